"""The gateway's routes beside completions -- /tokenize, /detokenize, /version and the fields of
/v1/models -- and the OpenAI-shaped 500 (FastAPI's test client; no worker is started)."""
from __future__ import annotations

import json
import shutil

import pytest

import hydraserve
from hydraserve.cluster.local import LocalCluster
from hydraserve.config import ConfigError, GatewayConfig, default_local_cluster, \
    model_entry_from_dict

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


def _client(model_dirs, models: list[dict]):
    from fastapi.testclient import TestClient

    from hydraserve.gateway.app import Gateway, create_app

    cfg = default_local_cluster()
    cluster = LocalCluster(cfg)
    gateway = Gateway(GatewayConfig(max_queue=0), cfg, cluster, [])
    c = TestClient(create_app(gateway))  # no lifespan: no cluster process is started
    for m in models:
        r = c.post("/admin/models", json=m)
        assert r.status_code == 200, r.text
    c.gateway = gateway
    return c, cluster


@pytest.fixture(scope="module")
def client(model_dirs):
    c, cluster = _client(model_dirs, [{"name": "m", "path": model_dirs["llama"]}])
    yield c
    cluster.close()


@pytest.fixture(scope="module")
def two(model_dirs, tmp_path_factory):
    """Two models: "m", and "plain" (a copy without a chat template, owned by "acme")."""
    plain = tmp_path_factory.mktemp("plain") / "llama"
    shutil.copytree(model_dirs["llama"], plain)
    cfg_path = plain / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    c, cluster = _client(model_dirs, [{"name": "m", "path": model_dirs["llama"]},
                                      {"name": "plain", "path": str(plain), "owned_by": "acme"}])
    yield c
    cluster.close()


def tok(c, name="m"):
    return c.gateway.tokenizers[name]


def refused(r, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    return err


# -- /tokenize ------------------------------------------------------------------------------------

def test_tokenize_a_prompt_as_the_tokenizer_does(client):
    text = "Hello, wörld! 1 2 3"
    r = client.post("/tokenize", json={"model": "m", "prompt": text})
    assert r.status_code == 200, r.text
    ids = tok(client).encode(text)
    assert r.json() == {"count": len(ids), "max_model_len": 3072, "tokens": ids}
    r = client.post("/tokenize", json={"model": "m", "prompt": text, "add_special_tokens": False,
                                       "return_token_strs": True})
    ids = tok(client).encode(text, add_special_tokens=False)
    assert r.json()["tokens"] == ids
    assert r.json()["token_strs"] == [tok(client).backend.id_to_token(i) for i in ids]


def test_tokenize_messages_through_the_chat_template(client):
    t = tok(client)
    r = client.post("/tokenize", json={"model": "m", "messages": MSGS})
    assert r.status_code == 200, r.text
    ids = t.encode(t.apply_chat_template(MSGS), add_special_tokens=False)
    assert r.json()["tokens"] == ids and r.json()["count"] == len(ids)
    bare = client.post("/tokenize", json={"model": "m", "messages": MSGS,
                                          "add_generation_prompt": False}).json()
    assert bare["tokens"] == t.encode(t.apply_chat_template(MSGS, add_generation_prompt=False),
                                      add_special_tokens=False)
    assert bare["count"] < len(ids)
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi "},
                                          {"type": "text", "text": "there"}]}]
    same = client.post("/tokenize", json={"messages": parts}).json()
    assert same["tokens"] == t.encode(t.apply_chat_template(
        [{"role": "user", "content": "hi there"}]), add_special_tokens=False)


def test_tokenize_without_a_model_uses_the_only_one(client):
    r = client.post("/tokenize", json={"prompt": "abc"})
    assert r.status_code == 200 and r.json()["tokens"] == tok(client).encode("abc")


