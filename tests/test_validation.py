"""fastdiag.validate_attention: every section against by-hand values on attention maps of known
structure, the SDPA ablation on a tiny GPT-2 (model unchanged afterwards), and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import fastdiag
from fastdiag.validation import Thresholds, validate_attention

N = 12


class Fixed(nn.Module):
    """Returns the hidden states projected, and fixed attention weights [B, H, N, N]."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w", w)
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x), self.w


class Net(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 4)
        self.attn = fastdiag.register_attention(Fixed(w), lambda m, a, out: out[1])

    def forward(self, ids):
        return self.attn(self.emb(ids))[0]


def _norm(x):
    return x / x.sum(-1, keepdim=True)


def _causal_band(n, width):
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return ((j <= i) & (i - j <= width)).float()


def _report(w, ids=None, **kw):
    ids = torch.zeros(w.shape[0], w.shape[-1], dtype=torch.long) if ids is None else ids
    return validate_attention(Net(w), ids, **kw)


def test_uniform_map():
    w = torch.full((2, 2, N, N), 1.0 / N)
    r = _report(w)
    assert r["sanity"].checks[0].status == "pass"
    assert r["sanity"].checks[1].status == "n/a"  # causal flag unknown: never a fake pass
    st = r["statistics"]
    assert st.checks[0].values["abs_dev_mean"] == pytest.approx(0, abs=1e-7)
    assert st.checks[1].values["h_ratio"] == pytest.approx(1, abs=1e-5)
    assert st.status == "fail"
    heads = r["heads"].values["heads"]
    assert [h["class"] for h in heads] == ["uniform", "uniform"]
    assert all(h["row_std"] == pytest.approx(0, abs=1e-6) for h in heads)
    q = r["queries"].checks[0]
    assert q.values["l2_mean"] == pytest.approx(0, abs=1e-6) and q.status == "fail"
    pos = r["positional"].checks[0].values
    assert pos["local_far_ratio"] == pytest.approx(1, abs=1e-5)
    assert r["ablation"].status == "n/a" and r["gradients"].checks[1].status == "n/a"
    text = str(r)
    assert "[1/9] Sanity" in text and "SUMMARY" in text and "CONCLUSION" in text
    assert json.loads(r.to_json())["sections"][0]["key"] == "sanity"


def test_causal_local_band_and_sharp_head():
    band = _norm(_causal_band(N, 2))
    eye = torch.eye(N)
    w = torch.stack([band, eye])[None]  # head 0: causal band, head 1: attends itself
    r = _report(w, causal=True, local_window=2)
    assert r["sanity"].checks[1].status == "pass"
    assert r["sanity"].checks[1].values["future_max"] == 0
    # by hand: row_std over the row's i + 1 attendable keys, rows with >= 2 keys
    n = torch.arange(1, N + 1).float()[1:]
    std_band = torch.stack([band[i, : i + 1].std(unbiased=False) for i in range(1, N)]).mean()
    std_eye = torch.sqrt(1 / n - 1 / n**2).mean()
    heads = r["heads"].values["heads"]
    assert heads[0]["row_std"] == pytest.approx(float(std_band), rel=1e-5)
    assert heads[1]["row_std"] == pytest.approx(float(std_eye), rel=1e-5)
    assert heads[1]["class"] == "sharp"
    # local mass is all the mass: far keys get 0
    pos = r["positional"].checks[0]
    assert pos.values["far_weight"] == 0 and pos.status == "pass"
    # uniformity over i + 1 keys: mean_j |p_j - 1/n_i| by hand
    dev = []
    for p in (band, eye):
        for i in range(N):
            dev.append((p[i, : i + 1] - 1 / (i + 1)).abs().mean())
    assert r["statistics"].checks[0].values["abs_dev_mean"] == pytest.approx(float(torch.stack(dev).mean()), rel=1e-5)
    # adjacent / distant L2 between rows (distant = 10)
    adj = torch.stack([(p[1:] - p[:-1]).norm(dim=-1).mean() for p in (band, eye)]).mean()
    far = torch.stack([(p[10:] - p[:-10]).norm(dim=-1).mean() for p in (band, eye)]).mean()
    q = r["queries"].checks[1].values
    assert q["l2_adjacent"] == pytest.approx(float(adj), rel=1e-5)
    assert q["l2_distant"] == pytest.approx(float(far), rel=1e-5)


def test_causality_violation_fails():
    w = torch.full((1, 1, N, N), 1.0 / N)
    r = _report(w, causal=True)
    c = r["sanity"].checks[1]
    assert c.status == "fail" and c.values["future_max"] == pytest.approx((N - 1) / N, rel=1e-5)


def test_repeated_and_special_tokens():
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2, 3, 0, 5, 6]])
    same = (ids[0][:, None] == ids[0][None, :]).float()
    w = _norm(1 + 3 * same)[None, None]
    r = _report(w, ids=ids, special_token_ids=[0])
    eye = torch.eye(N, dtype=torch.bool)
    p = w[0, 0]
    s_mask, d_mask = (same > 0) & ~eye, same == 0
    t = r["tokens"].checks
    assert t[0].values["same_weight"] == pytest.approx(float(p[s_mask].mean()), rel=1e-5)
    assert t[0].values["diff_weight"] == pytest.approx(float(p[d_mask].mean()), rel=1e-5)
    assert t[0].status == "pass"
    assert t[1].status == "info"
    assert t[1].values["special_weight"] == pytest.approx(float(p[:, 9].mean()), rel=1e-5)
    assert _report(w).checks  # no repeated pairs of distinct tokens besides all-zero ids: still runs
    assert _report(w, token_ids=None, ids=ids[:, :0].new_zeros(1, N))["tokens"].checks[1].status == "n/a"


