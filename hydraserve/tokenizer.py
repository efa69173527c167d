"""Tokenization without transformers: the ``tokenizers`` library plus the model's jinja2 chat
template (transformers costs ~8 s to import; this costs tens of milliseconds)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from hydraserve.engine.config import ModelLoadError


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): each byte is a printable character, itself for
    the printable Latin-1 ones, else 256 + n in byte order. Maps the character to its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_level_alphabet()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte fallback


def _is_byte_level(decoder) -> bool:
    if decoder is None:
        return False
    if type(decoder).__name__ == "ByteLevel":
        return True
    return "ByteLevel" in repr(decoder)


class Tokenizer:
    """``config``: tokenizer_config.json's keys. ``chat_template``: the template's source, which
    wins over ``config["chat_template"]`` (transformers >= 4.43 saves it as chat_template.jinja)."""

    def __init__(self, tokenizer, config: dict, chat_template: str | None = None):
        self._tok = tokenizer
        self._byte_level: bool | None = None  # whether its decoder is byte-level BPE's
        self.config = config
        self._template = None
        template = chat_template or config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template:
            import jinja2.sandbox

            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._template = env.from_string(template)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelLoadError(f"model directory {model_dir} does not exist")
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise ModelLoadError(f"{model_dir} has no tokenizer.json")
        cfg_path = model_dir / "tokenizer_config.json"
        try:
            config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{cfg_path}: invalid JSON ({e})") from None
        template_path = model_dir / "chat_template.jinja"
        template = template_path.read_text() if template_path.exists() else None
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ModelLoadError(f"{path}: cannot be read ({e})") from None
        try:
            return cls(tok, config, template)
        except Exception as e:  # a jinja2 syntax error names the line
            where = template_path if template else cfg_path
            raise ModelLoadError(f"{where}: the chat template does not compile ({e})") from None

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` underneath (for incremental decoding)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a token may hold part of a character: its bytes are
        what the OpenAI API reports with logprobs)."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level is None:
            self._byte_level = _is_byte_level(self._tok.decoder)
        if self._byte_level and all(c in _BYTE_OF for c in piece):
            return bytes(_BYTE_OF[c] for c in piece)
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def token_text(self, token_id: int) -> str:
        """A token as text; one holding part of a character reads "bytes:\\xe2\\x80" (the
        OpenAI API's convention)."""
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ModelLoadError("the model has no chat template (neither chat_template.jinja nor "
                                 "a chat_template in tokenizer_config.json)")
        special = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            value = self.config.get(key)
            if isinstance(value, dict):  # an AddedToken as older files serialise it
                value = value.get("content")
            if isinstance(value, str):
                special[key] = value
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **special)
