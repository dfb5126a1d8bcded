"""`softprompt train`: datasets, the training loop, the saved PEFT adapter and its metadata, the demo."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from softprompt.engine.datasets import (
    Example, dataset_hash, load_pairs, make_category_task, save_pairs, split,
)
from softprompt.engine.errors import SoftPromptError
from softprompt.engine.prompts import content_version
from softprompt.engine.train import (
    METADATA_FILE, TrainConfig, _load_peft_model, add_train_arguments, run_train, train_prompt,
)

TINY = dict(num_virtual_tokens=6, lr=0.3, epochs=4, batch_size=8, device="cpu", patience=0)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(argv)


# ---- datasets ---------------------------------------------------------------------------------------------------

def test_pairs_round_trip_and_hash(tmp_path):
    examples = make_category_task(30, seed=1)
    assert examples == make_category_task(30, seed=1) and examples != make_category_task(30, seed=2)
    assert all(e.target.startswith(" ") and e.input for e in examples)
    path = save_pairs(examples, tmp_path / "d" / "pairs.jsonl")
    assert load_pairs(path) == examples
    assert dataset_hash(examples) == dataset_hash(load_pairs(path))
    assert len(dataset_hash(examples)) == 12
    assert dataset_hash(examples[::-1]) != dataset_hash(examples)
    # key order and extra keys do not change what is loaded
    (tmp_path / "k.jsonl").write_text('{"target": " x", "input": "a", "id": 7}\n\n')
    assert load_pairs(tmp_path / "k.jsonl") == [Example("a", " x")]


@pytest.mark.parametrize("line, message", [
    ("not json", "not valid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"input": "a"}', "missing key 'target'"),
    ('{"input": 3, "target": "b"}', "'input' must be a string"),
    ('{"input": "a", "target": ""}', "'target' is empty"),
])
def test_bad_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "ok", "target": " fine"}\n' + line + "\n")
    with pytest.raises(SoftPromptError, match=f"bad.jsonl:2: .*{message}"):
        load_pairs(path)


def test_missing_or_empty_dataset(tmp_path):
    with pytest.raises(SoftPromptError, match="does not exist"):
        load_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SoftPromptError, match="no examples"):
        load_pairs(tmp_path / "empty.jsonl")


def test_split_is_a_seeded_partition():
    examples = make_category_task(50)
    train, val = split(examples, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert sorted(train + val, key=repr) == sorted(examples, key=repr)
    assert split(examples, 0.2, seed=3) == (train, val) and split(examples, 0.2, seed=4) != (train, val)
    assert split(examples[:2], 0.01)[1] != [] and split(examples, 0.0)[1] == []
    with pytest.raises(SoftPromptError):
        split(examples, 1.0)


# ---- training ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(model_dir_for, tmp_path_factory):
    model_dir = model_dir_for("llama")
    train, val = split(make_category_task(48, seed=0), 0.25)
    out = tmp_path_factory.mktemp("train") / "adapter"
    result = train_prompt(model_dir, train, val, out, TrainConfig(**TINY), log=None)
    return model_dir, train, val, out, result


def test_training_lowers_the_loss_and_changes_only_the_prompt(trained):
    from transformers import AutoModelForCausalLM

    model_dir, train, val, out, result = trained
    assert len(result.train_losses) == 4 and len(result.val_losses) == 4
    assert result.train_losses[-1] < result.train_losses[0] - 0.5
    assert min(result.val_losses) < result.val_losses[0]
    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    base = result.peft_model.get_base_model().state_dict()
    assert fresh.keys() == base.keys()
    assert all(torch.equal(fresh[k], base[k]) for k in fresh), "a frozen base weight changed"
    init_model, _ = _load_peft_model(model_dir, TrainConfig(**TINY), torch.device("cpu"))
    init = init_model.prompt_encoder["default"].embedding.weight
    trained_rows = result.peft_model.prompt_encoder["default"].embedding.weight
    assert not torch.equal(init, trained_rows)
    assert [n for n, p in result.peft_model.named_parameters() if p.requires_grad] == \
        ["prompt_encoder.default.embedding.weight"]


def test_loss_covers_only_the_target_and_matches_peft(trained):
    from softprompt.engine.train import _collate, _encode, _target_loss_and_hits

    model_dir, train, val, out, result = trained
    model = result.peft_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inp, tgt = _encode(tokenizer, Example("word: apple ->", " fruit"))
    assert inp[0] == tokenizer.bos_token_id and tgt[-1] == tokenizer.eos_token_id
    assert tgt[:-1] == tokenizer(" fruit", add_special_tokens=False)["input_ids"]
    short = _encode(tokenizer, Example("x", " tool"))
    batch = _collate([(inp, tgt), short], tokenizer.pad_token_id, "cpu")
    assert batch["labels"][0].tolist() == [-100] * len(inp) + tgt
    assert batch["attention_mask"][1].sum() == len(short[0]) + len(short[1])
    with torch.no_grad():
        loss, _ = _target_loss_and_hits(model, batch, 6, exclude_last=True)
        for row, (i, t) in enumerate([(inp, tgt), short]):
            ids = torch.tensor([i + t])
            labels = torch.tensor([[-100] * len(i) + t])
            expected = model(input_ids=ids, labels=labels).loss  # PEFT/HF's own shifted target-only loss
            assert loss[row].item() == pytest.approx(expected.item(), rel=1e-5)


def test_metadata(trained):
    model_dir, train, val, out, result = trained
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta == json.loads(json.dumps(result.metadata))
    assert meta["dataset"] == {"train_hash": dataset_hash(train), "train_size": len(train),
                               "val_hash": dataset_hash(val), "val_size": len(val)}
    assert meta["init"] == {"kind": "random", "text": None}
    assert meta["config"]["lr"] == 0.3 and meta["config"]["num_virtual_tokens"] == 6
    assert meta["val_losses"] == result.val_losses and meta["train_losses"] == result.train_losses
    assert meta["best_epoch"] == 1 + min(range(4), key=result.val_losses.__getitem__)
    assert 0.0 <= meta["val_exact_match"] <= 1.0
    from safetensors.torch import load_file

    rows = load_file(str(out / "adapter_model.safetensors"))["prompt_embeddings"]
    assert meta["version"] == result.version == content_version(rows.to(torch.float32))
    assert meta["versions_by_dtype"]["bfloat16"] == content_version(rows.to(torch.bfloat16))


def test_adapter_round_trips_through_peft_and_the_engine(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt import Engine, Request, SamplingParams

    model_dir, train, val, out, result = trained
    engine = Engine(model_dir, device="cpu", dtype="float32")
    prompt = engine.add_prompt("trained", out)
    assert prompt.version == result.version and prompt.length == 6
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                           str(out)).eval()
    saved = peft_model.prompt_encoder["default"].embedding.weight
    assert torch.equal(saved, result.peft_model.prompt_encoder["default"].embedding.weight)
    n = 8
    texts = [e.input for e in val[:3]] + ["the cat sat on the"]
    outs = engine.generate([Request(prompt="trained", text=t, sampling=SamplingParams(max_new_tokens=n))
                            for t in texts])
    for text, out_ in zip(texts, outs):
        ids = tokenizer(text, return_tensors="pt")
        with torch.no_grad():  # both stop after an EOS (and keep it) or after n tokens
            hf = peft_model.generate(**ids, max_new_tokens=n, do_sample=False)
        assert out_.input_ids == ids["input_ids"][0].tolist()
        assert out_.token_ids == hf[0, ids["input_ids"].shape[1]:].tolist(), text
        assert out_.prompt_version == result.version


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_prompts_for_embeddings_narrower_than_the_model_train_and_serve(method, model_dir_for, tmp_path):
    """OPT-350m's token embeddings are narrower than its hidden size: the trained rows take their width (PEFT
    would size them by hidden_size), and the engine serves them."""
    from softprompt import Engine

    model_dir = model_dir_for("opt_post_norm")
    train, val = split(make_category_task(16, seed=1), 0.25)
    config = TrainConfig(**{**TINY, "epochs": 1, "method": method})
    train_prompt(model_dir, train, val, tmp_path / "adapter", config, log=None)
    engine = Engine(model_dir, device="cpu", dtype="float32")
    prompt = engine.add_prompt("t", tmp_path / "adapter")
    assert prompt.embeds.shape == (6, engine.config.embedding_width) and engine.config.embedding_width == 32


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prompts_for_a_config_peft_cannot_read_train_and_serve(method, model_dir_for, tmp_path):
    """XGLM's config calls its head count `attention_heads`, which PEFT cannot find: training gives it, and the
    trained adapter serves."""
    from softprompt import Engine, Request, SamplingParams

    model_dir = model_dir_for("xglm")
    train, val = split(make_category_task(16, seed=1), 0.25)
    config = TrainConfig(**{**TINY, "epochs": 1, "method": method})
    train_prompt(model_dir, train, val, tmp_path / "adapter", config, log=None)
    engine = Engine(model_dir, device="cpu", dtype="float32")
    prompt = engine.add_prompt("t", tmp_path / "adapter")
    assert prompt.length == 6 and prompt.kind == ("prefix" if method == "prefix_tuning" else "peft")
    assert engine.generate([Request(prompt="t", text="word: dog ->", sampling=SamplingParams(max_new_tokens=2))])


def test_early_stopping_keeps_the_best_prompt(model_dir_for, tmp_path):
    # validation asks for the opposite of training: its loss rises, so epoch 1 is best and training stops early
    inputs = [f"word: {w} ->" for w in ("apple", "dog", "red", "saw", "plum", "cat", "blue", "axe")]
    train = [Example(i, " fruit") for i in inputs]
    val = [Example(i, " tool") for i in inputs]
    config = TrainConfig(**{**TINY, "epochs": 10, "patience": 2, "lr": 0.5})
    result = train_prompt(model_dir_for("llama"), train, val, tmp_path / "a", config, log=None)
    assert result.best_epoch == 1 and len(result.train_losses) == 3
    assert result.val_losses[2] > result.val_losses[0]
    from safetensors.torch import load_file

    rows = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert content_version(rows) == result.version
    # the saved prompt is the epoch-1 one: its validation loss is the best one recorded
    assert result.metadata["val_losses"][0] == min(result.val_losses)


def test_l2_to_init_keeps_the_prompt_near_its_init(model_dir_for, tmp_path):
    model_dir = model_dir_for("llama")
    train = make_category_task(16)
    init, _ = _load_peft_model(model_dir, TrainConfig(**TINY), torch.device("cpu"))
    init_rows = init.prompt_encoder["default"].embedding.weight.detach()

    def distance(l2: float) -> float:
        config = TrainConfig(**{**TINY, "epochs": 2, "l2_to_init": l2})
        result = train_prompt(model_dir, train, None, tmp_path / str(l2), config, log=None)
        assert result.val_losses == [] and result.val_accuracy is None and result.best_epoch == 2
        return (result.peft_model.prompt_encoder["default"].embedding.weight - init_rows).norm().item()

    assert distance(100.0) < 0.5 * distance(0.0)


def test_vocab_and_text_inits(model_dir_for):
    from transformers import AutoTokenizer

    model_dir = model_dir_for("llama")
    model, tokenizer = _load_peft_model(model_dir, TrainConfig(**{**TINY, "init": "vocab"}), torch.device("cpu"))
    vocab = model.get_input_embeddings().weight
    rows = model.prompt_encoder["default"].embedding.weight
    for row in rows:
        matches = (vocab == row).all(1).nonzero().flatten().tolist()
        assert matches and not set(matches) & set(tokenizer.all_special_ids)
    text = "the cat"
    model, _ = _load_peft_model(model_dir, TrainConfig(**{**TINY, "init": "text", "init_text": text}),
                                torch.device("cpu"))
    ids = AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]  # PEFT's TEXT init keeps the BOS
    assert len(ids) < 6
    ids = (ids * 6)[:6]
    rows = model.prompt_encoder["default"].embedding.weight
    assert torch.equal(rows, model.get_input_embeddings().weight[ids])


@pytest.mark.parametrize("method, options", [
    ("p_tuning", {}),
    ("p_tuning", {"encoder": "LSTM", "encoder_hidden_size": 16}),
    ("prefix_tuning", {}),
    ("prefix_tuning", {"prefix_projection": True, "encoder_hidden_size": 16}),
])
def test_p_tuning_and_prefix_tuning_train_and_serve_as_peft_does(method, options, model_dir_for, tmp_path):
    """Only the prompt encoder learns, the loss falls, and the saved adapter serves in the engine with the
    version the run reported and HF + PEFT's greedy tokens and logits."""
    from transformers import AutoModelForCausalLM

    from softprompt import Engine, Request, SamplingParams
    from softprompt.testing import assert_generation_matches, hf_peft_reference

    model_dir = model_dir_for("llama")
    train, val = split(make_category_task(32, seed=1), 0.25)
    config = TrainConfig(**{**TINY, "lr": None, "epochs": 3}, method=method, **options)
    result = train_prompt(model_dir, train, val, tmp_path / "adapter", config, log=None)
    assert result.metadata["method"] == method and result.metadata["config"]["lr"] == 0.01
    from transformers import AutoTokenizer

    from softprompt.engine.train import _encode

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():  # the best epoch's validation loss is PEFT/HF's own shifted target-only loss, averaged
        losses = [result.peft_model(input_ids=torch.tensor([i + t]), labels=torch.tensor([[-100] * len(i) + t])).loss
                  for i, t in (_encode(tokenizer, e) for e in val)]
    assert min(result.val_losses) == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
    assert result.train_losses[-1] < result.train_losses[0]
    named = dict(result.peft_model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    assert trainable and all(n.startswith("prompt_encoder.default.") for n in trainable)
    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    base = result.peft_model.get_base_model().state_dict()
    assert all(torch.equal(fresh[k], base[k]) for k in fresh), "a frozen base weight changed"
    engine = Engine(model_dir, device="cpu", dtype="float32")
    prompt = engine.add_prompt("trained", result.out_dir)
    assert prompt.version == result.version and prompt.length == 6
    assert prompt.kind == ("prefix" if method == "prefix_tuning" else "peft")
    requests = [Request(prompt="trained", text=e.input, sampling=SamplingParams(max_new_tokens=4)) for e in val[:3]]
    assert_generation_matches(engine, hf_peft_reference(model_dir, {"trained": result.out_dir}), requests)


@pytest.mark.parametrize("options, message", [
    ({"method": "lora"}, "method must be one of"),
    ({"method": "p_tuning", "init": "vocab"}, "init and l2_to_init apply to prompt_tuning"),
    ({"method": "prefix_tuning", "l2_to_init": 0.1}, "init and l2_to_init apply to prompt_tuning"),
    ({"method": "p_tuning", "encoder": "GRU"}, "encoder must be one of"),
    ({"init": "text"}, "needs init_text"),
    ({"init": "zeros"}, "init must be one of"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"dtype": "int8"}, "dtype must be one of"),
])
def test_bad_configs(model_dir_for, tmp_path, options, message):
    with pytest.raises(SoftPromptError, match=message):
        train_prompt(model_dir_for("llama"), make_category_task(4), None, tmp_path, TrainConfig(**options))


