"""Hugging Face model directories as transformers writes them: the chat template in
chat_template.jinja, in tokenizer_config.json or nowhere; config.json without `architectures`;
eos lists; half-precision checkpoints computed in float32 on CPU. Errors name the file and key."""
from __future__ import annotations

import json
import shutil

import pytest

from hydraserve.engine.config import Arch, ModelConfig, ModelLoadError
from hydraserve.tokenizer import Tokenizer

TURN = [{"role": "user", "content": "hi"}]


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _edit(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_chat_template_jinja_wins_over_tokenizer_config(llama_dir, tmp_path):
    d = tmp_path / "m"
    _copy(llama_dir, d)
    (d / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert Tokenizer.from_dir(d).apply_chat_template(TURN) == "[hi]"
    _edit(d / "tokenizer_config.json", lambda c: c.pop("chat_template"))
    assert Tokenizer.from_dir(d).apply_chat_template(TURN) == "[hi]"  # the .jinja file alone
    (d / "chat_template.jinja").unlink()
    tok = Tokenizer.from_dir(d)
    assert not tok.has_chat_template
    with pytest.raises(ModelLoadError, match="chat_template.jinja"):
        tok.apply_chat_template(TURN)


def test_a_broken_template_names_its_file(llama_dir, tmp_path):
    d = tmp_path / "m"
    _copy(llama_dir, d)
    (d / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ModelLoadError, match="chat_template.jinja: the chat template"):
        Tokenizer.from_dir(d)


def test_chat_without_a_template_is_a_clear_400(llama_dir, tmp_path):
    from fastapi.testclient import TestClient

    from hydraserve.cluster.local import LocalCluster
    from hydraserve.config import GatewayConfig, default_local_cluster
    from hydraserve.gateway.app import Gateway, create_app

    d = tmp_path / "m"
    _copy(llama_dir, d)
    _edit(d / "tokenizer_config.json", lambda c: c.pop("chat_template"))
    cfg = default_local_cluster()
    # no lifespan: no cluster process starts; max_queue=0 makes an accepted request a fast 429
    cluster = LocalCluster(cfg)  # it makes its temporary folder at once: closed on every path
    try:
        c = TestClient(create_app(Gateway(GatewayConfig(max_queue=0), cfg, cluster, [])))
        assert c.post("/admin/models", json={"name": "m", "path": str(d)}).status_code == 200
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": TURN})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "messages" and "no chat template" in err["message"]
        assert c.post("/v1/completions", json={"model": "m", "prompt": "hi"}).status_code == 429
    finally:
        cluster.close()


def test_family_from_model_type_when_architectures_is_missing(model_dirs, tmp_path):
    for name in ("llama", "qwen2", "opt"):
        d = tmp_path / name
        _copy(model_dirs[name], d)
        _edit(d / "config.json", lambda c: c.pop("architectures"))
        assert ModelConfig.from_dir(d).arch is Arch(name)
    d = tmp_path / "gpt2"
    _copy(model_dirs["llama"], d)
    _edit(d / "config.json", lambda c: (c.pop("architectures"), c.update(model_type="gpt2")))
    with pytest.raises(ModelLoadError, match=r"config\.json: unsupported model_type 'gpt2'"):
        ModelConfig.from_dir(d)


def test_missing_key_and_bad_json_name_the_file(llama_dir, tmp_path):
    d = tmp_path / "m"
    _copy(llama_dir, d)
    _edit(d / "config.json", lambda c: c.pop("hidden_size"))
    with pytest.raises(ModelLoadError, match=r"config\.json: required key 'hidden_size'"):
        ModelConfig.from_dir(d)
    (d / "generation_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"generation_config\.json: invalid JSON"):
        ModelConfig.from_dir(d)


def test_eos_lists_and_rope_parameters(llama_dir, tmp_path):
    d = tmp_path / "m"
    _copy(llama_dir, d)
    _edit(d / "generation_config.json", lambda g: g.update(eos_token_id=[2, 5]))

    def to_v5(c):
        c["rope_parameters"] = {"rope_type": "linear", "factor": 2.0,
                                "rope_theta": c.pop("rope_theta", 10000.0)}
        c.pop("rope_scaling", None)
    _edit(d / "config.json", to_v5)
    cfg = ModelConfig.from_dir(d)
    assert cfg.eos_token_ids == (2, 5)
    assert cfg.rope_scaling == {"factor": 2.0, "rope_type": "linear"}
    _edit(d / "generation_config.json", lambda g: g.update(eos_token_id="2"))
    with pytest.raises(ModelLoadError, match="eos_token_id"):
        ModelConfig.from_dir(d)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_checkpoints_compute_in_float32_on_cpu(model_dirs, tmp_path, dtype):
    """A float16/bfloat16 checkpoint served with the CPU default (float32) gives the tokens the
    float32 model gives after rounding its weights to that dtype (transformers as the reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hydraserve.engine.config import EngineConfig
    from hydraserve.engine.engine import LLMEngine
    from hydraserve.engine.sequence import SamplingParams

    ref = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.float32)
    half = ref.to(getattr(torch, dtype))
    half.save_pretrained(tmp_path / "half")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(f"{model_dirs['llama']}/{f}", tmp_path / "half" / f)
    assert ModelConfig.from_dir(tmp_path / "half").checkpoint_dtype == dtype
    engine = LLMEngine(tmp_path / "half", EngineConfig())
    prompt = [5, 9, 14, 3, 7]
    ours = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "half", dtype=torch.float32)
    with torch.no_grad():
        theirs = back.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12,
                               do_sample=False)[0, len(prompt):].tolist()
    assert ours == theirs
