"""`softprompt verify` and `softprompt.testing.assert_generation_matches`: pass on the test models (CPU, fp32 and
half precision), and catch each seeded fault in the backend under test (a soft prompt shifted by one position,
wrong ALiBi slopes, a prefix cache handing out another task's prefix, a cached prefix's blocks freed while still
served) with exit code 1 and a report naming backend and task. The triton column is not run here: under the CPU
interpreter it takes about a minute (it is exercised on CUDA, and its "unavailable" report is tested)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from softprompt import Request, SamplingParams
from softprompt.engine import verify as v
from softprompt.testing import (
    assert_generation_matches,
    hf_peft_reference,
    tiny_model_with_adapters,
)

from .conftest import ARCH_VARIANTS

pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: thread hand-offs cost more than the matmuls (and much more on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def adapters_for(variant, adapter_for, **kw) -> dict:
    return {"task0": adapter_for(variant, seed=0, **kw), "task1": adapter_for(variant, seed=1, init="text", **kw)}


def run(model_dir, adapters, **kw) -> v.Report:
    kw = {"backends": ["torch"], "dtype": "float32", "device": "cpu", "random_per_task": 2, "max_new_tokens": 6, **kw}
    return v.verify(model_dir, adapters, **kw)


# one model per family, and some of the newest kinds: local-window layers, a multimodal checkpoint, a sigmoid router
@pytest.mark.parametrize("variant", [*ARCH_VARIANTS, "gpt_neo", "qwen2_5_vl", "glm4_moe", "deepseek_v3"])
def test_verify_passes_on_test_models(variant, model_dir_for, adapter_for):
    report = run(model_dir_for(variant), adapters_for(variant, adapter_for))
    assert report.oracle == "hf+peft" and report.exit_code() == 0, report.summary()
    assert set(report.backends) == {"reference", "torch"}
    torch_result = report.backends["torch"]
    assert set(torch_result.tasks) == {"task0", "task1", "base"}
    for task, result in torch_result.tasks.items():
        assert set(result.modes) == {"single", "batch"}
        for mode in result.modes.values():
            assert mode.num_requests == 2 and mode.greedy_agree == 2
            assert 0 <= mode.max_abs < 1e-4 and mode.max_abs_vs_reference < 1e-4
        if task != "base":
            pc = result.prefix_cache
            assert pc.miss_observed and pc.hit_observed and pc.tokens_equal and pc.miss_vs_hit_max_abs < 1e-5
    json.dumps(report.to_dict())  # the report is plain JSON
    assert "PASSED" in report.summary()


# ---- seeded faults: each must be caught, naming backend and task -----------------------------------------------
def shifted_prompt(engine):
    """The soft prompt rows rotated by one position (row i holds row i-1)."""
    for name in engine.prompts.names():
        engine.add_prompt(name, torch.roll(engine.prompts.get(name).embeds, 1, dims=0), replace=True)


def wrong_alibi_slopes(engine):
    engine.model.alibi_slopes.mul_(1.5)


def prefix_cache_returns_other_task(engine):
    """On a cache hit, hand out another (cached, same-length) task's prefix instead."""
    cache, acquire = engine.prefix_cache, engine.prefix_cache.acquire

    def faulty(prompt):
        hit = prompt in cache
        entry = acquire(prompt)
        other = [e for e in cache.entries if e is not entry and e.length == entry.length]
        if hit and other:
            cache.release(entry)
            return acquire(other[0].prompt)
        return entry

    cache.acquire = faulty


def prefix_blocks_freed_while_cached(engine):
    """Use after free: an idle cached prefix's blocks go back to the pool while the cache still serves them, so
    the next request's own K/V overwrite them and only a cache hit reads garbage. (Injected with the request-block
    cache off: its refcount check would stop the run at the double free that follows, before the [prefix cache]
    check shows the wrong tokens.)"""
    cache, release = engine.prefix_cache, engine.prefix_cache.release

    def faulty(entry):
        release(entry)
        if entry.refcount == 0 and entry.blocks:
            engine.pool.free(entry.blocks)

    cache.release = faulty


