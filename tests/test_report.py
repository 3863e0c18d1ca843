"""fastdiag.report: rolling bands, trends, verdicts from a stored run, terminal and HTML report."""

from __future__ import annotations

import base64
import math
import re

import numpy as np
import pytest
import torch

from fastdiag.report import rolling_band, run_verdicts, summarize, trend, write_html
from fastdiag.report.html import auto_window
from fastdiag.schema import COMPARISON_TABLE
from fastdiag.store import MetricsLogger


def loop_band(values, window):
    """Independent rolling mean / population std: a plain loop over finite values."""
    means, stds = [], []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        if not chunk:
            means.append(math.nan)
            stds.append(math.nan)
            continue
        mean = sum(chunk) / len(chunk)
        means.append(mean)
        stds.append(math.sqrt(sum((v - mean) ** 2 for v in chunk) / len(chunk)))
    return np.array(means), np.array(stds)


@pytest.mark.parametrize("window", [1, 3, 7])
def test_rolling_band_matches_a_plain_loop(window):
    rng = np.random.default_rng(0)
    values = rng.normal(size=40)
    values[[0, 1, 2, 10, 25]] = [math.nan, math.nan, math.nan, math.inf, -math.inf]
    mean, std = rolling_band(values, window)
    want_mean, want_std = loop_band(values.tolist(), window)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-12, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(std, want_std, rtol=1e-9, atol=1e-12, equal_nan=True)
    assert np.isnan(mean[:3]).all()  # windows holding no finite value
    with pytest.raises(ValueError, match="window"):
        rolling_band(values, 0)


def test_trend_and_auto_window():
    assert trend(np.array([1.0, 2.0, 4.0]), 2) == (1.0, "^")
    assert trend(np.array([4.0, math.nan, 2.0]), 5) == (-0.5, "v")
    change, arrow = trend(np.array([1.0, 1.001]), 5)
    assert arrow == "=" and change == pytest.approx(0.001)
    assert trend(np.array([math.nan, 3.0]), 5) == (None, "")
    assert trend(np.array([0.0, 0.5]), 5) == (0.5, "^")  # absolute change from 0
    assert [auto_window(n) for n in (0, 10, 300, 5000)] == [3, 3, 30, 100]


def make_db(path):
    """Two runs: 'base' (baseline keys) and 'sets' (set keys, a frozen router)."""
    with MetricsLogger(path, run="base", config={"model": "baseline"}) as logger:
        for epoch in range(4):
            step = (epoch + 1) * 10
            for s in range(step - 9, step + 1):
                logger.log({"train/loss": 4.0 - 0.05 * s, "shared": 1.0}, s)
            logger.log(
                {
                    "baseline/attention_entropy_norm": 0.6,
                    "baseline/attention_top1_mean": 0.4,
                    "baseline/attention_gradient_norm": 0.8,
                    "baseline/attention_weight_change": 0.05 / (epoch + 1),
                    "baseline/attention_pattern_jaccard": 0.45,
                    "baseline/attention_effective_heads": 1.0,
                },
                step,
            )
    with MetricsLogger(path, run="sets") as logger:
        for epoch in range(4):
            step = (epoch + 1) * 10
            for s in range(step - 9, step + 1):
                logger.log({"train/loss": 4.0 - 0.04 * s, "shared": 3.0}, s)
            logger.log(
                {
                    "ausa/routing_entropy_norm": 0.62,
                    "ausa/router_confidence_mean": 0.58,
                    "ausa/router_gradient_norm": 0.0,
                    "ausa/router_weight_change": 0.0,
                    "ausa/set_reuse_jaccard": 0.71,
                    "ausa/active_set_ratio": 0.6,
                    "ausa/set_embedding_variance": math.nan,
                },
                step,
            )


