"""gpt-oss's MXFP4 experts (openai/gpt-oss-20b / 120b ship them so), dequantized at load: known codes, transformers'
own dequantizer, and a quantized tiny gpt-oss checkpoint against HF + PEFT loading the same files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.errors import CheckpointError, UnsupportedModelError
from softprompt.engine.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from softprompt.engine.testing import quantize_checkpoint_mxfp4

from .runtime_helpers import assert_quantized_logits_match_hf_peft


def test_known_codes_dequantize_to_their_values():
    """Byte 0x21: low nibble 1 (0.5) first, then 2 (1.0); 0xF8: -0.0, then -6.0; the group's scale 2^(s - 127)."""
    blocks = torch.zeros(1, 2, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0, :2] = torch.tensor([0x21, 0xF8], dtype=torch.uint8)
    blocks[0, 1, 0, 0] = 0x7B  # 0xB: -1.5, then 0x7: 6.0
    scales = torch.tensor([[[128], [125]]], dtype=torch.uint8)  # x2 and x1/4
    w = dequantize_mxfp4(blocks, scales, torch.float32)  # [1, 32 columns, 2 rows]: transposed, as transformers holds it
    assert w.shape == (1, 32, 2)
    assert w[0, :4, 0].tolist() == [1.0, 2.0, -0.0, -12.0] and not w[0, 4:, 0].any()
    assert w[0, :2, 1].tolist() == [-0.375, 1.5] and not w[0, 2:, 1].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dequantize_equals_transformers(dtype):
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 135, (3, 40, 4), generator=g, dtype=torch.uint8)
    assert torch.equal(dequantize_mxfp4(blocks, scales, dtype),
                       mxfp4._convert_moe_packed_tensors(blocks, scales, dtype=dtype))


def test_quantize_rounds_to_the_grid():
    w = torch.randn(2, 64, 24, generator=torch.Generator().manual_seed(1))
    grid = dequantize_mxfp4(*quantize_mxfp4(w), torch.float32)
    assert grid.shape == w.shape
    assert ((grid - w).abs() <= w.abs().amax() / 4).all()  # within a step of the coarsest group
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(grid), torch.float32), grid)  # grid values are exact


@pytest.fixture(scope="module")
def quantized(model_dir_for, tmp_path_factory):
    return quantize_checkpoint_mxfp4(model_dir_for("gpt_oss"), tmp_path_factory.mktemp("mxfp4") / "gpt_oss")


def test_mxfp4_checkpoint_matches_hf_peft(quantized, model_dir_for, adapter_for):
    """Our dequantized experts are transformers' (which dequantizes where it has no MXFP4 kernels), bit for bit, and
    the model's fp32 logits with a prompt-tuning adapter are HF + PEFT's within 1e-4 (the quantization moves them
    by more than 1e-2: the test can fail)."""
    pytest.importorskip("peft")
    from softprompt.engine.hf_auto import load_hf_causal_lm

    adapter = adapter_for("gpt_oss")
    hf = load_hf_causal_lm(quantized, dtype=torch.float32).eval()  # (dequantized by transformers: see hf_auto)
    engine = Engine(quantized, device="cpu", dtype="float32", backend="reference")
    theirs, ours = hf.model.layers[1].mlp.experts, engine.model.model.layers[1].mlp.experts
    for e, expert in enumerate(ours):
        assert torch.equal(expert.gate_proj.weight, theirs.gate_up_proj[e][:, ::2].t())
        assert torch.equal(expert.up_proj.weight, theirs.gate_up_proj[e][:, 1::2].t())
        assert torch.equal(expert.down_proj.weight, theirs.down_proj[e].t())
    assert_quantized_logits_match_hf_peft(quantized, model_dir_for("gpt_oss"), adapter, hf)


def test_mxfp4_checkpoint_serves_on_the_torch_backend(quantized, adapter_for):
    """Greedy tokens of the batched engine equal the reference path's; in bf16 the experts load as the same grid
    values (every MXFP4 value is exact in bf16)."""
    ref = Engine(quantized, device="cpu", dtype="float32", backend="reference")
    eng = Engine(quantized, device="cpu", dtype="float32", backend="torch")
    for e in (ref, eng):
        e.add_prompt("task", adapter_for("gpt_oss"))
    requests = [Request(prompt="task" if seed != 1 else None,
                        input_ids=torch.randint(4, 512, (5 + 4 * seed,), generator=torch.Generator().manual_seed(seed))
                        .tolist(), sampling=SamplingParams(max_new_tokens=6)) for seed in range(3)]
    assert [o.token_ids for o in eng.generate(requests)] == [o.token_ids for o in ref.generate(requests)]
    half = Engine(quantized, device="cpu", dtype="bfloat16", backend="torch").model.model.layers[0].mlp.experts[0]
    full = eng.model.model.layers[0].mlp.experts[0]
    assert half.gate_proj.weight.dtype == torch.bfloat16
    assert torch.equal(half.gate_proj.weight.float(), full.gate_proj.weight)


def test_mxfp4_is_refused_on_other_models(tmp_path, model_dir_for):
    d = tmp_path / "m"
    shutil.copytree(model_dir_for("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="quantized checkpoint.*mxfp4"):
        Engine(d, device="cpu")


def test_mxfp4_blocks_without_scales_are_refused(quantized, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(quantized, d)
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    del tensors["model.layers.0.mlp.experts.down_proj_scales"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="down_proj_blocks has no .*down_proj_scales"):
        Engine(d, device="cpu")
