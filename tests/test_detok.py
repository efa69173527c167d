"""Incremental detokenization and stop strings against a full decode."""
from __future__ import annotations

from hydraserve.gateway.detok import Detokenizer
from hydraserve.tokenizer import Tokenizer


def test_deltas_add_up_to_the_full_decode(llama_dir):
    tok = Tokenizer.from_dir(llama_dir)
    text = "def héllo(wörld):\n    return 'naïve ☃ text'  # ünïcode"
    ids = tok.encode(text)
    d = Detokenizer(tok)
    out = "".join(d.push(i) for i in ids) + d.flush()
    assert out == tok.decode(ids) == text


def test_stop_strings_cut_the_text(llama_dir):
    tok = Tokenizer.from_dir(llama_dir)
    ids = tok.encode("alpha beta STOP gamma delta")
    d = Detokenizer(tok, ["STOP"])
    out = ""
    for i in ids:
        out += d.push(i)
        if d.stopped:
            break
    assert d.stopped and out == "alpha beta "
    d = Detokenizer(tok, ["never"])
    assert "".join(d.push(i) for i in ids) + d.flush() == "alpha beta STOP gamma delta"
