"""Models and PEFT adapters named by their Hugging Face Hub id (engine/hub.py), resolved from a local HF cache laid
out as huggingface_hub writes it (the tests run offline: HF_HUB_OFFLINE=1, see conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.errors import CheckpointError, PromptError
from softprompt.engine.hub import hub_id, hub_prompt_name, resolve_model, resolve_prompt_source
from softprompt.engine.server.cli import discover_prompts
from softprompt.engine.verify import parse_prompt_args

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo: str, files_from: Path, *, names: list[str] | None = None) -> Path:
    """Put `files_from`'s files (or `names` of them) in `cache` as the `main` snapshot of model repo `repo`."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    for f in files_from.iterdir():
        if names is None or f.name in names:
            shutil.copy(f, snapshot / f.name)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, model_dir_for, adapter_for):
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return {
        "model": cache_repo(cache, "org/tiny-llama", model_dir_for("llama")),
        "adapter": cache_repo(cache, "someone/task-prompt", adapter_for("llama", seed=3)),
        "pickle_adapter": cache_repo(cache, "someone/pickle-prompt", adapter_for("llama"),
                                     names=["adapter_config.json"]),
        "pickle_model": cache_repo(cache, "org/pickle-model", model_dir_for("llama"), names=["config.json"]),
    }


@pytest.mark.parametrize("source, expected", [
    ("org/name", ("org/name", None)),
    ("Org-1/name.v2_x", ("Org-1/name.v2_x", None)),
    ("org/name@v1.0", ("org/name", "v1.0")),
    ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
    ("name", None), ("a/b/c", None), ("/abs/dir", None), ("./org/name", None), ("../org", None),
    ("org/..", None), ("org/name.", None), ("org/na me", None), ("org/name#2", None), ("", None),
])
def test_hub_ids_are_read_only_from_org_name(source, expected):
    assert hub_id(source) == expected


def test_an_existing_path_is_never_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub_id("org/name") is None
    assert resolve_model("org/name") == Path("org/name")


def test_engine_serves_a_hub_model_and_hub_adapter_like_local_ones(hub_cache, model_dir_for, adapter_for):
    local = Engine(model_dir_for("llama"), device="cpu")
    local.add_prompt("t", adapter_for("llama", seed=3))
    hub = Engine("org/tiny-llama", device="cpu")
    assert hub.model_dir == hub_cache["model"]
    prompt = hub.add_prompt("t", "someone/task-prompt")
    assert prompt.version == local.prompts.get("t").version
    request = Request(prompt="t", text="the cat", sampling=SamplingParams(max_new_tokens=8))
    assert hub.generate([request])[0].token_ids == local.generate([request])[0].token_ids
    pinned = Engine("org/tiny-llama@main", device="cpu", backend="reference")
    assert pinned.model_dir == hub_cache["model"]
    assert Engine("org/tiny-llama", device="cpu", backend="reference", revision=COMMIT).model_dir == hub_cache["model"]


def test_hub_errors_name_the_repo_and_leave_the_engine_serving(hub_cache):
    with pytest.raises(CheckpointError, match="'org/missing' is no local path, and fetching it from the Hugging Face"):
        Engine("org/missing", device="cpu")
    with pytest.raises(CheckpointError, match="at revision 'v9'"):
        Engine("org/tiny-llama@v9", device="cpu")
    with pytest.raises(CheckpointError, match="names revision 'main' but revision='v2'"):
        Engine("org/tiny-llama@main", device="cpu", revision="v2")
    with pytest.raises(CheckpointError, match="is a local path"):
        resolve_model(hub_cache["model"], revision="main")
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        Engine("org/pickle-model", device="cpu")
    engine = Engine("org/tiny-llama", device="cpu")
    engine.add_prompt("t", "someone/task-prompt")
    with pytest.raises(PromptError, match="'someone/missing' is no local path"):
        engine.add_prompt("u", "someone/missing")
    with pytest.raises(PromptError, match="lacks adapter_model.safetensors"):
        engine.add_prompt("t", "someone/pickle-prompt", replace=True)
    assert engine.prompts.names() == ["t"]
    out = engine.generate([Request(prompt="t", input_ids=[5, 6], sampling=SamplingParams(max_new_tokens=3))])
    assert len(out[0].token_ids) == 3


def test_command_lines_take_hub_adapter_ids(hub_cache):
    assert resolve_prompt_source("someone/task-prompt") == hub_cache["adapter"]
    assert resolve_prompt_source("someone/task-prompt#1") == Path(f"{hub_cache['adapter']}#1")
    assert hub_prompt_name("someone/task-prompt") == "task-prompt"
    assert hub_prompt_name("someone/task-prompt@main#2") == "task-prompt-task2"
    assert discover_prompts(["someone/task-prompt", "x=someone/task-prompt"]) == [
        ("task-prompt", Path("someone/task-prompt")), ("x", Path("someone/task-prompt"))]
    assert parse_prompt_args(["someone/task-prompt"]) == {"task-prompt": hub_cache["adapter"]}


def test_generate_command_and_ray_settings_take_hub_ids(hub_cache, capsys):
    import json

    from softprompt.engine.cli import main

    assert main(["generate", "org/tiny-llama", "--prompt", "t=someone/task-prompt", "--task", "t", "--ids", "5,6,7",
                 "--max-new-tokens", "4", "--json", "--device", "cpu"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4
    pytest.importorskip("ray")
    from softprompt.engine.server.ray_serve import RayServeSettings

    settings = RayServeSettings(model_dir="org/tiny-llama", prompts={"t": "someone/task-prompt#0"})
    assert settings.model_dir == str(hub_cache["model"].resolve())  # fetched on the driver, read by the replicas
    assert settings.prompts == {"t": f"{hub_cache['adapter'].resolve()}#0"}
