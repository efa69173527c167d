"""The tokenizer files of ``hydraserve import-gguf``, rebuilt from a GGUF file's metadata.

A ``gpt2``-model vocabulary is byte-level BPE (vocabulary + merges as stored; control tokens
become special added tokens, user-defined ones plain added tokens). The pre-tokenizer split follows
``tokenizer.ggml.pre`` (Llama 3's and Qwen2's patterns; the GPT-2 pattern otherwise). No BOS is
added by the tokenizer, as with transformers' own GGUF loader: chat templates write it themselves.
End of generation: ``eos_token_id`` plus the end-of-turn ids the file names (``eot``, ``eom``).

torch- and numpy-free: only ``tokenizers`` (imported when a tokenizer is built).
"""
from __future__ import annotations

import json
from pathlib import Path

from hydraserve.engine.config import ModelLoadError

# GGUF token types (llama.cpp's llama_token_type)
CONTROL, USER_DEFINED = 3, 4

# Pre-tokenizer split patterns by tokenizer.ggml.pre. The Llama 3 pattern is the one Meta's
# tokenizer.json publishes; Qwen2's differs only in splitting digits one by one.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# the GPT-2 byte-level pattern (tokenizers' ByteLevel use_regex=True)
GPT2_PRE_TOKENIZERS = ("default", "gpt-2", "gpt2", "smollm", "starcoder", "refact", "olmo")


class GGUFImportError(ModelLoadError):
    """The GGUF file cannot be converted (unreadable, truncated, unsupported content). Defined
    here, the lower of the two import-gguf modules, so both raise it; ``hydraserve.gguf_import``
    re-exports it."""


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (a fact of byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + \
        list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer(meta: dict, path: Path):
    """A ``tokenizers.Tokenizer`` from the file's tokenizer metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFImportError(
            f"{path}: tokenizer.ggml.model is {kind!r}; import-gguf builds byte-level BPE "
            "tokenizers ('gpt2': Llama 3, SmolLM, Qwen2 ...), not SentencePiece ('llama')")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise GGUFImportError(f"{path}: metadata key tokenizer.ggml."
                              f"{'tokens' if not tokens else 'merges'} is missing")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    alphabet = _byte_alphabet()
    chars = set(alphabet.values())
    # tokens are stored in the byte alphabet; the odd one stored as raw text is respelled
    vocab = {}
    for i, tok in enumerate(tokens):
        spelled = tok if set(tok) <= chars else "".join(alphabet[b] for b in tok.encode("utf-8"))
        vocab.setdefault(spelled, i)
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise GGUFImportError(f"{path}: tokenizer.ggml.merges entry {m!r} is not 'a b'")
        pairs.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # control tokens stored as raw text outside the byte alphabet are mislabelled: skipped
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= chars]
    plain = [AddedToken(t, special=False, normalized=False)
             for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
    tok.add_special_tokens(special)
    tok.add_tokens(plain)
    return tok, (pre not in GPT2_PRE_TOKENIZERS and split is None) and pre


def tokenizer_files(meta: dict, path: Path) -> tuple[dict[str, str], list[int], list[str]]:
    """{file name: text} of the tokenizer files, the eos ids, and notes."""
    tok, unknown_pre = build_tokenizer(meta, path)
    tokens = meta["tokenizer.ggml.tokens"]
    notes = [f"pre-tokenizer {unknown_pre!r} is not known; used GPT-2's split"] if unknown_pre else []

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    eos_ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and int(i) not in eos_ids:
            eos_ids.append(int(i))
    tconf = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": False,
        "model_max_length": int(meta.get("llama.context_length", 4096)),
    }
    files = {"tokenizer.json": tok.to_str(pretty=False),
             "tokenizer_config.json": json.dumps({k: v for k, v in tconf.items() if v is not None},
                                                 indent=2)}
    template = meta.get("tokenizer.chat_template")
    if template:
        files["chat_template.jinja"] = template
    else:
        notes.append("the file has no chat template: chat requests will be refused")
    return files, eos_ids, notes
