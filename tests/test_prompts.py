"""The soft-prompt store: every source kind, validation errors, versions, and no change on rejection."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

from softprompt import Engine
from softprompt.engine.errors import PromptError, UnknownPromptError
from softprompt.testing import build_prompt_tensor


@pytest.fixture()
def engine(model_dir_for):
    return Engine(model_dir_for("llama"), device="cpu", dtype="float32", backend="reference")


def test_peft_adapter_rows_equal_saved_weights(engine, adapter_for):
    from safetensors.torch import load_file

    adapter = adapter_for("llama", num_virtual_tokens=6)
    prompt = engine.add_prompt("t", adapter)
    assert prompt.kind == "peft" and prompt.length == 6
    torch.testing.assert_close(prompt.embeds, load_file(adapter / "adapter_model.safetensors")["prompt_embeddings"])


def test_tensor_and_safetensors_file_sources(engine, tmp_path):
    rows = build_prompt_tensor(engine.config.hidden_size, 5, seed=1)
    a = engine.add_prompt("a", rows)
    path = tmp_path / "p.safetensors"
    save_file({"whatever": rows}, path)
    b = engine.add_prompt("b", path)
    assert a.version == b.version  # same content, same version
    assert torch.equal(a.embeds, b.embeds)


def test_text_prompt_rows_are_token_embeddings(engine):
    p = engine.add_prompt("hard", text="the cat sat")
    ids = engine.tokenizer.encode("the cat sat", add_special_tokens=False)
    assert p.kind == "text" and list(p.token_ids) == ids
    assert torch.equal(p.embeds, engine.model.word_embeddings.weight[ids])


def test_prompts_cast_to_model_dtype_once(model_dir_for):
    engine = Engine(model_dir_for("gpt2"), device="cpu", dtype="bfloat16")
    p = engine.add_prompt("t", build_prompt_tensor(engine.config.hidden_size, 4, dtype=torch.float64))
    assert p.embeds.dtype == torch.bfloat16


def test_version_changes_with_content_and_replace(engine):
    h = engine.config.hidden_size
    v1 = engine.add_prompt("t", build_prompt_tensor(h, 4, seed=0)).version
    with pytest.raises(PromptError, match="already taken"):
        engine.add_prompt("t", build_prompt_tensor(h, 4, seed=1))
    assert engine.prompts.get("t").version == v1  # unchanged by the rejected call
    v2 = engine.add_prompt("t", build_prompt_tensor(h, 4, seed=1), replace=True).version
    assert v2 != v1 and engine.prompts.get("t").version == v2


@pytest.mark.parametrize(
    "rows, message",
    [
        (torch.randn(4, 63), "hidden size 63"),
        (torch.randn(0, 64), "empty"),
        (torch.randn(64), "matrix"),
        (torch.tensor([[float("nan")] * 64]), "NaN"),
        (torch.tensor([[float("inf")] * 64]), "NaN or Inf"),
        (torch.full((2, 64), 1e39, dtype=torch.float64), "NaN or Inf|overflows"),
        (torch.ones(2, 64, dtype=torch.int64), "non-float"),
        (torch.randn(300, 64), "no room"),
    ],
)
def test_bad_tensors_rejected_store_unchanged(engine, rows, message):
    engine.add_prompt("keep", torch.randn(3, 64))
    with pytest.raises(PromptError, match=message):
        engine.add_prompt("bad", rows)
    assert engine.prompts.names() == ["keep"]


@pytest.mark.parametrize("name", ["", "a/b", "../x", "base", "x" * 200, "has space", ".hidden", None])
def test_bad_names(engine, name):
    with pytest.raises(PromptError, match="name"):
        engine.add_prompt(name, torch.randn(2, 64))


def _edit_adapter(adapter_for, tmp_path, **changes):
    d = tmp_path / "adapter"
    shutil.copytree(adapter_for("llama"), d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"peft_type": "LORA"}, "LORA"),
        ({"peft_type": "IA3"}, "IA3"),
        ({"peft_type": "PREFIX_TUNING", "num_layers": 2}, "num_layers=2 and token_dim=64 give rows of width 256"),
        ({"task_type": "SEQ_2_SEQ_LM"}, "SEQ_2_SEQ_LM"),
        ({"num_virtual_tokens": 9}, "num_virtual_tokens=9"),
        ({"token_dim": 128}, "token_dim=128"),
        ({"num_transformer_submodules": 2}, "num_transformer_submodules"),
    ],
)
def test_bad_adapter_configs(engine, adapter_for, tmp_path, changes, message):
    with pytest.raises(PromptError, match=message):
        engine.add_prompt("t", _edit_adapter(adapter_for, tmp_path, **changes))
    assert "t" not in engine.prompts


def test_adapter_of_another_model_width(engine, tmp_path):
    from softprompt.testing import build_prompt_tuning_adapter, build_tiny_checkpoint

    narrow = build_tiny_checkpoint("llama", tmp_path / "narrow", hidden_size=32, with_tokenizer=False)
    adapter = build_prompt_tuning_adapter(narrow, tmp_path / "adapter", num_virtual_tokens=4)
    with pytest.raises(PromptError, match="hidden size 32, the model's is 64"):
        engine.add_prompt("t", adapter)
    assert "t" not in engine.prompts


def test_missing_adapter_files(engine, tmp_path, adapter_for):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PromptError, match="adapter_config.json"):
        engine.add_prompt("t", tmp_path / "empty")
    d = _edit_adapter(adapter_for, tmp_path)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(PromptError, match="adapter_model"):
        engine.add_prompt("t", d)
    with pytest.raises(PromptError, match="does not exist"):
        engine.add_prompt("t", tmp_path / "missing")
    with pytest.raises(PromptError, match="cannot be read: File name too long"):
        engine.add_prompt("t", "a" * 5000)


def test_bin_adapter_plain_tensors_accepted(engine, adapter_for, tmp_path):
    from safetensors.torch import load_file

    d = _edit_adapter(adapter_for, tmp_path)
    weights = load_file(d / "adapter_model.safetensors")
    (d / "adapter_model.safetensors").unlink()
    torch.save(weights, d / "adapter_model.bin")
    p = engine.add_prompt("t", d)
    torch.testing.assert_close(p.embeds, weights["prompt_embeddings"])


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_bin_adapter_with_arbitrary_objects_refused(engine, adapter_for, tmp_path, capsys):
    d = _edit_adapter(adapter_for, tmp_path)
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"prompt_embeddings": _Evil()}))
    with pytest.raises(PromptError, match="refusing"):
        engine.add_prompt("t", d)
    assert "pwned" not in capsys.readouterr().out


def test_pickle_tensor_files_refused(engine, tmp_path):
    path = tmp_path / "p.pt"
    torch.save(torch.randn(2, 64), path)
    with pytest.raises(PromptError, match="safetensors"):
        engine.add_prompt("t", path)


def test_safetensors_file_with_several_tensors(engine, tmp_path):
    path = tmp_path / "p.safetensors"
    save_file({"a": torch.randn(2, 64), "b": torch.randn(2, 64)}, path)
    with pytest.raises(PromptError, match="2 tensors"):
        engine.add_prompt("t", path)


def test_unknown_and_removed_prompts(engine):
    engine.add_prompt("t", torch.randn(2, 64))
    engine.remove_prompt("t")
    with pytest.raises(UnknownPromptError, match="unknown prompt 't'"):
        engine.prompts.get("t")
    with pytest.raises(UnknownPromptError):
        engine.remove_prompt("t")
    assert isinstance(UnknownPromptError("x"), ValueError)


def test_exactly_one_source(engine):
    with pytest.raises(PromptError, match="exactly one"):
        engine.add_prompt("t")
    with pytest.raises(PromptError, match="exactly one"):
        engine.add_prompt("t", torch.randn(2, 64), text="hi")
    with pytest.raises(PromptError, match="empty"):
        engine.add_prompt("t", text="")
    with pytest.raises(PromptError, match="vocabulary"):
        engine.add_prompt("t", token_ids=[10**6])
