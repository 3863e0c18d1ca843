"""``fastdiag.WeightDiagnostics`` against ``fastdiag.reference.weight_stats`` / ``bank_coherence``.

Epoch value = mean over updates of the reference's batch values; pooling weights of a real
attention-pooling module, mixture gates from logits, sparse codes with exact zeros, on every
backend; plus median support, non-finite rows, bad input, no sync and state_dict.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from fastdiag import reference, schema
from fastdiag.diagnostics import WeightDiagnostics
from tests.conftest import available_backends, forbid_host_sync
from tests.test_set_diagnostics import ATOL, RTOL, assert_stats_close

BACKENDS = available_backends("cpu")


def _reference_epoch(prefix: str, batches: list[dict]) -> dict[str, float]:
    """Mean over updates of the reference batch values, under ``prefix``."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for kw in batches:
        values: dict[str, float] = {}
        if kw.get("weights") is not None:
            w = kw["weights"].softmax(-1) if kw.get("from_logits") else kw["weights"]
            stats = reference.weight_stats(w, indices=kw.get("indices"), num_sets=kw.get("num_sets"))
            values.update(stats)
        elif kw.get("indices") is not None:
            raise AssertionError("test batches give indices with weights")
        if kw.get("atoms") is not None:
            values["coherence"] = reference.bank_coherence(kw["atoms"])
        for k, v in values.items():
            if not math.isnan(v):
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            else:
                counts.setdefault(k, 0)
    return {f"{prefix}/{k}": (sums[k] / counts[k] if counts[k] else math.nan) for k in counts}


class AttentionPool(torch.nn.Module):
    """Attention pooling of tokens by a few learned queries (weights [B, Q, N])."""

    def __init__(self, d: int, queries: int) -> None:
        super().__init__()
        self.q = torch.nn.Parameter(torch.randn(queries, d))

    def forward(self, x):
        return (self.q @ x.mT / x.shape[-1] ** 0.5).softmax(-1)


def _batches(seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pool = AttentionPool(8, 3)
    out = []
    for u in range(4):
        x = torch.randn(2, 10, 8, generator=gen)
        with torch.no_grad():
            w = pool(x)  # [2, 3, 10]
        kw = {"weights": w, "atoms": torch.randn(5, 2, 4, generator=gen)}
        if u % 2:
            kw["indices"] = torch.topk(w, 2, dim=-1).indices  # the tokens each query picks
            kw["num_sets"] = 10
        out.append(kw)
    # a mixture gate from logits and sparse codes with exact zeros (seed 003's alpha)
    logits = 2 * torch.randn(6, 4, generator=gen)
    out.append({"weights": logits, "from_logits": True, "indices": logits.argmax(-1)})
    codes = torch.rand(7, 6, generator=gen)
    codes[codes < 0.5] = 0.0
    codes = codes / codes.sum(-1, keepdim=True).clamp_min(1e-12)
    out.append({"weights": codes, "atoms": torch.randn(6, 9, generator=gen)})
    return out


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("prefix", ["pool", "moe/"])
def test_parity_with_reference(backend, name, prefix):
    backend(name)
    batches = _batches()
    fd = WeightDiagnostics(prefix)
    for kw in batches:
        fd.update(**kw)
    got = fd.get_epoch_stats()
    want = _reference_epoch(prefix.rstrip("/"), batches)
    assert_stats_close(want, got, extra=(f"{prefix.rstrip('/')}/nonfinite_rows",))
    assert set(got) - {f"{prefix.rstrip('/')}/nonfinite_rows"} == set(schema.weight_keys(prefix))
    # a second epoch: the sums restart
    fd.reset()
    fd.update(**batches[0])
    assert_stats_close(_reference_epoch(prefix.rstrip("/"), batches[:1]), fd.get_epoch_stats(),
                       extra=(f"{prefix.rstrip('/')}/nonfinite_rows",))


@pytest.mark.parametrize("name", BACKENDS)
def test_support_median_even_and_odd(backend, name):
    backend(name)
    w = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.4, 0.3, 0.3, 0.0]])
    fd = WeightDiagnostics("alpha")
    fd.update(w)  # supports 2, 4, 1, 3: median 2.5
    fd.update(w[:3])  # supports 2, 4, 1: median 2
    got = fd.get_epoch_stats()
    assert got["alpha/support_median"] == pytest.approx((2.5 + 2.0) / 2)
    assert got["alpha/support_mean"] == pytest.approx((10 / 4 + 7 / 3) / 2)
    assert got["alpha/prune_frac"] == pytest.approx((6 / 16 + 5 / 12) / 2)


