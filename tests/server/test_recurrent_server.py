"""The server on models whose past is a recurrent state (Mamba: no attention at all; Qwen3.5: Gated DeltaNet beside
attention): completions, chat and streaming equal Engine.generate, and no state or block is left behind."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from softprompt import Request, SamplingParams
from softprompt.engine.server.registry import PromptRegistry

from .support import RunningServer, make_engine


@pytest.mark.parametrize("variant", ["mamba", "qwen3_5"])
def test_recurrent_models_serve_completions_equal_to_the_engine(variant, model_dir_for, adapter_for):
    d = model_dir_for(variant)
    adapter = adapter_for(variant, seed=3, num_virtual_tokens=6)
    registry = PromptRegistry(Path(tempfile.mkdtemp(prefix="softprompt-recurrent-")) / "prompts")
    engine, reference = make_engine(d), make_engine(d)
    registry.register(engine, "task", adapter)
    reference.add_prompt("task", adapter)
    server = RunningServer(engine, registry)
    try:
        client = server.openai()
        got = client.completions.create(model="task", prompt="the cat sat on", max_tokens=8, temperature=0,
                                        extra_body={"return_token_ids": True, "ignore_eos": True})
        [want] = reference.generate(Request(prompt="task", text="the cat sat on",
                                            sampling=SamplingParams(max_new_tokens=8, ignore_eos=True)))
        assert got.choices[0].model_extra["token_ids"] == want.token_ids and got.choices[0].text == want.text
        stream = client.completions.create(model="task", prompt="the cat sat on", max_tokens=8, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in stream if c.choices) == want.text
        models = {m.id for m in client.models.list().data}
        assert "task" in models
        server.assert_pool_empty()
        assert server.call(lambda e: e.pool.states.num_held) == len(engine.prefix_cache.entries)  # prompts' alone
    finally:
        server.stop()