def test_diversity_and_thresholds_override():
    w = torch.full((1, 1, N, N), 1.0 / N)
    r = _report(w, ids=torch.arange(N)[None])
    c = r["diversity"].checks[0]
    assert c.values["input_diversity"] > 0.3 and c.status == "fail"  # diverse inputs, uniform attention
    r = _report(w, ids=torch.arange(N)[None], thresholds=Thresholds(diverse_inputs=0.99))
    assert r["diversity"].checks[0].status == "pass"


def test_log_to():
    class Log:
        def log(self, values, step):
            self.values, self.step = values, step

    log = Log()
    r = _report(torch.full((1, 1, N, N), 1.0 / N))
    r.log_to(log, 3)
    assert log.step == 3 and log.values["validation/sanity/rowsum_err_max"] < 1e-6


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
    cfg._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # sharper attention than the random init
        for blk in model.transformer.h:
            blk.attn.c_attn.weight.mul_(8)
    return model


def test_gpt2_ablation_and_model_unchanged():
    model = _gpt2().train()
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
    model.train()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    r = validate_attention(model, [ids, ids.flip(1)], loss_fn=lambda m, b: m(b, labels=b).loss)
    assert r.meta["causal"] is True and r["sanity"].checks[1].status == "pass"
    assert r.meta["layer_kinds"] == {"transformer.h.0.attn": "sdpa", "transformer.h.1.attn": "sdpa"}
    g = r["gradients"].checks[1]
    assert g.status == "pass" and g.values["nonzero"] == 8
    a = r["ablation"].checks[0].values
    assert a["loss_uniform"] != pytest.approx(a["loss_learned"], abs=1e-4)
    assert a["loss_local"] != pytest.approx(a["loss_learned"], abs=1e-4)
    assert a["ppl_learned"] == pytest.approx(math.exp(a["loss_learned"]))
    # unchanged: parameters, gradients, training flag, attention implementation, outputs
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    assert model.config._attn_implementation == "sdpa"
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_gpt2_eager_ablation_skipped():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg)
    r = validate_attention(model, torch.randint(0, 64, (1, 16)), loss_fn=lambda m, b: m(b, labels=b).loss)
    assert r["sanity"].checks[1].status == "pass"  # causal from the model class
    assert r["ablation"].checks[0].status == "n/a" and "skipped" in r["ablation"].checks[0].message


def test_cli(tmp_path):
    from fastdiag.cli import main

    model = _gpt2()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "ids.txt").write_text(" ".join(str(i % 64) for i in range(24)))
    out = tmp_path / "r.json"
    code = main(["validate", str(tmp_path / "m"), "--ids", str(tmp_path / "ids.txt"), "--json", str(out)])
    data = json.loads(out.read_text())
    assert code == (1 if data["status"] == "fail" else 0)
    assert [s["key"] for s in data["sections"]][-1] == "ablation"
    assert data["sections"][-1]["checks"][0]["values"]["loss_uniform"] is not None


def _demo_checkpoint(path):
    from fastdiag.demo import BaselineLM, save_checkpoint
    from fastdiag.demo.train import CharData, load_corpus

    chars = CharData(load_corpus(), torch.device("cpu")).chars
    kwargs = {"vocab": len(chars), "dim": 16, "heads": 2, "layers": 1, "context": 24}
    torch.manual_seed(0)
    return save_checkpoint(BaselineLM(**kwargs), path, kwargs, chars)


def test_cli_demo_checkpoint(tmp_path, capsys):
    from fastdiag.cli import main

    ckpt = _demo_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "r.json"
    code = main(["validate", str(ckpt), "--seq-len", "20", "--json", str(out)])
    data = json.loads(out.read_text())
    assert code == (1 if data["status"] == "fail" else 0)
    assert len(data["sections"]) == 9 and data["layers"] == ["blocks.0.attn"]
    assert data["meta"]["causal"] is True
    sanity = data["sections"][0]["checks"]
    assert [c["status"] for c in sanity] == ["pass", "pass"]
    assert sanity[0]["values"]["rows"] == 20 * 2  # 20 query rows x 2 heads
    assert data["sections"][7]["checks"][1]["status"] == "pass"  # loss_fn: the demo's LM loss
    (tmp_path / "ids.txt").write_text("1 2 3 999")
    assert main(["validate", str(ckpt), "--ids", str(tmp_path / "ids.txt")]) == 2
    assert "ids must be in [0," in capsys.readouterr().err
    (tmp_path / "ids.txt").write_text(" ".join(["1"] * 30))
    assert main(["validate", str(ckpt), "--ids", str(tmp_path / "ids.txt")]) == 2
    assert "exceed the demo model's context 24" in capsys.readouterr().err


def test_cli_demo_checkpoint_bad_files(tmp_path, capsys):
    from fastdiag.cli import main

    ckpt = _demo_checkpoint(tmp_path / "ckpt")
    torch.save({"x": torch.nn.Linear(2, 2)}, ckpt / "model.pt")  # a pickled module: refused
    assert main(["validate", str(ckpt)]) == 2
    assert "cannot load the state dict" in capsys.readouterr().err
    (ckpt / "fastdiag_demo.json").write_text("{not json")
    assert main(["validate", str(ckpt)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
