"""The genuine vLLM as a serverless worker (`--engine vllm`): the request translation, the store's
side files the stock engine needs, and -- where vLLM is installed -- a real cold start through
`hydraserve serve --exec-type serverless_vllm --engine vllm`, checked token for token against
transformers."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from hydraserve.httpjson import CallError, call, get_bytes
from hydraserve.make_model import ModelSpec, make_model
from hydraserve.store.launch import ServerProcess
from hydraserve.worker.vllm_worker import completion_body, find_vllm_python, token_items


def test_generate_body_becomes_a_token_id_completion():
    body = {"prompt_ids": [5, 6, 7], "max_tokens": 4, "temperature": 0.5, "top_p": 0.9,
            "top_k": 0, "seed": 3, "stop_token_ids": [2], "ignore_eos": True}
    out = completion_body("m", body)
    assert out["prompt"] == [5, 6, 7] and out["stream"] and out["return_token_ids"]
    assert out["model"] == "m" and out["max_tokens"] == 4 and out["temperature"] == 0.5
    assert out["top_k"] == -1  # our 0 = off is vLLM's -1
    assert out["top_p"] == 0.9 and out["seed"] == 3 and out["stop_token_ids"] == [2]
    assert out["ignore_eos"] is True
    assert "seed" not in completion_body("m", {"prompt_ids": [1]})


def test_stream_chunks_become_one_item_per_token():
    chunk = {"choices": [{"index": 0, "text": "ab", "token_ids": [11, 12],
                          "finish_reason": "length"}]}
    assert token_items(chunk) == [{"token_id": 11, "finish_reason": None},
                                  {"token_id": 12, "finish_reason": "length"}]
    assert token_items({"choices": [{"token_ids": [], "finish_reason": "stop"}]}) == \
        [{"token_id": None, "finish_reason": "stop"}]
    assert token_items({"choices": [{"token_ids": [], "finish_reason": None}]}) == []
    assert token_items({"error": {"message": "boom"}}) == [{"error": "boom"}]


def test_store_serves_the_side_files_a_stock_engine_needs(tmp_path, llama_dir):
    root = tmp_path / "root"
    root.mkdir()
    (root / "m").symlink_to(llama_dir)
    store = ServerProcess(["store", "serve", "--root", str(root)], tmp_path / "store.log")
    agent = ServerProcess(["store", "agent", "--node", "n0", "--remote", store.url],
                          tmp_path / "agent.log")
    try:
        tok = get_bytes(store.url, "/models/m/files/tokenizer.json")
        assert tok == open(os.path.join(llama_dir, "tokenizer.json"), "rb").read()
        assert b"num_hidden_layers" in get_bytes(store.url, "/models/m/files/config.json")
        for path in ("/models/m/files/model.safetensors", "/models/nope/files/config.json",
                     "/models/m/files/..%2Fconfig.json", "/models/m/files/tokenizer.model"):
            with pytest.raises(CallError) as e:
                get_bytes(store.url, path)
            assert e.value.status == 404
        assert call(agent.url, "GET", "/health")["remote"] == store.url
    finally:
        agent.stop()
        store.stop()


def test_serve_refuses_vllm_with_a_pipeline_or_without_vllm(tmp_path):
    cmd = [sys.executable, "-m", "hydraserve.cli", "serve", "--engine", "vllm", "--port", "0"]
    r = subprocess.run([*cmd, "--exec-type", "hydraserve"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "whole models" in r.stderr
    if find_vllm_python(sys.executable):
        pytest.skip("this Python has vLLM: the missing-vLLM error cannot be shown with it")
    r = subprocess.run([*cmd, "--exec-type", "serverless_vllm", "--vllm-python", sys.executable],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no Python with vLLM" in r.stderr


VLLM_PY = find_vllm_python(os.environ.get("HYDRASERVE_VLLM_PYTHON"))


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(VLLM_PY is None, reason="vLLM is not installed (see the README)")
def test_a_cold_start_on_the_genuine_vllm_matches_transformers(tmp_path):
    """~1 min: the storage path delivers the model to the node, the real vLLM OpenAI server
    starts on it, and the gateway streams its greedy tokens, equal to transformers'."""
    openai = pytest.importorskip("openai")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    # head size 32: one that vLLM's CPU attention supports
    model = make_model(tmp_path / "m", ModelSpec(arch="llama", hidden=128, layers=2, heads=4,
                                                 kv_heads=2, vocab=512, seed=21))
    cluster = {"device": "cpu", "scale": {"size_scale": 100, "after_fetch_ms": 0},
               "servers": [{"name": f"s{i}", "gpus": [24], "nic_gbps": 16} for i in range(2)]}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(
        {"models": [{"name": "m", "path": str(model), "ttft_slo_s": 600}]}))
    server = ServerProcess(["serve", "--cluster", str(tmp_path / "cluster.yaml"), "--models",
                            str(tmp_path / "models.yaml"), "--exec-type", "serverless_vllm",
                            "--engine", "vllm", "--vllm-python", VLLM_PY, "--port", "0",
                            "--keep-alive", "600", "--log-dir", str(tmp_path / "logs")],
                           tmp_path / "gateway.log")
    vllm_pid = None
    try:
        prompt = [7, 99, 4, 250, 31, 8]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0,
                               timeout=600)
        text = "".join(c.choices[0].text for c in client.completions.create(
            model="m", prompt=prompt, max_tokens=8, temperature=0, stream=True,
            extra_body={"ignore_eos": True}))
        inst = call(server.url, "GET", "/admin/instances")["instances"][0]
        health = call(inst["stages"][0]["url"], "GET", "/health")
        assert health["engine"] == "vllm" and health["phase"] == "ready"
        tl = health["timeline"]
        assert tl["attached"] <= tl["weights_ready"] <= tl["vllm_started"] <= tl["engine_ready"]
        vllm_pid = health["vllm_pid"]
        os.kill(vllm_pid, 0)  # vLLM runs

        ref = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                           min_new_tokens=8)[0, len(prompt):].tolist()
        from hydraserve.tokenizer import Tokenizer

        assert text == Tokenizer.from_dir(model).decode(out)
    finally:
        assert server.stop() == 0
    if vllm_pid:  # stopping the gateway stopped the worker, and the worker stopped vLLM
        with pytest.raises(ProcessLookupError):
            os.kill(vllm_pid, 0)
