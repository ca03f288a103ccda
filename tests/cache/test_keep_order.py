"""keep_order: which slots an eviction keeps, with ties decided the same way on every CPU."""

from __future__ import annotations

import math

import pytest
import torch

from kvbound.cache import keep_order
from kvbound.cache.layer import TIE_RTOL
from tests.oracle import expected_keep


def _kept(scores, keep):
    return keep_order(torch.tensor([[scores]], dtype=torch.float32), keep)[0, 0].tolist()


def test_exact_and_last_bit_ties_keep_the_most_recent():
    assert _kept([1.0, 1.0, 1.0, 1.0], 2) == [2, 3]
    x = 3.0
    noisy = [x, math.nextafter(x, 4.0), math.nextafter(x, 2.0), x * (1 + TIE_RTOL / 10)]
    assert _kept(noisy, 2) == [2, 3]  # the noise does not decide: recency does


def test_ties_at_zero_and_at_large_magnitudes():
    assert _kept([0.0, 0.0, 0.0], 1) == [2]  # a zero gap at zero scale is a tie too
    big = 1000.0
    assert _kept([big * (1 + TIE_RTOL / 10), big], 1) == [1]  # relative, not absolute tolerance
    assert _kept([big * (1 + TIE_RTOL * 10), big], 1) == [0]


def test_real_differences_still_decide():
    assert _kept([5.0, 1.0, 4.0, 2.0], 2) == [0, 2]
    assert _kept([1.0, 1.0 + 100 * TIE_RTOL, 1.0], 1) == [1]


def test_infinities_tie_only_among_themselves():
    inf = math.inf
    assert _kept([inf, 1e30, -inf, inf, 0.0], 2) == [0, 3]
    assert _kept([-inf, -inf, 7.0], 2) == [1, 2]  # padding only where nothing else is left
    assert _kept([1e38, inf, 3e38], 2) == [1, 2]


@pytest.mark.portability
def test_noise_below_the_tolerance_never_changes_what_is_kept():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n, keep = 40, 12
        # few distinct values, many exact ties, as repeated tokens give (K-norm at layer 0)
        base = torch.randint(0, 6, (2, 3, n), generator=g).float() * 0.37 - 1.0
        noise = 1 + (torch.rand(base.shape, generator=g) - 0.5) * TIE_RTOL * 0.2
        clean, noisy = keep_order(base, keep), keep_order(base * noise, keep)
        assert torch.equal(clean, noisy), trial
        for b in range(2):
            for h in range(3):
                assert clean[b, h].tolist() == expected_keep(base[b, h].tolist(), [9] * n, 0, keep)
