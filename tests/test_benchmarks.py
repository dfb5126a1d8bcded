"""Benchmarks: `--quick` C1 and SERVE-CPU write complete JSON (+ PNG), GPU workloads refuse to run without CUDA, the
roofline's weight count matches real models, Poisson arrivals and the SLO rule. No timings are asserted."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import c1, run, table, throughput
from benchmarks.roofline import layer_linear_params, peak_for
from benchmarks.serving import max_rate_held
from benchmarks.workloads import WORKLOADS, ModelShape, get_workload, poisson_arrivals
from softprompt.engine import bench_cli
from softprompt.engine.bench_cli import add_bench_arguments, run_bench

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _run(tmp_path: Path, *args: str) -> dict:
    assert run.main(["--quick", "--out", str(tmp_path), *args]) == 0
    (path,) = tmp_path.glob("*.json")
    report = json.loads(path.read_text())
    env = report["environment"]
    assert report["quick"] is True
    assert env["device"] and env["torch"] == torch.__version__ and env["transformers"] and env["peft"]
    assert "--quick" in env["command"] and "git_commit" in env and env["contention_cpu_s"] is not None
    png = path.with_suffix(".png")
    if HAS_MPL:
        assert report["plot"] == png.name and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert report["plot"] is None and "matplotlib" in report["plot_skipped"]
    return report


def test_quick_c1(tmp_path):
    r = _run(tmp_path, "--workload", "c1")
    w = r["workload"]
    assert (w["name"], w["dtype"], w["device"], r["repeats"]) == ("C1", "float32", "cpu", 1)
    assert set(r["systems"]) == {"engine", "hf_mixed", "peft"} and "hf_static" in r["skipped"]
    counts = r["token_counts"]
    assert counts["output"] == w["num_requests"] * w["new_tokens"]
    for s in r["systems"].values():
        assert s["output_tok_s"] == pytest.approx(counts["output"] / s["seconds"])
        assert s["total_tok_s"] == pytest.approx(counts["total"] / s["seconds"])
    engine_s = r["systems"]["engine"]["seconds"]
    assert r["ratios"] == pytest.approx({f"engine/{n}": r["systems"][n]["seconds"] / engine_s
                                         for n in ("hf_mixed", "peft")})
    assert r["engine_prefix_computations_per_run"] == [w["num_tasks"]]  # cold prefixes, each computed once
    assert r["floor"]["total"] > 0 and set(r["targets"]) == {"engine/hf_mixed", "engine/peft", "floor_fraction"}
    assert r["roofline"]["flops"] > 0 and r["roofline"]["fraction"] is None  # no peaks assumed for a CPU
    assert r["kv_memory"]["with_sharing"] < r["kv_memory"]["without_sharing"]
    a = r["agreement"]
    assert a["pass"] and a["pairs"]["engine~hf_mixed"]["exact"] == 1.0 and a["pairs"]["engine~peft"]["exact"] == 1.0
    row = table.throughput_row(r, "results")
    assert row.startswith("| C1 |")
    assert f"`{r['environment']['command']}`" in row and f"**{r['ratios']['engine/peft']:.2f}×**" in row



def _engine_on_torch_whatever_backend(monkeypatch) -> None:
    """`--compare-backend` engines run on the torch backend (the same tokens), so these tests need no Triton."""
    real = throughput.EngineSystem
    monkeypatch.setattr(throughput, "EngineSystem", lambda workload, backend="torch", **kw: real(workload, **kw))


def test_a_stop_during_an_optional_system_leaves_a_complete_report_of_the_rest(tmp_path, monkeypatch, capsys):
    """The optional systems (another backend, HF static + compile) run after the others, each after the report so
    far is written: a GPU step stopped at its time limit during the compile (SIGINT: KeyboardInterrupt) still
    leaves the engine, HF, PEFT and the other backend's figures."""
    _engine_on_torch_whatever_backend(monkeypatch)
    real = throughput.measure_all
    monkeypatch.setattr(throughput, "measure_all", lambda *a, **k: real(*a, **{**k, "hf_static": True}))

    class StoppedDuringCompile:
        def __init__(self, *args, **kwargs):
            raise KeyboardInterrupt

    monkeypatch.setattr(throughput, "HFStaticCompiled", StoppedDuringCompile)
    with pytest.raises(KeyboardInterrupt):
        run.main(["--quick", "--workload", "C1", "--compare-backend", "triton", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("*.json")
    report = json.loads(path.read_text())
    assert report["partial"] is True and report["skipped"] == {"hf_static": "pending: runs after the others"}
    assert set(report["systems"]) == {"engine", "engine_triton", "hf_mixed", "peft"} and report["agreement"]["pass"]
    assert report["agreement"]["pairs"]["engine~engine_triton"]["exact"] == 1.0
    assert report["environment"]["command"].endswith("--out " + str(tmp_path))
    out = capsys.readouterr().out
    assert f"wrote {path} (partial: engine_triton, hf_static still to run)" in out
    assert f"wrote {path} (partial: hf_static still to run)" in out and "Workload C1" in out


def test_a_failing_comparison_backend_is_reported_not_fatal(tmp_path, monkeypatch):
    real = throughput.EngineSystem

    def engine_system(workload, backend="torch", **kw):
        if backend != "torch":
            raise RuntimeError("no such backend here\nsecond line")
        return real(workload, backend=backend, **kw)

    monkeypatch.setattr(throughput, "EngineSystem", engine_system)
    r = _run(tmp_path, "--workload", "C1", "--compare-backend", "triton")
    assert set(r["systems"]) == {"engine", "hf_mixed", "peft"} and "partial" not in r
    assert r["skipped"]["engine_triton"] == "failed: RuntimeError: no such backend here"
    assert r["skipped"]["hf_static"].startswith("CUDA only")


def test_repeats_stop_once_the_runs_add_up_to_the_budget(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(throughput, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    class TwoSecondRuns:
        name, label = "slow", "a system whose runs take 2 s"
        calls = 0

        def warmup(self):
            pass

        def reset(self):
            pass

        def generate(self, items):
            TwoSecondRuns.calls += 1
            clock[0] += 2.0
            return [[1]]

        def info(self):
            return {}

    workload = SimpleNamespace(config=SimpleNamespace(device="cpu"), items=[None])
    assert throughput.measure(TwoSecondRuns(), workload, repeats=3).runs == [2.0, 2.0, 2.0]
    assert len(throughput.measure(TwoSecondRuns(), workload, repeats=3, budget_s=3.0).runs) == 2
    assert len(throughput.measure(TwoSecondRuns(), workload, repeats=3, budget_s=1.0).runs) == 1
    assert TwoSecondRuns.calls == 6


def test_quick_ray_replicas(tmp_path):
    """1 replica, 2 round-robin, 2 with affinity on a local Ray cluster: every setup's greedy tokens equal the
    engine's; round-robin computes tasks' prefixes on both replicas."""
    r = _run(tmp_path, "--workload", "ray-cpu", "--repeats", "2")
    w, setups = r["workload"], r["setups"]
    assert w["name"] == "RAY-CPU" and w["kind"] == "replicas" and r["repeats"] == 2
    assert list(setups) == ["1 replica", "2 replicas, round-robin", "2 replicas, affinity"]
    assert r["agreement"]["pass"]
    for s in setups.values():
        assert len(s["runs"]) == 2 and s["seconds"] == min(s["runs"]) and s["cold_seconds"] == s["runs"][0]
        assert sum(s["requests_per_replica_cold"].values()) == w["num_requests"]
        assert len(s["requests_per_replica_cold"]) == s["replicas"]
    assert setups["1 replica"]["prefix_computations_per_task_max"] == 1
    rr, affinity = setups["2 replicas, round-robin"], setups["2 replicas, affinity"]
    assert rr["prefix_computations_per_task_mean"] > 1  # tasks on both replicas
    # affinity: never more than round-robin; exactly once per task unless the load guard spilled a task (16
    # requests at once, all of a task's on its home: tests/server/test_ray_serve.py checks the exact count)
    assert affinity["prefix_computations_total"] <= rr["prefix_computations_total"]
    assert table.replicas_row(r, "results").startswith("| RAY-CPU |")

def test_quick_serve_cpu(tmp_path):
    r = _run(tmp_path, "--workload", "SERVE-CPU")
    serving = get_workload("SERVE-CPU").resolved(True)[1]
    rates = list(serving.rates)
    assert r["workload"]["kind"] == "serving" and r["serving"]["rates"] == rates
    for name in ("engine", "hf_mixed"):
        sysrep = r["systems"][name]
        assert [p["rate"] for p in sysrep["per_rate"]] == rates
        for p in sysrep["per_rate"]:
            assert p["requests"] == serving.requests_at(p["rate"])
            assert 0 < p["ttft_s"]["p50"] <= p["ttft_s"]["p99"] and 0 < p["itl_s"]["p50"] <= p["itl_s"]["p99"]
            assert p["held"] == (p["ttft_s"]["p99"] < r["serving"]["ttft_slo_s"])
            assert p["contention_cpu_s"] is not None
        assert sysrep["max_rate_held"] == max_rate_held(sysrep["per_rate"])
    assert r["agreement"]["pass"]
    assert r["agreement"]["engine~hf_mixed (first rate, all requests)"]["exact"] == 1.0  # fp32: same greedy tokens
    assert "| SERVE-CPU |" in table.serving_row(r, "results")


def test_table_marks_missing_results(tmp_path):
    text = table.tables(tmp_path)
    for name, spec in WORKLOADS.items():
        assert f"| {name} | {'CUDA GPU' if spec.needs_cuda else 'CPU'}: **not yet measured** |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("name", [n for n, s in WORKLOADS.items() if s.needs_cuda])
def test_gpu_workloads_refuse_without_cuda(name, tmp_path, capsys):
    assert run.main(["--workload", name, "--out", str(tmp_path)]) == 2
    assert "CUDA" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_usage_errors(tmp_path, capsys):
    assert run.main(["--workload", "nope"]) == 2
    assert "unknown workload 'nope'" in capsys.readouterr().err
    assert run.main(["--workload", "C1", "--rates", "1,2", "--out", str(tmp_path)]) == 2
    assert "serving workloads" in capsys.readouterr().err
    assert run.main(["--workload", "SERVE-CPU", "--compare-backend", "triton", "--out", str(tmp_path)]) == 2
    assert "--compare-backend applies to throughput workloads" in capsys.readouterr().err
    assert run.main(["--workload", "C1", "--compare-backend", "torch", "--out", str(tmp_path)]) == 2
    assert "already the engine's --backend" in capsys.readouterr().err
    assert run.main(["--workload", "C1", "--repeat-budget", "0", "--out", str(tmp_path)]) == 2
    assert "--repeat-budget must be positive" in capsys.readouterr().err


def test_bench_cli_and_c1_alias(monkeypatch, capsys):
    args = add_bench_arguments(argparse.ArgumentParser()).parse_args(["--list"])
    assert run_bench(args) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in WORKLOADS)
    seen = []
    monkeypatch.setattr(c1, "run_main", lambda argv: seen.append(argv) or 0)
    assert c1.main(["--quick"]) == 0 and seen == [["--workload", "C1", "--quick"]]
    monkeypatch.setattr(bench_cli, "_has_benchmarks", lambda root: False)  # an installed engine, outside a clone
    assert run_bench(args) == 2
    assert "not part of the installed package" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["llama", "bloom"])
def test_roofline_counts_the_models_matmul_weights(model_dir_for, variant):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir_for(variant))
    hf = model.config
    shape = ModelShape(variant, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
                       num_heads=hf.num_attention_heads, num_kv_heads=getattr(hf, "num_key_value_heads", 0),
                       intermediate_size=getattr(hf, "intermediate_size", 0), vocab_size=hf.vocab_size)
    layer_weights = sum(p.numel() for n, p in model.named_parameters()
                        if p.dim() == 2 and (".layers." in n or ".h." in n))
    assert shape.num_layers * layer_linear_params(shape) == layer_weights


def test_peaks_by_device_name():
    assert peak_for("NVIDIA H100 80GB HBM3").bytes_per_s == 3.35e12
    assert peak_for("NVIDIA H200").bytes_per_s == 4.8e12 and peak_for("NVIDIA H100 PCIe").flops == 756e12
    assert peak_for("AMD EPYC") is None


def test_poisson_arrivals_scale_with_rate():
    slow, fast = poisson_arrivals(2000, 5.0, seed=1), poisson_arrivals(2000, 50.0, seed=1)
    assert slow[0] == 0 and all(b >= a for a, b in zip(slow, slow[1:]))
    assert fast == pytest.approx([t / 10 for t in slow])
    assert slow[-1] / (len(slow) - 1) == pytest.approx(1 / 5.0, rel=0.1)


def test_max_rate_held_stops_at_the_first_miss():
    def stats(rate, held):
        return {"rate": rate, "held": held}

    assert max_rate_held([stats(4, True), stats(1, True), stats(2, False)]) == 1
    assert max_rate_held([stats(1, False), stats(2, True)]) is None
    assert max_rate_held([stats(1, True), stats(2, True)]) == 2


def test_gpu_session_script_runs_its_steps_within_the_deadline(tmp_path):
    """benchmarks/gpu_session.sh (the one device call of a GPU session): the package imports through its shim from
    any directory, each step's outcome lands in summary.txt and the tarball. Here a CUDA workload refuses at once."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "BUDGET_S": "60", "ONLY": "W1"}
    done = subprocess.run(["bash", str(root / "benchmarks/gpu_session.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "summary.txt").read_text()
    imported = next(line for line in summary.splitlines() if line.startswith("softprompt imports from"))
    assert imported.endswith("/softprompt/__init__.py") and "_root" not in imported  # the shim, not an install
    assert "tests:" not in summary  # not in ONLY
    if not torch.cuda.is_available():
        assert "W1: rc=2" in summary and "runs on a CUDA GPU" in summary
    with tarfile.open(tmp_path / "gpu-results.tgz") as tar:
        assert {"./W1.log", "./environment.txt"} <= set(tar.getnames())


def test_host_overhead_benchmark_runs(tmp_path):
    from benchmarks import host_overhead

    out = tmp_path / "host.json"
    for outputs in ("every", "finished"):
        assert host_overhead.main(["--batch", "16", "--steps", "5", "--outputs", outputs, "--out", str(out)]) == 0
        r = json.loads(out.read_text())
        assert r["batch"] == 16 and r["steps"] == 5 and r["outputs"] == outputs and "--batch" in r["command"]
        for variant in host_overhead.VARIANTS:
            assert r[variant]["step_s_mean"] > 0
            assert set(r[variant]["parts_s"]) == {"schedule", "model inputs", "  of which graph-step metadata",
                                                  "sample", "outputs and the rest"}
    assert host_overhead.main(["--steps", "0"]) == 2


def test_server_handoff_benchmark_runs(capsys):
    from benchmarks import server_handoff

    assert server_handoff.main(["--streams", "8", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "per output" in out and "one per step" in out


def test_stream_text_benchmark_runs(tmp_path, model_dir_for, capsys):
    from benchmarks import stream_text

    out = tmp_path / "text.json"
    assert stream_text.main(["--streams", "4", "--tokens", "9", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["streams"] == 4 and r["tokens"] == 9 and r["decode_stream"] and "--streams" in r["command"]
    for case in ("text", "text + stop strings"):
        assert r[case]["incremental"]["total_s"] > 0 and r[case]["whole decode"]["total_s"] > 0
    assert stream_text.main(["--streams", "2", "--tokens", "3", "--tokenizer", str(model_dir_for("gpt2"))]) == 0
    assert "gpt2" in capsys.readouterr().out
    assert stream_text.main(["--tokens", "0"]) == 2


def test_shared_instruction_benchmark_runs(tmp_path):
    from benchmarks import shared_instruction

    out = tmp_path / "shared.json"
    # 12 requests of ~340 tokens pass the 2048-token step budget over several steps: the later ones find blocks
    args = ["--instruction", "300", "--requests", "12", "--tasks", "2", "--rounds", "1", "--out", str(out)]
    assert shared_instruction.main(args) == 0
    r = json.loads(out.read_text())
    assert r["identical_tokens"] and r["block cache"]["hit_tokens_per_run"] > 0 and r["requests"] == 12
    assert "--instruction" in r["environment"]["command"]
    assert r["block cache"]["best_s"] > 0 and r["no block cache"]["best_s"] > 0
    assert r["no block cache"]["hit_tokens_per_run"] == 0
    # the 3 samples of each input arrive together: the 2nd and 3rd wait a step and find its full blocks
    args = ["--instruction", "30", "--requests", "2", "--tasks", "2", "--samples", "3", "--rounds", "1", "--out",
            str(out)]
    assert shared_instruction.main(args) == 0
    r = json.loads(out.read_text())
    assert r["requests"] == 6 and r["samples"] == 3 and 0 <= r["requests_with_identical_tokens"] <= 6
    assert r["no in-batch sharing"]["hit_tokens_per_run"] == 0
    assert r["block cache"]["hit_tokens_per_run"] >= 2 * 2 * 32  # 2 of 3 samples find 2+ blocks of 16
    assert shared_instruction.main(["--tasks", "0"]) == 2
    assert shared_instruction.main(["--instruction", "400"]) == 2
    assert shared_instruction.main(["--samples", "0"]) == 2


def test_structured_benchmark_runs(tmp_path, monkeypatch):
    from benchmarks import structured

    # a small corpus keeps the 32000-token tokenizer's training short (it learns what merges the text has)
    monkeypatch.setattr(structured, "_sources", lambda: iter(["def f(x):\n    return {\"a\": [x, 1]}\n"] * 50))
    out = tmp_path / "structured.json"
    assert structured.main(["--requests", "3", "--tasks", "2", "--rounds", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["requests"] == 3 and r["generated_tokens"] > 0 and r["mask_calls_per_run"] > 0
    assert r["json schema"]["best_s"] > 0 and r["unconstrained"]["best_s"] > 0 and "--requests" in r["environment"][
        "command"]
    assert r["valid_json"] == r["stopped_at_eos"]  # an output that ended at EOS is the schema's JSON
    assert structured.main(["--requests", "0"]) == 2


def test_sampling_benchmark_runs(tmp_path):
    from benchmarks import sampling

    out = tmp_path / "sampling.json"
    assert sampling.main(["--vocab", "1000", "--draws", "5", "--rows", "3", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["vocabs"]["1000"]
    assert r["draw_us"] > 0 and r["torch.multinomial_us"] > 0
    assert r["3 rows lm-like"]["batched_us"] > 0 and r["3 rows flat"]["before_us"] > 0
    assert sampling.main(["--draws", "0"]) == 2


def test_score_benchmark_runs(tmp_path):
    from benchmarks import score

    out = tmp_path / "score.json"
    assert score.main(["--contexts", "4", "--labels", "2", "--context-tokens", "20", "--rounds", "1",
                       "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["same"] and r["contexts"] == 4 and r["shared context"]["best_s"] > 0 and r["every row"]["best_s"] > 0
    assert "--contexts" in r["environment"]["command"]
    assert score.main(["--labels", "0"]) == 2
    assert score.main(["--context-tokens", "400"]) == 2


def test_beam_search_benchmark_runs(tmp_path):
    from benchmarks import beam_search

    out = tmp_path / "beam.json"
    assert beam_search.main(["--requests", "2", "--tasks", "2", "--beams", "2", "--new-tokens", "3", "--rounds", "1",
                             "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["same_hypotheses"] == 2 and r["engine_s"] > 0 and r["hf_peft_s"] > 0 and "--beams" in r["environment"][
        "command"]
    assert beam_search.main(["--beams", "0"]) == 2
