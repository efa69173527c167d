"""What every model family's stage module shares: global parameter names, loading, growing.

A stage module keeps Hugging Face's parameter names (``model.layers.7.mlp...``) whatever layers it
holds, so a stage loads a plain checkpoint or a stage image with one code path, and a stage that
later absorbs more layers (consolidation) just builds the missing modules and loads their tensors.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from hydraserve.engine.config import ModelConfig, ModelLoadError
from hydraserve.engine.h2d import Copy, plain_copy
from hydraserve.engine.layers import AttentionMetadata, Linear
from hydraserve.store.layout import StageSpec


class StageModel(nn.Module):
    """One pipeline stage of a causal LM. Subclasses build modules in ``_build_*``."""

    # checkpoint sub-name -> (packed parameter sub-name, shard index), e.g. q_proj -> qkv_proj[0]
    packed: dict[str, tuple[str, int]] = {}
    # the checkpoint name of the input embedding (the lm_head weight when embeddings are tied)
    embed_name: str = ""
    # prefix some hubs' checkpoints omit (OPT files say "decoder." for "model.decoder.")
    optional_prefix: str = "model."

    def __init__(self, cfg: ModelConfig, spec: StageSpec, dtype: torch.dtype, device: torch.device,
                 max_len: int):
        super().__init__()
        self.cfg, self.dtype, self.device, self.max_len = cfg, dtype, device, max_len
        self.spec = StageSpec(spec.rank, spec.p, spec.layer_start, spec.layer_start)
        self.has_embed = self.has_head = False
        # tied embeddings, but the checkpoint stores the head's copy too (some do): a stage's
        # head is then complete with lm_head.weight, as the layout gives it
        self.head_in_checkpoint = False
        self._build_skeleton()
        self.extend(spec)

    # -- structure ---------------------------------------------------------------------------
    def extend(self, spec: StageSpec) -> list[int]:
        """Grow to hold everything ``spec`` holds (it must contain the current range).
        Returns the decoder layer ids that were added (their parameters are still empty)."""
        cur = self.spec
        if cur.layer_start != cur.layer_end and not (
                spec.layer_start <= cur.layer_start and cur.layer_end <= spec.layer_end):
            raise ValueError(f"stage {spec} does not contain the current layers {cur.layers}")
        head_was_here = self.has_head
        if spec.is_first and not self.has_embed:
            self._build_embed()
            self.has_embed = True
        if spec.is_last and not self.has_head:
            self._build_head()
            self.has_head = True
        if self.cfg.tie_word_embeddings and self.has_embed and self.has_head:
            # one matrix serves both ends; the one already loaded is kept
            embed = self.get_submodule(self.embed_name.rsplit(".", 1)[0])
            if head_was_here:
                embed.weight = self.lm_head.weight
            else:
                self.lm_head.weight = embed.weight
        added = [i for i in spec.layers if i not in cur.layers]
        for i in added:
            self._build_layer(i)
        self.spec = spec
        return added

    def _build_skeleton(self) -> None:
        """Containers that hold the optional parts (so parameter names stay global)."""
        raise NotImplementedError

    def _build_embed(self) -> None:
        raise NotImplementedError

    def _build_head(self) -> None:
        raise NotImplementedError

    def _build_layer(self, i: int) -> None:
        raise NotImplementedError

    # -- forward -----------------------------------------------------------------------------
    def embed(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_layers(self, h: torch.Tensor, meta: AttentionMetadata,
                   kv: dict[int, tuple[torch.Tensor, torch.Tensor]], layers: range) -> torch.Tensor:
        """Run decoder ``layers`` (a sub-range of what this stage holds)."""
        raise NotImplementedError

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- loading -----------------------------------------------------------------------------
    def _targets(self, name: str, params: dict[str, nn.Parameter]) -> list[tuple[str, int | None]]:
        if name == self.embed_name and self.cfg.tie_word_embeddings and "lm_head.weight" in params:
            out = [("lm_head.weight", None)]
            if name in params and params[name] is not params["lm_head.weight"]:
                out.append((name, None))
            return out
        if name in params:
            return [(name, None)]
        for sub, (packed, shard) in self.packed.items():
            if f".{sub}." in name:
                cand = name.replace(f".{sub}.", f".{packed}.")
                if cand in params:
                    return [(cand, shard)]
        return []

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     copy: Copy = plain_copy) -> set[str]:
        """Copy checkpoint tensors into this stage's parameters; return the names used
        (canonical: with the ``optional_prefix`` some files omit). ``copy(dst, src)``: how a
        tensor reaches its parameter (on CUDA, `hydraserve.engine.h2d` gives an asynchronous one).

        Tensors this stage does not hold are skipped (not returned). Raises if a tensor's shape
        does not fit its parameter."""
        params = dict(self.named_parameters(remove_duplicate=False))
        shared = self._shared_param_ids()
        shards_done: dict[str, set[int]] = {}
        loaded: set[str] = set()
        for name, tensor in weights:
            if name not in params and not name.startswith(self.optional_prefix) and \
                    any(p.startswith(self.optional_prefix + name.split(".")[0]) for p in params):
                name = self.optional_prefix + name
            targets = self._targets(name, params)
            for pname, shard in targets:
                dst = params[pname].data
                if shard is not None:
                    mod = self.get_submodule(pname.rsplit(".", 1)[0])
                    assert isinstance(mod, Linear)
                    dst = dst.narrow(0, sum(mod.shards[:shard]), mod.shards[shard])
                if dst.shape != tensor.shape:
                    raise ModelLoadError(f"tensor {name} has shape {tuple(tensor.shape)}, "
                                         f"parameter {pname} expects {tuple(dst.shape)}")
                copy(dst, tensor)
                mod = self.get_submodule(pname.rsplit(".", 1)[0])
                if isinstance(mod, Linear) and pname.endswith(".weight"):
                    # pack as soon as the whole weight is in, while later tensors still arrive
                    done = shards_done.setdefault(pname, set())
                    done.add(shard or 0)
                    if len(done) == len(mod.shards):
                        mod.pack(keep_dense=id(mod.weight) in shared)
            if targets:
                loaded.add(name)
                self.head_in_checkpoint |= name == "lm_head.weight"
        return loaded

    def _shared_param_ids(self) -> set[int]:
        """Weights that must stay dense: those a non-Linear module uses too, and with tied
        embeddings the head's (it becomes the embedding if this stage grows to the first one)."""
        keep = {id(p) for n, p in self.named_parameters(remove_duplicate=False)
                if not isinstance(self.get_submodule(n.rsplit(".", 1)[0]), Linear)}
        if self.cfg.tie_word_embeddings and self.has_head:
            keep.add(id(self.lm_head.weight))
        return keep

    def pack_weights(self) -> None:
        """Called once all tensors are loaded: lay weights out for fast inference."""
        shared = self._shared_param_ids()
        for mod in self.modules():
            if isinstance(mod, Linear):
                mod.pack(keep_dense=id(mod.weight) in shared)

    def expected_tensors(self) -> set[str]:
        """Checkpoint tensor names (canonical form) this stage must load to be complete."""
        names = set()
        for pname, param in self.named_parameters(remove_duplicate=False):
            mod = self.get_submodule(pname.rsplit(".", 1)[0])
            if pname == "lm_head.weight" and self.cfg.tie_word_embeddings:
                names.add(pname if self.head_in_checkpoint else self.embed_name)
                continue
            packed = {v: k for k, v in self.packed.items()}
            leaf = pname.split(".")[-2]
            if isinstance(mod, Linear) and len(mod.shards) > 1:
                for shard in range(len(mod.shards)):
                    names.add(pname.replace(f".{leaf}.", f".{packed[(leaf, shard)]}."))
            else:
                names.add(pname)
        return names
