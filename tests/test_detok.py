"""Incremental detokenization and stop strings against a full decode."""
from __future__ import annotations

import random

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from hydraserve.gateway.detok import Detokenizer
from hydraserve.tokenizer import Tokenizer

TEXTS = ["def héllo(wörld):\n    return 'naïve ☃ text'  # ünïcode",
         "The capital of France is Paris. 日本語のテキスト 🎉🎉",
         "кириллица ελληνικά עברית, then ASCII again"]


def test_deltas_add_up_to_the_full_decode(llama_dir):
    tok = Tokenizer.from_dir(llama_dir)
    text = TEXTS[0]
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


def test_stop_strings_wait_for_min_tokens(llama_dir):
    tok = Tokenizer.from_dir(llama_dir)
    ids = tok.encode("alpha STOP beta STOP gamma")
    first = next(n for n in range(1, len(ids) + 1) if "STOP" in tok.decode(ids[:n]))
    d = Detokenizer(tok, ["STOP"], min_tokens=first + 1)  # the first STOP is before min_tokens
    out = ""
    for i in ids:
        out += d.push(i)
        if d.stopped:
            break
    assert d.stopped and out == "alpha STOP beta "


def whole_decode_reference(tok: Tokenizer, ids: list[int], stop: list[str]) -> list:
    """The specification: the detokenizer as it was before it streamed, decoding all the ids
    after each one. Returns (delta, stopped) per id pushed (until stopped), then the flush's."""
    stop = [s for s in stop if s]
    state = {"released": "", "stopped": False}

    def release(full: str, final: bool) -> str:
        released = state["released"]
        if state["stopped"]:
            return ""
        cut = [full.find(s, max(0, len(released) - len(s))) for s in stop]
        upto = next((full[:i] for i in cut if i != -1), None)
        state["stopped"] = upto is not None
        if upto is None and final:
            upto = full
        elif upto is None:
            if full.endswith("\ufffd"):
                return ""
            hold = max((k for s in stop for k in range(1, len(s)) if full.endswith(s[:k])),
                       default=0)
            upto = full[:len(full) - hold]
        if len(upto) <= len(released) or not upto.startswith(released):
            return ""
        state["released"] = upto
        return upto[len(released):]

    out = []
    for n in range(1, len(ids) + 1):
        out.append((release(tok.decode(ids[:n]), False), state["stopped"]))
        if state["stopped"]:
            break
    return out + [(release(tok.decode(ids), True), state["stopped"])]


def streamed(tok: Tokenizer, ids: list[int], stop: list[str]) -> list:
    d = Detokenizer(tok, stop)
    out = []
    for i in ids:
        out.append((d.push(i), d.stopped))
        if d.stopped:
            break
    return out + [(d.flush(), d.stopped)]


def assert_streams_like_a_whole_decode(tok: Tokenizer, cases: int = 400) -> None:
    """Every delta and stop of the streaming detokenizer equals the specification's, on texts in
    several scripts (cut anywhere) and random ids (partial characters, special tokens), with stop
    strings taken from the text, one character long, or a lone U+FFFD."""
    rng = random.Random(0)
    for _ in range(cases):
        if rng.random() < 0.5:
            ids = tok.encode(rng.choice(TEXTS), add_special_tokens=False)
            ids = ids[rng.randrange(len(ids)):] + ids
        else:
            # a tenth among the first ids, where the special tokens are
            ids = [rng.randrange(20 if rng.random() < 0.1 else tok.vocab_size)
                   for _ in range(rng.randrange(1, 40))]
        text = tok.decode(ids)
        stop = []
        for _ in range(rng.randrange(3)):
            at = rng.randrange(len(text) or 1)
            stop.append(text[at:at + rng.randrange(1, 6)] if rng.random() < 0.7
                        else rng.choice(["\n", " ", "e", "\ufffd", "STOP"]))
        assert streamed(tok, ids, stop) == whole_decode_reference(tok, ids, stop), (ids, stop)


def test_streaming_equals_the_whole_decode(llama_dir):
    assert_streams_like_a_whole_decode(Tokenizer.from_dir(llama_dir))


def _counting_tokenizer(model_dir: str) -> tuple[Tokenizer, list[int]]:
    """The model's tokenizer with its decoder wrapped to count the tokens it is given: both our
    decodes and DecodeStream's go through it."""
    raw = HFTokenizer.from_file(f"{model_dir}/tokenizer.json")
    inner, decoded = raw.decoder, [0]

    class Counting:
        def decode_chain(self, tokens: list[str]) -> list[str]:
            decoded[0] += len(tokens)
            return [inner.decode(tokens)]

    raw.decoder = decoders.Decoder.custom(Counting())
    return Tokenizer(raw, {}), decoded


def test_streaming_an_answer_costs_linear_decode_work(llama_dir):
    tok, decoded = _counting_tokenizer(llama_dir)
    ids = tok.encode(" ".join(TEXTS) * 100)[:2000]
    assert len(ids) == 2000
    decoded[0] = 0
    # stop strings that never match but whose starts do: text is held back and searched
    d = Detokenizer(tok, ["Paris!", "日本語 ", "ε x"])
    out = "".join(d.push(i) for i in ids) + d.flush()
    assert out == tok.decode(ids)
    # the whole decode after each token cost n (n + 1) / 2 = 2,001,000 tokens
    assert decoded[0] < 10 * len(ids), decoded[0]


def test_a_decoder_that_rewrites_its_text_does_not_stall_the_stream():
    # byte fallback replaces every byte of an invalid sequence: "=" becomes U+FFFD once 0xC0
    # follows, so the text already released is no longer a prefix (DecodeStream raises there)
    raw = HFTokenizer(models.BPE(vocab={"<0x3D>": 0, "<0xC0>": 1, "a": 2}, merges=[],
                                 byte_fallback=True))
    raw.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok = Tokenizer(raw, {})
    assert tok.decode([2, 0, 1, 2]) == "a\ufffd\ufffda"
    d = Detokenizer(tok)
    assert [d.push(i) for i in (2, 0, 1, 2, 2)] + [d.flush()] == ["a", "=", "", "\ufffda", "a", ""]
