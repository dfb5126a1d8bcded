"""The live prompt registry over HTTP: upload a PEFT adapter, use it, replace it, address versions, delete it."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from softprompt import Request, SamplingParams
from softprompt.engine.server.app import ServerConfig
from softprompt.engine.server.registry import PromptRegistry
from softprompt.testing import build_prompt_tensor

from .support import RunningServer, make_engine


def adapter_files(adapter_dir: Path) -> list[tuple[str, tuple[str, bytes]]]:
    """The adapter directory as PEFT wrote it (README.md included), as multipart files."""
    return [("files", (p.name, p.read_bytes())) for p in sorted(adapter_dir.iterdir()) if p.is_file()]


def complete(http, model: str, ids=(5, 6, 7), max_tokens: int = 6) -> list[int]:
    r = http.post("/v1/completions", json={"model": model, "prompt": list(ids), "max_tokens": max_tokens,
                                           "temperature": 0, "ignore_eos": True, "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def reference_ids(served, source, ids=(5, 6, 7), max_tokens: int = 6, task_id: int | None = None) -> list[int]:
    name = f"ref{time.monotonic_ns()}"
    served.reference.add_prompt(name, source, task_id=task_id)
    try:
        [out] = served.expected(Request(prompt=name, input_ids=list(ids),
                                        sampling=SamplingParams(max_new_tokens=max_tokens, ignore_eos=True)))
    finally:
        served.reference.remove_prompt(name)
    return out.token_ids


def test_upload_use_replace_version_delete(served, adapter_for):
    http = served.server.client()
    first, second = adapter_for("llama", seed=2, num_virtual_tokens=6), adapter_for("llama", seed=3,
                                                                                    num_virtual_tokens=4)
    r = http.post("/v1/prompts", data={"name": "c"}, files=adapter_files(first))
    assert r.status_code == 201, r.text
    v1 = r.json()
    assert (v1["name"], v1["version"], v1["length"], v1["kind"]) == ("c", 1, 6, "peft")
    assert complete(http, "c") == reference_ids(served, first)

    narrow = save({"p": torch.ones(2, 8)})
    bad = http.post("/v1/prompts", data={"name": "c"}, files=[("files", ("c.safetensors", narrow))])
    assert bad.status_code == 400 and "prompt 'c' has hidden size 8" in bad.json()["error"]["message"]
    r = http.post("/v1/prompts", data={"name": "c"}, files=adapter_files(second))
    assert r.status_code == 201 and r.json()["version"] == 2 and r.json()["length"] == 4  # the refusal used none
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert models["c"]["version"] == 2 and models["c"]["versions"] == [1, 2] and models["c"]["length"] == 4
    assert complete(http, "c") == complete(http, "c@2") == reference_ids(served, second)
    assert complete(http, "c@1") == complete(http, f"c@{v1['content_hash']}") == reference_ids(served, first)
    info = http.get("/v1/prompts/c").json()
    assert [v["version"] for v in info["versions"]] == [1, 2] and info["version"] == 2
    assert http.get("/v1/prompts/c@1").json()["length"] == 6
    stored = served.server.registry.prompt_dir / "c"
    assert len([p for p in stored.iterdir() if (p / "adapter_model.safetensors").is_file()]) == 2

    # deleting one version keeps the other; deleting the name refuses new requests at once
    assert http.delete("/v1/prompts/c@1").json()["versions"] == [1]
    assert http.post("/v1/completions", json={"model": "c@1", "prompt": [5]}).status_code == 404
    assert complete(http, "c") == reference_ids(served, second)
    with http.stream("POST", "/v1/completions", json={"model": "c", "prompt": [5, 6], "max_tokens": 40,
                                                      "temperature": 0, "ignore_eos": True, "stream": True}) as s:
        lines = s.iter_lines()
        first_chunk = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first_chunk[6:])["choices"][0]["finish_reason"] is None
        assert http.delete("/v1/prompts/c").status_code == 200
        r = http.post("/v1/completions", json={"model": "c", "prompt": [5]})
        assert r.status_code == 404 and "not found" in r.json()["error"]["message"]
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    # the running request finished on the deleted prompt
    assert rest[-1]["choices"][0]["finish_reason"] == "length"
    assert "c" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert not any(stored.iterdir())
    assert http.get("/v1/prompts/c").status_code == 404
    served.server.assert_pool_empty()
    assert served.server.call(lambda e: [n for n in e.prompts.names() if n.startswith("c.")]) == []


def test_json_uploads_text_token_ids_and_base64_tensor(served):
    http = served.server.client()
    r = http.post("/v1/prompts", json={"name": "kind-words", "text": "be kind:"})
    assert r.status_code == 201 and r.json()["kind"] == "text"
    served.reference.add_prompt("kind-words", text="be kind:")
    [want] = served.expected(Request(prompt="kind-words", input_ids=[5, 6, 7],
                                     sampling=SamplingParams(max_new_tokens=6, ignore_eos=True)))
    assert complete(http, "kind-words") == want.token_ids
    tensor = build_prompt_tensor(64, 3, seed=9)
    blob = base64.b64encode(save({"prompt": tensor})).decode()
    r = http.post("/v1/prompts", json={"name": "t3", "files": {"t3.safetensors": blob}})
    assert r.status_code == 201 and r.json()["length"] == 3 and r.json()["kind"] == "tensor"
    assert complete(http, "t3") == reference_ids(served, tensor)
    r = http.post("/v1/prompts", json={"name": "ids", "token_ids": [40, 41, 42]})
    assert r.status_code == 201 and r.json()["length"] == 3
    for name in ("kind-words", "t3", "ids"):
        assert http.delete(f"/v1/prompts/{name}").status_code == 200


def test_upload_other_prompt_learning_adapters(served, tmp_path):
    """PEFT writes them like a prompt-tuning adapter (config + safetensors): the same upload serves them."""
    pytest.importorskip("peft")
    from softprompt.testing import (
        build_cartridge_adapter,
        build_cpt_adapter,
        build_p_tuning_adapter,
        build_prefix_tuning_adapter,
    )

    http = served.server.client()
    for name, adapter, kind, length in [
        ("ptune", build_p_tuning_adapter(served.model_dir, tmp_path / "ptune", num_virtual_tokens=5), "peft", 5),
        ("kv", build_prefix_tuning_adapter(served.model_dir, tmp_path / "kv", num_virtual_tokens=7), "prefix", 7),
        ("cart", build_cartridge_adapter(served.model_dir, tmp_path / "cart", num_virtual_tokens=3), "prefix", 3),
        ("cpt", build_cpt_adapter(served.model_dir, tmp_path / "cpt", token_ids=[9, 10, 11, 12]), "peft", 4),
    ]:
        r = http.post("/v1/prompts", data={"name": name}, files=adapter_files(adapter))
        assert r.status_code == 201, r.text
        assert (r.json()["kind"], r.json()["length"]) == (kind, length)
        assert complete(http, name) == reference_ids(served, adapter)
        assert http.delete(f"/v1/prompts/{name}").status_code == 200
    served.server.assert_pool_empty()


def test_upload_a_task_of_a_multitask_adapter(served, tmp_path):
    """`task_id` (a multipart field or a JSON member) picks the task; without it a multi-task adapter is refused."""
    pytest.importorskip("peft")
    from softprompt.testing import build_multitask_prompt_tuning_adapter

    mpt = build_multitask_prompt_tuning_adapter(served.model_dir, tmp_path / "mpt", num_virtual_tokens=4, seed=4)
    http = served.server.client()
    r = http.post("/v1/prompts", data={"name": "m1", "task_id": "1"}, files=adapter_files(mpt))
    assert r.status_code == 201, r.text
    assert complete(http, "m1") == reference_ids(served, f"{mpt}#1")
    blobs = {p.name: base64.b64encode(p.read_bytes()).decode() for p in mpt.iterdir() if p.is_file()}
    r = http.post("/v1/prompts", json={"name": "m2", "files": blobs, "task_id": 2})
    assert r.status_code == 201, r.text
    assert complete(http, "m2") == reference_ids(served, mpt, task_id=2) != complete(http, "m1")
    for data, status, words in [({"name": "m"}, 400, "of 3 tasks: pick one with task_id"),
                                ({"name": "m", "task_id": "3"}, 400, "not one of the adapter's 3 tasks"),
                                ({"name": "m", "task_id": "-1"}, 400, "non-negative integer")]:
        r = http.post("/v1/prompts", data=data, files=adapter_files(mpt))
        assert r.status_code == status and words in r.json()["error"]["message"], (data, r.text)
    r = http.post("/v1/prompts", json={"name": "m", "text": "hi", "task_id": 0})
    assert r.status_code == 400 and "send its files" in r.json()["error"]["message"]
    assert "m" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
    for name in ("m1", "m2"):
        assert http.delete(f"/v1/prompts/{name}").status_code == 200
    served.server.assert_pool_empty()


def test_bad_uploads_are_refused_and_leave_nothing(served, adapter_for, tmp_path):
    http = served.server.client()
    root = served.server.registry.prompt_dir
    before = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    wrong_width = save({"prompt": torch.zeros(4, 32)})
    cases = [
        ({"name": "w"}, [("files", ("w.safetensors", wrong_width))], 400, "hidden size"),
        ({"name": "nan"}, [("files", ("n.safetensors", save({"p": torch.full((2, 64), float("nan"))})))], 400, "NaN"),
        ({"name": "p"}, [("files", ("adapter_config.json", b"{}")), ("files", ("adapter_model.bin", b"\x80"))],
         400, "pickle"),
        ({"name": "junk"}, [("files", ("x.safetensors", b"not a safetensors file"))], 400, "cannot read"),
        ({"name": "lora"}, [("files", ("adapter_config.json", json.dumps({"peft_type": "LORA"}).encode())),
                            ("files", ("adapter_model.safetensors", save({"prompt_embeddings": torch.zeros(2, 64)})))],
         400, "PROMPT_TUNING"),
        ({"name": "../escape"}, [("files", ("x.safetensors", save({"p": torch.zeros(2, 64)})))], 400, "invalid"),
        ({"name": "base"}, [("files", ("x.safetensors", save({"p": torch.zeros(2, 64)})))], 400, "reserved"),
        ({"name": "v.v2"}, [("files", ("x.safetensors", save({"p": torch.zeros(2, 64)})))], 400, "versions"),
        ({}, [("files", ("x.safetensors", save({"p": torch.zeros(2, 64)})))], 422, "name"),
    ]
    for data, files, status, words in cases:
        r = http.post("/v1/prompts", data=data, files=files)
        assert r.status_code == status and words in r.json()["error"]["message"], (data, r.text)
    # a client file name cannot choose where the file goes
    r = http.post("/v1/prompts", data={"name": "x"}, files=[("files", ("../../evil.safetensors", wrong_width))])
    assert r.status_code == 400
    assert not (root.parent / "evil.safetensors").exists() and not (root / "evil.safetensors").exists()
    after = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert after == before
    assert http.post("/v1/prompts", json={"name": "t", "text": ""}).status_code == 400
    assert http.post("/v1/prompts", content=b"name=x", headers={"content-type": "text/plain"}).status_code == 415
    assert {m["id"] for m in http.get("/v1/models").json()["data"]} == {"base", "a", "b", "polite"}


@pytest.fixture(scope="module")
def guarded(model_dir_for):
    server = RunningServer(make_engine(model_dir_for("llama")), PromptRegistry(max_versions=2),
                           ServerConfig(admin_token="s3cret", max_body_bytes=4096, max_upload_bytes=1 << 16))
    yield server
    server.stop()


ADMIN = {"Authorization": "Bearer s3cret"}


def test_admin_endpoints_need_the_bearer_token(guarded):
    http = guarded.client()
    body = {"name": "h", "text": "hello"}
    assert http.post("/v1/prompts", json=body).status_code == 401
    r = http.post("/v1/prompts", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert http.post("/v1/prompts", json=body, headers=ADMIN).status_code == 201
    assert http.get("/v1/prompts/h").status_code == 401 and http.get("/v1/prompts").status_code == 401
    assert http.delete("/v1/prompts/h").status_code == 401
    # serving is open
    assert http.get("/v1/models").status_code == 200
    assert complete(http, "h") and http.delete("/v1/prompts/h", headers=ADMIN).is_success


def test_old_versions_beyond_the_limit_are_dropped(guarded):
    http = guarded.client()
    for i in range(3):
        assert http.post("/v1/prompts", json={"name": "v", "token_ids": [40 + i, 41]}, headers=ADMIN).status_code == 201
    assert [v["version"] for v in http.get("/v1/prompts/v", headers=ADMIN).json()["versions"]] == [2, 3]
    assert http.post("/v1/completions", json={"model": "v@1", "prompt": [5]}).status_code == 404
    assert complete(http, "v@2") != complete(http, "v@3") == complete(http, "v")
    assert guarded.call(lambda e: sorted(n for n in e.prompts.names() if n.startswith("v."))) == ["v.v2", "v.v3"]
    assert http.delete("/v1/prompts/v", headers=ADMIN).json()["versions"] == [2, 3]


def test_bodies_over_the_limits_get_413(guarded):
    http = guarded.client()
    r = http.post("/v1/completions", json={"model": "base", "prompt": "x" * 5000})
    assert r.status_code == 413

    def chunked():  # no Content-Length: the limit still holds while reading
        yield b'{"model": "base", "prompt": "'
        for _ in range(20):
            yield b"x" * 512

    r = http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["message"]
    files = [("files", ("big.safetensors", save({"p": torch.zeros(300, 64)})))]  # 77 kB > 64 kB
    assert http.post("/v1/prompts", data={"name": "big"}, files=files, headers=ADMIN).status_code == 413
    assert http.post("/v1/prompts", json={"name": "small", "text": "x" * 5000}, headers=ADMIN).status_code == 400
    assert http.get("/health").json()["status"] == "ok"
