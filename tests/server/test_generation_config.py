"""The checkpoint's generation_config.json sampling settings: the server's defaults for what a request leaves out
(vLLM's --generation-config auto), Engine.default_sampling_params, and a bad value named at load."""

from __future__ import annotations

import json
import shutil

import pytest

from softprompt import Request, SamplingParams
from softprompt.engine.errors import CheckpointError
from softprompt.engine.server.app import ServerConfig, create_app
from softprompt.engine.server.registry import PromptRegistry

from .support import RunningServer, make_engine

RECOMMENDED = {"temperature": 0.5, "top_k": 7, "repetition_penalty": 1.3, "max_new_tokens": 5, "do_sample": True,
               "max_length": 20}  # HF's max_length is not a default (vLLM reads only max_new_tokens)


@pytest.fixture(scope="module")
def model_dir(model_dir_for, tmp_path_factory):
    d = shutil.copytree(model_dir_for("llama"), tmp_path_factory.mktemp("gen") / "m")
    config = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**config, **RECOMMENDED}))
    return d


def test_engine_reads_the_recommended_settings(model_dir, tmp_path):
    engine = make_engine(model_dir)
    assert engine.generation_defaults == {"temperature": 0.5, "top_k": 7, "repetition_penalty": 1.3,
                                          "max_new_tokens": 5}
    params = engine.default_sampling_params(max_new_tokens=3, top_k=2)
    assert (params.temperature, params.top_k, params.repetition_penalty, params.max_new_tokens) == (0.5, 2, 1.3, 3)
    assert engine.default_sampling_params().max_new_tokens == 5
    assert SamplingParams().greedy  # SamplingParams alone stays greedy
    bad = shutil.copytree(model_dir, tmp_path / "bad")
    (bad / "generation_config.json").write_text(json.dumps({"temperature": -1.0}))
    with pytest.raises(CheckpointError, match="generation_config.json: .*temperature"):
        make_engine(bad)
    (bad / "generation_config.json").write_text(json.dumps({"max_new_tokens": 0}))
    with pytest.raises(CheckpointError, match="generation_config.json: .*max_new_tokens must be an integer >= 1"):
        make_engine(bad)


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_the_server_fills_what_a_request_leaves_out(model_dir, mode):
    engine, reference = make_engine(model_dir), make_engine(model_dir)
    server = RunningServer(engine, PromptRegistry(), ServerConfig(generation_config=mode))
    try:
        client = server.openai()
        kw = dict(model="base", prompt=[5, 6, 7, 8], max_tokens=8, seed=3, extra_body={"return_token_ids": True,
                                                                                       "ignore_eos": True})
        left_out = client.completions.create(**kw).choices[0].model_extra["token_ids"]
        given = client.completions.create(temperature=0, **kw).choices[0].model_extra["token_ids"]
        recommended = dict(temperature=0.5, top_k=7, repetition_penalty=1.3) if mode == "auto" else dict(
            temperature=1.0)  # OpenAI's default
        [want] = reference.generate([Request(input_ids=[5, 6, 7, 8], sampling=SamplingParams(
            max_new_tokens=8, seed=3, ignore_eos=True, **recommended))])
        [greedy] = reference.generate([Request(input_ids=[5, 6, 7, 8], sampling=SamplingParams(
            max_new_tokens=8, ignore_eos=True, repetition_penalty=1.3 if mode == "auto" else 1.0))])
        assert left_out == want.token_ids and given == greedy.token_ids
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_max_new_tokens_is_the_default_length(model_dir, mode):
    """vLLM: a request that sets no length gets the checkpoint's max_new_tokens (a chat request, and a completion
    that sends max_tokens null; a completion that leaves it out keeps OpenAI's 16); one that sets it, its own."""
    server = RunningServer(make_engine(model_dir), PromptRegistry(), ServerConfig(generation_config=mode))
    try:
        http = server.client()
        common = {"model": "base", "temperature": 0, "ignore_eos": True}
        chat = {**common, "messages": [{"role": "user", "content": "the cat"}]}
        def length(route: str, body: dict) -> int:
            return http.post(route, json=body).json()["usage"]["completion_tokens"]

        lengths = [length("/v1/chat/completions", chat), length("/v1/chat/completions", {**chat, "max_tokens": 3}),
                   length("/v1/completions", {**common, "prompt": [5, 6], "max_tokens": None}),
                   length("/v1/completions", {**common, "prompt": [5, 6]})]
        max_positions = server.call(lambda e: e.config.max_positions)
        assert lengths[1:] == [3, 5 if mode == "auto" else 16, 16]
        assert lengths[0] == 5 if mode == "auto" else lengths[0] > 16  # none: as many as fit
        assert lengths[0] < max_positions
    finally:
        server.stop()


def test_a_bad_mode_is_refused(model_dir):
    with pytest.raises(ValueError, match="generation_config must be 'auto' or 'none'"):
        create_app(make_engine(model_dir), PromptRegistry(), ServerConfig(generation_config="sometimes"))
