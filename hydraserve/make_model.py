"""``hydraserve make-model``: write a small Hugging Face-format model with random weights.

Tests and demos cannot download models, so we make them: config.json, safetensors weights
(sharded with an index above ``shard_mb``), a byte-level BPE tokenizer trained here on the Python
standard library's own source text, a chat template and generation_config.json. transformers and
vLLM load the result like any hub checkpoint.

Weights are scaled so that greedy decoding is not degenerate: projections have std 1/sqrt(fan_in)
so every layer changes the residual stream, and the output head gives logits of std ~4, so the
argmax is well separated from the runner-up (robust to float rounding across implementations).
"""
from __future__ import annotations

import json
import math
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

ARCHS = ("llama", "qwen2", "mistral", "opt", "falcon")


@dataclass
class ModelSpec:
    """Shape of a model to make; None fields get per-architecture defaults."""

    arch: str = "llama"
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int | None = None
    intermediate: int | None = None
    vocab: int = 2048
    dtype: str = "float32"
    seed: int = 0
    shard_mb: int = 256
    max_position: int = 4096
    extra_config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} is not divisible by {self.heads} heads")
        if self.kv_heads is None:
            self.kv_heads = 1 if self.arch == "falcon" else \
                self.heads if self.arch == "opt" or self.heads % 2 else self.heads // 2
        if self.arch == "opt" and self.kv_heads != self.heads:
            raise ValueError("OPT has no grouped-query attention: --kv-heads must equal --heads")
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.heads} heads are not divisible into {self.kv_heads} kv heads")
        if self.intermediate is None:
            self.intermediate = 4 * self.hidden if self.arch in ("opt", "falcon") else \
                64 * math.ceil(8 * self.hidden / 3 / 64)
        if self.vocab < 300:
            raise ValueError("vocab must be >= 300 (256 byte tokens + specials + merges)")


def _hf_config(s: ModelSpec, ids: dict[str, int]) -> dict:
    common = {"vocab_size": s.vocab, "hidden_size": s.hidden, "num_hidden_layers": s.layers,
              "num_attention_heads": s.heads, "torch_dtype": s.dtype,
              "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
              "pad_token_id": ids["<|endoftext|>"], "use_cache": True}
    if s.arch == "opt":
        cfg = {"architectures": ["OPTForCausalLM"], "model_type": "opt", "ffn_dim": s.intermediate,
               "max_position_embeddings": s.max_position, "do_layer_norm_before": True,
               "word_embed_proj_dim": s.hidden, "activation_function": "relu", "enable_bias": True,
               "layer_norm_elementwise_affine": True, "tie_word_embeddings": True}
    elif s.arch == "falcon":
        cfg = {"architectures": ["FalconForCausalLM"], "model_type": "falcon",
               "ffn_hidden_size": s.intermediate, "max_position_embeddings": s.max_position,
               "layer_norm_epsilon": 1e-5, "activation": "gelu", "alibi": False, "bias": False,
               "rope_theta": 10000.0, "tie_word_embeddings": True, "parallel_attn": True,
               **_falcon_attention(s)}
    else:
        name = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[s.arch]
        cfg = {"architectures": [f"{name}ForCausalLM"], "model_type": s.arch,
               "intermediate_size": s.intermediate, "num_key_value_heads": s.kv_heads,
               "head_dim": s.hidden // s.heads, "max_position_embeddings": s.max_position,
               "rms_norm_eps": 1e-5, "hidden_act": "silu",
               "rope_theta": 1000000.0 if s.arch == "qwen2" else 10000.0,
               "tie_word_embeddings": s.arch == "qwen2", "attention_bias": False}
        if s.arch == "qwen2":
            cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=s.layers)
        if s.arch == "mistral":
            cfg.update(sliding_window=None)
    return {**cfg, **common, **s.extra_config}


