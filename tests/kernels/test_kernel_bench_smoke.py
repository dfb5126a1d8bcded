"""`python -m benchmarks.kernels --smoke` runs (tiny shapes; CPU: Triton interpreter) and finds every kernel correct."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def test_kernel_benchmark_smoke(tmp_path):
    out = tmp_path / "k.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--smoke", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["torch"] and report["triton"] and "--smoke" in report["command"]
    cases = report["cases"]
    assert {c["kernel"] for c in cases} == {"prefill_attention", "decode_attention", "prompt_input", "input_qkv",
                                                "rope_kv_write"}
    assert all(c["correctness"] == "OK" for c in cases), [(c["name"], c["correctness"]) for c in cases]
    assert all(c["kernel_ms"] is not None and c["torch_ms"] is not None for c in cases)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_exits_2_without_cuda_unless_smoke():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernels"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--smoke" in proc.stderr