NO_BLOCK_CACHE = {"prefix_blocks_freed_while_cached"}
FAULTS = {  # name -> (variant, fault, tasks whose failures must say `message`, message)
    "shifted_prompt": ("llama", shifted_prompt, ["task0", "task1"], "[single]: max |logit diff|"),
    "wrong_alibi_slopes": ("bloom", wrong_alibi_slopes, ["task0", "task1", "base"], "[batch]: max |logit diff|"),
    "prefix_cache_returns_other_task": ("llama", prefix_cache_returns_other_task, ["task0", "task1"],
                                        "[single]: greedy tokens diverge"),
    "prefix_blocks_freed_while_cached": ("gpt2", prefix_blocks_freed_while_cached, ["task0"],
                                         "[prefix cache]: prefix-cache hit differs from miss"),
}


def faulty_factory(model_dir, fault, backend_under_test="torch"):
    make = v.default_engine_factory(model_dir, "cpu", "float32",
                                    enable_prefix_caching=fault.__name__ not in NO_BLOCK_CACHE)

    def factory(backend, adapters):
        engine = make(backend, adapters)
        if backend == backend_under_test:
            fault(engine)
        return engine

    return factory


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_seeded_fault_is_caught(fault, model_dir_for, adapter_for):
    variant, inject, tasks, message = FAULTS[fault]
    model_dir = model_dir_for(variant)
    report = run(model_dir, adapters_for(variant, adapter_for), engine_factory=faulty_factory(model_dir, inject))
    assert report.exit_code() == 1
    assert report.backends["reference"].status == "pass"  # only the backend under test is broken
    assert report.backends["torch"].status == "fail"
    summary = report.summary()
    assert "FAILED" in summary
    for task in tasks:
        assert any(f.startswith(f"torch/{task} {message}") for f in report.failures), summary
    for task in ("task0", "task1"):
        assert any(f.startswith(f"torch/{task} [") for f in report.failures), summary
    divergences = [d for t in report.backends["torch"].tasks.values() for m in t.modes.values() for d in m.divergences]
    assert all(not d.near_tie for d in divergences)  # wrong tokens chosen by clear margins: bugs, not near-ties


def test_seeded_fault_caught_in_bfloat16_too(model_dir_for, adapter_for):
    """The looser half-precision defaults still catch a one-position prompt shift."""
    model_dir = model_dir_for("gpt2")
    make = v.default_engine_factory(model_dir, "cpu", "bfloat16")

    def factory(backend, adapters):
        engine = make(backend, adapters)
        if backend == "torch":
            shifted_prompt(engine)
        return engine

    report = run(model_dir, adapters_for("gpt2", adapter_for), dtype="bfloat16", engine_factory=factory,
                 reference_column=False)
    assert report.exit_code() == 1 and any(f.startswith("torch/task0 [single]: max") for f in report.failures)


def test_a_crashing_backend_is_a_failure_not_a_crash(model_dir_for, adapter_for):
    model_dir = model_dir_for("llama")

    def broken(engine):
        def boom(*args, **kwargs):
            raise RuntimeError("kernel exploded")

        engine.runner.run = boom

    report = run(model_dir, adapters_for("llama", adapter_for), engine_factory=faulty_factory(model_dir, broken),
                 reference_column=False)
    assert report.exit_code() == 1 and "kernel exploded" in report.failures[0]


