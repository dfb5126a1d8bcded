"""Where a benchmark ran: device, versions, commit, and how busy the machine was meanwhile."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
CONTENTION_WARNING = 0.03  # share of the CPUs others may take before the timings are flagged


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else cpu_name()


def device_slug(device: str) -> str:
    """A short name for result files: cpu, h100, h200, a100, ... (the first word with a digit in the GPU's name)."""
    if torch.device(device).type != "cuda":
        return "cpu"
    words = device_name(device).lower().replace("nvidia", "").split()
    return next((w for w in words if any(c.isdigit() for c in w)), "cuda")


def cpu_seconds() -> tuple[float, float, float, float] | None:
    """Wall clock, the machine's busy and steal CPU-seconds so far (/proc/stat), and this process's CPU-seconds."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, IndexError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    hz, own = os.sysconf("SC_CLK_TCK"), os.times()
    return time.perf_counter(), (user + nice + system + irq + softirq) / hz, steal / hz, own.user + own.system


def contention(start: tuple[float, float, float, float] | None, own_children: float = 0.0) -> dict[str, float] | None:
    """CPU-seconds other processes (`others`) and the hypervisor (`steal`) took since `start`, and their share of
    the CPU capacity (`share`: wall time x cores). `own_children`: CPU-seconds of processes the benchmark itself
    started (a local Ray cluster), which are not others."""
    end = cpu_seconds()
    if start is None or end is None:
        return None
    others, steal = (end[1] - start[1]) - (end[3] - start[3]) - own_children, end[2] - start[2]
    return {"others": others, "steal": steal, "share": (others + steal) / ((end[0] - start[0]) * (os.cpu_count() or 1))}


class DescendantCPU:
    """CPU-seconds used by this process's descendants (e.g. a local Ray cluster's processes), read from /proc each
    time `sample()` is called while they live (a process's last sample counts)."""

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}

    def sample(self) -> None:
        parent: dict[int, int] = {}
        ticks: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            pid = int(stat.parent.name)
            parent[pid], ticks[pid] = int(fields[1]), int(fields[11]) + int(fields[12])  # ppid, utime + stime
        me = os.getpid()
        for pid, t in ticks.items():
            p, hops = parent.get(pid), 0
            while p not in (None, 0, 1, me) and hops < 64:
                p, hops = parent.get(p), hops + 1
            if p == me and pid != me:
                self._seen[pid] = max(self._seen.get(pid, 0), t)

    @property
    def seconds(self) -> float:
        return sum(self._seen.values()) / os.sysconf("SC_CLK_TCK")


def contention_warning(busy: dict[str, float] | None) -> str | None:
    if busy and busy["share"] > CONTENTION_WARNING:
        return (f"WARNING: other processes ({busy['others']:.1f} CPU-s) and the hypervisor ({busy['steal']:.1f} CPU-s) "
                f"took {busy['share']:.0%} of the CPUs during the run: timings may be off, rerun on an idle machine")
    return None


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:  # read-only queries; no optional locks, so a concurrent git in the checkout is never disturbed
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str | None:
    """HEAD, or $SOFTPROMPT_GIT_COMMIT where the tree has no .git (a copy sent to a device machine)."""
    proc = _git("rev-parse", "HEAD")
    if proc is not None and proc.returncode == 0:
        return proc.stdout.strip()
    return os.environ.get("SOFTPROMPT_GIT_COMMIT") or None


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (the figures then come from a modified tree)."""
    proc = _git("diff", "--quiet", "HEAD", "--")
    return None if proc is None or proc.returncode not in (0, 1) else proc.returncode == 1


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def environment(device: str, command: str) -> dict[str, Any]:
    import peft
    import transformers

    env: dict[str, Any] = {
        "device": device_name(device), "device_type": torch.device(device).type, "threads": torch.get_num_threads(),
        "cpu": cpu_name(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "python": platform.python_version(), "command": command,
        "git_commit": git_commit(), "git_dirty": git_dirty(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if env["device_type"] == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(cuda=torch.version.cuda, gpu_memory_bytes=props.total_memory,
                   compute_capability=f"{props.major}.{props.minor}")
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    return env


class PeakMemory:
    """Peak device memory of a block of work on CUDA (bytes above what was allocated when it started, and the
    absolute peak); on the CPU only the process's lifetime peak RSS exists, reported once in the environment."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"
        self.device = torch.device(device)
        self.result: dict[str, int] | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.result = {"peak_allocated_bytes": peak, "above_start_bytes": peak - self._start,
                           "resident_at_start_bytes": self._start}


def write_results(path: Path, result: dict[str, Any], device: str, module: str, argv: list[str] | None) -> None:
    """Write a benchmark's figures as JSON to `path`, with its environment and the command that made them
    (`python -m benchmarks.<module>` and the arguments given: `argv`, or the process's own)."""
    command = " ".join([f"python -m benchmarks.{module}", *(sys.argv[1:] if argv is None else argv)])
    path.write_text(json.dumps({**result, "environment": environment(device, command)}, indent=2) + "\n")
