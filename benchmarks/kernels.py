"""Kernel microbenchmarks: each Triton kernel against what torch ships for the same work and the memory floor.

    python -m benchmarks.kernels [--out benchmarks/results/kernels-<gpu>.json] [--smoke]

Times are `triton.testing.do_bench` medians (L2 flushed before each call) of CUDA-graph replays, i.e. GPU time
without Python launch overhead; eager times (the same calls launched from Python) are kept beside them. The floor is
the case's unavoidable memory traffic over the bandwidth of a large device-to-device copy measured in the same run.
Every kernel is checked against torch first and not timed if it disagrees. `--smoke` runs tiny shapes once each (on
the CPU under the Triton interpreter, in fp32, when there is no GPU) to prove the script works; its timings mean
nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from softprompt.engine.attention_padded import PaddedSDPAAttention  # noqa: E402
from softprompt.engine.attention_torch import SeqSlice  # noqa: E402
from softprompt.kernels.decode_attention import (  # noqa: E402
    decode_attention, decode_attention_reference, group_by_prefix)
from softprompt.kernels.input_qkv import fused_input_qkv  # noqa: E402
from softprompt.kernels.prefill_attention import prefill_attention, prefill_attention_reference  # noqa: E402
from softprompt.kernels.prompt_input import fused_prompt_input, fused_prompt_input_reference  # noqa: E402
from softprompt.kernels.rope_kv_write import rope_kv_write, rope_kv_write_reference  # noqa: E402

from .environment import REPO, device_name, device_slug, git_commit  # noqa: E402

# Tolerances as in tests/kernels: attention kernel vs the fp32 reference (the torch backend computes in the input
# dtype: 3x that in bf16); prompt input and RoPE vs torch (atol, rtol).
ATTN_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
ELEMENTWISE_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-2, 2e-2)}
PROJECTION_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (6e-2, 6e-2)}  # as tests/kernels/test_input_qkv.py


@dataclass(frozen=True)
class AttnShape:
    hq: int
    hkv: int
    d: int
    block_size: int
    tasks: int
    prefix: int  # P, each task's prefix length
    batch: int  # B sequences, sequence b on task b % tasks
    own: int  # own tokens per sequence (prefill: all new; decode: the last one is new)


@dataclass(frozen=True)
class Shapes:
    prefill: AttnShape
    decode: AttnShape
    hidden: int
    vocab: int
    prompt_rows: int  # rows of the soft-prompt table
    rows: tuple[int, ...]  # T for the prompt-input and RoPE cases
    max_pos: int


FULL = Shapes(prefill=AttnShape(32, 8, 64, 16, tasks=16, prefix=256, batch=64, own=128),
              decode=AttnShape(32, 8, 64, 16, tasks=16, prefix=1024, batch=256, own=64),
              hidden=2048, vocab=128256, prompt_rows=16 * 256, rows=(64, 8192), max_pos=16384)
SMOKE = Shapes(prefill=AttnShape(4, 2, 32, 8, tasks=2, prefix=20, batch=3, own=13),
               decode=AttnShape(4, 2, 32, 8, tasks=2, prefix=24, batch=6, own=5),
               hidden=64, vocab=100, prompt_rows=20, rows=(8, 17), max_pos=64)


@dataclass
class Case:
    name: str
    kernel: str  # prefill_attention, decode_attention, prompt_input, input_qkv or rope_kv_write
    torch_impl: str
    run_kernel: Callable[[], object]
    run_torch: Callable[[], object]
    check: Callable[[], None]  # raises AssertionError where the kernel disagrees with torch
    floor_bytes: int | None = None
    min_speedup: float | None = None  # the targets
    max_over_floor: float | None = None


@dataclass
class Result:
    name: str
    kernel: str
    torch_impl: str
    correctness: str  # "OK", or FAILED-CORRECTNESS / FAILED-ERROR and why
    kernel_ms: float | None  # CUDA-graph replay (eager where capture failed; one plain call with --smoke)
    torch_ms: float | None
    kernel_eager_ms: float | None
    torch_eager_ms: float | None
    floor_bytes: int | None
    floor_ms: float | None
    speedup: float | None  # torch_ms / kernel_ms
    kernel_over_floor: float | None
    torch_over_floor: float | None
    target: str
    passed: bool | None  # None: no target, or --smoke


def _i32(rows, device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32, device=device)


def _close(what: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _paged_batch(s: AttnShape, num_queries: int, dtype: torch.dtype, device: torch.device):
    """A one-layer pool of random K/V with `tasks` prefixes and `batch` sequences in shuffled blocks."""
    blocks = lambda n: -(-n // s.block_size)  # noqa: E731
    num_blocks = s.tasks * blocks(s.prefix) + s.batch * blocks(s.own)
    ids = torch.randperm(num_blocks).tolist()
    prefixes = [[ids.pop() for _ in range(blocks(s.prefix))] for _ in range(s.tasks)]
    task_of = [b % s.tasks for b in range(s.batch)]
    slices = [SeqSlice(num_queries, prefixes[task], s.prefix, [ids.pop() for _ in range(blocks(s.own))],
                       s.own - num_queries) for task in task_of]
    kv = torch.randn(1, 2, num_blocks, s.block_size, s.hkv, s.d, device=device, dtype=dtype)
    return SimpleNamespace(kv=kv, block_size=s.block_size), slices, task_of


def _kv_bytes(tokens: int, s: AttnShape, itemsize: int) -> int:
    return 2 * tokens * s.hkv * s.d * itemsize


def prefill_cases(s: AttnShape, dtype: torch.dtype, device: torch.device) -> list[Case]:
    pool, slices, _ = _paged_batch(s, s.own, dtype, device)
    t = s.batch * s.own
    q = torch.randn(t, s.hq, s.d, device=device, dtype=dtype)
    k, v = (torch.randn(t, s.hkv, s.d, device=device, dtype=dtype) for _ in range(2))
    backend = PaddedSDPAAttention(pool, slices, s.d ** -0.5, None, s.hq, device)
    expected = backend(0, q, k, v)  # writes the new tokens' K/V, which the kernel then reads in place
    caches = (pool.kv[0, 0], pool.kv[0, 1])
    args = dict(cu_seqlens_q=_i32(list(range(0, t + 1, s.own)), device),
                prefix_block_tables=_i32([x.prefix_blocks for x in slices], device),
                prefix_lens=_i32([s.prefix] * s.batch, device),
                own_block_tables=_i32([x.own_blocks for x in slices], device),
                own_starts=_i32([0] * s.batch, device), scale=s.d ** -0.5)

    def check() -> None:
        ref = prefill_attention_reference(q, *caches, **args)
        _close("prefill_attention vs fp32 reference", prefill_attention(q, *caches, **args), ref,
               ATTN_TOL[dtype], ATTN_TOL[dtype])
        tol = ATTN_TOL[dtype] * (1 if dtype == torch.float32 else 3)
        _close("PaddedSDPAAttention vs fp32 reference", expected, ref, tol, tol)

    item = q.element_size()
    floor = _kv_bytes(s.tasks * s.prefix + t, s, item) + 2 * q.numel() * item  # unique K/V, q, out
    return [Case(f"prefill B={s.batch} L={s.own} P={s.prefix} tasks={s.tasks}", "prefill_attention",
                 "PaddedSDPAAttention (K/V write + gather + cat + SDPA)",
                 lambda: prefill_attention(q, *caches, **args), lambda: backend(0, q, k, v), check, floor,
                 min_speedup=1.3)]


def decode_cases(s: AttnShape, dtype: torch.dtype, device: torch.device) -> list[Case]:
    pool, slices, task_of = _paged_batch(s, 1, dtype, device)
    q = torch.randn(s.batch, s.hq, s.d, device=device, dtype=dtype)
    k, v = (torch.randn(s.batch, s.hkv, s.d, device=device, dtype=dtype) for _ in range(2))
    backend = PaddedSDPAAttention(pool, slices, s.d ** -0.5, None, s.hq, device)
    perm, starts = group_by_prefix(task_of)  # the kernel's inputs are gathered by task once, outside the timing
    perm_t = torch.tensor(perm, device=device)
    expected = backend(0, q, k, v).index_select(0, perm_t)  # writes the new token's K/V
    shared = dict(q=q.index_select(0, perm_t), k_cache=pool.kv[0, 0], v_cache=pool.kv[0, 1],
                  group_starts=_i32(starts, device),
                  group_prefix_block_tables=_i32([slices[perm[g]].prefix_blocks for g in starts[:-1]], device),
                  group_prefix_lens=_i32([s.prefix] * (len(starts) - 1), device),
                  own_block_tables=_i32([slices[i].own_blocks for i in perm], device),
                  own_lens=_i32([s.own] * s.batch, device), scale=s.d ** -0.5)
    unshared = dict(shared, group_starts=_i32(list(range(s.batch + 1)), device),  # every sequence its own group
                    group_prefix_block_tables=_i32([slices[i].prefix_blocks for i in perm], device),
                    group_prefix_lens=_i32([s.prefix] * s.batch, device))

    @functools.cache  # shared by both cases (an exception is not cached: a failure shows in both)
    def check() -> None:
        ref = decode_attention_reference(**shared)
        tol = ATTN_TOL[dtype]
        _close("decode_attention (shared) vs fp32 reference", decode_attention(**shared), ref, tol, tol)
        _close("decode_attention (unshared) vs fp32 reference", decode_attention(**unshared), ref, tol, tol)
        tol *= 1 if dtype == torch.float32 else 3
        _close("PaddedSDPAAttention vs fp32 reference", expected, ref, tol, tol)

    item = q.element_size()
    floor = _kv_bytes(s.tasks * s.prefix + s.batch * s.own, s, item) + 2 * q.numel() * item  # prefix K/V read once
    name = f"decode B={s.batch} P={s.prefix} own={s.own} tasks={s.tasks}"
    torch_impl = "PaddedSDPAAttention (K/V write + gather + cat + SDPA)"
    return [Case(f"{name} shared", "decode_attention", torch_impl, lambda: decode_attention(**shared),
                 lambda: backend(0, q, k, v), check, floor, min_speedup=5.0, max_over_floor=1.5),
            Case(f"{name} prefix-unaware", "decode_attention", torch_impl, lambda: decode_attention(**unshared),
                 lambda: backend(0, q, k, v), check, floor)]


def _torch_layer0(prompt_idx, token_ids, token_table, prompt_table, norm_w, eps):
    """What torch ships: embedding + index_select of prompt rows + cat + RMSNorm (the model's op order)."""
    x = torch.cat([prompt_table.index_select(0, prompt_idx), F.embedding(token_ids, token_table)])
    x32 = x.float()
    return x, norm_w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def prompt_input_cases(s: Shapes, t: int, dtype: torch.dtype, device: torch.device) -> list[Case]:
    """T rows, the first half soft-prompt rows of random tasks, the rest token rows; then the QKV projection:
    the input kernel + F.linear, and the input as the prologue of the QKV GEMM (one kernel)."""
    h, a = s.hidden, s.prefill
    token_table = torch.randn(s.vocab, h, device=device, dtype=dtype)
    prompt_table = torch.randn(s.prompt_rows, h, device=device, dtype=dtype)
    norm_w = (torch.rand(h, device=device) + 0.5).to(dtype)
    w_qkv = (torch.randn((a.hq + 2 * a.hkv) * a.d, h, device=device) * h ** -0.5).to(dtype)
    n_prompt = t // 2
    prompt_idx = torch.randint(0, s.prompt_rows, (n_prompt,), device=device)
    token_ids = torch.randint(0, s.vocab, (t - n_prompt,), device=device)
    zeros = lambda n: torch.zeros(n, dtype=torch.long, device=device)  # noqa: E731
    args = (torch.cat([zeros(n_prompt), token_ids]), torch.cat([prompt_idx, zeros(t - n_prompt)]),
            torch.arange(t, device=device) < n_prompt, token_table, prompt_table, None, None, None,
            (norm_w, None, 1e-5, "rms"))
    kernel = lambda: fused_prompt_input(*args)  # noqa: E731
    baseline = lambda: _torch_layer0(prompt_idx, token_ids, token_table, prompt_table, norm_w, 1e-5)  # noqa: E731
    reference = lambda: fused_prompt_input_reference(*args)  # noqa: E731

    @functools.cache  # shared by both cases
    def check() -> None:
        res, normed = kernel()
        for label, (want_res, want_normed) in (("torch", baseline()), ("reference", reference())):
            _close(f"fused_prompt_input residual vs {label}", res, want_res, 0.0, 0.0)  # a plain row copy
            _close(f"fused_prompt_input normed vs {label}", normed, want_normed, *ELEMENTWISE_TOL[dtype])

    fused = lambda: fused_input_qkv(*args, w_qkv, None)  # noqa: E731

    def check_fused() -> None:
        res, qkv = fused()
        want_res, want_normed = baseline()
        _close("fused_input_qkv residual vs torch", res, want_res, 0.0, 0.0)
        _close("fused_input_qkv qkv vs torch", qkv, F.linear(want_normed, w_qkv), *PROJECTION_TOL[dtype])

    size = token_table.element_size()
    floor = 3 * t * h * size  # rows read, residual and normed written
    n = w_qkv.shape[0]
    fused_floor = (2 * t * h + n * h + t * n) * size  # rows read, weight read, residual and qkv written
    return [Case(f"input T={t} H={h} + QKV linear", "prompt_input",
                 "embedding + index_select + cat + RMSNorm, + F.linear", lambda: F.linear(kernel()[1], w_qkv),
                 lambda: F.linear(baseline()[1], w_qkv), check),
            Case(f"input T={t} H={h} as the QKV GEMM's prologue", "input_qkv",
                 "embedding + index_select + cat + RMSNorm, + F.linear", fused,
                 lambda: F.linear(baseline()[1], w_qkv), check_fused, fused_floor),
            Case(f"input T={t} H={h} alone", "prompt_input", "fused_prompt_input_reference", kernel,
                 reference, check, floor)]


def rope_cases(s: Shapes, t: int, dtype: torch.dtype, device: torch.device) -> list[Case]:
    """q/k/v as views of one [T, (Hq + 2 Hkv) D] projection output, K/V written to shuffled slots."""
    a, block_size = s.prefill, 16
    qkv = torch.randn(t, a.hq + 2 * a.hkv, a.d, device=device, dtype=dtype)
    q, k, v = qkv.split([a.hq, a.hkv, a.hkv], dim=1)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, a.d, 2, device=device).float() / a.d))
    freqs = torch.arange(s.max_pos, device=device).float()[:, None] * inv_freq
    cos_sin = (torch.cat([freqs, freqs], 1).cos().to(dtype), torch.cat([freqs, freqs], 1).sin().to(dtype))
    positions = torch.randint(0, s.max_pos, (t,), device=device)
    num_blocks = 2 * -(-t // block_size)
    slots = torch.randperm(num_blocks * block_size, device=device)[:t]
    caches = [torch.zeros(num_blocks, block_size, a.hkv, a.d, device=device, dtype=dtype) for _ in range(4)]
    kernel = lambda: rope_kv_write(q, k, v, positions, cos_sin, caches[0], caches[1], slots)  # noqa: E731
    reference = lambda: rope_kv_write_reference(q, k, v, positions, cos_sin, caches[2], caches[3], slots)  # noqa: E731

    def check() -> None:
        atol, rtol = ELEMENTWISE_TOL[dtype]
        _close("rope_kv_write q", kernel(), reference(), atol, rtol)
        _close("rope_kv_write k cache", caches[0], caches[2], atol, rtol)
        _close("rope_kv_write v cache", caches[1], caches[3], 0.0, 0.0)

    item = qkv.element_size()
    floor = t * item * ((a.hq + 2 * a.hkv) * a.d + 2 * a.d + (a.hq + 2 * a.hkv) * a.d)  # q/k/v, cos/sin; q, k, v out
    return [Case(f"rope+kv write T={t}", "rope_kv_write", "rope_kv_write_reference (torch ops)", kernel, reference,
                 check, floor)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """fn captured in a CUDA graph (after a warm-up on a side stream), as its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(fn: Callable[[], object], device: torch.device, smoke: bool) -> tuple[float | None, float]:
    """(CUDA-graph ms or None, eager ms); with --smoke one plain call's wall time."""
    if smoke:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return None, (time.perf_counter() - start) * 1e3
    eager = do_bench(fn, return_mode="median")
    try:
        return do_bench(_graphed(fn), return_mode="median"), eager
    except Exception as exc:  # an op refused capture: eager time only
        print(f"  (CUDA graph capture failed, eager time only: {exc})")
        return None, eager


def copy_bandwidth(device: torch.device, smoke: bool) -> float:
    """Bytes/s (read + written) of a large device-to-device copy_, best of many."""
    n = 1 << (20 if smoke else 30)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    ms = measure(copy, device, smoke=True)[1] if smoke else do_bench(copy, return_mode="min")
    return 2 * n / (ms * 1e-3)


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def run_case(case: Case, bandwidth: float, device: torch.device, smoke: bool) -> Result:
    try:
        case.check()
        correctness = "OK"
    except AssertionError as exc:
        correctness = f"FAILED-CORRECTNESS: {str(exc).splitlines()[0]}"
        print(f"MISMATCH in {case.name}:\n{exc}")
    except Exception as exc:
        correctness = f"FAILED-ERROR: {type(exc).__name__}: {exc}"
        print(f"ERROR in {case.name}: {correctness}")
    torch_graph, torch_eager = measure(case.run_torch, device, smoke)
    kernel_graph, kernel_eager = measure(case.run_kernel, device, smoke) if correctness == "OK" else (None, None)
    kernel_ms = kernel_graph if kernel_graph is not None else kernel_eager
    torch_ms = torch_graph if torch_graph is not None else torch_eager
    floor_ms = case.floor_bytes / bandwidth * 1e3 if case.floor_bytes else None
    speedup, over_floor = _ratio(torch_ms, kernel_ms), _ratio(kernel_ms, floor_ms)
    targets, checks = [], []
    if case.min_speedup is not None:
        targets.append(f">={case.min_speedup:g}x torch")
        checks.append(speedup is not None and speedup >= case.min_speedup)
    if case.max_over_floor is not None:
        targets.append(f"<={case.max_over_floor:g}x floor")
        checks.append(over_floor is not None and over_floor <= case.max_over_floor)
    passed = None if smoke or not checks else all(checks)
    return Result(case.name, case.kernel, case.torch_impl, correctness, kernel_ms, torch_ms, kernel_eager,
                  torch_eager, case.floor_bytes, floor_ms, speedup, over_floor, _ratio(torch_ms, floor_ms),
                  ", ".join(targets), passed)


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(results: list[Result], smoke: bool) -> None:
    head = ("case", "kernel ms", "torch ms", "speed-up", "floor ms", "kernel/floor", "eager k / t ms", "target",
            "result")
    rows = [head]
    for r in results:
        verdict = (r.correctness.split(":")[0] if r.correctness != "OK" else "n/a (smoke)" if smoke and r.target
                   else "" if r.passed is None else "PASS" if r.passed else "FAIL")
        rows.append((r.name, _fmt(r.kernel_ms), _fmt(r.torch_ms), _fmt(r.speedup, ".2f"),
                     _fmt(r.floor_ms), _fmt(r.kernel_over_floor, ".2f"),
                     f"{_fmt(r.kernel_eager_ms)} / {_fmt(r.torch_eager_ms)}", r.target, verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if smoke:
        return
    shared, unaware = (r.kernel_ms for r in results if r.kernel == "decode_attention")
    if shared and unaware:
        print(f"decode: reading each task's prefix once makes the kernel {unaware / shared:.2f}x faster")
    for r in results:
        if r.kernel == "rope_kv_write" and r.speedup is not None:
            verdict = "the kernel wins" if r.speedup > 1 else "the kernel does not win here: leave this to torch"
            print(f"{r.name}: torch/kernel = {r.speedup:.2f}x, torch/floor = {_fmt(r.torch_over_floor, '.2f')}x: "
                  f"{verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON results (default benchmarks/results/kernels-<gpu>.json; "
                                                 "--smoke writes only where given)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one plain call each (CPU: interpreter)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("benchmarks.kernels times Triton kernels on a CUDA GPU and none is available; "
              "`--smoke` runs tiny shapes on the CPU under the Triton interpreter (timings meaningless).",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter's tl.dot mishandles bf16
    shapes = SMOKE if args.smoke else FULL
    torch.manual_seed(0)
    if args.smoke:
        print("SMOKE RUN: tiny shapes, one plain call per case; timings are meaningless.")
    bandwidth = copy_bandwidth(device, args.smoke)
    print(f"{device_name(str(device))}, {dtype}, copy bandwidth {bandwidth / 1e9:.0f} GB/s")

    builders = [lambda: prefill_cases(shapes.prefill, dtype, device),
                lambda: decode_cases(shapes.decode, dtype, device),
                *(lambda t=t: prompt_input_cases(shapes, t, dtype, device) for t in shapes.rows),
                *(lambda t=t: rope_cases(shapes, t, dtype, device) for t in shapes.rows)]
    results = []
    for build in builders:
        for case in build():
            results.append(run_case(case, bandwidth, device, args.smoke))
            print(f"  done: {case.name}", flush=True)
        if cuda:
            torch.cuda.empty_cache()
    print_table(results, args.smoke)

    out = args.out or (None if args.smoke else REPO / "benchmarks" / "results" / f"kernels-{device_slug('cuda')}.json")
    if out is not None:
        report = dict(gpu=device_name(str(device)), torch=torch.__version__, triton=triton.__version__,
                      command=shlex.join(["python", "-m", "benchmarks.kernels", *(sys.argv[1:] if argv is None else argv)]),
                      git_commit=git_commit(), smoke=args.smoke, dtype=str(dtype).removeprefix("torch."),
                      copy_bandwidth_bytes_per_s=bandwidth,
                      timing="smoke: one plain call" if args.smoke else
                      "triton.testing.do_bench median, CUDA-graph replay (eager alongside), L2 flushed",
                      cases=[asdict(r) for r in results])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0 if all(r.correctness == "OK" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
