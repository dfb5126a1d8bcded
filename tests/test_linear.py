"""The projections' GEMM (engine/models/linear.py): oneDNN for fp32 on the CPU agrees with F.linear, autograd and
other dtypes fall back to F.linear, and a loaded CPU fp32 model holds its projections in [in, out] storage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from softprompt.engine.loader import load_model
from softprompt.engine.models import linear as linear_module
from softprompt.engine.models.linear import linear, onednn_applies, transposed_storage


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("stored", ["plain", "transposed"])
def test_fp32_matches_f_linear(rows, bias, stored):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(48, 40, generator=gen)
    b = torch.randn(48, generator=gen) if bias else None
    x = torch.randn(rows, 40, generator=gen)
    w = transposed_storage(weight) if stored == "transposed" else weight
    got = linear(x, w, b)
    want = (x.double() @ weight.double().t() + (0 if b is None else b.double())).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.shape == (rows, 48) and got.dtype == torch.float32


def test_non_contiguous_and_empty_inputs():
    weight = torch.randn(16, 32)
    x = torch.randn(5, 64)[:, ::2]
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert linear(torch.randn(0, 32), weight).shape == (0, 16)


def test_autograd_and_other_dtypes_use_f_linear():
    weight = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)
    assert not onednn_applies(x)
    linear(x, weight).sum().backward()  # the oneDNN op has no backward: F.linear must have been used
    torch.testing.assert_close(x.grad, weight.detach().sum(0).expand(3, 4))
    assert not onednn_applies(torch.randn(2, 4, dtype=torch.bfloat16))
    with torch.no_grad():
        assert onednn_applies(torch.randn(2, 4)) == linear_module._ONEDNN


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bloom"])
def test_cpu_fp32_models_hold_projections_transposed(model_dir_for, arch):
    model = load_model(model_dir_for(arch), "cpu", "float32")
    embed = model.word_embeddings.weight
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.weight is not embed:
            assert module.weight.stride(0) == 1, name  # [in, out] memory (fused q/k/v are slices of one)
    if arch == "gpt2":
        return  # its Conv1D weights arrive [in, out] in every dtype
    half = load_model(model_dir_for(arch), "cpu", "bfloat16")  # kept as loaded
    assert all(m.weight.stride(1) == 1 for m in half.modules()
               if isinstance(m, torch.nn.Linear) and m is not half.lm_head_module)
