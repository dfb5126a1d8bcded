"""Block-wise FP8 checkpoints (`quant_method: fp8`: DeepSeek-V3 / R1, the Qwen3 and GLM FP8 releases), dequantized
at load: known values, ragged blocks, transformers' own dequantizer, and quantized tiny checkpoints against HF +
PEFT loading the same files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from softprompt import Engine
from softprompt.engine.errors import CheckpointError
from softprompt.engine.fp8 import dequantize_fp8, quantize_fp8
from softprompt.engine.testing import quantize_checkpoint_fp8

from .runtime_helpers import assert_quantized_logits_match_hf_peft


def test_known_values_and_ragged_blocks():
    """Each 2 x 2 block times its scale; with a block size from the config, the last block of a dim that is not a
    multiple of it is ragged (3 rows: blocks of 2 and 1), as DeepSeek's kv_a_proj_with_mqa (576 rows of 128)."""
    w = torch.tensor([[1.0, 2.0, 0.5], [-1.0, 448.0, 3.0], [0.25, -2.0, 1.5]]).to(torch.float8_e4m3fn)
    scales = torch.tensor([[2.0, 0.5], [10.0, -1.0]])
    got = dequantize_fp8(w, scales, torch.float32, block=(2, 2))
    want = torch.tensor([[2.0, 4.0, 0.25], [-2.0, 896.0, 1.5], [2.5, -20.0, -1.5]])
    assert torch.equal(got, want)
    assert torch.equal(dequantize_fp8(w, torch.tensor(3.0), torch.float32), w.float() * 3)  # one scale, per tensor
    with pytest.raises(CheckpointError, match="do not divide it and the config gives no weight_block_size"):
        dequantize_fp8(w, scales, torch.float32)
    with pytest.raises(CheckpointError, match="disagree for 1 x 1 blocks"):
        dequantize_fp8(w, scales, torch.float32, block=(1, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dequantize_equals_transformers(dtype):
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    g = torch.Generator().manual_seed(0)
    w, scales = quantize_fp8(torch.randn(3, 64, 96, generator=g), (32, 32))
    assert w.dtype == torch.float8_e4m3fn and scales.shape == (3, 2, 3)
    theirs = fp8.Fp8Dequantize(None)._dequantize_one(w, scales, output_dtype=dtype)
    assert torch.equal(dequantize_fp8(w, scales, dtype), theirs)
    assert torch.equal(dequantize_fp8(w, scales, dtype, block=(32, 32)), theirs)


def test_quantize_rounds_within_e4m3():
    w = torch.randn(80, 72, generator=torch.Generator().manual_seed(1))
    q, s = quantize_fp8(w, (32, 32))  # ragged on both dims
    back = dequantize_fp8(q, s, torch.float32, block=(32, 32))
    step = s.repeat_interleave(32, 0)[:80].repeat_interleave(32, 1)[:, :72] * 2.0**-9  # e4m3's subnormal step
    assert ((back - w).abs() <= w.abs() / 16 + step).all()  # 3 mantissa bits: half an ulp, 1/16 of the value


# blocks that divide every weight: where one does not, transformers reads the scale grid as even blocks (block =
# rows // grid rows), not as the config's blocks with a ragged last one (DeepSeek's own dequantization, ours)
BLOCKS = {"llama": (32, 32), "qwen3_moe": (32, 32), "deepseek_v3": (8, 8), "mimo_v2_flash": (8, 8)}


@pytest.fixture(scope="module")
def quantized(model_dir_for, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    return lambda variant: (root / variant if (root / variant).exists() else
                            quantize_checkpoint_fp8(model_dir_for(variant), root / variant, block=BLOCKS[variant]))


@pytest.mark.parametrize("variant", ["llama", "qwen3_moe", "deepseek_v3", "mimo_v2_flash"])
def test_fp8_checkpoint_matches_hf_peft(variant, quantized, model_dir_for, adapter_for):
    """Our dequantized weights are transformers' bit for bit, and fp32 logits with a prompt-tuning adapter are HF +
    PEFT's within 1e-4 (the quantization moves them by far more: the test can fail)."""
    pytest.importorskip("peft")
    from softprompt.engine.hf_auto import load_hf_causal_lm

    checkpoint, adapter = quantized(variant), adapter_for(variant)
    hf = load_hf_causal_lm(checkpoint, dtype=torch.float32).eval()  # (dequantized by transformers: see hf_auto)
    engine = Engine(checkpoint, device="cpu", dtype="float32", backend="reference")
    assert engine.config.quantization == "fp8" and engine.config.quantization_block == BLOCKS[variant]
    ours, theirs = engine.model.model.layers[0].self_attn, hf.model.layers[0].self_attn
    name = "q_a_proj" if variant == "deepseek_v3" else "q_proj"
    assert torch.equal(getattr(ours, name).weight, getattr(theirs, name).weight)
    assert_quantized_logits_match_hf_peft(checkpoint, model_dir_for(variant), adapter, hf)


def test_fp8_weights_without_scales_are_refused(quantized, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(quantized("llama"), d)
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    del tensors["model.layers.0.self_attn.k_proj.weight_scale_inv"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="k_proj.weight has no .*k_proj.weight_scale_inv"):
        Engine(d, device="cpu")


def test_a_bad_block_size_is_refused(quantized, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(quantized("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [128]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="weight_block_size must be \\[rows, cols\\]"):
        Engine(d, device="cpu")
