"""`softprompt demo`: several soft prompts served in one batch on a tiny random model, on the CPU."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def run_demo(args: argparse.Namespace) -> int:
    from .api import Engine
    from .request import Request
    from .sampling import SamplingParams
    from .testing import build_prompt_tuning_adapter, build_tiny_checkpoint

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        print(f"building a tiny random Llama checkpoint and {args.tasks} PEFT prompt-tuning adapters in {root} ...")
        model_dir = build_tiny_checkpoint("llama", root / "tiny-llama", hidden_size=128, num_layers=4,
                                          num_heads=4, num_kv_heads=2, vocab_size=1024, max_positions=512)
        engine = Engine(model_dir, device=args.device or "cpu", dtype=args.dtype, backend=args.backend,
                        cuda_graphs=False if args.enforce_eager else None)
        names = []
        for t in range(args.tasks):
            adapter = build_prompt_tuning_adapter(model_dir, root / f"adapter-{t}", num_virtual_tokens=8 + 4 * t,
                                                  seed=t)
            names.append(engine.add_prompt(f"task-{t}", adapter).name)
        engine.add_prompt("hard-prompt", text="answer briefly and politely:")
        names.append("hard-prompt")
        inputs = ["the cat sat on the", "a small red bird", "my teacher opened the book", "the river near the city"]
        requests = [
            Request(prompt=names[i % len(names)], text=inputs[i % len(inputs)],
                    sampling=SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True))
            for i in range(args.requests)
        ]
        print(f"serving {len(requests)} requests over {len(names)} prompts in one batch "
              f"(backend={engine.backend}, device={engine.device}, dtype={engine.dtype}) ...")
        start = time.perf_counter()
        outputs = engine.generate(requests)
        elapsed = time.perf_counter() - start
        for out in outputs[: min(len(outputs), 2 * len(names))]:
            print(f"[{out.prompt}@{out.prompt_version}] {inputs[outputs.index(out) % len(inputs)]!r} -> {out.text!r}")
        new_tokens = sum(len(o.token_ids) for o in outputs)
        stats = engine.prefix_cache.stats
        print(f"\n{new_tokens} new tokens in {elapsed:.2f} s: {new_tokens / elapsed:.1f} output tokens/s "
              f"(random weights: the text is gibberish by design)")
        print(f"prefix K/V computed once per task: {len(stats.computations)} computations, {stats.hits} cache hits")
    return 0
