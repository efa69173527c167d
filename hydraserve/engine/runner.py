"""A stage runner: one stage's model slice and KV cache, executing step batches."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import torch

from hydraserve.engine.batch import StepBatch, attention_metadata
from hydraserve.engine.config import EngineConfig, ModelConfig, ModelLoadError
from hydraserve.engine.h2d import CudaBackend, device_copies
from hydraserve.engine.kv_cache import KVCache
from hydraserve.engine.models.registry import STAGE_CLASSES
from hydraserve.engine.sampler import StepLogits, step_logits
from hydraserve.store.checkpoint import TensorInfo, scan_checkpoint
from hydraserve.store.layout import StageSpec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def torch_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device cuda was requested but torch sees no CUDA GPU")
    return torch.device(name)


def iter_checkpoint(model_dir: str | Path, names: Iterable[str],
                    tensors: Mapping[str, TensorInfo] | None = None
                    ) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for ``names`` from a checkpoint directory, one file at a time.
    ``tensors``: the directory's table if the caller has scanned it already."""
    from safetensors import safe_open

    wanted = set(names)
    by_file: dict[Path, list[str]] = {}
    for name, info in (tensors or scan_checkpoint(Path(model_dir))).items():
        if name in wanted:
            by_file.setdefault(info.file, []).append(name)
    for path, file_names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in file_names:
                yield name, f.get_tensor(name)


class StageRunner:
    def __init__(self, model_cfg: ModelConfig, spec: StageSpec, cfg: EngineConfig,
                 num_blocks: int, max_model_len: int, h2d: CudaBackend | None = None):
        """``h2d``: the CUDA calls of loads (default: the real ones on CUDA; see `h2d`)."""
        self.model_cfg, self.cfg = model_cfg, cfg
        self.h2d = h2d
        self.dtype, self.device = torch_dtype(cfg.dtype), torch_device(cfg.device)
        self.model = STAGE_CLASSES[model_cfg.arch](model_cfg, spec, self.dtype, self.device,
                                                   max_model_len)
        self.kv = KVCache(model_cfg, num_blocks, cfg.block_size, self.dtype, self.device)
        self.kv.add_layers(spec.layers)
        self.loaded: set[str] = set()  # checkpoint tensors loaded so far
        # what execute() runs; differs from what the model holds while a consolidating stage
        # has grown (extend) but still serves its pipeline slice (until activate)
        self.active = spec

    @property
    def spec(self) -> StageSpec:
        """Everything this runner holds (or is growing to hold)."""
        return self.model.spec

    def extend(self, spec: StageSpec) -> list[int]:
        """Grow to hold ``spec`` (modules and KV layers); load the new tensors with ``load``.
        execute() keeps running the active slice until ``activate``."""
        added = self.model.extend(spec)
        self.kv.add_layers(spec.layers)
        return added

    def activate(self, spec: StageSpec) -> None:
        if not (spec.is_first <= self.spec.is_first and spec.is_last <= self.spec.is_last
                and spec.layer_start >= self.spec.layer_start
                and spec.layer_end <= self.spec.layer_end):
            raise ValueError(f"cannot activate {spec}: this stage holds {self.spec}")
        self.active = spec

    def load(self, weights: Iterable[tuple[str, torch.Tensor]],
             host: memoryview | None = None) -> set[str]:
        """Load tensors and check the stage is complete; returns the tensor names loaded.
        ``host``: the buffer the tensors view (a progressive region's bytes); on CUDA it is
        pinned for the load, and the copies overlap the arrival of later bytes. When this
        returns, every copy has landed: the buffer may be closed."""
        with device_copies(self.device, host, self.h2d) as copy:
            loaded = self.model.load_weights(weights, copy)
            self.loaded |= loaded
            missing = self.model.expected_tensors() - self.loaded
            if missing:
                raise ModelLoadError(
                    f"stage {self.spec.rank}/{self.spec.p} is missing tensors: "
                    f"{', '.join(sorted(missing)[:5])}{' ...' if len(missing) > 5 else ''}")
            self.model.pack_weights()  # on the copies' stream, after them
        return loaded

    @torch.inference_mode()
    def execute(self, batch: StepBatch, hidden: torch.Tensor | None) -> torch.Tensor | StepLogits:
        """Run this stage: token ids (first stage) or the previous stage's hidden states in;
        hidden states out, or on the last stage a :class:`StepLogits` (each sequence's
        last-token logits [B, V], and the prompt logprobs asked for)."""
        meta = attention_metadata(batch, self.cfg.block_size, self.model_cfg.sliding_window,
                                  self.device)
        active = self.active
        if active.is_first:
            ids = torch.tensor(batch.token_ids, dtype=torch.long).to(self.device)
            hidden = self.model.embed(ids, meta.positions)
        elif hidden is None:
            raise ValueError(f"stage {active.rank} needs the previous stage's hidden states")
        hidden = self.model.run_layers(hidden.to(self.device, self.dtype), meta, self.kv.layers,
                                       active.layers)
        if active.is_last:
            return step_logits(batch, hidden, meta.last_rows, self.model.logits)
        return hidden
