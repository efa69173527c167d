"""Typed model and engine configuration, parsed once from a checkpoint's ``config.json``."""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path


class ModelLoadError(ValueError):
    """A model directory cannot be served: missing files, bad config, unsupported architecture."""


class Arch(enum.Enum):
    LLAMA = "llama"
    MISTRAL = "mistral"
    QWEN2 = "qwen2"
    OPT = "opt"
    FALCON = "falcon"


# Hugging Face ``architectures`` entry -> our family
HF_ARCHITECTURES = {
    "LlamaForCausalLM": Arch.LLAMA,
    "MistralForCausalLM": Arch.MISTRAL,
    "Qwen2ForCausalLM": Arch.QWEN2,
    "OPTForCausalLM": Arch.OPT,
    "FalconForCausalLM": Arch.FALCON,
}
# config.json ``model_type`` -> our family, for files that omit ``architectures``
HF_MODEL_TYPES = {arch.value: arch for arch in Arch}


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts the engine needs; field names follow the Llama convention."""

    arch: Arch
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position: int
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    sliding_window: int | None = None
    # OPT only
    word_embed_proj_dim: int = 0
    do_layer_norm_before: bool = True
    # Falcon only: attention and MLP both read the layer's input and add to the residual
    # together; 2 parallel norms = a separate norm before each (Falcon-40B's ln_attn, ln_mlp)
    parallel_attn: bool = False
    parallel_norms: int = 1
    # from generation_config.json / config.json
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str = "float32"

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelLoadError(f"model directory {model_dir} does not exist")
        path = model_dir / "config.json"
        if not path.exists():
            raise ModelLoadError(f"{model_dir} has no config.json: not a Hugging Face model directory")
        raw = _read_json(path)
        gen_path = model_dir / "generation_config.json"
        gen = _read_json(gen_path) if gen_path.exists() else {}
        try:
            return cls.from_hf(raw, gen)
        except ModelLoadError as e:
            raise ModelLoadError(f"{path}: {e}") from None

    @classmethod
    def from_hf(cls, raw: dict, gen: dict | None = None) -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
        if arch is None and not archs:
            # transformers accepts a config without "architectures"; its model_type names the family
            arch = HF_MODEL_TYPES.get(raw.get("model_type"))
        if arch is None:
            supported = ", ".join(sorted(HF_ARCHITECTURES))
            found = f"architectures {archs}" if archs else f"model_type {raw.get('model_type')!r}"
            raise ModelLoadError(f"unsupported {found}; supported: {supported}")
        eos = (gen or {}).get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in eos_ids):
            raise ModelLoadError(f"eos_token_id must be an integer or a list of integers, got {eos!r}")
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        try:
            if arch is Arch.OPT:
                return cls._from_opt(raw, eos_ids, dtype)
            if arch is Arch.FALCON:
                return cls._from_falcon(raw, eos_ids, dtype)
            return cls._from_llama(arch, raw, eos_ids, dtype)
        except KeyError as e:
            raise ModelLoadError(f"required key {e} is missing") from None

    @classmethod
    def _from_llama(cls, arch: Arch, raw: dict, eos_ids: tuple[int, ...], dtype: str) -> "ModelConfig":
        heads = raw["num_attention_heads"]
        theta, rope_scaling = _rope(raw)
        window = raw.get("sliding_window")
        if arch is Arch.QWEN2 and not raw.get("use_sliding_window", False):
            window = None
        return cls(
            arch=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            intermediate_size=raw["intermediate_size"],
            max_position=raw.get("max_position_embeddings", 4096),
            norm_eps=raw.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=raw.get("tie_word_embeddings", arch is Arch.QWEN2),
            qkv_bias=arch is Arch.QWEN2 or raw.get("attention_bias", False),
            o_bias=raw.get("attention_bias", False),
            mlp_bias=raw.get("mlp_bias", False),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            sliding_window=window,
            eos_token_ids=eos_ids,
            checkpoint_dtype=dtype,
        )

    @classmethod
    def _from_opt(cls, raw: dict, eos_ids: tuple[int, ...], dtype: str) -> "ModelConfig":
        hidden = raw["hidden_size"]
        heads = raw["num_attention_heads"]
        if raw.get("activation_function", "relu") != "relu":
            raise ModelLoadError("only OPT models with relu activation are supported")
        return cls(
            arch=Arch.OPT,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=raw["ffn_dim"],
            max_position=raw.get("max_position_embeddings", 2048),
            norm_eps=1e-5,
            tie_word_embeddings=True,
            qkv_bias=raw.get("enable_bias", True),
            o_bias=raw.get("enable_bias", True),
            mlp_bias=raw.get("enable_bias", True),
            word_embed_proj_dim=raw.get("word_embed_proj_dim") or hidden,
            do_layer_norm_before=raw.get("do_layer_norm_before", True),
            eos_token_ids=eos_ids,
            checkpoint_dtype=dtype,
        )

    @classmethod
    def _from_falcon(cls, raw: dict, eos_ids: tuple[int, ...], dtype: str) -> "ModelConfig":
        # the decoder variants transformers' FalconModel runs: Falcon-7B (multi-query, parallel
        # attention, one norm), Falcon-40B/180B and Falcon2-11B ("new decoder architecture":
        # grouped kv heads, one or two parallel norms), and sequential attention (Falcon-RW)
        if raw.get("alibi", False):
            raise ModelLoadError("Falcon with alibi true (ALiBi position biases) is not supported")
        if raw.get("activation", "gelu") != "gelu":
            raise ModelLoadError(f"Falcon activation {raw['activation']!r} is not supported "
                                 "(only gelu)")
        hidden = raw["hidden_size"]
        heads = raw["num_attention_heads"]
        if hidden % heads:
            raise ModelLoadError(f"hidden_size {hidden} is not divisible by num_attention_heads "
                                 f"{heads}")
        new_arch = raw.get("new_decoder_architecture", False)
        parallel = raw.get("parallel_attn", True)
        norms = raw.get("num_ln_in_parallel_attn") or (2 if new_arch else 1)
        if new_arch:
            kv_heads = raw.get("num_kv_heads") or heads
            if not parallel:
                raise ModelLoadError("parallel_attn false with new_decoder_architecture true is "
                                     "not supported (transformers cannot run it either)")
        elif raw.get("multi_query", True):
            kv_heads = 1
        else:
            kv_heads = heads
            if raw.get("num_kv_heads", heads) != heads:
                raise ModelLoadError(f"num_kv_heads {raw['num_kv_heads']} needs "
                                     "new_decoder_architecture true")
        if heads % kv_heads:
            raise ModelLoadError(f"num_attention_heads {heads} is not divisible into num_kv_heads "
                                 f"{kv_heads}")
        if parallel and norms not in ((1, 2) if new_arch else (1,)):
            raise ModelLoadError(f"num_ln_in_parallel_attn {norms} is not supported with "
                                 f"new_decoder_architecture {str(new_arch).lower()}")
        theta, rope_scaling = _rope(raw)
        bias = raw.get("bias", False)
        return cls(
            arch=Arch.FALCON,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=hidden // heads,
            intermediate_size=raw.get("ffn_hidden_size") or 4 * hidden,
            max_position=raw.get("max_position_embeddings", 2048),
            norm_eps=raw.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=raw.get("tie_word_embeddings", True),
            qkv_bias=bias,
            o_bias=bias,
            mlp_bias=bias,
            rope_theta=theta,
            rope_scaling=rope_scaling,
            parallel_attn=parallel,
            parallel_norms=norms if parallel else 1,
            eos_token_ids=eos_ids,
            checkpoint_dtype=dtype,
        )


def _rope(raw: dict) -> tuple[float, dict | None]:
    """(theta, scaling or None for the default rope) of a config.json. transformers >= 5 writes
    rope settings as "rope_parameters"; older files use "rope_theta" + "rope_scaling"."""
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    return float(theta), None if rope_type == "default" else {**rope, "rope_type": rope_type}


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return raw


@dataclass(frozen=True)
class EngineConfig:
    """How one engine (or one pipeline stage of it) runs.

    ``num_kv_blocks`` fixes the KV cache size; when None it is derived from ``kv_cache_mb``
    (per stage: a stage stores only its own layers, but every stage has the same block count so that
    one block table serves the whole pipeline).
    """

    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    kv_cache_mb: int = 256
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_model_len: int = 3072


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def num_kv_blocks(model: ModelConfig, cfg: EngineConfig) -> int:
    """Blocks of the KV cache: ``cfg.num_kv_blocks``, or what ``kv_cache_mb`` holds for the
    k and v of every layer of the whole model."""
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    if cfg.dtype not in DTYPE_BYTES:
        raise ValueError(f"unsupported dtype {cfg.dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    per_block = (2 * model.num_layers * cfg.block_size * model.num_kv_heads * model.head_dim
                 * DTYPE_BYTES[cfg.dtype])
    return max(1, cfg.kv_cache_mb * 2**20 // per_block)
