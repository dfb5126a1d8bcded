"""Compile the kernels' launches for Hopper (sm_90) without a GPU.

`record_launches()` records, under the Triton interpreter, every kernel launch made inside it (the kernel, the
Triton type of each argument, the constexpr values, num_warps / num_stages) and still runs it. Run as a script
(`python -m tests.kernels.hopper_compile LAUNCHES.json`, without TRITON_INTERPRET), this module compiles each
recorded launch with `triton.compile` for `GPUTarget("cuda", 90, 32)`: front end, TTGIR passes, LLVM, PTX and the
wheel's ptxas, everything but loading the binary, and checks the shared memory each launch needs against an H100
block's. That catches what the interpreter cannot (type rules of the compiler, layouts, shared memory for the
pipelined tiles), on triton 3.6 (the GPU image) as on the current release.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import inspect
import json
import os
import sys
from collections.abc import Iterator

import torch

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
                torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
HOPPER_SHARED_BYTES = 232448  # an H100 / H200 thread block's shared memory at most (227 KiB)


def _triton_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _is_constexpr(param: inspect.Parameter) -> bool:
    return "constexpr" in str(param.annotation)


@contextlib.contextmanager
def record_launches() -> Iterator[list[dict]]:
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[dict] = []
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        params = list(inspect.signature(self.fn).parameters.values())
        bound = dict(zip((p.name for p in params), args)) | {k: v for k, v in kwargs.items()
                                                             if k not in LAUNCH_OPTIONS}
        launches.append(dict(
            module=self.fn.__module__, kernel=self.fn.__name__,
            signature={p.name: "constexpr" if _is_constexpr(p) else _triton_type(bound[p.name]) for p in params},
            constexprs={p.name: bound[p.name] for p in params if _is_constexpr(p)},
            options={k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        yield launches
    finally:
        InterpretedFunction.run = run


def unique(launches: list[dict]) -> list[dict]:
    seen, out = set(), []
    for launch in launches:
        key = json.dumps(launch, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


def compile_one(launch: dict) -> str:
    """Compile one launch for sm_90: "ok ..." or "FAILED ...: error"."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    what = f'{launch["kernel"]} {launch["constexprs"]} {launch["options"]}'
    try:
        src = ASTSource(fn, launch["signature"], constexprs=launch["constexprs"])
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch["options"])
        shared = getattr(compiled.metadata, "shared", 0)
        if shared > HOPPER_SHARED_BYTES:  # (else the launch fails on the GPU: out of resources)
            return f"FAILED {what}: needs {shared} bytes of shared memory, an H100 block has {HOPPER_SHARED_BYTES}"
        return f"ok {what} shared={shared}"
    except Exception as exc:  # noqa: BLE001 - reported: the test fails on any
        return f"FAILED {what}: {type(exc).__name__}: {str(exc)[-2000:]}"


def compile_all(launches: list[dict]) -> list[str]:
    """Compile every launch, on all cores; one line per launch, in order."""
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(compile_one, launches))


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        lines = compile_all(json.load(f))
    print("\n".join(lines))
    sys.exit(1 if any(line.startswith("FAILED") for line in lines) else 0)