def test_run_verdicts_use_last_values_and_history(tmp_path):
    path = tmp_path / "m.db"
    make_db(path)
    found = {(v.key, v.failure) for v in run_verdicts(path, "sets")}
    assert ("ausa/router_weight_change", "frozen router") in found
    assert ("ausa/router_gradient_norm", "vanishing gradient") in found
    assert not any(key == "ausa/set_embedding_variance" for key, _ in found)  # NaN ignored
    assert run_verdicts(path, "base") == []  # weight change decreasing: healthy

    with MetricsLogger(path, run="unstable") as logger:
        for epoch, change in enumerate([0.01, 0.02, 0.03]):
            logger.log({"ausa/router_weight_change": change}, epoch)
    assert [v.failure for v in run_verdicts(path, "unstable")] == ["unstable router"]
    with MetricsLogger(path, run="settled") as logger:
        for epoch, change in enumerate([0.01, 0.02, 0.03, 0.03]):
            logger.log({"ausa/router_weight_change": change}, epoch)
    assert run_verdicts(path, "settled") == []  # 0.02, 0.03, 0.03 is not strictly rising


def test_terminal_summary(tmp_path):
    path = tmp_path / "m.db"
    make_db(path)
    text = summarize(path, window=5)
    assert "== run base: 8 metrics" in text and "== run sets: 9 metrics" in text
    loss_line = next(line for line in text.splitlines() if line.startswith("train/loss"))
    # last value 4 - 0.05 * 40 = 2, mean of the last 5 = 2.1, trend (2 - 2.2) / 2.2
    assert loss_line.split()[1:5] == ["40", "2", "2.1", "v"]
    assert "-9.1%" in loss_line
    assert "frozen router" in text and "vanishing gradient" in text
    assert "baseline (base) vs set-routing (sets)" in text
    for row in COMPARISON_TABLE:
        assert row.label in text
    confidence = next(line for line in text.splitlines() if line.startswith("Confidence"))
    assert confidence.split()[1:3] == ["0.4", "0.58"]
    tail = text.split("run base vs run sets (last values, largest relative difference first):")[1]
    shared = next(line for line in tail.splitlines() if line.startswith("shared "))
    assert shared.split() == ["shared", "1", "3", "2", "66.7%"]  # A, B, B - A, relative
    assert "config differences:" in text and '"baseline"' in text
    with pytest.raises(ValueError, match="nope"):
        summarize(path, runs=["nope"])


