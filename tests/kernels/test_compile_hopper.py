"""Every kernel launch the triton backend makes, compiled for Hopper (sm_90) with the installed triton, no GPU.

Engines on test models with the head dims of real ones (64, 80, 128, DeepSeek's 192, Gemma 4's 256 and 512; GQA,
ALiBi, GPT-2 positions, BLOOM's embedding LayerNorm) run a few requests under the interpreter with the GPU's tile
choices forced (kernels/tiles.py), in fp32 and fp16, with and without the CUDA-graph decode path. Each distinct
launch is recorded, fp16 ones also as bf16 (the tile choices do not depend on which half type), and compiled in a
subprocess without the interpreter (tests/kernels/hopper_compile.py). On a GPU the other tests compile the kernels
for real, so this one is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softprompt import Engine
from softprompt.kernels.prompt_input import fused_prompt_input
from softprompt.kernels.tiles import gpu_tiles_forced
from softprompt.testing import build_tiny_checkpoint

from ..runtime_helpers import make_requests, register_tasks, run
from .hopper_compile import record_launches, unique

REPO = Path(__file__).resolve().parents[2]
KERNELS = {"_partial_attention_kernel", "_merge_kernel", "_prefill_attention_kernel", "_rope_kv_write_kernel",
           "_prompt_input_kernel", "_input_qkv_kernel"}
# arch -> (head dim, build options): Llama GQA at 64, GPT-2 at 64, BLOOM (ALiBi) at 128, Mistral (MQA, a sliding
# window shorter than the requests) at 128, and more layouts below
MODELS = {"llama": (64, dict(hidden_size=256, num_heads=4, num_kv_heads=2)),
          "gpt2": (64, dict(hidden_size=256, num_heads=4)),
          "bloom": (128, dict(hidden_size=512, num_heads=4)),
          "mistral": (128, dict(hidden_size=512, num_heads=4, num_kv_heads=1, sliding_window=8)),
          "gemma2": (64, dict(hidden_size=256, num_heads=4, num_kv_heads=2, sliding_window=8,
                              attn_logit_softcapping=50.0)),
          "gpt_neox": (64, dict(hidden_size=256, num_heads=4)),
          # Phi-2's head dim (80: tiles padded to 128), Cohere's bias-free LayerNorm input, OPT's offset positions
          "phi": (80, dict(hidden_size=320, num_heads=4)),
          "cohere": (64, dict(hidden_size=256, num_heads=4, num_kv_heads=2)),
          "opt": (64, dict(hidden_size=256, num_heads=4)),
          # DeepSeek-V3's latent attention: keys 128 + 64 wide, values 128 (padded to 192 in the pool: tiles of 256)
          "deepseek_v3": (192, dict(hidden_size=256, num_heads=2, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                    v_head_dim=128, kv_lora_rank=64, q_lora_rank=64)),
          # gpt-oss's attention sinks (head dim 64, a sliding layer and a full one)
          "gpt_oss": (64, dict(hidden_size=256, num_heads=4, num_kv_heads=1)),
          # Gemma 4's heads: 256 wide on its sliding layer, 512 on its full one (prefill tiles of 64 x 32 there)
          "gemma4_text": (512, dict(hidden_size=512, num_heads=2, num_kv_heads=2))}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile and run the kernels")
def test_every_launch_compiles_for_hopper(tmp_path):
    with record_launches() as launches, gpu_tiles_forced():
        for arch, (_, options) in MODELS.items():
            model_dir = build_tiny_checkpoint(arch, tmp_path / arch, num_layers=1, vocab_size=512, **options)
            for dtype, graphs in (("float32", False), ("float16", True)):
                # (a small pool: one test holds every engine it makes until it ends)
                eng = Engine(model_dir, device="cpu", dtype=dtype, backend="triton", cuda_graphs=graphs,
                             kv_cache_bytes=32 << 20)
                names = register_tasks([eng], 2, hidden=options["hidden_size"]) + [None]
                run(eng, make_requests(names, 3, seed=5, max_new_tokens=2))
                if not eng.model.fused_layer0:
                    continue
                norms = eng.model.layer0_norms()  # the two-output input kernel (the benchmark's, not the backend's)
                ids = torch.arange(4)
                fused_prompt_input(ids, ids, ids < 2, eng.model.word_embeddings.weight,
                                   eng.model.word_embeddings.weight, ids if norms.pos_table is not None else None,
                                   norms.pos_table, norms.embed_norm, norms.input_norm)
    recorded = unique(launches)
    assert {launch["kernel"] for launch in recorded} >= KERNELS, "a kernel the backend uses was not launched"
    assert {launch["constexprs"].get("BLOCK_D") for launch in recorded} >= {64, 128, 256, 512}
    assert {launch["constexprs"].get("HAS_WINDOW") for launch in recorded} >= {True, False}
    assert {launch["constexprs"].get("SOFTCAP") for launch in recorded} >= {True, False}
    assert {launch["constexprs"].get("HAS_SINKS") for launch in recorded} >= {True, False}
    as_bf16 = [json.loads(json.dumps(launch).replace('"*fp16"', '"*bf16"')) for launch in recorded]
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(unique(recorded + as_bf16)))
    if os.environ.get("SOFTPROMPT_SAVE_LAUNCHES"):  # to compile them with another triton (see the README)
        Path(os.environ["SOFTPROMPT_SAVE_LAUNCHES"]).write_text(path.read_text())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.hopper_compile", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    assert proc.returncode == 0 and not failed, "\n".join(failed) or proc.stderr[-3000:]
    assert proc.stdout.count("\nok ") + proc.stdout.startswith("ok ") == len(unique(recorded + as_bf16))
