"""fastdiag.watch on attention that calls ``torch.nn.functional.scaled_dot_product_attention``.

Tiny random-init Hugging Face models (built from configs, nothing downloaded) with
``attn_implementation="sdpa"`` give the per-layer keys of the same models with ``"eager"``;
the logits are bit-identical with and without the watch; padded query rows (2-D
``attention_mask``) are left out; ``every`` and eval passes; nanoGPT-style user modules.
"""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdiag
from fastdiag import ops
from fastdiag.diagnostics.training import ATTENTION_METRICS, TrainingDiagnostics
from fastdiag.integrations import register_attention, watch
from fastdiag.integrations.sdpa import SDPACapture
from tests.conftest import forbid_host_sync

BATCH, SEQ, VOCAB = 2, 12, 100


@pytest.fixture(autouse=True)
def _torch_backend(backend):
    backend("torch")


@pytest.fixture
def transformers():
    tf = pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return tf


def _model(tf, arch: str, impl: str, attn_dropout: float = 0.0) -> nn.Module:
    """A tiny random-init model of ``arch`` with attention implementation ``impl`` (seeded)."""
    common = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        attn_implementation=impl,
    )
    torch.manual_seed(0)
    if arch == "gpt2":
        config = tf.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32, attn_pdrop=attn_dropout,
            resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation=impl,
        )
        model = tf.GPT2LMHeadModel(config)
    elif arch == "bert":
        model = tf.BertForMaskedLM(tf.BertConfig(attention_probs_dropout_prob=attn_dropout, **common))
    elif arch == "llama":  # GQA: 4 query heads, 2 kv heads
        model = tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **common))
    elif arch == "mistral":  # sliding window shorter than the sequence
        model = tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2, sliding_window=4, **common))
    elif arch == "mixtral":  # MoE
        model = tf.MixtralForCausalLM(
            tf.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **common)
        )
    else:
        raise AssertionError(arch)
    return model.train()


def _inputs(padded: bool):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    if not padded:
        return ids, {}
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, 8:] = 0  # right padding of the second sequence
    return ids, {"attention_mask": mask}


