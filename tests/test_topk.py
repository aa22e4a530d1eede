"""topk.py against the plain computation: sort everything, take the k-th (the oracle), for values with many ties."""

import pytest
import torch

from gradiend_hf.topk import bits_to_float, count_to_keep, kth_largest_bits, magnitude_bits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_kth_largest_over_several_tensors_equals_a_full_sort(seed):
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=generator) for n in (1, 700, 3000)]
    tensors.append(torch.randint(0, 4, (500,), generator=generator).float() * 0.25)  # many exact ties, and zeros
    everything = torch.cat([t.abs() for t in tensors]).sort(descending=True).values
    for k in (1, 2, 17, 500, 2000, everything.numel()):
        got = bits_to_float(kth_largest_bits(lambda: (magnitude_bits(t) for t in tensors), k))
        assert got == float(everything[k - 1]), k


def test_how_many_to_keep():
    assert [count_to_keep(f, 1000) for f in (0.01, 0.0005, 0.0004, 1.0)] == [10, 1, 1, 1000]  # half up, at least 1
    assert count_to_keep(25, 10) == 10 and count_to_keep(0, 10, allow_zero=True) == 0
    for bad, error in [(0, ValueError), (1.5, ValueError), (0.0, ValueError), (True, TypeError), ("1%", TypeError)]:
        with pytest.raises(error):
            count_to_keep(bad, 10)