@pytest.mark.parametrize("name", BACKENDS)
def test_nonfinite_rows_counted_and_excluded(backend, name):
    backend(name)
    gen = torch.Generator().manual_seed(2)
    w = torch.rand(6, 5, generator=gen).softmax(-1)
    bad = w.clone()
    bad[2, 1] = math.nan
    bad[4, 0] = -math.inf
    fd = WeightDiagnostics("pool")
    fd.update(bad)
    got = fd.get_epoch_stats()
    assert got["pool/nonfinite_rows"] == 2
    keep = torch.tensor([True, True, False, True, False, True])
    want = {f"pool/{k}": v for k, v in reference.weight_stats(w[keep]).items()}
    assert_stats_close(want, got, extra=("pool/nonfinite_rows",))


def test_bad_inputs():
    fd = WeightDiagnostics("pool")
    with pytest.raises(ValueError, match="num_sets is needed"):
        fd.update(indices=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="weights must have shape"):
        fd.update(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="atoms must have shape"):
        fd.update(atoms=torch.zeros(4))
    with pytest.raises(ValueError, match="prefix"):
        WeightDiagnostics("/")
    fd.update(torch.full((2, 3), 1 / 3), indices=torch.tensor([0, 3]), num_sets=3)
    with pytest.warns(RuntimeWarning, match="indices must be < num_sets"):
        assert fd.get_epoch_stats()["pool/indices_out_of_range"] == 1.0


def test_update_never_syncs():
    batches = _batches(seed=3)
    fd = WeightDiagnostics("pool")
    fd.update(**batches[0])
    with forbid_host_sync():
        for kw in batches[1:]:
            fd.update(**kw)
    got = fd.get_epoch_stats()
    assert all(math.isfinite(v) for v in got.values())


def test_state_dict_round_trip():
    batches = _batches(seed=4)
    straight, resumed = WeightDiagnostics("moe"), WeightDiagnostics("moe")
    for i, kw in enumerate(batches):
        straight.update(**kw)
        resumed.update(**kw)
        if i == 2:
            buf = io.BytesIO()
            torch.save(resumed.state_dict(), buf)
            buf.seek(0)
            resumed = WeightDiagnostics("moe")
            resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert straight.get_epoch_stats() == resumed.get_epoch_stats()
    with pytest.raises(ValueError, match="prefix"):
        WeightDiagnostics("pool").load_state_dict(straight.state_dict())


def test_coherence_is_max_abs_cosine():
    atoms = torch.tensor([[1.0, 0.0], [-0.9, 0.1], [0.0, 0.0], [0.0, 2.0]])
    fd = WeightDiagnostics("bank")
    fd.update(atoms=atoms)
    want = 0.9 / math.hypot(0.9, 0.1)
    assert fd.get_epoch_stats()["bank/coherence"] == pytest.approx(want, rel=RTOL, abs=ATOL)


def test_bad_indices_and_atoms_are_value_or_type_errors():
    diag = WeightDiagnostics("moe")
    with pytest.raises(TypeError, match="indices must be an integer tensor .* got dtype torch.uint64"):
        diag.update(indices=torch.tensor([2**63 + 5], dtype=torch.uint64), num_sets=4)
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        diag.update(indices=torch.tensor([1.0]), num_sets=4)
    for atoms in (torch.zeros(0, 4), torch.zeros(3, 0), torch.zeros(2, 3, 0)):
        with pytest.raises(ValueError, match="atoms must have shape"):
            diag.update(atoms=atoms)
    assert diag.get_epoch_stats() == {}  # nothing half-recorded