# ---- tolerances, near-ties --------------------------------------------------------------------------------------
def test_near_tie_told_apart_from_bug():
    request = v.VerifyRequest("t", [5, 6], 3)
    logits = torch.zeros(5, 8)
    logits[1, 4], logits[1, 7] = 1.0, 0.9999  # token 0 chosen at row 1: 4 over 7 by 1e-4
    logits[2, 3], logits[2, 6] = 2.0, 1.0  # token 1 chosen at row 2: 3 over 6 by 1.0
    want = v.PathOutput([4, 3, 1], logits)
    tol = v.DEFAULT_TOLERANCES[torch.float32]
    tie = v.first_divergence(0, request, want, [7, 6, 1], logits, tol)
    assert (tie.position, tie.expected, tie.got, tie.near_tie) == (0, 4, 7, True)
    assert tie.oracle_margin == pytest.approx(1e-4, abs=1e-6)
    bug = v.first_divergence(0, request, want, [4, 6, 1], logits, tol)
    assert (bug.position, bug.near_tie, bug.oracle_margin) == (1, False, 1.0)
    result = v.compare_mode("torch/t [single]", [0, 1], [request, request], [want, want], [[7, 6, 1], [4, 6, 1]],
                            [logits, logits], tol)
    assert result.greedy_agree == 0 and len(result.failures) == 1 and "request 1 token 1" in result.failures[0]
    assert v.compare_mode("x", [0], [request], [want], [[4, 3, 1]], [logits + float("nan")], tol).failures


def test_default_tolerances_follow_the_documented_method(model_dir_for, adapter_for):
    """Defaults >= 4x HF's own half-vs-fp32 logit difference on a test model; the engine passes the calibrated
    (tighter) tolerance too."""
    model_dir = model_dir_for("bloom")
    for dtype in (torch.bfloat16, torch.float16):
        report = run(model_dir, adapters_for("bloom", adapter_for), dtype=dtype, calibrate_tolerance=True,
                     reference_column=False)
        assert report.exit_code() == 0, report.summary()
        default, measured = v.DEFAULT_TOLERANCES[dtype], report.tolerance
        assert 0 < measured.max_abs <= default.max_abs and measured.mean_abs <= default.mean_abs
        assert report.calibration["hf_half_vs_fp32_max_abs"] * v.CALIBRATION_FACTOR == measured.max_abs
    assert v.default_tolerance(torch.float32, max_abs=0.1) == v.Tolerance(0.1, 1e-4, 0.2)


def test_without_peft_the_reference_path_is_the_oracle(model_dir_for, adapter_for, monkeypatch):
    monkeypatch.setattr(v, "peft_available", lambda: False)
    report = run(model_dir_for("qwen2"), adapters_for("qwen2", adapter_for))
    assert report.oracle == "reference" and "peft is not installed" in report.notes[0]
    assert set(report.backends) == {"torch"} and report.exit_code() == 0, report.summary()


# ---- the command line --------------------------------------------------------------------------------------------
def parse(argv):
    parser = argparse.ArgumentParser()
    v.add_verify_arguments(parser)
    return parser.parse_args(argv)


def test_cli_inputs_file_report_and_unavailable_triton(model_dir_for, adapter_for, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton cannot run on this CPU: reported, not a crash
    model_dir, adapter = model_dir_for("llama"), adapter_for("llama")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "sentiment", "text": "the cat sat on the mat"},
        {"prompt": None, "input_ids": [5, 6, 7], "max_new_tokens": 3},
        {"prompt": "sentiment", "input_ids": [9, 10, 11, 12]},
    ]) + "\n")
    out = tmp_path / "report.json"
    code = v.run_verify(parse([str(model_dir), "--prompts", f"sentiment={adapter}", "--device", "cpu",
                               "--backends", "torch,triton", "--inputs", str(inputs), "--max-new-tokens", "5",
                               "--report", str(out)]))
    text = capsys.readouterr().out
    assert code == 3 and "UNAVAILABLE" in text and "TRITON_INTERPRET" in text and "INCOMPLETE" in text
    data = json.loads(out.read_text())
    assert data["exit_code"] == 3 and data["oracle"] == "hf+peft"
    assert data["backends"]["triton"]["status"] == "unavailable"
    assert data["backends"]["torch"]["status"] == "pass" and data["num_requests"] == 3
    assert data["backends"]["torch"]["tasks"]["sentiment"]["modes"]["batch"]["greedy_agree"] == 2
    # a broken tolerance: exit 1 with the report naming backend and task
    code = v.run_verify(parse([str(model_dir), "--prompts", str(adapter), "--device", "cpu", "--random", "1",
                               "--max-new-tokens", "3", "--max-abs", "-1", "--report", str(out)]))
    assert code == 1 and f"torch/{adapter.name} [single]: max |logit diff|" in capsys.readouterr().out
    assert json.loads(out.read_text())["passed"] is False


