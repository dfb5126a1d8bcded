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


def test_token_slice_equals_slicing_the_tokens():
    from softprompt.engine.request import RequestTiming
    from softprompt.engine.sequence import Sequence

    seq = Sequence(request=None, prompt=None, input_ids=[1, 2, 3], params=None, generator=None,
                   timing=RequestTiming(arrival=0.0), arrival_order=0, generated=[4, 5])
    for start in range(6):
        for n in range(6 - start):
            assert seq.token_slice(start, n) == seq.tokens[start:start + n]
