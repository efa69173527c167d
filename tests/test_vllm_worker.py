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

from hydraserve.httpjson import CallError, call, get_bytes, stream
from hydraserve.make_model import ModelSpec, make_model
from hydraserve.store.launch import ServerProcess
from hydraserve.worker.vllm_worker import (choice_seed, completion_body, find_vllm_python,
                                           token_items)


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


def test_sampling_params_pass_through_to_vllm():
    body = {"prompt_ids": [5, 6], "max_tokens": 8, "presence_penalty": 0.5,
            "frequency_penalty": -0.25, "repetition_penalty": 1.2, "min_tokens": 3,
            "logit_bias": {"17": 5, "3": -100.0}, "logprobs": 2}
    out = completion_body("m", body)
    assert out["presence_penalty"] == 0.5 and out["frequency_penalty"] == -0.25
    assert out["repetition_penalty"] == 1.2 and out["min_tokens"] == 3
    assert out["logit_bias"] == {"17": 5.0, "3": -100.0}
    assert out["logprobs"] == 2 and out["return_tokens_as_token_ids"] is True
    assert "echo" not in out and "prompt_logprobs" not in out
    plain = completion_body("m", {"prompt_ids": [1]})
    assert not {"logprobs", "echo", "min_tokens", "logit_bias", "return_tokens_as_token_ids",
                "presence_penalty"} & plain.keys()
    with pytest.raises(ValueError):
        completion_body("m", {"prompt_ids": [1], "logprobs": -1})


def test_prompt_logprobs_come_by_echo_and_a_resumed_stream_asks_for_the_rest():
    # vLLM refuses prompt_logprobs with stream: true; echo + logprobs streams them instead
    out = completion_body("m", {"prompt_ids": [5, 6], "prompt_logprobs": 3, "logprobs": 1})
    assert out["echo"] is True and out["logprobs"] == 3 and "prompt_logprobs" not in out
    assert completion_body("m", {"prompt_ids": [5], "prompt_logprobs": 0})["logprobs"] == 0
    resumed = completion_body("m", {"prompt_ids": [5, 6], "output_ids": [7, 8, 9],
                                    "max_tokens": 10, "min_tokens": 4, "prompt_logprobs": 2})
    assert resumed["prompt"] == [5, 6, 7, 8, 9] and resumed["max_tokens"] == 7
    assert resumed["min_tokens"] == 1 and "echo" not in resumed and "logprobs" not in resumed
    assert completion_body("m", {"prompt_ids": [5], "output_ids": [7, 8], "max_tokens": 9,
                                 "min_tokens": 1})["min_tokens"] == 0


