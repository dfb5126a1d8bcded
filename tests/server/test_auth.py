"""vLLM's --api-key (every /v1 request carries the key), the admin token beside it, --chat-template and
--max-model-len on the single-process server."""

from __future__ import annotations

import argparse

import pytest

from softprompt import Request
from softprompt.engine.errors import SoftPromptError
from softprompt.engine.server.app import ServerConfig
from softprompt.engine.server.cli import add_serve_arguments, build_server, read_chat_template
from softprompt.engine.server.registry import PromptRegistry

from .support import RunningServer, make_engine

KEY, ADMIN = "k-123", "adm-456"


@pytest.fixture(scope="module")
def keyed(model_dir_for):
    server = RunningServer(make_engine(model_dir_for("llama")), PromptRegistry(max_versions=2),
                           ServerConfig(api_key=KEY, admin_token=ADMIN))
    yield server
    server.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_every_v1_route_needs_the_api_key(keyed):
    http = keyed.client()
    body = {"model": "base", "prompt": [5, 6, 7], "max_tokens": 3}
    for headers in ({}, bearer("wrong"), {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
                    {"x-api-key": "wrong"}, {**bearer("wrong"), "x-api-key": KEY}):
        r = http.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
        assert http.get("/v1/models", headers=headers).status_code == 401
        assert http.post("/v1/chat/completions", headers=headers, json={
            "model": "base", "messages": [{"role": "user", "content": "hi"}]}).status_code == 401
        assert http.post("/invocations", json=body, headers=headers).status_code == 401  # SageMaker's route too
    assert http.post("/v1/completions", json=body, headers=bearer(KEY)).status_code == 200
    assert http.post("/invocations", json=body, headers=bearer(KEY)).status_code == 200
    assert http.post("/v1/completions", json=body, headers={"x-api-key": KEY}).status_code == 200  # Anthropic's
    assert http.post("/v1/completions", json=body, headers=bearer(ADMIN)).status_code == 200  # admin may serve too
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=bearer(KEY)) as r:
        assert r.status_code == 200 and "[DONE]" in r.read().decode()
    # open, as in vLLM: health, metrics, tokenizer routes
    assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
    assert http.get("/ping").status_code == 200
    assert http.post("/tokenize", json={"prompt": "the cat"}).status_code == 200
    assert 'code="401"' in http.get("/metrics").text  # the refusals are counted


def test_prompt_management_takes_the_admin_token_not_the_api_key(keyed):
    http = keyed.client()
    body = {"name": "h", "text": "hello"}
    assert http.post("/v1/prompts", json=body, headers=bearer(KEY)).status_code == 401
    assert http.post("/v1/prompts", json=body, headers=bearer(ADMIN)).status_code == 201
    assert http.delete("/v1/prompts/h", headers=bearer(ADMIN)).is_success


def test_openai_client_with_the_key(keyed):
    openai = pytest.importorskip("openai")
    import httpx

    def client(key: str):
        return openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=key, max_retries=0,
                             http_client=httpx.Client(trust_env=False))

    out = client(KEY).completions.create(model="base", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        client("EMPTY").models.list()


def test_without_an_admin_token_the_api_key_manages_prompts(model_dir_for):
    server = RunningServer(make_engine(model_dir_for("llama")), PromptRegistry(), ServerConfig(api_key=KEY))
    try:
        http = server.client()
        assert http.post("/v1/prompts", json={"name": "h", "text": "hello"}).status_code == 401
        assert http.post("/v1/prompts", json={"name": "h", "text": "hello"}, headers=bearer(KEY)).status_code == 201
    finally:
        server.stop()


def test_chat_template_and_max_model_len_options(model_dir_for, tmp_path):
    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    path = tmp_path / "chat.jinja"
    path.write_text(template)
    assert read_chat_template(str(path)) == template == read_chat_template(template)
    long_template = template + "{# " + "x" * 5000 + " #}"
    assert read_chat_template(long_template) == long_template
    with pytest.raises(SoftPromptError, match="neither a file nor a Jinja template"):
        read_chat_template(str(tmp_path / "missing.jinja"))
    engine = make_engine(model_dir_for("llama"))
    with pytest.raises(SoftPromptError, match="does not compile"):
        engine.set_chat_template("{% for m in messages %}")
    engine.set_chat_template(template)
    server = RunningServer(engine, PromptRegistry())
    try:
        http = server.client()
        r = http.post("/tokenize", json={"model": "base", "messages": [{"role": "user", "content": "the cat"}]})
        assert r.json()["tokens"] == engine.tokenizer.encode("<<the cat>>", add_special_tokens=False)
    finally:
        server.stop()
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args([str(model_dir_for("llama")), "--max-model-len", "40", "--chat-template", str(path),
                              "--api-key", KEY, "--device", "cpu", "--kv-cache-bytes", str(4 << 20)])
    app, registry = build_server(args)
    try:
        engine = app.state.loop.engine
        assert engine.config.max_positions == 40 and engine.tokenizer.hf.chat_template == template
        assert app.state.config.api_key == KEY
    finally:
        registry.close()
    with pytest.raises(SoftPromptError, match="max_model_len must be an integer in 1..256"):
        make_engine(model_dir_for("llama"), max_model_len=257)
    short = make_engine(model_dir_for("llama"), max_model_len=12)
    with pytest.raises(SoftPromptError, match="12 positions"):
        short.prepare(Request(input_ids=list(range(5, 18))))