@pytest.mark.parametrize("line, message", [
    ("not json", "in.jsonl:1: not valid JSON"),
    ('{"prompt": "t"}', 'exactly one of "text", "input_ids"'),
    ('{"prompt": "t", "input_ids": []}', "non-empty list of integers"),
    ('{"prompt": 3, "input_ids": [1]}', "prompt name or null"),
])
def test_bad_inputs_file_is_a_clear_error(line, message, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(v.VerifyError, match=message.replace("(", r"\(").replace("|", r"\|")):
        v.load_requests_jsonl(path, None)


def test_bad_requests_and_prompt_args_are_clear_errors(tmp_path):
    with pytest.raises(v.VerifyError, match="names prompt 'nope'"):
        v.check_requests([v.VerifyRequest("nope", [1])], {"t": 4}, 512, 256)
    with pytest.raises(v.VerifyError, match="exceed the model's 32 positions"):
        v.check_requests([v.VerifyRequest("t", [1] * 20, 16)], {"t": 4}, 512, 32)
    with pytest.raises(v.VerifyError, match="not a PEFT adapter directory"):
        v.parse_prompt_args([str(tmp_path / "missing")])
    (tmp_path / "a").mkdir()
    assert v.parse_prompt_args([str(tmp_path / "a"), f"x={tmp_path / 'a'}", str(tmp_path / "a")]) == {
        "a": tmp_path / "a", "x": tmp_path / "a", "a-2": tmp_path / "a"}


# ---- softprompt.testing helpers for users' own suites --------------------------------------------------------
def test_assert_generation_matches_and_tiny_fixtures(tmp_path):
    from softprompt import Engine

    model_dir, adapters = tiny_model_with_adapters(tmp_path, "gpt2", 2, num_virtual_tokens=[4, 7])
    engines = {b: Engine(model_dir, device="cpu", dtype="float32", backend=b) for b in ("torch", "reference")}
    for engine in engines.values():
        for name, adapter in adapters.items():
            engine.add_prompt(name, adapter)
    params = SamplingParams(max_new_tokens=5)
    requests = [Request(prompt="task0", text="the cat sat", sampling=params),
                Request(prompt="task1", input_ids=[7, 8, 9], sampling=params),
                Request(prompt=None, input_ids=[10, 11], sampling=params)]
    result = assert_generation_matches(engines["torch"], engines["reference"], requests)
    assert result.tasks["task1"].modes["batch"].greedy_agree == 1
    hf = hf_peft_reference(model_dir, adapters)
    assert_generation_matches(engines["torch"], hf, requests, dtype=torch.float32)
    shifted_prompt(engines["torch"])
    with pytest.raises(AssertionError, match=r"torch/task0 \[single\]: max \|logit diff\|"):
        assert_generation_matches(engines["torch"], hf, requests)
    with pytest.raises(ValueError, match="greedy"):
        assert_generation_matches(engines["torch"], hf, [Request(prompt=None, input_ids=[5],
                                                                 sampling=SamplingParams(temperature=1.0))])


def test_softprompt_testing_exports():
    import softprompt.engine.testing as engine_testing
    import softprompt.testing as t

    assert {"build_tiny_checkpoint", "build_prompt_tuning_adapter", "build_prompt_tensor", "build_tokenizer",
            "assert_generation_matches", "tiny_model_with_adapters", "hf_peft_reference"} <= set(engine_testing.__all__)
    assert all(getattr(t, name) is getattr(engine_testing, name) for name in engine_testing.__all__)