def test_html_report_has_one_chart_per_requested_metric(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "m.db"
    make_db(path)
    requested = ["train/loss", "ausa/router_confidence_mean", "ausa/set_embedding_variance"]
    out = write_html(path, tmp_path / "report.html", metrics=requested)
    page = out.read_text()
    charts = re.findall(r"<figure class='chart single' data-metric='([^']*)'>", page)
    assert charts == requested
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == len(requested)
    assert all(base64.b64decode(img).startswith(b"\x89PNG\r\n\x1a\n") for img in images)
    assert "3 non-finite values not drawn" not in page  # only the NaN series has them
    assert "sets: 4 non-finite values not drawn" in page
    assert "frozen router" in page
    for row in COMPARISON_TABLE:
        assert row.label in page
    assert "<td>0.58</td>" in page  # set-routing confidence in the comparison table

    everything = write_html(path, tmp_path / "all.html", runs=["base"])
    page = everything.read_text()
    all_charts = re.findall(r"<figure class='chart single' data-metric='([^']*)'>", page)
    assert sorted(all_charts) == ["shared", "train/loss"]
    # the per-epoch baseline keys: one grid of cells, naming each key
    (grid,) = re.findall(r"<figure class='chart grid' data-metrics='([^']*)' data-family='baseline/'", page)
    assert sorted(grid.split()) == sorted(_baseline_keys())


def _baseline_keys():
    return [
        "baseline/attention_entropy_norm",
        "baseline/attention_top1_mean",
        "baseline/attention_gradient_norm",
        "baseline/attention_weight_change",
        "baseline/attention_pattern_jaccard",
        "baseline/attention_effective_heads",
    ]


def test_html_escapes_names_and_rejects_unknown_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "m.db"
    with MetricsLogger(path, run="<b>run</b>") as logger:
        logger.log({"<script>alert(1)</script>": 1.0}, 0)
        logger.log({"<script>alert(1)</script>": 2.0}, 1)
    page = write_html(path, tmp_path / "r.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page and "<b>run" not in page
    with pytest.raises(ValueError, match="not logged"):
        write_html(path, tmp_path / "r.html", metrics=["missing"])


def test_html_without_matplotlib_keeps_the_tables(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    path = tmp_path / "m.db"
    make_db(path)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.warns(RuntimeWarning, match="matplotlib is not installed"):
        page = write_html(path, tmp_path / "r.html").read_text()
    assert "<figure" not in page and "Confidence" in page and "fastdiag[report]" in page


def test_math_text_and_underscore_names_are_drawn_literally(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    path = tmp_path / "m.db"
    for run in ("exp$\\x$", "_x"):
        with MetricsLogger(path, run=run) as logger:
            for step in range(5):
                logger.log({"grad$_$norm": float(step), "a^b_{c}": 1.0}, step)
    seen = []
    real_savefig = Figure.savefig

    def spy(fig, *args, **kwargs):
        (ax,) = fig.axes
        (legend,) = fig.legends
        named = [t for t in fig.findobj(Text) if set(t.get_text()) & set("$^_")]
        assert named and all(not t.get_parse_math() for t in named)
        seen.append((ax.get_title("left"), [t.get_text() for t in legend.get_texts()]))
        return real_savefig(fig, *args, **kwargs)

    Figure.savefig = spy
    try:
        page = write_html(path, tmp_path / "r.html").read_text()
    finally:
        Figure.savefig = real_savefig
    charts = re.findall(r"<figure class='chart single' data-metric='([^']*)'>", page)
    assert charts == ["a^b_{c}", "grad$_$norm"]
    assert {title for title, _ in seen} == {"a^b_{c}", "grad$_$norm"}
    for _, legend in seen:  # every run in the legend, by its literal name
        assert [label.split(" (window")[0] for label in legend] == ["exp$\\x$", "_x"]
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        write_html(path, tmp_path / "r.html", window=0)
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        summarize(path, window=0)


def test_a_chart_that_cannot_be_drawn_is_named_and_the_report_kept(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from fastdiag.report import html as report_html

    path = tmp_path / "m.db"
    make_db(path)

    def broken(name, by_run, window):
        if name == "shared":
            raise RuntimeError("no renderer")
        return real(name, by_run, window)

    real = report_html._chart_png
    monkeypatch.setattr(report_html, "_chart_png", broken)
    with pytest.warns(RuntimeWarning, match="chart of metric 'shared'"):
        page = write_html(path, tmp_path / "r.html", metrics=["shared", "train/loss"]).read_text()
    assert "the chart of metric &#x27;shared&#x27; could not be drawn" in page
    assert re.findall(r"data-metric='([^']*)'", page) == ["train/loss"]


def test_a_per_layer_family_is_one_heatmap_not_a_chart_per_key(tmp_path):
    pytest.importorskip("matplotlib")
    from fastdiag.report import group_metrics

    path = tmp_path / "m.db"
    layers = [f"layers.{i}.self_attn" for i in range(12)]
    with MetricsLogger(path, run="enc") as logger:
        for epoch in range(5):
            record = {f"attention_top1/{name}": 0.2 + 0.01 * i * epoch for i, name in enumerate(layers)}
            record |= {f"grad_norm/{name}.in_proj_weight": 0.5 for name in layers}
            record |= {"val/loss": 3.0 - 0.1 * epoch, "epoch": float(epoch)}
            logger.log(record, epoch)
            for s in range(10):
                logger.log({"train/loss": 3.0 - 0.01 * (10 * epoch + s)}, 10 * epoch + s)
    curves, families, others = group_metrics(
        [f"attention_top1/{n}" for n in layers] + ["train/loss", "val/loss", "epoch",
         "baseline/attention_top1_mean", "ausa/top1_vs_random_kl", "moe/router_top1/block.3"]
    )  # fmt: skip
    assert curves == ["train/loss", "val/loss"]
    assert list(families) == ["attention_top1", "moe/router_top1"]
    assert families["attention_top1"][:3] == [f"attention_top1/layers.{i}.self_attn" for i in range(3)]
    assert others == ["epoch", "baseline/attention_top1_mean", "ausa/top1_vs_random_kl"]

    page = write_html(path, tmp_path / "r.html").read_text()
    assert re.findall(r"<figure class='chart heatmap' data-family='([^']*)'", page) == [
        "attention_top1",
        "grad_norm",
    ]
    assert re.findall(r"<figure class='chart multiples' data-family='([^']*)'", page) == [
        "attention_top1",
        "grad_norm",
    ]
    singles = re.findall(r"<figure class='chart single' data-metric='([^']*)'", page)
    assert singles == ["train/loss", "val/loss", "epoch"]  # training curves first
    headings = re.findall(r"<h2 id='([^']*)'>([^<]*)</h2>", page)
    titles = [h for _, h in headings]
    assert titles.index("Training curves") < titles.index("Health verdicts")
    assert titles.index("Health verdicts") < titles.index("attention_top1/* (12 keys)")
    toc = page.split("<nav class='toc'>")[1].split("</nav>")[0]
    assert all(f"href='#{anchor}'" in toc for anchor, _ in headings)


def test_counters_and_schedules_get_no_band_and_smoothing_does_not_lag():
    from fastdiag.report import centred_band, is_schedule

    assert is_schedule("epoch", np.array([1.0, 2.0]))
    assert is_schedule("train/lr", np.array([0.1, 0.3, 0.2]))
    assert is_schedule("warmup", np.linspace(0, 1, 20))  # monotone
    noisy = np.sin(np.arange(200) / 10) + np.random.default_rng(0).normal(0, 0.3, 200)
    assert not is_schedule("train/loss", noisy)
    # a centred mean of a straight line is the line itself (a trailing one lags by (w - 1) / 2)
    line = np.arange(100, dtype=np.float64)
    mean, _ = centred_band(line, 9)
    np.testing.assert_allclose(mean[4:-4], line[4:-4])
    trailing, _ = rolling_band(line, 9)
    np.testing.assert_allclose(line[8:] - trailing[8:], 4.0)
    values = np.array([1.0, math.nan, 3.0, 5.0])
    mean, std = centred_band(values, 3)
    np.testing.assert_allclose(mean, [1.0, 2.0, 4.0, 4.0])
    np.testing.assert_allclose(std, [0.0, 1.0, 1.0, 1.0])


def test_a_collapsed_model_driven_through_watch_shows_its_verdicts(tmp_path):
    from fastdiag import watch
    from tests.training_helpers import BATCH, SEQ, D, encoder, quiet

    model = encoder(layers=2)
    with torch.no_grad():  # layer 0: queries x 1000, every query attends to one key
        model.layers[0].self_attn.in_proj_weight[:D] *= 1000.0
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # and nothing learns
    path = tmp_path / "watch.db"
    torch.manual_seed(0)
    with quiet(), watch(model, optimizer=opt) as handle, MetricsLogger(path, run="collapsed") as log:
        for epoch in range(2):
            for _ in range(2):
                loss = model(torch.randn(BATCH, SEQ, D)).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            log.log(handle.get_epoch_stats(), epoch)
            handle.reset()
    found = {(v.key, v.failure, v.severity) for v in run_verdicts(path, "collapsed")}
    assert ("attention_top1/layers.0.self_attn", "overconfidence", "warning") in found
    assert ("attention_entropy_norm/layers.0.self_attn", "peaked routing", "warning") in found
    assert not any(k == "attention_top1/layers.1.self_attn" for k, _, _ in found)
    frozen = {k for k, f, _ in found if f == "frozen router"}  # lr 0: update ratio 0, per parameter
    assert "update_ratio/layers.0.self_attn.in_proj_weight" in frozen
    text = summarize(path)
    assert "overconfidence" in text and "attention_top1/layers.0.self_attn" in text
    page = write_html(path, tmp_path / "r.html").read_text()
    assert "overconfidence" in page and "attention_top1/layers.0.self_attn" in page


def test_progress_bar_on_stderr_for_many_metrics(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    from fastdiag.report import html as report_html

    path = tmp_path / "m.db"
    with MetricsLogger(path, run="r") as logger:
        for step in range(3):
            logger.log({f"grad_norm/layers.{i}": 1.0 + step for i in range(4)} | {"a[1]": 1.0}, step)
    write_html(path, tmp_path / "r.html", progress=True)
    captured = capsys.readouterr()
    assert "fastdiag report: charts" in captured.err and captured.out == ""
    write_html(path, tmp_path / "r.html")  # few metrics, not a terminal: quiet
    assert capsys.readouterr().err == ""
    assert report_html.PROGRESS_MIN_METRICS <= 500  # the 12-layer encoder's report shows one
    # a key holding glob characters is still chosen by its literal name
    page = write_html(path, tmp_path / "r.html", metrics=["a[1]"]).read_text()
    assert re.findall(r"data-metric='([^']*)'", page) == ["a[1]"]
