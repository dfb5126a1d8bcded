"""Helpers for the HTTP server tests: a real uvicorn server on 127.0.0.1 in a background thread."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from softprompt import Engine
from softprompt.engine.server.app import ServerConfig, create_app
from softprompt.engine.server.registry import PromptRegistry

KV_BYTES = 4 << 20  # a small pool: quick to allocate, and leaks show

# a chat template that renders tools, earlier calls (their arguments as objects) and tool turns, for the tool-calling
# tests of every API; and a parameters schema a random model answers briefly under a constraint
TOOLS_TEMPLATE = (
    "{% if tools %}tools: {% for t in tools %}{{ t.function.name }}({{ t.type }}) "
    "{% endfor %}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}</tool_call>{% endfor %}{% if m.tool_call_id %} (for {{ m.tool_call_id }}){% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
UNIT_SCHEMA = {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["unit"],
               "additionalProperties": False}


class RunningServer:
    """uvicorn on a loopback socket bound by us (a free port, no race), stopped by stop()."""

    def __init__(self, engine: Engine, registry: PromptRegistry, config: ServerConfig | None = None):
        self.engine = engine
        self.registry = registry
        self.app = create_app(engine, registry, config)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on",
                                                     timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    @property
    def loop(self):
        return self.app.state.loop

    def call(self, fn, timeout: float = 30.0):
        """fn(engine) on the engine loop thread."""
        return self.loop.call(fn).result(timeout)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0, trust_env=False, **kw)

    def openai(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60.0,
                      http_client=httpx.Client(trust_env=False), **kw)

    def wait_idle(self, timeout: float = 20.0) -> None:
        """Until the engine has nothing to run and no HTTP request holds a slot (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            busy = self.call(lambda e: e.has_unfinished_requests())
            if not busy and self.app.state.admission.in_flight == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError("the server did not become idle")
            time.sleep(0.05)

    def assert_pool_empty(self) -> None:
        """No request holds KV: every block is free or held by an idle cached prefix or request block."""
        self.wait_idle()

        def check(e: Engine):
            return e.kv_is_idle(), len(set(e.pool._free)) == len(e.pool._free)

        assert self.call(check) == (True, True)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._sock.close()
        self.registry.close()
        assert not self._thread.is_alive(), "the test server did not stop"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(http: httpx.Client, proc: subprocess.Popen, timeout: float,
                       ready=lambda body: True) -> dict:
    """Poll GET /health until it answers 200 and `ready(body)`; the server process must stay alive meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            health = http.get("/health")
            if health.status_code == 200 and ready(health.json()):
                return health.json()
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)


def interrupt(proc: subprocess.Popen, timeout: float) -> None:
    """Ctrl-C a server process and wait for it to exit (killed if it does not within `timeout`)."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def make_engine(model_dir: Path, **kw) -> Engine:
    return Engine(model_dir, device="cpu", kv_cache_bytes=KV_BYTES, **kw)


# ---- the shared server ----------------------------------------------------------------------------------
class Served:
    """The main test server (tasks "a" and "b": PEFT adapters, "polite": a text prompt) and a reference engine
    holding the same prompts under the same public names, for Engine.generate comparisons."""

    TEXT_PROMPT = "answer politely:"

    def __init__(self, model_dir: Path, adapters: dict[str, Path]):
        self.model_dir = model_dir
        self.adapters = adapters
        # a private parent: tests check that uploads write nothing beside the prompt directory, which the system
        # temp dir (other processes' files come and go there) cannot show
        self.scratch = Path(tempfile.mkdtemp(prefix="softprompt-served-"))
        registry = PromptRegistry(self.scratch / "prompts")
        engine = make_engine(model_dir)
        self.reference = make_engine(model_dir)
        for name, path in adapters.items():
            registry.register(engine, name, path)
            self.reference.add_prompt(name, path)
        registry.register(engine, "polite", text=self.TEXT_PROMPT)
        self.reference.add_prompt("polite", text=self.TEXT_PROMPT)
        self.server = RunningServer(engine, registry)

    def expected(self, requests):
        """Engine.generate on the reference engine (not the server's: that one belongs to its loop)."""
        return self.reference.generate(requests)


_served: list[Served] = []


@pytest.fixture(scope="session")
def served(model_dir_for, adapter_for):
    if not _served:
        _served.append(Served(model_dir_for("llama"), {"a": adapter_for("llama", seed=0, num_virtual_tokens=8),
                                                       "b": adapter_for("llama", seed=1, num_virtual_tokens=5)}))
    yield _served[0]
    if _served and _served[0].server._thread.is_alive():
        _served[0].server.stop()
    shutil.rmtree(_served[0].scratch, ignore_errors=True)
