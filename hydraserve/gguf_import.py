"""``hydraserve import-gguf``: a llama.cpp GGUF checkpoint becomes a Hugging Face model directory.

What comes out is an ordinary directory that our engine, transformers and vLLM all load:
safetensors weights under Hugging Face names (``--dtype`` float16 by default, sharded with an index
above 2 GB), config.json with ``architectures``, a ``tokenizers`` tokenizer.json, tokenizer_config.json,
chat_template.jinja and generation_config.json.

How each part is recovered from the file (facts of the GGUF format and of llama.cpp's converter):

- Tensors are dequantized with the ``gguf`` package (every type it implements: F16, BF16, the
  Q4/Q5/Q8 blocks, the K-quants, the IQ types ...). GGUF lists dimensions fastest first, so a
  ``[576, 49152]`` embedding is a 49152 x 576 matrix. llama.cpp's converter interleaves the rows of
  q_proj and k_proj per head for its rotary convention; we undo that permutation.
- The tokenizer files and the end-of-generation ids: ``hydraserve.gguf_tokenizer``.
- Llama 3.1-style rope scaling is stored only as a ``rope_freqs`` factor table; we match it against
  the published llama3 parameters and write them to config.json.

torch-free (numpy + gguf + tokenizers), so it runs in the gateway's environment, and it writes to
a temporary folder renamed into place at the end: an interrupted import leaves no half directory.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from hydraserve.gguf_tokenizer import GGUFImportError, tokenizer_files
from hydraserve.store.checkpoint import TensorInfo
from hydraserve.store.image import encode_header

SUPPORTED_ARCHS = ("llama",)
DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}
SHARD_BYTES = 2 * 10**9

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Llama 3.x rope scaling parameters as Meta publishes them: (factor, low, high, original length)
LLAMA3_ROPE_CANDIDATES = ((8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 1.0, 4.0, 8192))


@dataclass
class ImportReport:
    out: Path
    arch: str
    tensors: int
    weight_bytes: int
    quant_types: dict[str, int]
    seconds: float
    notes: list[str] = field(default_factory=list)


# -- reading ----------------------------------------------------------------------------------

def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` on ``path`` whose every tensor lies wholly inside the file."""
    try:
        import gguf
    except ImportError:
        raise GGUFImportError("import-gguf needs the gguf package: pip install gguf") from None
    path = Path(path)
    if not path.is_file():
        raise GGUFImportError(f"{path}: no such file")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, struct.error, OSError) as e:
        raise GGUFImportError(f"{path}: not a readable GGUF file, or truncated ({e})") from None
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
            raise GGUFImportError(
                f"{path}: truncated: tensor {t.name} needs bytes up to "
                f"{t.data_offset + int(t.n_bytes)}, the file has {size}")
    return reader


def metadata(reader) -> dict:
    """Every metadata key -> its Python value (arrays as lists)."""
    out = {}
    for key, f in reader.fields.items():
        try:
            out[key] = f.contents()
        except Exception as e:  # the gguf package raises plain errors on malformed fields
            raise GGUFImportError(f"metadata key {key}: cannot be read ({e})") from None
    return out


def _need(meta: dict, key: str, path: Path):
    if key not in meta:
        raise GGUFImportError(f"{path}: metadata key {key} is missing")
    value = meta[key]
    if isinstance(value, list):
        raise GGUFImportError(f"{path}: metadata key {key} varies per layer ({value[:4]}...); "
                              "such models are not supported")
    return value


# -- config -----------------------------------------------------------------------------------

def hf_config(meta: dict, reader, path: Path, dtype: str) -> tuple[dict, list[str]]:
    """config.json for the file's model, and notes on what was inferred."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFImportError(f"{path}: unsupported architecture {arch!r} (general.architecture); "
                              f"import-gguf converts: {', '.join(SUPPORTED_ARCHS)}")
    a = arch
    hidden = int(_need(meta, f"{a}.embedding_length", path))
    heads = int(_need(meta, f"{a}.attention.head_count", path))
    kv_heads = int(meta.get(f"{a}.attention.head_count_kv", heads))
    head_dim = int(meta.get(f"{a}.attention.key_length")
                   or meta.get(f"{a}.rope.dimension_count") or hidden // heads)
    names = {t.name for t in reader.tensors}
    if any(n.endswith("_exps.weight") for n in names):
        raise GGUFImportError(f"{path}: mixture-of-experts tensors (ffn_*_exps) are not supported")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise GGUFImportError(f"{path}: tensor token_embd.weight is missing")
    vocab = int(meta.get(f"{a}.vocab_size") or int(embd.shape[1]))
    notes = []
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_need(meta, f"{a}.feed_forward_length", path)),
        "num_hidden_layers": int(_need(meta, f"{a}.block_count", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(meta.get(f"{a}.context_length", 4096)),
        "rms_norm_eps": float(meta.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get(f"{a}.rope.freq_base", 10000.0)),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        if f"tokenizer.ggml.{key}" in meta:
            config[key.replace("padding", "pad")] = int(meta[f"tokenizer.ggml.{key}"])
    scaling = meta.get(f"{a}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise GGUFImportError(f"{path}: metadata key {a}.rope.scaling.type is {scaling!r}; "
                                  "supported: linear (and llama3 through rope_freqs)")
        config["rope_scaling"] = {"rope_type": "linear",
                                  "factor": float(_need(meta, f"{a}.rope.scaling.factor", path))}
    if "rope_freqs.weight" in names:
        config["rope_scaling"] = _llama3_scaling(reader, config, meta, a, path)
        notes.append(f"rope_freqs matched llama3 scaling {config['rope_scaling']}")
    return config, notes


def _llama3_scaling(reader, config: dict, meta: dict, a: str, path: Path) -> dict:
    t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    factors = np.asarray(dequantize(t), dtype=np.float64).reshape(-1)
    dim = config["head_dim"]
    inv = 1.0 / (config["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelen = 2 * math.pi / inv
    original = int(meta.get(f"{a}.rope.scaling.original_context_length") or 0)
    for factor, low, high, old_len in LLAMA3_ROPE_CANDIDATES:
        old_len = original or old_len
        smooth = (old_len / wavelen - low) / (high - low)
        expect = np.where(wavelen < old_len / high, 1.0,
                          np.where(wavelen > old_len / low, factor,
                                   1.0 / ((1 - smooth) / factor + smooth)))
        if expect.shape == factors.shape and np.allclose(expect, factors, rtol=1e-3):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": old_len}
    raise GGUFImportError(f"{path}: tensor rope_freqs.weight matches no known llama3 rope scaling")


# -- tensors ----------------------------------------------------------------------------------

def dequantize(t) -> np.ndarray:
    """A GGUF tensor as float32, shaped as Hugging Face stores it (slowest dimension first)."""
    from gguf import quants

    try:
        data = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise GGUFImportError(f"tensor {t.name}: {e}") from None
    return np.asarray(data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave of q_proj / k_proj (weights or biases): the
    converter stores row (h, i, j) of an [heads, 2, d/2] view at (h, j, i)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str, path: Path) -> str:
    base, _, suffix = name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    raise GGUFImportError(f"{path}: tensor {name} has no Hugging Face counterpart in a Llama model")


def convert_tensors(reader, config: dict, path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, float32 array) for every weight, in file order."""
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # folded into config.json's rope_scaling
        name = hf_name(t.name, path)
        w = dequantize(t)
        if ".q_proj." in name:
            w = unpermute(w, config["num_attention_heads"])
        elif ".k_proj." in name:
            w = unpermute(w, config["num_key_value_heads"])
        yield name, w