def _falcon_attention(s: ModelSpec) -> dict:
    """Falcon's kv heads: one is Falcon-7B's multi-query attention, as many as the heads its
    older per-head layout, any other count the grouped "new decoder architecture" (Falcon-40B)."""
    if s.kv_heads == 1:
        return {"multi_query": True, "new_decoder_architecture": False}
    if s.kv_heads == s.heads:
        return {"multi_query": False, "new_decoder_architecture": False}
    return {"multi_query": False, "new_decoder_architecture": True, "num_kv_heads": s.kv_heads}


def _falcon_norms(s: ModelSpec) -> tuple[str, ...]:
    """The LayerNorms of a Falcon decoder layer, as transformers' FalconDecoderLayer has them."""
    cfg = {"parallel_attn": True, **_falcon_attention(s), **s.extra_config}
    if not cfg["parallel_attn"]:
        return ("input_layernorm", "post_attention_layernorm")
    if cfg["new_decoder_architecture"] and cfg.get("num_ln_in_parallel_attn", 2) == 2:
        return ("ln_attn", "ln_mlp")
    return ("input_layernorm",)


def _weights(s: ModelSpec):
    """Yield (name, tensor) in checkpoint order."""
    import torch

    g = torch.Generator().manual_seed(s.seed)
    dtype = getattr(torch, s.dtype)

    def rnd(*shape: int, std: float) -> "torch.Tensor":
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm(n: int) -> "torch.Tensor":
        return (1.0 + 0.1 * torch.randn(n, generator=g)).to(dtype)

    def final_norm(n: int) -> "torch.Tensor":
        # Random signs: with tied embeddings the input token's own vector sits in the residual
        # stream, and with a positive norm weight it would win the output argmax again and again
        # (its logit ~ |e|^2). Mixed signs make that self-logit zero-mean.
        signs = torch.randint(0, 2, (n,), generator=g) * 2 - 1
        return (signs * (1.0 + 0.1 * torch.randn(n, generator=g))).to(dtype)

    h, i, v = s.hidden, s.intermediate, s.vocab
    hd = h // s.heads
    head_std = 4.0 / math.sqrt(h)
    if s.arch == "opt":
        pre = "model.decoder."
        yield pre + "embed_tokens.weight", rnd(v, h, std=head_std)
        yield pre + "embed_positions.weight", rnd(s.max_position + 2, h, std=head_std)
        for layer in range(s.layers):
            p = f"{pre}layers.{layer}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                yield p + f"self_attn.{proj}.weight", rnd(h, h, std=1 / math.sqrt(h))
                yield p + f"self_attn.{proj}.bias", rnd(h, std=0.1)
            yield p + "self_attn_layer_norm.weight", norm(h)
            yield p + "self_attn_layer_norm.bias", rnd(h, std=0.1)
            yield p + "fc1.weight", rnd(i, h, std=1 / math.sqrt(h))
            yield p + "fc1.bias", rnd(i, std=0.1)
            fc2 = rnd(h, i, std=1 / math.sqrt(i))
            yield p + "fc2.weight", fc2
            # relu outputs have mean ~0.4 (unit-variance inputs): cancel the constant vector
            # they would add to every token's residual, which makes every output the same
            yield p + "fc2.bias", (rnd(h, std=0.1).float() - 0.4 * fc2.float().sum(1)).to(dtype)
            yield p + "final_layer_norm.weight", norm(h)
            yield p + "final_layer_norm.bias", rnd(h, std=0.1)
        yield pre + "final_layer_norm.weight", final_norm(h)
        yield pre + "final_layer_norm.bias", rnd(h, std=0.1)
        return
    if s.arch == "falcon":
        yield from _falcon_weights(s, rnd, norm, final_norm)
        return
    tied = s.arch == "qwen2"
    yield "model.embed_tokens.weight", rnd(v, h, std=head_std if tied else 1.0)
    for layer in range(s.layers):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", norm(h)
        yield p + "self_attn.q_proj.weight", rnd(s.heads * hd, h, std=1 / math.sqrt(h))
        yield p + "self_attn.k_proj.weight", rnd(s.kv_heads * hd, h, std=1 / math.sqrt(h))
        yield p + "self_attn.v_proj.weight", rnd(s.kv_heads * hd, h, std=1 / math.sqrt(h))
        if s.arch == "qwen2":
            yield p + "self_attn.q_proj.bias", rnd(s.heads * hd, std=0.1)
            yield p + "self_attn.k_proj.bias", rnd(s.kv_heads * hd, std=0.1)
            yield p + "self_attn.v_proj.bias", rnd(s.kv_heads * hd, std=0.1)
        yield p + "self_attn.o_proj.weight", rnd(h, s.heads * hd, std=1 / math.sqrt(h))
        yield p + "post_attention_layernorm.weight", norm(h)
        yield p + "mlp.gate_proj.weight", rnd(i, h, std=1 / math.sqrt(h))
        yield p + "mlp.up_proj.weight", rnd(i, h, std=1 / math.sqrt(h))
        yield p + "mlp.down_proj.weight", rnd(h, i, std=1 / math.sqrt(i))
    yield "model.norm.weight", final_norm(h)
    if not tied:
        yield "lm_head.weight", rnd(v, h, std=head_std)


