"""Streaming load: tensors from a progressive region, each yielded the moment its bytes are in.

The consumer (``StageRunner.load``) copies each tensor to its device parameter while the agent
keeps receiving later bytes, so loading hides behind the fetch.
"""
from __future__ import annotations

from typing import Iterator

import torch

from hydraserve.store.image import header_length, parse_header
from hydraserve.store.progressive import ProgressiveRegion

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
             "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def iter_region(region: ProgressiveRegion, timeout: float = 120.0) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) in image order. Tensors are views of the shared memory: copy them
    before the region is closed."""
    region.wait_for(8, timeout)
    region.wait_for(header_length(region.data), timeout)
    base, table = parse_header(region.data)
    entries = sorted(table.items(), key=lambda kv: kv[1]["data_offsets"][0])
    for name, meta in entries:
        start, end = meta["data_offsets"]
        region.wait_for(base + end, timeout)
        dtype = ST_DTYPES[meta["dtype"]]
        if end == start:
            t = torch.empty(meta["shape"], dtype=dtype)
        else:
            t = torch.frombuffer(region.data, dtype=dtype, count=(end - start) // dtype.itemsize,
                                 offset=base + start).view(meta["shape"])
        yield name, t
