"""`softprompt serve`: argument parsing, prompt discovery, and a real server process on loopback."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

import httpx
import pytest
from safetensors.torch import save_file

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.errors import SoftPromptError
from softprompt.engine.server.cli import add_serve_arguments, discover_prompts
from softprompt.testing import build_prompt_tensor

from .support import free_port, interrupt, wait_until_healthy

SERVE = ("import sys, argparse; from softprompt.engine.server.cli import add_serve_arguments, run_serve; "
         "p = argparse.ArgumentParser(); add_serve_arguments(p); sys.exit(run_serve(p.parse_args(sys.argv[1:])))")


def test_discover_prompts(tmp_path, adapter_for):
    adapters = tmp_path / "prompts"
    shutil.copytree(adapter_for("llama", seed=0), adapters / "sentiment")
    save_file({"p": build_prompt_tensor(64, 3)}, str(adapters / "summary.safetensors"))
    (adapters / "notes.txt").write_text("ignored")
    found = discover_prompts([str(adapters), f"other={adapters / 'summary.safetensors'}",
                              str(adapters / "sentiment")])
    assert [(n, p.name) for n, p in found] == [("sentiment", "sentiment"), ("summary", "summary.safetensors"),
                                              ("other", "summary.safetensors"), ("sentiment", "sentiment")]
    with pytest.raises(SoftPromptError, match="does not exist"):
        discover_prompts([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SoftPromptError, match="no PEFT adapter"):
        discover_prompts([str(tmp_path / "empty")])


def test_serve_arguments_defaults_to_loopback():
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    args = p.parse_args(["model", "--prompts", "x", "y", "--port", "9"])
    assert args.host == "127.0.0.1" and args.port == 9 and args.prompts == ["x", "y"] and args.max_queue == 256


def test_serve_process_answers_and_stops_on_sigint(model_dir_for, adapter_for, tmp_path):
    model, adapter = model_dir_for("llama"), adapter_for("llama", seed=0)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(model), "--prompts", f"sent={adapter}", "--text-prompt", "h=be brief:",
         "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--kv-cache-bytes", str(4 << 20),
         "--prompt-dir", str(tmp_path / "store"), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, trust_env=False) as http:
            wait_until_healthy(http, proc, 90)
            assert {m["id"] for m in http.get("/v1/models").json()["data"]} == {"base", "sent", "h"}
            r = http.post("/v1/completions", json={"model": "sent", "prompt": [5, 6, 7], "max_tokens": 5,
                                                   "temperature": 0, "return_token_ids": True})
            got = r.json()["choices"][0]["token_ids"]
        engine = Engine(model, device="cpu", kv_cache_bytes=4 << 20)
        engine.add_prompt("sent", adapter)
        [want] = engine.generate(Request(prompt="sent", input_ids=[5, 6, 7], sampling=SamplingParams(max_new_tokens=5)))
        assert got == want.token_ids
    finally:
        interrupt(proc, 30)
    assert proc.returncode == 0, proc.stderr.read()
    assert (tmp_path / "store").is_dir()  # a given prompt dir is kept


def test_tool_call_reasoning_and_scheduling_flags(model_dir_for):
    from softprompt.engine.server.app import ServerConfig, create_app
    from softprompt.engine.server.cli import build_server, run_serve
    from softprompt.engine.server.ray_cli import settings_from_args

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    args = p.parse_args([str(model_dir_for("llama")), "--device", "cpu", "--kv-cache-bytes", str(4 << 20),
                         "--tool-call-parser", "hermes", "--enable-auto-tool-choice", "--reasoning-parser", "qwen3",
                         "--scheduling-policy", "priority"])
    app, registry = build_server(args)
    registry.close()
    assert (app.state.config.tool_call_parser, app.state.config.reasoning_parser) == ("hermes", "qwen3")
    settings = settings_from_args(args, 0)  # and to each Ray replica's server
    assert (settings.tool_call_parser, settings.reasoning_parser) == ("hermes", "qwen3")
    assert app.state.loop.engine.scheduler.config.policy == settings.scheduling_policy == "priority"
    with pytest.raises(SystemExit):
        p.parse_args(["m", "--tool-call-parser", "nope"])
    with pytest.raises(SystemExit):
        p.parse_args(["m", "--reasoning-parser", "nope"])
    with pytest.raises(SoftPromptError, match="--enable-auto-tool-choice needs --tool-call-parser"):
        run_serve(p.parse_args(["m", "--enable-auto-tool-choice"]))
    with pytest.raises(ValueError, match="unknown tool-call parser 'nope'"):
        create_app(app.state.loop.engine, config=ServerConfig(tool_call_parser="nope"))
    with pytest.raises(ValueError, match="unknown reasoning parser 'nope'"):
        create_app(app.state.loop.engine, config=ServerConfig(reasoning_parser="nope"))
