"""OPT: learned positions (offset 2), LayerNorm, ReLU MLP, biases, tied embeddings, optional
project_in/out when the embedding width differs from the hidden size."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hydraserve.engine.layers import AttentionMetadata, Embedding, LayerNorm, Linear, paged_attention
from hydraserve.engine.models.base import StageModel

POSITION_OFFSET = 2  # OPT's learned position table starts at row 2


class OPTLayer(nn.Module):
    def __init__(self, stage: "OPTStage"):
        super().__init__()
        c, dt, dev = stage.cfg, stage.dtype, stage.device
        h = c.hidden_size
        self.nh, self.hd, self.pre_norm = c.num_heads, c.head_dim, c.do_layer_norm_before
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = Linear(h, [h, h, h], c.qkv_bias, dt, dev)
        self.self_attn.out_proj = Linear(h, h, c.o_bias, dt, dev)
        self.self_attn_layer_norm = LayerNorm(h, c.norm_eps, dt, dev)
        self.fc1 = Linear(h, c.intermediate_size, c.mlp_bias, dt, dev)
        self.fc2 = Linear(c.intermediate_size, h, c.mlp_bias, dt, dev)
        self.final_layer_norm = LayerNorm(h, c.norm_eps, dt, dev)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata,
                kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        t = h.shape[0]
        x = self.self_attn_layer_norm(h) if self.pre_norm else h
        q, k, v = self.self_attn.qkv_proj(x).view(t, 3, self.nh, self.hd).unbind(1)
        o = paged_attention(q, k, v, kv[0], kv[1], meta)
        h = h + self.self_attn.out_proj(o.reshape(t, self.nh * self.hd))
        if not self.pre_norm:
            h = self.self_attn_layer_norm(h)
        x = self.final_layer_norm(h) if self.pre_norm else h
        h = h + self.fc2(F.relu(self.fc1(x)))
        return h if self.pre_norm else self.final_layer_norm(h)


class OPTStage(StageModel):
    packed = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}
    embed_name = "model.decoder.embed_tokens.weight"

    def _build_skeleton(self) -> None:
        self.model = nn.Module()
        self.model.decoder = nn.Module()
        self.model.decoder.layers = nn.ModuleDict()

    @property
    def _proj(self) -> bool:
        return self.cfg.word_embed_proj_dim != self.cfg.hidden_size

    def _build_embed(self) -> None:
        c, d = self.cfg, self.model.decoder
        d.embed_tokens = Embedding(c.vocab_size, c.word_embed_proj_dim, self.dtype, self.device)
        d.embed_positions = Embedding(c.max_position + POSITION_OFFSET, c.hidden_size,
                                      self.dtype, self.device)
        if self._proj:
            d.project_in = Linear(c.word_embed_proj_dim, c.hidden_size, False, self.dtype, self.device)

    def _build_head(self) -> None:
        c, d = self.cfg, self.model.decoder
        if c.do_layer_norm_before:
            d.final_layer_norm = LayerNorm(c.hidden_size, c.norm_eps, self.dtype, self.device)
        if self._proj:
            d.project_out = Linear(c.hidden_size, c.word_embed_proj_dim, False, self.dtype, self.device)
        self.lm_head = Linear(c.word_embed_proj_dim, c.vocab_size, False, self.dtype, self.device)

    def _build_layer(self, i: int) -> None:
        self.model.decoder.layers[str(i)] = OPTLayer(self)

    def embed(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        d = self.model.decoder
        x = d.embed_tokens(token_ids)
        if self._proj:
            x = d.project_in(x)
        return x + d.embed_positions(positions + POSITION_OFFSET)

    def run_layers(self, h, meta, kv, layers):
        for i in layers:
            h = self.model.decoder.layers[str(i)](h, meta, kv[i])
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        d = self.model.decoder
        if self.cfg.do_layer_norm_before:
            h = d.final_layer_norm(h)
        if self._proj:
            h = d.project_out(h)
        return self.lm_head(h)
