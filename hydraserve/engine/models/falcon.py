"""Falcon: one fused query_key_value matmul, rotary positions, LayerNorm, GELU MLP, tied
embeddings. Falcon-7B runs attention and MLP in parallel from one norm with a single kv head;
Falcon-40B-style models group the kv heads and give attention and MLP a norm each; sequential
attention (two norms, two residual adds) is supported too."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hydraserve.engine.layers import (AttentionMetadata, Embedding, LayerNorm, Linear, Rotary,
                                      paged_attention)
from hydraserve.engine.models.base import StageModel


class FalconLayer(nn.Module):
    def __init__(self, stage: "FalconStage"):
        super().__init__()
        c, dt, dev = stage.cfg, stage.dtype, stage.device
        h = c.hidden_size
        self.nh, self.nkv, self.hd = c.num_heads, c.num_kv_heads, c.head_dim
        self.parallel = c.parallel_attn
        self.split_norms = c.parallel_attn and c.parallel_norms == 2
        self.self_attention = nn.Module()
        # rows per kv group: its nh/nkv query heads, then its key head, then its value head
        self.self_attention.query_key_value = Linear(h, (self.nh + 2 * self.nkv) * self.hd,
                                                     c.qkv_bias, dt, dev)
        self.self_attention.dense = Linear(self.nh * self.hd, h, c.o_bias, dt, dev)
        self.mlp = nn.Module()
        self.mlp.dense_h_to_4h = Linear(h, c.intermediate_size, c.mlp_bias, dt, dev)
        self.mlp.dense_4h_to_h = Linear(c.intermediate_size, h, c.mlp_bias, dt, dev)
        if self.split_norms:
            self.ln_attn = LayerNorm(h, c.norm_eps, dt, dev)
            self.ln_mlp = LayerNorm(h, c.norm_eps, dt, dev)
        else:
            self.input_layernorm = LayerNorm(h, c.norm_eps, dt, dev)
            if not c.parallel_attn:
                self.post_attention_layernorm = LayerNorm(h, c.norm_eps, dt, dev)

    def _attention(self, x: torch.Tensor, meta: AttentionMetadata, rotary: Rotary,
                   kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        t, group = x.shape[0], self.nh // self.nkv
        qkv = self.self_attention.query_key_value(x).view(t, self.nkv, group + 2, self.hd)
        q = rotary(qkv[:, :, :group].reshape(t, self.nh, self.hd), meta.positions)
        k = rotary(qkv[:, :, group], meta.positions)
        o = paged_attention(q, k, qkv[:, :, group + 1], kv[0], kv[1], meta)
        return self.self_attention.dense(o.reshape(t, self.nh * self.hd))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.dense_4h_to_h(F.gelu(self.mlp.dense_h_to_4h(x)))

    def forward(self, h: torch.Tensor, meta: AttentionMetadata, rotary: Rotary,
                kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if not self.parallel:
            h = h + self._attention(self.input_layernorm(h), meta, rotary, kv)
            return h + self._mlp(self.post_attention_layernorm(h))
        if self.split_norms:
            attn = self._attention(self.ln_attn(h), meta, rotary, kv)
            return h + (self._mlp(self.ln_mlp(h)) + attn)
        x = self.input_layernorm(h)
        attn = self._attention(x, meta, rotary, kv)
        return h + (self._mlp(x) + attn)  # the reference's order of additions


class FalconStage(StageModel):
    embed_name = "transformer.word_embeddings.weight"
    optional_prefix = "transformer."

    def _build_skeleton(self) -> None:
        self.transformer = nn.Module()
        self.transformer.h = nn.ModuleDict()
        self.rotary = Rotary(self.cfg, self.max_len, self.device)

    def _build_embed(self) -> None:
        c = self.cfg
        self.transformer.word_embeddings = Embedding(c.vocab_size, c.hidden_size, self.dtype,
                                                     self.device)

    def _build_head(self) -> None:
        c = self.cfg
        self.transformer.ln_f = LayerNorm(c.hidden_size, c.norm_eps, self.dtype, self.device)
        self.lm_head = Linear(c.hidden_size, c.vocab_size, False, self.dtype, self.device)

    def _build_layer(self, i: int) -> None:
        self.transformer.h[str(i)] = FalconLayer(self)

    def embed(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer.word_embeddings(token_ids)

    def run_layers(self, h, meta, kv, layers):
        for i in layers:
            h = self.transformer.h[str(i)](h, meta, self.rotary, kv[i])
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.transformer.ln_f(h))