def to_dtype(w: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return w
    if dtype == "float16":
        return w.astype(np.float16)
    # bfloat16: round to nearest even on the top 16 bits (numpy has no bfloat16 type)
    u = w.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(out: Path, shapes: list[tuple[str, tuple[int, ...]]], dtype: str,
                      arrays: Iterator[tuple[str, np.ndarray]]) -> int:
    """Write the tensors ``shapes`` lists (name, shape) into one or more safetensors files under
    ``out``, taking their arrays from ``arrays`` in the same order as they are written (one tensor
    in memory at a time). Returns the bytes of weights written."""
    code, itemsize = DTYPES[dtype]
    shards: list[list[TensorInfo]] = [[]]
    used = 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and used + nbytes > SHARD_BYTES:
            shards.append([])
            used = 0
        # offsets within the file's data section: all encode_header reads
        shards[-1].append(TensorInfo(name, out, code, shape, used, used + nbytes))
        used += nbytes
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for fname, shard in zip(files, shards):
        with open(out / fname, "wb") as f:
            f.write(encode_header(shard))
            for info in shard:
                name, arr = next(arrays)
                arr = np.ascontiguousarray(to_dtype(arr, dtype))
                if name != info.name or arr.shape != info.shape:
                    raise GGUFImportError(f"tensor {name} {arr.shape}: expected {info.name} "
                                          f"{info.shape}")
                f.write(arr.tobytes())
                weight_map[name] = fname
                total += info.nbytes
    if len(files) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


# -- the whole import -------------------------------------------------------------------------

def import_gguf(src: str | Path, out: str | Path, dtype: str = "float16",
                progress: Callable[[str], None] | None = None) -> ImportReport:
    """Convert ``src`` (a GGUF file) into the Hugging Face directory ``out`` (must not exist or
    be empty)."""
    if dtype not in DTYPES:
        raise GGUFImportError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    say = progress or (lambda _msg: None)
    src, out = Path(src), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GGUFImportError(f"{out} already exists and is not an empty directory")
    t0 = time.monotonic()
    reader = open_gguf(src)
    meta = metadata(reader)
    config, notes = hf_config(meta, reader, src, dtype)
    files, eos_ids, tok_notes = tokenizer_files(meta, src)
    notes += tok_notes
    quant: dict[str, int] = {}
    for t in reader.tensors:
        quant[t.tensor_type.name] = quant.get(t.tensor_type.name, 0) + 1
    say(f"{src.name}: {config['num_hidden_layers']}-layer {meta['general.architecture']} "
        f"(hidden {config['hidden_size']}, {config['num_attention_heads']} heads / "
        f"{config['num_key_value_heads']} kv), {len(reader.tensors)} tensors "
        f"({', '.join(f'{n} {k}' for k, n in sorted(quant.items()))}) -> {dtype}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users
    try:
        shapes = [(hf_name(t.name, src), tuple(int(d) for d in reversed(t.shape)))
                  for t in reader.tensors if t.name != "rope_freqs.weight"]
        nbytes = write_safetensors(tmp, shapes, dtype, convert_tensors(reader, config, src))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = {"eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids}
        if "bos_token_id" in config:
            gen["bos_token_id"] = config["bos_token_id"]
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        for name, text in files.items():
            (tmp / name).write_text(text)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = ImportReport(out=out, arch=meta["general.architecture"], tensors=len(shapes),
                          weight_bytes=nbytes, quant_types=quant,
                          seconds=time.monotonic() - t0, notes=notes)
    for note in notes:
        say(f"note: {note}")
    say(f"wrote {out} ({nbytes / 1e6:.0f} MB of {dtype} weights) in {report.seconds:.1f} s")
    return report
