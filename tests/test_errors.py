"""Bad model directories give clear errors, from the API and from the CLI."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from hydraserve.engine.config import ModelLoadError
from hydraserve.engine.engine import LLMEngine
from hydraserve.store.checkpoint import CheckpointError


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLMEngine(tmp_path / "nope")


def test_no_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        LLMEngine(tmp_path)


def test_unsupported_architecture(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "m")
    cfg = json.loads(open(f"{d}/config.json").read())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    open(f"{d}/config.json", "w").write(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config\.json: unsupported architectures \['GPT2LMHeadModel'\].*LlamaForCausalLM"):
        LLMEngine(d)


def test_no_weights(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "m")
    for f in tmp_path.glob("m/*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no safetensors"):
        LLMEngine(d)


def test_missing_tensor(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(llama_dir, tmp_path / "m")
    tensors = load_file(f"{d}/model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, f"{d}/model.safetensors")
    with pytest.raises(ModelLoadError, match="missing tensors: model.layers.2.mlp.up_proj.weight"):
        LLMEngine(d, pipeline=2)


def test_wrong_shape(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(llama_dir, tmp_path / "m")
    tensors = load_file(f"{d}/model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors[
        "model.layers.0.self_attn.q_proj.weight"].clone()
    save_file(tensors, f"{d}/model.safetensors")
    with pytest.raises(ModelLoadError, match="k_proj.weight has shape"):
        LLMEngine(d)


def test_corrupt_weights(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "m")
    open(f"{d}/model.safetensors", "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!}")
    with pytest.raises(CheckpointError, match="corrupt"):
        LLMEngine(d)


def test_cli_reports_errors_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hydraserve.cli", "generate", "--model",
                        str(tmp_path / "nope"), "--prompt", "hi"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "error:" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


FALCON = {"architectures": ["FalconForCausalLM"], "vocab_size": 512, "hidden_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.mark.parametrize("extra,key", [
    ({"alibi": True}, "alibi"),
    ({"activation": "relu"}, "activation"),
    ({"new_decoder_architecture": True, "parallel_attn": False}, "parallel_attn"),
    ({"num_ln_in_parallel_attn": 2}, "num_ln_in_parallel_attn"),
    ({"multi_query": False, "num_kv_heads": 2}, "num_kv_heads"),
    ({"new_decoder_architecture": True, "num_kv_heads": 3}, "num_kv_heads"),
])
def test_falcon_variants_we_cannot_run_name_the_key(extra, key):
    from hydraserve.engine.config import ModelConfig

    with pytest.raises(ModelLoadError, match=key):
        ModelConfig.from_hf({**FALCON, **extra})

