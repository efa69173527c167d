"""Building blocks shared by the model families: linear, norms, rotary embedding, paged attention.

Parameters are allocated with ``torch.empty`` (no random init: every one is overwritten by the
loader, which checks that none is left unloaded).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hydraserve.engine.config import ModelConfig, ModelLoadError


def _param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T + b. ``shards`` lists the output sizes of checkpoint tensors packed into it
    (q/k/v into qkv_proj, gate/up into gate_up_proj); the loader copies each into its rows."""

    def __init__(self, in_features: int, shards: list[int] | int, bias: bool,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.shards = [shards] if isinstance(shards, int) else list(shards)
        self.weight = _param(sum(self.shards), in_features, dtype=dtype, device=device)
        self.bias = _param(sum(self.shards), dtype=dtype, device=device) if bias else None
        self._packed: torch.Tensor | None = None

    def pack(self, keep_dense: bool) -> None:
        """Float32 on CPU: pre-pack the loaded weight for oneDNN, whose small-batch GEMM is 2-3x
        faster here than the default path. The dense copy is dropped unless another module
        shares it (a tied embedding)."""
        if self._packed is not None or not can_pack(self.weight):
            return
        bound_onednn_caches()
        self._packed = self.weight.data.to_mkldnn()
        if not keep_dense:
            self.weight.data = torch.empty(0, dtype=self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


# oneDNN's primitive cache and ideep's own (PyTorch's CPU build) keep, for each input shape a
# packed Linear has seen, a compiled kernel and its buffers: 0.6-1.8 MB an entry measured here
# (benchmarks/soak.py; a prefill of every new length is a new shape), 1,024 entries each by
# default -- a warm worker serving varied prompt lengths grew by ~2 MB a round of 8 requests and
# would have kept growing to gigabytes. 64 entries each hold a decode batch's shapes (one per
# distinct Linear) for a dozen batch sizes; a prefill of a length not cached pays the kernel's
# creation once per distinct Linear (~1-6 ms each). An operator's own setting is kept.
ONEDNN_CACHE_ENTRIES = 64


def bound_onednn_caches() -> None:
    """Bound both caches to `ONEDNN_CACHE_ENTRIES` unless the environment says otherwise; read
    at the process's first oneDNN primitive, so it is called before the first packing."""
    for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(var, str(ONEDNN_CACHE_ENTRIES))


def can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available())


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps = eps
        self.weight = _param(n, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in float32 like the reference, then cast back
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, n: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps = eps
        self.weight = _param(n, dtype=dtype, device=device)
        self.bias = _param(n, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies for the config's rope variant (default, linear, llama3)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if not scaling:
        return inv
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ModelLoadError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")


class Rotary(nn.Module):
    """Rotary position embedding in the rotate-half convention, cos/sin tables precomputed."""

    def __init__(self, cfg: ModelConfig, max_len: int, device: torch.device):
        super().__init__()
        inv = rope_inv_freq(cfg)
        freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos().to(device), persistent=False)
        self.register_buffer("sin", emb.sin().to(device), persistent=False)
        self._positions: torch.Tensor | None = None
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]. Every layer of a step passes the same ``positions`` tensor,
        so its cos/sin rows are gathered once per step."""
        if positions is not self._positions:
            self._positions = positions
            self._cos_sin = (self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))
        cos, sin = self._cos_sin
        xf = x.float()
        half = xf.shape[-1] // 2
        rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)


@dataclass
class PrefillSlice:
    """Rows [start, end) of the step's tokens belong to one sequence with more than one new token.
    ``fresh``: its context is exactly these tokens (plain causal attention on the new k/v)."""

    start: int
    end: int
    fresh: bool
    ctx_slots: torch.Tensor | None = None  # [L] cache slots of the whole context
    mask: torch.Tensor | None = None  # [Q, L] bool


@dataclass
class AttentionMetadata:
    """Per-step tensors every attention layer of a stage uses (built once per step)."""

    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] where each new token's k/v is written
    decode_rows: torch.Tensor | None  # [Bd] rows of single-token sequences
    decode_blocks: torch.Tensor | None  # [Bd, nblk] KV blocks of their contexts (padded)
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, nblk * block_size]
    prefills: list[PrefillSlice]
    last_rows: torch.Tensor  # [B] row of each sequence's last token
    block_size: int = 16
    window: int | None = None


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KV, D]; caches: [slots, KV, D]. Returns [T, H, D].

    New k/v are written into the cache first; single-token sequences attend over their cached
    context in one padded batch, multi-token ones one by one (causal)."""
    k_cache[meta.slot_mapping] = k
    v_cache[meta.slot_mapping] = v
    gqa = q.shape[1] != k.shape[1]
    decode_only = not meta.prefills
    out = None if decode_only else torch.empty_like(q)
    if meta.decode_rows is not None:
        qd = (q if decode_only else q[meta.decode_rows]).unsqueeze(2)  # [B, H, 1, D]
        # index_select copies whole blocks (block_size rows at once): ~5x faster on CPU than
        # advanced indexing, which was half of a decode step at batch 16
        paged = (-1, meta.block_size) + k_cache.shape[1:]
        blocks = meta.decode_blocks.flatten()
        gathered = (meta.decode_blocks.shape[0], -1) + k_cache.shape[1:]
        kd = k_cache.view(paged).index_select(0, blocks).view(gathered).transpose(1, 2)
        vd = v_cache.view(paged).index_select(0, blocks).view(gathered).transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, enable_gqa=gqa)
        if decode_only:
            return o.squeeze(2)
        out[meta.decode_rows] = o.squeeze(2)
    for s in meta.prefills:
        qs = q[s.start:s.end].transpose(0, 1)  # [H, Q, D]
        if s.fresh:
            ks, vs = k[s.start:s.end], v[s.start:s.end]
        else:
            ks, vs = k_cache.index_select(0, s.ctx_slots), v_cache.index_select(0, s.ctx_slots)
        o = F.scaled_dot_product_attention(qs, ks.transpose(0, 1), vs.transpose(0, 1),
                                           attn_mask=s.mask, is_causal=s.mask is None,
                                           enable_gqa=gqa)
        out[s.start:s.end] = o.transpose(0, 1)
    return out


class Embedding(nn.Module):
    def __init__(self, num: int, dim: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = _param(num, dim, dtype=dtype, device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
