"""Consolidation of a pipeline into standalone workers, the part of `Worker` that grows a stage
into the whole model (a mixin: it shares the worker's threads, sockets and engine state).

An all-card stage fetches the ``rest`` image and grows its model and KV cache while it still
serves its slice (``consolidate``). The head then drains its in-flight pipeline batches, pulls
the KV blocks of its running requests for the layers it lacked (a ``kv_pull`` message goes round
the ring, each stage adding its layers: ``_pull_kv`` / ``_install_kv``), switches to the whole
model and sends ``release``; the other stages leave the ring on it (``_on_release``): part-card
ones exit, all-card ones become standalone workers.
"""
from __future__ import annotations

import logging
import threading

import torch

from hydraserve.engine.scheduler import Scheduler
from hydraserve.engine.stream_load import iter_region
from hydraserve.store.image import ImageKind, ImageSpec
from hydraserve.store.layout import StageSpec
from hydraserve.store.progressive import ProgressiveRegion

log = logging.getLogger("hydraserve.worker")


def _slots(blocks: list[int], block_size: int, device) -> torch.Tensor:
    """The KV cache rows of ``blocks``."""
    slots = (torch.tensor(blocks, dtype=torch.long)[:, None] * block_size
             + torch.arange(block_size)).flatten()
    return slots.to(device)


class Consolidation:
    """Mixed into `Worker`; every attribute it uses is the worker's."""

    def _on_release(self) -> None:
        """The head has the whole model: leave the ring."""
        self._close_ring()
        self.released.set()
        if not self.cfg.all_card:
            log.info("worker %s: part-card stage released; exiting", self.cfg.worker_id)
            self.stop()
        elif self.rest_loaded.is_set():
            self._become_standalone()

    def _become_standalone(self) -> None:
        with self._standalone_lock:  # reached from the stage thread or the consolidate thread
            if self.standalone:
                return
            self.standalone = True
        self.runner.activate(self.runner.spec)
        self.scheduler = Scheduler(self.cfg.engine, self.runner.kv.num_blocks,
                                   self.runner.model.max_len, self.runner.model_cfg.eos_token_ids)
        self.timeline.mark("consolidated")
        self._start_engine()

    def _kv_tensors(self, blocks: list[int], layers: range) -> dict[str, torch.Tensor]:
        slots = _slots(blocks, self.runner.kv.block_size, self.runner.device)
        out = {}
        for layer in layers:
            k, v = self.runner.kv.layers[layer]
            out[f"k.{layer}"], out[f"v.{layer}"] = k[slots], v[slots]
        return out

    def _pull_kv(self) -> None:
        blocks = sorted({b for s in self.scheduler.running for b in s.block_ids})
        self.kv_pending = True
        log.info("worker %s: migrating %d KV block(s)", self.cfg.worker_id, len(blocks))
        try:
            self._send({"type": "kv_pull", "blocks": blocks})
        except (ConnectionError, OSError) as e:
            self._fail(f"pipeline connection lost: {e}")
            self._fail_requests(self.error)

    def _install_kv(self, header: dict, tensors: dict[str, torch.Tensor]) -> None:
        slots = _slots(header["blocks"], self.runner.kv.block_size, self.runner.device)
        own = self.runner.active.layers
        for name, t in tensors.items():
            layer = int(name.split(".")[1])
            if layer not in own:
                self.runner.kv.layers[layer][0 if name[0] == "k" else 1][slots] = \
                    t.to(self.runner.device, self.runner.dtype)
        self.runner.activate(self.runner.spec)
        self.standalone = True
        self.switching = self.kv_pending = False
        try:
            self._send({"type": "release"})
        except (ConnectionError, OSError):
            pass  # the others exit on their own when the ring breaks
        self.timeline.mark("consolidated")
        log.info("worker %s: consolidated; serving the whole model alone", self.cfg.worker_id)

    def consolidate(self) -> None:
        if not self.cfg.all_card or self.cfg.p == 1:
            raise ValueError("only an all-card stage of a pipeline can consolidate")
        if self.timeline.has("consolidation_started"):
            return
        self.timeline.mark("consolidation_started")
        self.rest_thread = threading.Thread(target=self._consolidate, name="consolidate",
                                            daemon=True)
        self.rest_thread.start()

    def _consolidate(self) -> None:
        try:
            region = ProgressiveRegion.attach(
                self.cfg.agent, ImageSpec(self.cfg.model, ImageKind.REST, self.cfg.p, self.cfg.rank),
                token=self.cfg.token)
            self.rest_region = region
            if self.stopping.is_set():
                region.cancel()  # stop() ran while we attached
            self.weights_ready.wait()
            if self.runner is None:
                raise RuntimeError(self.error or "the stage did not load")
            whole = StageSpec(0, 1, 0, self.runner.model_cfg.num_layers)
            self.runner.extend(whole)
            self.runner.load(iter_region(region), region.data)  # pinned while it loads, on CUDA
            self.timeline.mark("rest_loaded")
        except Exception as e:  # noqa: BLE001
            if self.stopping.is_set():
                log.info("worker %s: consolidation abandoned (stopping)", self.cfg.worker_id)
            else:
                log.exception("worker %s: consolidation failed", self.cfg.worker_id)
                self.error = f"consolidation failed: {e}"
                self.timeline.notify()  # a waiter for "consolidated" learns of it
            return
        finally:
            # only this thread closes the region it reads (see stop)
            region, self.rest_region = self.rest_region, None
            if region is not None:
                region.close()
        self.rest_loaded.set()
        if self.is_head:
            self.events.put(("rest_loaded",))
        elif self.released.is_set():
            self._become_standalone()
