"""The Llama family: Llama-2/3 (GQA, rope scaling), Mistral (sliding window), Qwen2 (qkv bias,
tied embeddings). q/k/v and gate/up are packed into one matmul each."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hydraserve.engine.layers import (AttentionMetadata, Embedding, Linear, RMSNorm, Rotary,
                                      paged_attention)
from hydraserve.engine.models.base import StageModel


class LlamaLayer(nn.Module):
    def __init__(self, stage: "LlamaStage"):
        super().__init__()
        c, dt, dev = stage.cfg, stage.dtype, stage.device
        self.nh, self.nkv, self.hd = c.num_heads, c.num_kv_heads, c.head_dim
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps, dt, dev)
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = Linear(c.hidden_size, [self.nh * self.hd, self.nkv * self.hd,
                                                         self.nkv * self.hd], c.qkv_bias, dt, dev)
        self.self_attn.o_proj = Linear(self.nh * self.hd, c.hidden_size, c.o_bias, dt, dev)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps, dt, dev)
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = Linear(c.hidden_size, [c.intermediate_size] * 2, c.mlp_bias, dt, dev)
        self.mlp.down_proj = Linear(c.intermediate_size, c.hidden_size, c.mlp_bias, dt, dev)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata, rotary: Rotary,
                kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        t = h.shape[0]
        qkv = self.self_attn.qkv_proj(self.input_layernorm(h))
        q, k, v = qkv.split(self.self_attn.qkv_proj.shards, dim=-1)
        q = rotary(q.view(t, self.nh, self.hd), meta.positions)
        k = rotary(k.view(t, self.nkv, self.hd), meta.positions)
        o = paged_attention(q, k, v.view(t, self.nkv, self.hd), kv[0], kv[1], meta)
        h = h + self.self_attn.o_proj(o.reshape(t, self.nh * self.hd))
        gate, up = self.mlp.gate_up_proj(self.post_attention_layernorm(h)).chunk(2, dim=-1)
        return h + self.mlp.down_proj(F.silu(gate) * up)


class LlamaStage(StageModel):
    packed = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    embed_name = "model.embed_tokens.weight"

    def _build_skeleton(self) -> None:
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict()
        self.rotary = Rotary(self.cfg, self.max_len, self.device)

    def _build_embed(self) -> None:
        c = self.cfg
        self.model.embed_tokens = Embedding(c.vocab_size, c.hidden_size, self.dtype, self.device)

    def _build_head(self) -> None:
        c = self.cfg
        self.model.norm = RMSNorm(c.hidden_size, c.norm_eps, self.dtype, self.device)
        self.lm_head = Linear(c.hidden_size, c.vocab_size, False, self.dtype, self.device)

    def _build_layer(self, i: int) -> None:
        self.model.layers[str(i)] = LlamaLayer(self)

    def embed(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(token_ids)

    def run_layers(self, h, meta, kv, layers):
        for i in layers:
            h = self.model.layers[str(i)](h, meta, self.rotary, kv[i])
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(h))