@pytest.mark.parametrize("body,status,param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "m"}, 400, "prompt"),
    ({"model": "m", "prompt": "x", "messages": MSGS}, 400, "prompt"),
    ({"model": "m", "prompt": "x", "add_generation_prompt": True}, 400, "add_generation_prompt"),
    ({"model": "m", "prompt": "x", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
    ({"model": "m", "prompt": 5}, 400, "prompt"),
    ({"model": "m", "prompt": "x", "max_tokens": 3}, 400, "max_tokens"),
    ({"model": "m", "messages": []}, 400, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages"),
    ({"model": "m", "prompt": "\ud800"}, 400, "prompt"),
])
def test_tokenize_refuses(client, body, status, param):
    r = client.post("/tokenize", content=json.dumps(body).encode(),
                    headers={"Content-Type": "application/json"})
    err = refused(r, status, param)
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_tokenize_with_two_models_needs_a_name(two):
    refused(two.post("/tokenize", json={"prompt": "x"}), 400, "model")
    assert two.post("/tokenize", json={"model": "plain", "prompt": "x"}).status_code == 200
    err = refused(two.post("/tokenize", json={"model": "plain", "messages": MSGS}), 400,
                  "messages")
    assert "chat template" in err["message"]


# -- /detokenize ----------------------------------------------------------------------------------

def test_detokenize_round_trip(client):
    text = "Hello, wörld! ünïcode and <|im_end|> too"
    ids = client.post("/tokenize", json={"model": "m", "prompt": text}).json()["tokens"]
    r = client.post("/detokenize", json={"model": "m", "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": text}
    assert client.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize("body,status,param", [
    ({"model": "m", "tokens": [512]}, 400, "tokens"),
    ({"model": "m", "tokens": [-1]}, 400, "tokens"),
    ({"model": "m", "tokens": [10**30]}, 400, "tokens"),
    ({"model": "m", "tokens": ["1"]}, 400, "tokens"),
    ({"model": "m", "tokens": [1.0]}, 400, "tokens"),
    ({"model": "m"}, 400, "tokens"),
    ({"model": "m", "tokens": [1], "skip": True}, 400, "skip"),
    ({"model": "nope", "tokens": [1]}, 404, "model"),
])
def test_detokenize_refuses(client, body, status, param):
    refused(client.post("/detokenize", json=body), status, param)


# -- /version, /v1/models, config -----------------------------------------------------------------

def test_version(client):
    assert client.get("/version").json() == {"version": hydraserve.__version__}


def test_models_list_fields(two):
    data = two.get("/v1/models").json()
    assert data["object"] == "list"
    by_id = {m["id"]: m for m in data["data"]}
    assert set(by_id) == {"m", "plain"}
    for name, owner in (("m", "hydraserve"), ("plain", "acme")):
        m = by_id[name]
        assert set(m) == {"id", "object", "created", "owned_by", "max_model_len", "root",
                          "parent"}
        assert m["object"] == "model" and isinstance(m["created"], int) and m["created"] > 0
        assert m["owned_by"] == owner and m["root"] == name and m["parent"] is None
        assert m["max_model_len"] == 3072
    admin = {m["name"]: m for m in two.get("/admin/models").json()["models"]}
    assert admin["plain"]["owned_by"] == "acme"


def test_owned_by_in_a_model_entry():
    assert model_entry_from_dict({"name": "a", "path": "/x"}).owned_by == "hydraserve"
    assert model_entry_from_dict({"name": "a", "path": "/x", "owned_by": "me"}).owned_by == "me"
    for bad in (5, ["me"], "x" * 300, "a\nb", "\ud800"):
        with pytest.raises(ConfigError, match="owned_by"):
            model_entry_from_dict({"name": "a", "path": "/x", "owned_by": bad})


def test_admin_refuses_a_bad_owned_by(client, model_dirs):
    r = client.post("/admin/models", json={"name": "x", "path": model_dirs["llama"],
                                           "owned_by": 7})
    refused(r, 400, None)


# -- a server error is answered in the OpenAI shape ------------------------------------------------

def test_an_unexpected_error_is_an_openai_shaped_500(client, monkeypatch):
    from fastapi.testclient import TestClient

    def boom(*_a, **_k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(tok(client), "encode", boom)
    r = TestClient(client.app, raise_server_exceptions=False).post(
        "/tokenize", json={"model": "m", "prompt": "x"})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["type"] == "server_error" and err["message"].startswith("internal error")
    assert "a bug" not in err["message"]  # details go to the log, not to the client
