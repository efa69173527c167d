"""Host-to-device copies of a stage's weights while the fetch is still running.

On CUDA, a load from a progressive region (``StageRunner.load(weights, host=region.data)``):

1. registers the region's bytes as pinned host memory (``cudaHostRegister``), once per region;
2. makes a side stream wait on the current one (the parameters were just allocated there), then
   copies each tensor with ``non_blocking=True`` on that side stream as soon as its bytes are in,
   so the DMA overlaps the fetch; Linear packing runs on the same stream, after its copies;
3. synchronises the side stream once, at the end of the load (before the first step, and before
   the region's views can go);
4. unregisters the bytes, before the caller closes the shared-memory mapping.

If registration fails (an error code, or a call that raises), the copies run from
pageable memory (blocking), with a warning. On CPU
none of this runs: tensors are copied (or viewed) exactly as before.

The CUDA calls sit behind `CudaBackend`, so that tests can record them with a fake of the same
interface (tests/test_h2d.py; no GPU runs the tests).
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import threading
from contextlib import AbstractContextManager, contextmanager
from typing import Callable, Iterator

import torch

log = logging.getLogger("hydraserve.engine")

Copy = Callable[[torch.Tensor, torch.Tensor], None]  # (destination parameter, source tensor)
PAGE = mmap.PAGESIZE
REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context of the process


def plain_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


def buffer_address(buf: memoryview) -> int:
    """The address of ``buf``'s first byte. The ctypes view is dropped before returning, so it
    holds no export of the buffer (``SharedMemory.close`` would refuse while one is alive)."""
    view = (ctypes.c_char * buf.nbytes).from_buffer(buf)
    try:
        return ctypes.addressof(view)
    finally:
        del view


class CudaBackend:
    """The CUDA calls of the device path; the only real backend."""

    def __init__(self, device: torch.device):
        self.device = device

    def host_register(self, ptr: int, size: int) -> int:
        """``cudaHostRegister``; returns the cudaError code (0: success)."""
        return self._in_own_thread(
            lambda: int(torch.cuda.cudart().cudaHostRegister(ptr, size, REGISTER_PORTABLE)))

    def host_unregister(self, ptr: int) -> int:
        return self._in_own_thread(lambda: int(torch.cuda.cudart().cudaHostUnregister(ptr)))

    def _in_own_thread(self, call: Callable[[], int]) -> int:
        # A failed runtime call stays the calling thread's "last error", which the next kernel
        # launch check in that thread would raise; a thread of its own keeps it from the loader.
        out: list = []

        def run() -> None:
            try:
                torch.cuda.set_device(self.device)
                out.append(call())
            except Exception as e:  # noqa: BLE001 - raised again in the caller's thread
                out.append(e)

        t = threading.Thread(target=run, name="cuda-host-register")
        t.start()
        t.join()
        if isinstance(out[0], Exception):
            raise out[0]
        return out[0]

    def current_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def use_stream(self, stream: torch.cuda.Stream) -> AbstractContextManager:
        return torch.cuda.stream(stream)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool) -> None:
        dst.copy_(src, non_blocking=non_blocking)


class HostRegistration:
    """``buf`` registered as pinned host memory until `release`. ``ok`` is False if the
    registration failed (logged): copies from it must then block."""

    def __init__(self, buf: memoryview, backend: CudaBackend):
        # whole pages: a region's image starts 8 bytes into its mapping (after the counter),
        # and a mapping always spans whole pages, so rounding out stays inside it
        start = buffer_address(buf)
        self.ptr = start - start % PAGE
        self.size = -(-(start + buf.nbytes - self.ptr) // PAGE) * PAGE
        self.backend = backend
        try:
            err = backend.host_register(self.ptr, self.size)
        except Exception as e:  # noqa: BLE001 - e.g. a torch build without the binding
            err = f"{type(e).__name__}: {e}"
        self.ok = err == 0
        if not self.ok:
            log.warning("cudaHostRegister of %d bytes failed (%s): copying the weights from "
                        "pageable memory instead", self.size,
                        err if isinstance(err, str) else f"cudaError {err}")

    def release(self) -> None:
        if not self.ok:
            return
        self.ok = False
        err = self.backend.host_unregister(self.ptr)
        if err:
            log.warning("cudaHostUnregister failed (cudaError %d)", err)


@contextmanager
def device_copies(device: torch.device, host: memoryview | None = None,
                  backend: CudaBackend | None = None) -> Iterator[Copy]:
    """The copy function of one load into ``device``. ``host``: the buffer the source tensors
    view (a region's bytes), registered for the load's duration; None: tensors from elsewhere.
    ``backend``: the CUDA calls (default: the real ones on a CUDA device, none on CPU).

    On exit, also on an error, every copy has landed and ``host`` is unregistered."""
    if backend is None:
        if device.type != "cuda":
            yield plain_copy
            return
        backend = CudaBackend(device)
    pin = HostRegistration(host, backend) if host is not None else None
    try:
        side = backend.new_stream()
        side.wait_stream(backend.current_stream())
        non_blocking = pin is not None and pin.ok

        def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
            backend.copy(dst, src, non_blocking)

        try:
            with backend.use_stream(side):
                yield copy
        finally:
            side.synchronize()  # the one wait: copies from host must land before it goes
    finally:
        if pin is not None:
            pin.release()
