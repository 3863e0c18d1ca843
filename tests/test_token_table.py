"""``fastdiag.ops.token_table``: the C++ table update against the torch implementation and a
Python dict (the reference's semantics), no host synchronisation."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiag import backends
from fastdiag.ops.token_table import TokenTable, token_table_update_torch
from tests.conftest import available_backends, forbid_host_sync

needs_cpu_op = pytest.mark.skipif(
    "cpu" not in available_backends("cpu"), reason="needs the C++ extension"
)


def python_table(table: dict[int, int], ids: list[int], sets: list[int]) -> float:
    """The reference: lookups against the table before the batch, then writes in flat order."""
    pairs = [(t, s) for t, s in zip(ids, sets, strict=True) if t >= 0 and s >= 0]
    seen = [s == table[t] for t, s in pairs if t in table]
    for t, s in pairs:
        table[t] = s
    return sum(seen) / len(seen) if seen else math.nan


def fresh(capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    keys = torch.full((capacity + 1,), -1, dtype=torch.int64)
    return keys, keys.clone(), torch.full((), -1, dtype=torch.int64)


def batches(seed: int, capacity: int, updates: int = 6, shape=(3, 17), k: int = 0, id_dtype=torch.int64):
    """Random ids with repeats, padding (< 0), ids >= capacity and sets < 0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(updates):
        ids = torch.randint(-2, capacity + max(3, capacity // 2), shape, generator=g).to(id_dtype)
        ids[0, :4] = ids[0, 4]  # repeats inside the batch
        set_shape = (*shape, k) if k else shape
        sets = torch.randint(-1, 5, set_shape, generator=g)
        out.append((ids, sets))
    return out


@needs_cpu_op
@pytest.mark.parametrize("capacity", [1, 7, 64])
@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_cpu_op_matches_torch(capacity, k, id_dtype):
    op = backends.table("token_table_update")["cpu"].load()
    cpu_state, torch_state = fresh(capacity), fresh(capacity)
    for step, (ids, sets) in enumerate(batches(capacity, capacity, k=k, id_dtype=id_dtype), start=1):
        got = op(*cpu_state, ids, sets, step)
        want = token_table_update_torch(*torch_state, ids, sets, step)
        assert torch.allclose(got, want, rtol=0, atol=0, equal_nan=True), (step, got, want)
        for a, b in zip(cpu_state[:2], torch_state[:2], strict=True):
            assert torch.equal(a[:-1], b[:-1])  # the last slot: the torch code's scratch sink
        assert torch.equal(cpu_state[2], torch_state[2])
    assert cpu_state[2].item() >= capacity  # ids >= capacity were seen (overflow path taken)


@pytest.mark.parametrize("name", available_backends("cpu"))
def test_exact_below_capacity_and_last_occurrence_wins(backend, name):
    backend(name)
    table, ref = TokenTable(32), {}
    g = torch.Generator().manual_seed(3)
    for step in range(1, 6):
        ids = torch.randint(-1, 32, (4, 9), generator=g)
        ids[1, 3:] = ids[1, 2]  # one id many times in a batch: its last set is stored
        sets = torch.randint(-1, 4, (4, 9), generator=g)
        want = python_table(ref, ids.flatten().tolist(), sets.flatten().tolist())
        value, overflow, running = table.update_values(ids, sets, step).tolist()
        assert value == pytest.approx(want, nan_ok=True)
        assert overflow == 0
        stored = {int(t): int(s) for t, s in zip(table.keys[:-1].tolist(), table.vals[:-1].tolist(), strict=True) if t >= 0}
        assert stored == ref


@pytest.mark.parametrize("name", available_backends("cpu"))
def test_overflow_max_id_and_running_term(backend, name):
    backend(name)
    table = TokenTable(8)
    v1 = table.update_values(torch.tensor([[3, 20, -1, 9]]), torch.tensor([[1, 2, 0, 0]]), 1)
    assert v1.tolist()[1:] == [2.0, 20.0]  # 20 and 9 >= 8; running = max id 20
    v2 = table.update_values(torch.tensor([[5, 40]]), torch.tensor([[0, -1]]), 2)  # 40: no set
    assert v2.tolist()[1:] == [0.0, 20.0]  # 2 * 20 - 1 * 20
    v3 = table.update_values(torch.tensor([[3, 30]]), torch.tensor([[1, 1]]), 3)
    assert v3.tolist() == [1.0, 1.0, 3 * 30 - 2 * 20]  # 3 seen, same set; 30 overflows
    assert table.max_id.item() == 30
    assert math.isnan(table.update_values(torch.tensor([[-1, 1]]), torch.tensor([[0, 0]]), 4)[0].item())


@pytest.mark.parametrize("name", available_backends("cpu"))
def test_first_of_k_choices_and_empty_batch(backend, name):
    backend(name)
    a, b = TokenTable(16), TokenTable(16)
    ids = torch.tensor([[1, 2, 3], [1, 5, 6]])
    sets = torch.tensor([[[1, 9], [2, 9], [3, 9]], [[4, 9], [5, 9], [6, 9]]])
    va = a.update_values(ids, sets, 1)
    vb = b.update_values(ids, sets[..., 0], 1)
    assert torch.allclose(va, vb, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(a.vals, b.vals) and a.vals[1].item() == 4
    empty = a.update_values(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long), 2)
    assert math.isnan(empty[0].item()) and empty[1].item() == 0


@pytest.mark.parametrize("name", available_backends("cpu"))
def test_grow_keeps_entries(backend, name):
    backend(name)
    table = TokenTable(4)
    table.update_values(torch.tensor([1, 2, 7]), torch.tensor([0, 1, 2]), 1)  # 7 overflows
    table.grow(7)
    assert table.capacity == 8
    value = table.update_values(torch.tensor([1, 2, 7]), torch.tensor([0, 0, 2]), 2)
    assert value[0].item() == pytest.approx(2 / 3) and value[1].item() == 0


@pytest.mark.parametrize("name", available_backends("cpu"))
def test_no_host_sync(backend, name):
    backend(name)
    table = TokenTable(16)
    ids, sets = torch.randint(-1, 40, (4, 8)), torch.randint(0, 4, (4, 8))
    table.update_values(ids, sets, 1)
    with forbid_host_sync():
        table.update_values(ids, sets, 2)
        table.update(ids, sets)


def test_update_keeps_its_two_value_form():
    table = TokenTable(8)
    value, overflow = table.update(torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert math.isnan(value.item()) and overflow.item() == 0
    value, overflow = table.update(torch.tensor([1, 2]), torch.tensor([0, 0]))
    assert value.item() == 0.5 and value.shape == () and value.dtype == torch.float64


@needs_cpu_op
def test_torch_compile_fullgraph_cpu_op():
    op = backends.table("token_table_update")["cpu"].load()
    ids, sets = torch.randint(-1, 20, (3, 7)), torch.randint(0, 4, (3, 7))
    compiled_state, eager_state = fresh(16), fresh(16)
    torch._dynamo.reset()
    fn = torch.compile(lambda k, v, m, i, s: op(k, v, m, i, s, 1), fullgraph=True, backend="aot_eager")
    for _ in range(2):
        got = fn(*compiled_state, ids, sets)
        want = op(*eager_state, ids, sets, 1)
        torch.testing.assert_close(got, want, equal_nan=True)
    for a, b in zip(compiled_state, eager_state, strict=True):
        assert torch.equal(a, b)  # the in-place updates happened under compile too


def test_grow_is_bounded_and_load_state_dict_validates():
    """Case 5: grow() never makes more than its maximum capacity, whatever the id; a state whose
    capacity does not match its tables is a ValueError (not an inconsistent table)."""
    from fastdiag.ops.token_table import MAX_TOKEN_CAPACITY

    table = TokenTable(8)
    table.update_values(torch.tensor([1, 2**40]), torch.tensor([0, 1]))
    table.grow(2**40, max_capacity=64)
    assert table.capacity == 64 and table.keys.numel() == 65
    table.grow(2**62)
    assert table.capacity == MAX_TOKEN_CAPACITY
    state = TokenTable(8).state_dict()
    TokenTable(8).load_state_dict(state)
    with pytest.raises(ValueError, match="keys must be None or an int64 tensor of shape"):
        TokenTable(8).load_state_dict({**state, "capacity": 4, "keys": torch.zeros(9, dtype=torch.long)})
