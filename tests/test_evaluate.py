"""`softprompt eval`: metrics against the libraries, one batched run == one prompt at a time, ensembles, CLI."""

from __future__ import annotations

import argparse
import json

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from softprompt.engine import Engine
from softprompt.engine.errors import SoftPromptError
from softprompt.engine.datasets import Example, make_category_task, save_pairs
from softprompt.engine.evaluate import (
    EvalError,
    accuracy,
    add_eval_arguments,
    bleu,
    evaluate_prompts,
    macro_f1,
    parse_ensembles,
    parse_prompt_specs,
    rouge,
    run_eval,
    score_labels,
    to_label,
    vote,
)

LABELS = ["fruit", "animal", "color", "tool"]
HYPS = ["the cat sat on the mat today", "a quick brown fox jumps", "hello world"]
REFS = ["the cat sat on a mat today", "the quick brown fox jumped over", "hello there world"]


# ---- metrics -----------------------------------------------------------------------------------------
def test_bleu_matches_sacrebleu():
    assert bleu(HYPS, REFS) == pytest.approx(sacrebleu.BLEU().corpus_score(HYPS, [REFS]).score)
    assert 0 < bleu(HYPS, REFS) < 100
    assert bleu(REFS, REFS) == pytest.approx(100.0)


def test_rouge_matches_rouge_score_and_hand_value():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    got = rouge(HYPS, REFS)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(r, h)[key].fmeasure for h, r in zip(HYPS, REFS)) / len(HYPS)
        assert got[key] == pytest.approx(expected)
    # by hand: 2 of 3 unigrams shared each way -> F 2/3; one shared bigram of 2 -> F 1/2
    one = rouge(["the cat sat"], ["the cat ran"])
    assert one["rouge1"] == pytest.approx(2 / 3) and one["rouge2"] == pytest.approx(1 / 2)


def test_macro_f1_and_accuracy_by_hand():
    refs, preds = ["a", "a", "b", "c"], ["a", "b", "b", "x"]
    # a: tp1 fp0 fn1 -> 2/3; b: tp1 fp1 fn0 -> 2/3; c: tp0 -> 0  => macro 4/9
    assert macro_f1(preds, refs, ["a", "b", "c"]) == pytest.approx(4 / 9)
    assert accuracy(preds, refs) == 0.5
    assert macro_f1(refs, refs, ["a", "b", "c"]) == 1.0


def test_to_label_cuts_generation_to_a_label():
    assert to_label(" fruit and more", LABELS) == "fruit"
    assert to_label(" fruit\nx", LABELS) == "fruit"
    assert to_label(" fruitcake", LABELS) == "fruitcake"  # not a label: kept (counts as a miss)
    assert to_label("  free text ", None) == "free text"


def test_vote_majority_and_ties():
    assert vote(["a", "b", "b"]) == "b"
    assert vote(["a", "b"]) == "a"  # tie, no scores: first member
    assert vote(["a", "b"], [{"a": -3.0, "b": -1.0}, {"a": -2.0, "b": -5.0}]) == "a"  # -5 vs -6
    assert vote(["a", "b"], [{"a": -3.0, "b": -1.0}, {"a": -2.0, "b": -2.0}]) == "b"  # -5 vs -3


# ---- engine runs -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(model_dir_for, adapter_for):
    model = model_dir_for("llama")
    engine = Engine(model, device="cpu", dtype="float32")
    prompts = {"none": None, "soft1": str(adapter_for("llama", seed=1)), "soft2": str(adapter_for("llama", seed=2)),
               "hard": "text:the cat sat on the mat"}
    return model, engine, prompts, make_category_task(10, seed=3)


def _count_calls(monkeypatch, engine, method):
    calls = []
    real = getattr(engine, method)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, method, spy)
    return calls


def test_generate_mode_is_one_batched_call(setup, monkeypatch):
    _, engine, prompts, examples = setup
    calls = _count_calls(monkeypatch, engine, "generate")
    report = evaluate_prompts(engine, prompts, examples, labels=LABELS, max_new_tokens=4)
    assert len(calls) == 1
    requests = calls[0][0]
    assert len(requests) == len(prompts) * len(examples)
    assert {r.prompt for r in requests} == {None, "soft1", "soft2", "hard"}
    assert [e.name for e in report.entries] == list(prompts)
    assert all(e.n == len(examples) and len(e.predictions) == len(examples) for e in report.entries)


