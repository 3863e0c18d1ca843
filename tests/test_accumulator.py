"""Accumulator: device-side (sum, count, infinite) rows, one host copy per compute."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiag.accumulator import COLUMNS, Accumulator
from tests.conftest import forbid_host_sync


def test_means_skip_non_finite_values_and_count_infinite_ones():
    acc = Accumulator()
    values = [1.0, math.inf, 3.0, math.nan, -math.inf]
    with forbid_host_sync():
        for v in values:
            acc.add({"x": torch.tensor(v, dtype=torch.float64)})
    means, infinite = acc.compute_all()
    assert means == {"x": 2.0}
    assert infinite == {"x": 2.0}  # +inf and -inf; NaN is "undefined" and adds nothing
    assert acc.compute() == means


def test_fused_path_counts_the_same():
    acc = Accumulator()
    idx = acc.slots(("a", "b"), torch.device("cpu"))
    for row in ([1.0, math.inf], [math.nan, 2.0], [3.0, 4.0]):
        acc.add_at(idx, torch.tensor(row, dtype=torch.float64))
    means, infinite = acc.compute_all()
    assert means == {"a": 2.0, "b": 3.0}
    assert infinite == {"a": 0.0, "b": 1.0}
    assert acc.state.shape == (2, COLUMNS)


def test_reset_keeps_names_and_zeroes_everything():
    acc = Accumulator()
    acc.add({"x": torch.tensor(math.inf)})
    acc.reset()
    assert acc.compute_all() == ({"x": math.nan}, {"x": 0.0})


def test_state_dict_round_trip_and_old_two_column_states():
    acc = Accumulator()
    acc.add({"x": torch.tensor(2.0), "y": torch.tensor(math.inf)})
    other = Accumulator()
    other.load_state_dict(acc.state_dict())
    assert other.compute_all() == acc.compute_all()
    old = {"names": ["x"], "state": torch.tensor([[4.0, 2.0]], dtype=torch.float64)}
    other.load_state_dict(old)  # saved before the infinite count existed
    assert other.compute_all() == ({"x": 2.0}, {"x": 0.0})
    with pytest.raises(ValueError, match="state must have shape"):
        other.load_state_dict({"names": ["x"], "state": torch.zeros(1, 5, dtype=torch.float64)})