class _Count:
    """Counts the calls of a TrainingDiagnostics method (wrapping the bound method)."""

    def __init__(self, diag: TrainingDiagnostics, method: str) -> None:
        self.calls = 0
        original = getattr(diag, method)

        def wrapped(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        setattr(diag, method, wrapped)


def _watched_forward(model, ids, kwargs, **options):
    """(logits, epoch stats, update_attention_qk calls, attention_layers) of one watched forward;
    no warning allowed."""
    diag = TrainingDiagnostics()
    qk = _Count(diag, "update_attention_qk")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with watch(model, gradients=False, diagnostics=diag, **options) as handle:
            torch.manual_seed(5)
            logits = model(ids, **kwargs).logits
            layers = dict(handle.attention_layers)
    return logits, diag.get_epoch_stats(), qk.calls, layers


# ----------------------------------------------------------------------------------------------
# Hugging Face: sdpa == eager, outputs untouched
# ----------------------------------------------------------------------------------------------

ARCHS = ["gpt2", "bert", "llama", "mistral", "mixtral"]


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("arch", ARCHS)
def test_sdpa_keys_equal_eager_keys_and_logits_are_untouched(transformers, arch, padded):
    ids, kwargs = _inputs(padded)
    results = {}
    for impl in ("sdpa", "eager"):
        model = _model(transformers, arch, impl)
        torch.manual_seed(5)
        reference = model(ids, **kwargs).logits  # unwatched
        logits, stats, qk_calls, layers = _watched_forward(model, ids, kwargs)
        assert torch.equal(logits, reference), f"{arch}/{impl}: watch changed the logits"
        assert len(layers) == 2 and set(layers.values()) == {"hf"}
        # sdpa: one q/k update per layer, nothing materialised; eager: read from the weights
        assert qk_calls == (2 if impl == "sdpa" else 0)
        results[impl] = stats
    sdpa, eager = results["sdpa"], results["eager"]
    attention = {f"{m}/{n}" for m in ATTENTION_METRICS for n in layers}
    routers = {k for k in sdpa if k.startswith(("router_", "expert_"))}  # Mixtral (tests/test_routers.py)
    assert bool(routers) == (arch == "mixtral")
    assert sdpa.keys() == eager.keys() == attention | routers
    diff = max(abs(sdpa[k] - eager[k]) for k in sdpa if k in attention)
    assert diff < 1e-5, f"{arch}: max |sdpa - eager| = {diff}"


def test_padded_query_rows_are_left_out(transformers):
    """sdpa + 2-D attention_mask == eager weights with the padded rows masked out via row_mask
    (and differs from keeping them: transformers' 4-D mask lets padded queries attend)."""
    ids, kwargs = _inputs(padded=True)
    rows = kwargs["attention_mask"].bool()
    _, stats, _, layers = _watched_forward(_model(transformers, "llama", "sdpa"), ids, kwargs)
    eager = _model(transformers, "llama", "eager")
    with torch.no_grad():
        attentions = eager(ids, output_attentions=True, **kwargs).attentions
    kept, dropped = TrainingDiagnostics(), TrainingDiagnostics()
    for name, w in zip(layers, attentions, strict=True):
        kept.update_attention(name, w, row_mask=rows)
        dropped.update_attention(name, w)
    want, unmasked = kept.get_epoch_stats(), dropped.get_epoch_stats()
    assert stats.keys() == want.keys()
    for key in want:
        assert stats[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert any(abs(stats[k] - unmasked[k]) > 1e-4 for k in want)


def test_positional_attention_mask_is_found(transformers):
    ids, kwargs = _inputs(padded=True)
    bert = _model(transformers, "bert", "sdpa").bert
    stats = []
    for call in (lambda: bert(ids, **kwargs), lambda: bert(ids, kwargs["attention_mask"])):
        with watch(bert, gradients=False) as handle:
            torch.manual_seed(5)  # the same hidden dropout
            call()
            stats.append(handle.get_epoch_stats())
    assert stats[0] == stats[1]


def test_pre_dropout_statistics_and_identical_outputs_with_attention_dropout(transformers):
    """GPT-2 with attention dropout 0.1 in train mode: the recorded first layer equals the one
    without dropout (statistics of the pre-dropout probabilities), the logits are bit-identical
    with and without watch (the same random stream)."""
    ids, kwargs = _inputs(padded=False)
    with_dropout = _model(transformers, "gpt2", "sdpa", attn_dropout=0.1)
    torch.manual_seed(5)
    reference = with_dropout(ids).logits
    logits, stats, _, _ = _watched_forward(with_dropout, ids, kwargs)
    assert torch.equal(logits, reference)
    _, no_dropout, _, _ = _watched_forward(_model(transformers, "gpt2", "sdpa"), ids, kwargs)
    first = [k for k in stats if k.endswith("/transformer.h.0.attn")]
    assert len(first) == len(ATTENTION_METRICS)
    for key in first:
        assert stats[key] == pytest.approx(no_dropout[key], rel=1e-6, abs=1e-7), key


def test_training_steps_with_an_optimizer(transformers):
    """Forward + backward + step: gradients flow as without watch (same parameters after)."""
    ids, _ = _inputs(padded=False)
    watched, plain = _model(transformers, "llama", "sdpa"), _model(transformers, "llama", "sdpa")
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (watched, plain)]
    handle = watch(watched, optimizer=opts[0])
    for _ in range(2):
        for model, opt in zip((watched, plain), opts, strict=True):
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    stats = handle.get_epoch_stats()
    handle.remove()
    for a, b in zip(watched.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    assert "attention_entropy/model.layers.0.self_attn" in stats and "grad_norm_total" in stats
    acc = handle.diagnostics.accumulator
    assert acc.state[acc.names.index("attention_entropy/model.layers.1.self_attn"), 1] == 2


# ----------------------------------------------------------------------------------------------
# which passes count: every=k, eval mode, no_grad
# ----------------------------------------------------------------------------------------------


def test_every_2_skips_the_extra_pass(transformers, monkeypatch):
    model = _model(transformers, "llama", "sdpa")
    ids, _ = _inputs(padded=False)
    calls = []
    real = ops.attention_stats

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "attention_stats", counting)
    with watch(model, gradients=False, every=2) as handle:
        for _ in range(4):  # no optimizer: one forward is one step; steps 0 and 2 are sampled
            model(ids)
        acc = handle.diagnostics.accumulator
        assert acc.state[acc.names.index("attention_entropy/model.layers.0.self_attn"), 1] == 2
    assert len(calls) == 2 * 2  # 2 sampled forwards x 2 layers


def test_eval_and_no_grad_passes_are_not_counted(transformers):
    model = _model(transformers, "gpt2", "sdpa")
    ids, _ = _inputs(padded=False)
    with watch(model, gradients=False, every=2) as handle:
        model.eval()
        model(ids)  # eval mode
        model.train()
        with torch.no_grad():
            model(ids)  # no autograd
        with torch.inference_mode():
            model(ids)
        assert handle.get_epoch_stats() == {}
        assert handle.step == 0  # not steps either: the next training forward is step 0
        model(ids)
        first = handle.get_epoch_stats()
        model.eval()
        model(ids)
        assert handle.get_epoch_stats() == first
    assert len(first) == 2 * len(ATTENTION_METRICS)
    # include_eval=True: every pass counts
    with watch(model, gradients=False, include_eval=True) as handle, torch.no_grad():
        model(ids)
        assert len(handle.get_epoch_stats()) == 2 * len(ATTENTION_METRICS)
    model.train()


# ----------------------------------------------------------------------------------------------
# nanoGPT-style user modules
# ----------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """nanoGPT's block attention: qkv projection, F.scaled_dot_product_attention(is_causal=True)."""

    def __init__(self, d: int = 16, heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.dropout = dropout

    def qk(self, x):
        b, n, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        return [t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v)]

    def forward(self, x):
        q, k, v = self.qk(x)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=p, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(x.shape))