def _falcon_weights(s: ModelSpec, rnd: Callable[..., torch.Tensor],
                    norm: Callable[[int], torch.Tensor], final_norm: Callable[[int], torch.Tensor]
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    h, i = s.hidden, s.intermediate
    qkv = (s.heads + 2 * s.kv_heads) * (h // s.heads)
    bias = s.extra_config.get("bias", False)

    def linear(name: str, out: int, fan_in: int, zero_sum_rows: bool = False
               ) -> Iterator[tuple[str, torch.Tensor]]:
        w = rnd(out, fan_in, std=1 / math.sqrt(fan_in))
        if zero_sum_rows:
            # gelu outputs have mean ~0.28 (unit-variance inputs): rows that sum to zero keep
            # that constant out of the residual stream (Falcon has no bias to cancel it)
            w = (w.float() - w.float().mean(1, keepdim=True)).to(w.dtype)
        yield name + ".weight", w
        if bias:
            yield name + ".bias", rnd(out, std=0.1)

    yield "transformer.word_embeddings.weight", rnd(s.vocab, h, std=4.0 / math.sqrt(h))
    for layer in range(s.layers):
        p = f"transformer.h.{layer}."
        for ln in _falcon_norms(s):
            yield p + f"{ln}.weight", norm(h)
            yield p + f"{ln}.bias", rnd(h, std=0.1)
        yield from linear(p + "self_attention.query_key_value", qkv, h)
        yield from linear(p + "self_attention.dense", h, h)
        yield from linear(p + "mlp.dense_h_to_4h", i, h)
        yield from linear(p + "mlp.dense_4h_to_h", h, i, zero_sum_rows=True)
    yield "transformer.ln_f.weight", final_norm(h)
    yield "transformer.ln_f.bias", rnd(h, std=0.1)


def _write_weights(s: ModelSpec, out: Path) -> int:
    from safetensors.torch import save_file

    limit = s.shard_mb * 2**20
    shards: list[dict] = [{}]
    size = total = 0
    for name, t in _weights(s):
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
        total += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return total
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update({n: fname for n in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def training_text(max_bytes: int) -> list[str]:
    """Text every Python install has: the standard library's source, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            t = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(t)
        size += len(t)
        if size >= max_bytes:
            break
    return texts


def train_tokenizer(vocab: int) -> "tokenizers.Tokenizer":  # noqa: F821
    """A byte-level BPE tokenizer with exactly ``vocab`` tokens (extra tokens pad a short vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_text(min(8 * 2**20, max(2 * 2**20, 300 * vocab))), trainer)
    missing = vocab - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f"<|extra_{k}|>" for k in range(missing)])
    return tok


def make_model(out: str | Path, spec: ModelSpec) -> Path:
    """Write the model directory ``out`` and return its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(spec.vocab)
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "model_max_length": spec.max_position, "chat_template": CHAT_TEMPLATE,
        "add_bos_token": False, "clean_up_tokenization_spaces": False}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    (out / "config.json").write_text(json.dumps(_hf_config(spec, ids), indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}, indent=2))
    _write_weights(spec, out)
    return out
