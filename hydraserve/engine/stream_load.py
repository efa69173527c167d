"""Streaming load: tensors from a progressive region, each yielded the moment its bytes are in.

The consumer (``StageRunner.load``) copies each tensor to its device parameter while the agent
keeps receiving later bytes, so loading hides behind the fetch.
"""
from __future__ import annotations

import json
from typing import Iterator

import torch

from hydraserve.engine.config import ModelConfig, ModelLoadError
from hydraserve.store.image import header_length, parse_header
from hydraserve.store.progressive import ProgressiveRegion

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
             "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def region_header(region: ProgressiveRegion, timeout: float = 120.0) -> tuple[int, dict, dict]:
    """Wait for the image header; (data start, tensor table, metadata)."""
    region.wait_for(8, timeout)
    region.wait_for(header_length(region.data), timeout)
    return parse_header(region.data)


def region_model_config(region: ProgressiveRegion, timeout: float = 120.0) -> ModelConfig:
    """The model's config, carried in the image metadata (config.json, generation_config.json)."""
    meta = region_header(region, timeout)[2]
    if "config.json" not in meta:
        raise ModelLoadError("the image carries no config.json")
    gen = json.loads(meta["generation_config.json"]) if "generation_config.json" in meta else {}
    return ModelConfig.from_hf(json.loads(meta["config.json"]), gen)


def iter_region(region: ProgressiveRegion, timeout: float = 120.0) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) in image order. Tensors are views of the shared memory: copy them
    before the region is closed."""
    base, table, _ = region_header(region, timeout)
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