class Mixer(CausalSelfAttention):
    """The same module under a name watch does not detect (register_attention needed)."""


class GPT(nn.Module):
    def __init__(self, attention: type[nn.Module], layers: int = 2, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(attention(d) for _ in range(layers))
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _hand_stats(model: GPT, ids) -> dict[str, float]:
    diag = TrainingDiagnostics()
    with torch.no_grad():
        x = model.emb(ids)
        for i, block in enumerate(model.blocks):
            q, k, _ = block.qk(x)
            s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            s = s.masked_fill(~torch.ones(SEQ, SEQ, dtype=torch.bool).tril(), float("-inf"))
            diag.update_attention(f"blocks.{i}", s.softmax(-1))
            x = x + block(x)
    return diag.get_epoch_stats()


@pytest.mark.parametrize("how", ["detected", "registered"])
def test_nanogpt_style_module(how):
    torch.manual_seed(0)
    model = GPT(CausalSelfAttention if how == "detected" else Mixer)
    if how == "registered":
        for block in model.blocks:
            register_attention(block)  # no extract function: its SDPA calls
    ids, _ = _inputs(padded=False)
    torch.manual_seed(3)
    reference = model(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with watch(model, gradients=False) as handle:
            torch.manual_seed(3)
            out = model(ids)
            stats = handle.get_epoch_stats()
            kinds = dict(handle.attention_layers)
    assert torch.equal(out, reference)
    assert kinds == {f"blocks.{i}": "hf" if how == "detected" else "registered" for i in range(2)}
    want = _hand_stats(model, ids)
    assert stats.keys() == want.keys()
    for key in want:
        assert stats[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_the_mode_is_left_when_the_forward_raises_and_nothing_outside_is_touched():
    class BrokenAttention(CausalSelfAttention):
        def forward(self, x):
            super().forward(x)
            raise RuntimeError("boom")

    torch.manual_seed(0)
    model = GPT(BrokenAttention, layers=1)
    ids, _ = _inputs(padded=False)
    seen = []

    def outside_spy(module, args, out):
        seen.append(torch.overrides._get_current_function_mode())

    model.head.register_forward_hook(outside_spy)
    with watch(model, gradients=False) as handle:
        with pytest.raises(RuntimeError, match="boom"):
            model(ids)
        assert torch.overrides._get_current_function_mode() is None  # left on the error path
        model.blocks[0].__class__ = CausalSelfAttention
        model(ids)
        assert seen == [None]  # the model's other modules run outside the capture
        assert len(handle.get_epoch_stats()) == len(ATTENTION_METRICS)
    assert not any(isinstance(m, SDPACapture) for m in torch.overrides._get_current_function_mode_stack())


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_records_each_forward_once(reentrant):
    class Checkpointed(GPT):
        def forward(self, ids):
            x = self.emb(ids)
            for block in self.blocks:
                x = x + torch.utils.checkpoint.checkpoint(block, x, use_reentrant=reentrant)
            return self.head(x)

    torch.manual_seed(0)
    plain = GPT(CausalSelfAttention)
    ckpt = Checkpointed(CausalSelfAttention)
    ckpt.load_state_dict(plain.state_dict())
    ids, _ = _inputs(padded=False)
    results = []
    for model in (plain, ckpt):
        with watch(model) as handle:
            for _ in range(2):
                model(ids).square().mean().backward()
            acc = handle.diagnostics.accumulator
            assert acc.state[acc.names.index("attention_entropy/blocks.1"), 1] == 2
            results.append({k: v for k, v in handle.get_epoch_stats().items() if k.startswith("attention")})
    assert results[0].keys() == results[1].keys() and len(results[0]) == 2 * len(ATTENTION_METRICS)
    for key, value in results[0].items():
        assert results[1][key] == pytest.approx(value, rel=1e-6), key


def test_hooks_never_copy_to_host():
    torch.manual_seed(0)
    model = GPT(CausalSelfAttention)
    ids, _ = _inputs(padded=False)
    with watch(model, gradients=False) as handle:
        model(ids)  # warm-up: key names, plans
        with forbid_host_sync():
            model(ids)
        assert len(handle.get_epoch_stats()) == 2 * len(ATTENTION_METRICS)


def test_compiled_model_gives_the_eager_numbers():
    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        model = GPT(CausalSelfAttention)
        ids, _ = _inputs(padded=False)
        with watch(model, gradients=False) as handle:
            eager = model(ids)
            want = handle.get_epoch_stats()
        compiled = torch.compile(model)
        with watch(compiled, gradients=False) as handle:
            out = compiled(ids)
            got = handle.get_epoch_stats()
        torch.testing.assert_close(out, eager)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-6), key
    finally:
        torch._dynamo.reset()


def test_lazy_top_level_export_still_works():
    assert fastdiag.watch is watch and fastdiag.register_attention is register_attention
