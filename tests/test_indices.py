import pytest
import torch

from softprompt.engine.indices import index_tensor


@pytest.mark.parametrize("dtype", [torch.long, torch.int32])
@pytest.mark.parametrize("values", [[], [0], [3, -1, 2**31 - 1, 7]])
def test_index_tensor_equals_torch_tensor(values, dtype):
    got = index_tensor(values, "cpu", dtype)
    want = torch.tensor(values, dtype=dtype)
    assert got.dtype == dtype and torch.equal(got, want)


def test_index_tensor_rejects_what_does_not_fit():
    assert torch.equal(index_tensor([2**40]), torch.tensor([2**40]))
    with pytest.raises(OverflowError):
        index_tensor([2**40], dtype=torch.int32)