def test_each_choice_gets_its_own_seed():
    seeds = [completion_body("m", {"prompt_ids": [1], "seed": 7, "choice": j})["seed"]
             for j in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4
    assert seeds[1] == choice_seed(7, 1) == completion_body(
        "m", {"prompt_ids": [1], "seed": 7, "choice": 1})["seed"]  # deterministic
    assert choice_seed(8, 1) != seeds[1] and choice_seed(-3, 0) == -3
    assert all(0 <= choice_seed(s, j) < 2 ** 63 for s in (-(2 ** 63), 0, 2 ** 63 - 1)
               for j in (1, 2, 99))


# chunks of vLLM 0.32's stream for prompt [7, 99, 4, 250, 31, 8] of the test model below,
# asked with logprobs (k = 2), and with echo (logprobs 1: the prompt_logprobs = 1 request)
LOGPROB_CHUNK = {"choices": [{"index": 0, "text": " w", "logprobs": {
    "text_offset": [24], "token_logprobs": [-1.7835640907287598], "tokens": ["token_id:320"],
    "top_logprobs": [{"token_id:320": -1.7835640907287598, "token_id:112": -1.818993091583252}]},
    "finish_reason": "length", "stop_reason": None, "prompt_token_ids": None,
    "token_ids": [320]}]}
ECHO_CHUNK = {"choices": [{"index": 0, "text": "", "logprobs": {
    "text_offset": [0, 10, 21, 31, 43, 54, 64],
    "token_logprobs": [None, -18.412235260009766, -13.6455659866333, -11.240816116333008,
                       -11.016630172729492, -8.477334976196289, -0.7664911150932312],
    "tokens": ["token_id:7", "token_id:99", "token_id:4", "token_id:250", "token_id:31",
               "token_id:8", "token_id:248"],
    "top_logprobs": [None,
                     {"token_id:99": -18.412235260009766, "token_id:220": -0.49430203437805176},
                     {"token_id:4": -13.6455659866333, "token_id:432": -0.8271530270576477},
                     {"token_id:250": -11.240816116333008, "token_id:501": -0.7107861638069153},
                     {"token_id:31": -11.016630172729492, "token_id:437": -0.9089332222938538},
                     {"token_id:8": -8.477334976196289, "token_id:231": -0.4896163046360016},
                     {"token_id:248": -0.7664911150932312}]},
    "finish_reason": None, "stop_reason": None, "prompt_token_ids": [7, 99, 4, 250, 31, 8],
    "token_ids": [248]}]}


def test_vllm_logprobs_become_ours():
    [item] = token_items(LOGPROB_CHUNK, {"prompt_ids": [1], "logprobs": 2})
    assert item == {"token_id": 320, "finish_reason": "length",
                    "logprob": -1.7835640907287598,
                    "top_logprobs": [[320, -1.7835640907287598], [112, -1.818993091583252]]}
    # vLLM adds the chosen token when it is not among the top k: the top k stay, by value
    [item] = token_items(LOGPROB_CHUNK, {"prompt_ids": [1], "logprobs": 1})
    assert item["top_logprobs"] == [[320, -1.7835640907287598]]
    unordered = {"choices": [{"token_ids": [5], "finish_reason": None, "logprobs": {
        "token_logprobs": [-3.0], "top_logprobs": [{"token_id:5": -3.0, "token_id:9": -0.5,
                                                    "token_id:2": -1.0}]}}]}
    assert token_items(unordered, {"logprobs": 2})[0]["top_logprobs"] == [[9, -0.5], [2, -1.0]]
    # not asked for (vLLM sends them for prompt_logprobs alone): not passed on
    assert token_items(LOGPROB_CHUNK, {"prompt_ids": [1]}) == \
        [{"token_id": 320, "finish_reason": "length"}]


def test_vllm_echo_becomes_prompt_logprobs_on_the_first_token():
    body = {"prompt_ids": [7, 99, 4, 250, 31, 8], "prompt_logprobs": 1}
    [item] = token_items(ECHO_CHUNK, body)
    assert item["token_id"] == 248 and "logprob" not in item
    plp = item["prompt_logprobs"]
    assert len(plp) == 6 and plp[0] is None
    assert plp[1] == [-18.412235260009766, [[220, -0.49430203437805176]]]
    assert plp[5] == [-8.477334976196289, [[231, -0.4896163046360016]]]
    [item] = token_items(ECHO_CHUNK, {**body, "logprobs": 0})
    assert item["logprob"] == -0.7664911150932312 and item["top_logprobs"] == []
    assert [len(e[1]) for e in item["prompt_logprobs"][1:]] == [1] * 5


def test_vllm_errors_keep_the_requests_fault():
    chunk = {"error": {"message": "Requested sample logprobs of 25, which is greater than max "
                       "allowed: 20", "type": "BadRequestError", "code": 400}}
    assert token_items(chunk) == [{"error": chunk["error"]["message"], "status": 400}]
    assert token_items({"error": {"message": "x", "code": 500}}) == [{"error": "x"}]
    assert token_items({"error": "down"}) == [{"error": "down"}]


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

        # logprobs and prompt logprobs (vLLM's raw ones) through the worker, against
        # transformers'; a resumed stream; a request vLLM refuses
        url = inst["stages"][0]["url"]
        ask = {"prompt_ids": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
               "logprobs": 2, "prompt_logprobs": 2}
        items = list(stream(url, "/generate", ask))
        assert [i["token_id"] for i in items] == out[:4]
        with torch.no_grad():
            lp = torch.log_softmax(ref(torch.tensor([prompt + out])).logits[0].float(), -1)

        def near(pos: int, tid: int, got: float, top: list) -> None:
            assert got == pytest.approx(lp[pos, tid].item(), abs=2e-3)
            assert [t for t, _ in top] == torch.topk(lp[pos], 2).indices.tolist()

        for i, item in enumerate(items):
            near(len(prompt) + i - 1, out[i], item["logprob"], item["top_logprobs"])
        plp = items[0]["prompt_logprobs"]
        assert plp[0] is None and len(plp) == len(prompt)
        for j in range(1, len(prompt)):
            near(j - 1, prompt[j], *plp[j])
        assert not any("prompt_logprobs" in i for i in items[1:])
        resumed = list(stream(url, "/generate", {**ask, "output_ids": out[:2]}))
        assert [i["token_id"] for i in resumed] == out[2:4]
        assert "prompt_logprobs" not in resumed[0] and "logprob" in resumed[0]
        assert [i.get("status") for i in stream(url, "/generate", {**ask, "logprobs": 25})] \
            == [400]
    finally:
        assert server.stop() == 0
    if vllm_pid:  # stopping the gateway stopped the worker, and the worker stopped vLLM
        with pytest.raises(ProcessLookupError):
            os.kill(vllm_pid, 0)