@pytest.mark.parametrize("mode", ["generate", "score"])
def test_all_prompts_at_once_equal_each_alone(setup, mode):
    _, engine, prompts, examples = setup
    together = evaluate_prompts(engine, prompts, examples, mode=mode, labels=LABELS, max_new_tokens=4)
    for entry in together.entries:
        alone = evaluate_prompts(engine, {entry.name: prompts[entry.name]}, examples, mode=mode, labels=LABELS,
                                 max_new_tokens=4).entries[0]
        assert alone.predictions == entry.predictions
        assert alone.metrics == pytest.approx(entry.metrics)
        assert alone.version == entry.version
    # the soft prompts do change the model's answers
    assert len({tuple(e.predictions) for e in together.entries}) > 1


def test_score_mode_is_one_pass_and_picks_the_argmax_label(setup, monkeypatch):
    from softprompt.engine import scoring

    _, engine, prompts, examples = setup
    calls = _count_calls(monkeypatch, scoring, "_score")
    report = evaluate_prompts(engine, {"soft1": prompts["soft1"], "none": None}, examples, mode="score",
                              labels=LABELS)
    items = calls[0][1]  # one pass: every (prompt, example) context with all the labels after it
    assert len(calls) == 1 and len(items) == 2 * len(examples) and all(len(c) == len(LABELS) for _, _, c in items)
    entry = report.entries[0]
    assert report.mode == "score" and set(entry.predictions) <= set(LABELS)
    for ex, pred in zip(examples, entry.predictions):
        scores = engine.score("soft1", ex.input, [" " + lab for lab in LABELS])  # targets are " fruit" etc.
        assert pred == LABELS[scores.index(max(scores))]
    assert entry.metrics["accuracy"] == pytest.approx(
        sum(p == ex.target.strip() for p, ex in zip(entry.predictions, examples)) / len(examples))


def test_score_labels_equal_engine_score_in_any_chunking(setup):
    _, engine, prompts, examples = setup
    engine.add_prompt("soft1", prompts["soft1"], replace=True)
    contexts = [("soft1", ex.input) for ex in examples[:3]] + [(None, examples[0].input)]
    forms = [" fruit", " animal", " color"]
    expected = [engine.score(p, text, forms) for p, text in contexts]
    for budget in (1 << 26, 30 * engine.config.vocab_size, 1):  # one call, a few rows per call, one item per call
        got = score_labels(engine, contexts, forms, max_logit_floats=budget)
        assert got == [pytest.approx(row, abs=1e-4) for row in expected]


def test_prompt_whose_outputs_are_the_targets_ranks_first(setup):
    _, engine, prompts, examples = setup
    own = evaluate_prompts(engine, {"soft2": prompts["soft2"]}, examples, max_new_tokens=4,
                           metrics=("accuracy",)).entries[0].predictions
    data = [Example(ex.input, " " + p) for ex, p in zip(examples, own)]
    report = evaluate_prompts(engine, prompts, data, max_new_tokens=4, metrics=("accuracy", "f1"))
    ranked = report.ranking()
    assert ranked[0].name == "soft2" and ranked[0].metrics == {"accuracy": 1.0, "f1": 1.0}
    assert ranked[1].metrics["accuracy"] < 1.0


def test_ensemble_follows_the_majority(setup):
    _, engine, prompts, examples = setup
    members = {"a": prompts["soft1"], "a_copy": prompts["soft1"], "b": prompts["soft2"]}
    for mode in ("generate", "score"):
        report = evaluate_prompts(engine, members, examples, mode=mode, labels=LABELS, max_new_tokens=4,
                                  ensembles={"ens": ["a", "a_copy", "b"], "ba": ["b", "a"]})
        by_name = {e.name: e for e in report.entries}
        assert by_name["ens"].predictions == by_name["a"].predictions  # 2 of 3 always agree
        assert by_name["ens"].metrics == by_name["a"].metrics
        assert by_name["ens"].kind == "ensemble"
        assert by_name["ens"].version == [f"a@{by_name['a'].version}", f"a_copy@{by_name['a'].version}",
                                          f"b@{by_name['b'].version}"]
        if mode == "generate":  # every tie goes to the first member
            assert by_name["ba"].predictions == by_name["b"].predictions


