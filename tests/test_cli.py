"""The hydraserve command: make-model, generate --json, and a torch-free --help."""
from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

from hydraserve.engine.engine import LLMEngine
from hydraserve.engine.sequence import SamplingParams
from hydraserve.tokenizer import Tokenizer

PKG = pathlib.Path(__file__).resolve().parents[1] / "hydraserve"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hydraserve.cli", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("p", [1, 3])
def test_generate_json_matches_engine(llama_dir, p):
    r = _run("generate", "--model", llama_dir, "--prompt", "def f(x):", "--max-tokens", "12",
             "--ignore-eos", "--pipeline", str(p), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["pipeline"] == p
    tok = Tokenizer.from_dir(llama_dir)
    expected = LLMEngine(llama_dir).generate(
        [tok.encode("def f(x):")], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    assert out["token_ids"] == expected
    assert out["text"] == tok.decode(expected)


def test_generate_prompt_ids_and_chat(llama_dir):
    r = _run("generate", "--model", llama_dir, "--prompt-ids", "3,4,5", "--max-tokens", "4",
             "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout.splitlines()[-1])["token_ids"]) == 4
    r = _run("generate", "--model", llama_dir, "--prompt", "hello", "--chat", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert _run("generate", "--model", llama_dir, "--prompt-ids", "a,b").returncode != 0


def test_help_does_not_import_torch():
    code = ("import sys; from hydraserve.cli import build_parser; p = build_parser();"
            "p.format_help(); import hydraserve.tokenizer, hydraserve.store.layout;"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr
    assert "make-model" in _run("--help").stdout


def test_package_never_imports_transformers():
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "transformers" for n in names), path


def test_make_model_cli_shards_and_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "qwen"
    r = _run("make-model", str(out), "--arch", "qwen2", "--hidden", "128", "--layers", "2",
             "--vocab", "1000", "--shard-mb", "1")
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == 1000 == Tokenizer.from_dir(out).vocab_size
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == Tokenizer.from_dir(out).apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok("def f(x): return x").input_ids == Tokenizer.from_dir(out).encode("def f(x): return x")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    # the engine reads the sharded checkpoint too
    assert len(LLMEngine(out, pipeline=2).generate([[1, 2, 3]], SamplingParams(max_tokens=3))) == 1


def test_make_model_rejects_bad_shapes(tmp_path):
    r = _run("make-model", str(tmp_path / "x"), "--hidden", "100", "--heads", "3")
    assert r.returncode == 2 and "divisible" in r.stderr


def test_serve_on_kubernetes_without_a_cluster_says_so(tmp_path):
    r = _run("serve", "--cluster-backend", "kubernetes", "--port", "0", "--kubeconfig",
             str(tmp_path / "missing"))
    assert r.returncode == 2 and "--cluster-backend kubernetes" in r.stderr, r.stderr
