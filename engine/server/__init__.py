"""The OpenAI-compatible HTTP server (needs the `server` extra: fastapi, uvicorn, prometheus-client).

`create_app(engine, registry, config)` builds the FastAPI app; `softprompt serve` runs it under uvicorn.
Imports are lazy so that `softprompt --help` works without the extra installed.
"""

from __future__ import annotations

__all__ = ["EngineLoop", "PromptRegistry", "ServerConfig", "create_app"]


def __getattr__(name: str):
    if name in ("create_app", "ServerConfig"):
        from . import app

        return getattr(app, name)
    if name == "PromptRegistry":
        from .registry import PromptRegistry

        return PromptRegistry
    if name == "EngineLoop":
        from .engine_loop import EngineLoop

        return EngineLoop
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
