"""`softprompt serve --ray --replicas 2`: a real process starting a local Ray cluster, answering, stopping on SIGINT."""

from __future__ import annotations

import shutil
import subprocess
import sys

import httpx

from softprompt import Engine, Request, SamplingParams

from .support import free_port, interrupt, wait_until_healthy


def test_serve_ray_process_answers_and_stops_on_sigint(model_dir_for, adapter_for, tmp_path):
    model, adapter = model_dir_for("llama"), adapter_for("llama", seed=3)
    prompt_dir = tmp_path / "shared"
    shutil.copytree(adapter, prompt_dir / "sent")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "softprompt", "serve", str(model), "--ray", "--replicas", "2", "--replica-cpus", "1",
         "--prompt-dir", str(prompt_dir), "--text-prompt", "h=be brief:", "--host", "127.0.0.1", "--port", str(port),
         "--device", "cpu", "--kv-cache-bytes", str(4 << 20), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, trust_env=False) as http:
            health = wait_until_healthy(http, proc, 180, ready=lambda body: len(body["replicas"]) == 2)
            assert health["routing"] == "affinity" and health["replicas_configured"] == 2
            assert {m["id"] for m in http.get("/v1/models").json()["data"]} == {"base", "sent", "h"}
            got = {}
            for name in ("sent", "h", "base"):
                r = http.post("/v1/completions", json={"model": name, "prompt": [5, 6, 7], "max_tokens": 5,
                                                       "temperature": 0, "return_token_ids": True})
                assert r.status_code == 200, r.text
                got[name] = r.json()["choices"][0]["token_ids"]
        engine = Engine(model, device="cpu", kv_cache_bytes=4 << 20)
        engine.add_prompt("sent", adapter)
        engine.add_prompt("h", text="be brief:")
        for name, tokens in got.items():
            [want] = engine.generate(Request(prompt=None if name == "base" else name, input_ids=[5, 6, 7],
                                             sampling=SamplingParams(max_new_tokens=5)))
            assert tokens == want.token_ids, name
    finally:
        interrupt(proc, 90)
    assert proc.returncode == 0, proc.stdout.read()[-3000:]