# ---- CLI and demo -----------------------------------------------------------------------------------------------

def test_cli_trains_from_jsonl(model_dir_for, tmp_path, capsys):
    data = save_pairs(make_category_task(20), tmp_path / "data.jsonl")
    args = _parse([str(model_dir_for("llama")), "--data", str(data), "--out", str(tmp_path / "out"),
                   "--num-virtual-tokens", "4", "--epochs", "2", "--init", "vocab", "--device", "cpu",
                   "--val-fraction", "0.25"])
    assert run_train(args) == 0
    meta = json.loads((tmp_path / "out" / METADATA_FILE).read_text())
    assert meta["dataset"]["train_size"] == 15 and meta["dataset"]["val_size"] == 5
    assert meta["init"]["kind"] == "vocab" and meta["version"] in capsys.readouterr().out
    args = _parse([str(model_dir_for("llama")), "--data", str(data), "--out", str(tmp_path / "kv"), "--epochs", "1",
                   "--method", "prefix_tuning", "--prefix-projection", "--encoder-hidden-size", "8",
                   "--num-virtual-tokens", "3", "--device", "cpu"])
    assert run_train(args) == 0
    meta = json.loads((tmp_path / "kv" / METADATA_FILE).read_text())
    assert meta["method"] == "prefix_tuning" and meta["config"]["prefix_projection"] and meta["config"]["lr"] == 0.01
    assert json.loads((tmp_path / "kv" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    with pytest.raises(SoftPromptError, match="needs --data, --out"):
        run_train(_parse([str(model_dir_for("llama"))]))
    (tmp_path / "bad.jsonl").write_text('{"input": "a"}\n')
    with pytest.raises(SoftPromptError, match="bad.jsonl:1"):
        run_train(_parse([str(model_dir_for("llama")), "--data", str(tmp_path / "bad.jsonl"), "--out",
                          str(tmp_path / "o2")]))


def test_demo_tuned_prompt_beats_no_prompt_and_text_prompt(tmp_path, capsys):
    assert run_train(_parse(["--demo", str(tmp_path)])) == 0  # 0 only when tuned beats both baselines
    printed = capsys.readouterr().out
    assert "tuned prompt" in printed and "no prompt 0.000" in printed
    meta = json.loads((tmp_path / "adapter" / METADATA_FILE).read_text())
    assert meta["val_exact_match"] >= 0.4  # well above the 0.25 of always answering one of 4 categories