def _args(model, data, out, *extra):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args([str(model), "--data", str(data), "--out", str(out), *extra])


def test_cli_writes_json_with_versions_and_plot(setup, tmp_path, capsys):
    model, engine, prompts, examples = setup
    data = save_pairs(examples, tmp_path / "data.jsonl")
    args = _args(model, data, tmp_path / "out", "--prompts", "none", f"soft1={prompts['soft1']}",
                 "hard=text:the cat sat on the mat", "--labels", "fruit,animal,color,tool", "--mode", "score",
                 "--metrics", "accuracy,f1", "--ensemble", "ens=none,soft1,hard")
    assert run_eval(args) == 0
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    versions = {e["name"]: e["version"] for e in report["entries"]}
    assert versions["none"] is None
    assert versions["soft1"] == engine.prompts.get("soft1").version  # same adapter -> same content hash
    assert versions["hard"] == engine.prompts.get("hard").version
    assert versions["ens"] == ["none", f"soft1@{versions['soft1']}", f"hard@{versions['hard']}"]
    assert report["n"] == len(examples) and report["mode"] == "score" and report["primary_metric"] == "accuracy"
    assert set(report["entries"][0]["metrics"]) == {"accuracy", "f1"}
    assert (tmp_path / "out" / "eval.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "rank" in table and "soft1" in table and "ens" in table


def test_bad_specs_give_clear_errors(setup, tmp_path):
    model, engine, prompts, examples = setup
    with pytest.raises(EvalError, match="NAME=ADAPTER_DIR"):
        parse_prompt_specs(["just-a-word"])
    with pytest.raises(EvalError, match="given twice"):
        parse_prompt_specs(["a=none", "a=text:x"])
    with pytest.raises(EvalError, match="NAME=P1,P2"):
        parse_ensembles(["ens"])
    with pytest.raises(EvalError, match="neither an existing adapter"):
        evaluate_prompts(engine, {"x": str(tmp_path / "missing")}, examples)
    with pytest.raises(EvalError, match="empty text"):
        evaluate_prompts(engine, {"x": "text:"}, examples)
    with pytest.raises(EvalError, match="needs a label set"):
        evaluate_prompts(engine, {"none": None}, examples, mode="score")
    with pytest.raises(EvalError, match="unknown metric"):
        evaluate_prompts(engine, {"none": None}, examples, metrics=("bleu", "meteor"))
    with pytest.raises(EvalError, match="unknown: \\['zzz'\\]"):
        evaluate_prompts(engine, {"none": None, "h": "text:hi"}, examples, ensembles={"e": ["none", "zzz"]})
    with pytest.raises(ValueError):  # every eval error is a ValueError, as the CLI expects
        run_eval(_args(model, tmp_path / "nope.jsonl", tmp_path / "o", "--prompts", "none"))


def test_sweep_length_trains_and_evaluates_each_length_in_one_run(setup, tmp_path):
    model, _, _, examples = setup
    data = save_pairs(examples, tmp_path / "data.jsonl")
    args = _args(model, data, tmp_path / "out", "--prompts", "none", "--sweep-length", "2,5",
                 "--train-data", str(data), "--epochs", "1", "--labels", "fruit,animal,color,tool",
                 "--mode", "score", "--metrics", "accuracy")
    assert run_eval(args) == 0
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert {e["name"] for e in report["entries"]} == {"none", "sweep-P2", "sweep-P5"}
    for p in (2, 5):
        meta = json.loads((tmp_path / "out" / "sweep" / f"P{p}" / "softprompt_train.json").read_text())
        entry = next(e for e in report["entries"] if e["name"] == f"sweep-P{p}")
        assert entry["version"] == meta["version"]  # the eval names the trained prompt's version
    with pytest.raises(SoftPromptError, match="--train-data"):
        run_eval(_args(model, data, tmp_path / "o2", "--sweep-length", "3"))