# ----------------------------------------------------------------------------------------------
# reliability (cases 6, 8, 9, 12 of the reliability issue)
# ----------------------------------------------------------------------------------------------


def test_out_of_range_indices_do_not_lock_the_epoch():
    """Case 6: indices >= num_sets in one update: the stats come back with the entries excluded
    and reported in ``{prefix}/indices_out_of_range`` (mean per update) and a warning."""
    fd = WeightDiagnostics("moe")
    w = torch.full((2, 3), 1 / 3)
    fd.update(w, indices=torch.tensor([0, 1]), num_sets=3)
    fd.update(w, indices=torch.tensor([0, 3]), num_sets=3)
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="indices must be < num_sets"):
            got = fd.get_epoch_stats()
        assert got["moe/indices_out_of_range"] == 0.5
        assert got["moe/entropy_mean"] == pytest.approx(math.log(3))


def test_logits_passed_as_weights_warn_once():
    """Case 8: weights whose rows do not sum to 1 warn once per object (not with from_logits)."""
    logits = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(5)) * 3
    fd = WeightDiagnostics("pool")
    with forbid_host_sync():
        fd.update(logits)
    with pytest.warns(RuntimeWarning, match=r"weights rows do not sum to 1 \(mean \|sum-1\| = .*from_logits=True"):
        got = fd.get_epoch_stats()
    assert not any(k.startswith("_") for k in got)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fd.get_epoch_stats()
        ok = WeightDiagnostics("pool")
        ok.update(logits, from_logits=True)
        ok.update(logits.softmax(-1))
        ok.get_epoch_stats()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tau=math.nan), r"tau must be a finite number in \[0, 1\), got nan"),
        (dict(tau=-0.1), r"tau must be a finite number in \[0, 1\), got -0.1"),
        (dict(tau=1.5), r"tau must be a finite number in \[0, 1\), got 1.5"),
        (dict(tau="0.1"), r"tau must be a finite number"),
        (dict(eps=math.nan), r"eps must be a finite number in \[0, 1\), got nan"),
        (dict(eps=-1e-6), r"eps must be a finite number in \[0, 1\)"),
        (dict(eps=math.inf), r"eps must be a finite number in \[0, 1\)"),
    ],
)
def test_bad_thresholds_are_named(kwargs, match):
    """Case 9: tau / eps NaN, negative, >= 1 or not a number are ValueErrors naming them."""
    with pytest.raises(ValueError, match=match):
        WeightDiagnostics("pool", **kwargs)


def test_load_state_dict_with_a_bad_config_leaves_the_object_unchanged():
    """Case 12: a state whose ``_config`` lacks tau / eps (or holds a bad one) is a ValueError
    naming it, raised before anything is assigned (was: KeyError after the sums were loaded)."""
    fd = WeightDiagnostics("pool")
    fd.update(torch.softmax(torch.randn(3, 4), -1))
    before = fd.get_epoch_stats()
    other = WeightDiagnostics("pool")
    other.update(torch.softmax(torch.randn(5, 4) * 4, -1))
    for config in ({"prefix": "pool"}, {"prefix": "pool", "tau": math.nan, "eps": 1e-6}, "pool"):
        sd = other.state_dict()
        sd["states"]["_config"] = config
        with pytest.raises(ValueError, match="_config"):
            fd.load_state_dict(sd)
        assert fd.get_epoch_stats() == before
    with pytest.raises(ValueError, match="states"):
        fd.load_state_dict({**other.state_dict(), "states": ["not", "a", "dict"]})
    assert fd.get_epoch_stats() == before
