"""The ``fastdiag`` command (also ``python -m fastdiag``).

fastdiag build-ext                      build the C++ / CUDA extension now, print its path
fastdiag backends                       which backend runs each op here, and why (the switches)
fastdiag report A.db [B.db ...] [--run A --run db:B] [--metric GLOB] [--exclude GLOB]
                [--fail-on warning|critical] [--out report.html]   exit 1: a verdict at --fail-on
fastdiag --version
fastdiag demo [--quick] [--device cpu|cuda] [--break router] [--out runs/]
                also writes <out>/checkpoints/baseline/ and <out>/checkpoints/set-routing/
fastdiag validate MODEL_DIR [--ids FILE] [--seq-len N] [--window W] [--json out.json]
                MODEL_DIR: a demo checkpoint (fastdiag_demo.json) or a save_pretrained directory;
                exit 1: a failed check, 2: bad input
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path


def _build_ext(args: argparse.Namespace) -> int:
    from fastdiag import _extension, backends

    path = _extension.build_extension(
        verbose=args.verbose, cuda_sources=not backends.cuda_extension_disabled()
    )
    if path is None:
        print("fastdiag: the extension could not be built (see the warning above); "
              "the torch backend will be used", file=sys.stderr)  # fmt: skip
        return 1
    print(path)
    return 0


def _backends(args: argparse.Namespace) -> int:
    import fastdiag.ops  # noqa: F401  (registers every op's table)
    from fastdiag import backends

    print(f"FASTDIAG_BACKEND={backends.get_backend()}  TRITON_INTERPRET={int(backends.triton_interpreting())}"
          f"  FASTDIAG_NO_EXT={int(backends.extension_disabled())}")  # fmt: skip
    for op, devices in backends.summary().items():
        choices = ", ".join(f"{dev}: {name}" for dev, name in devices.items())
        print(f"{op:<20} {choices}   (implementations: {', '.join(backends.table(op))})")
    return 0


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _naming(exc: Exception, path: object) -> str:
    """The error on one line, naming ``path`` when it does not already."""
    text = _one_line(exc)
    return text if str(path) in text else f"{text} ({path})"


def _os_error(exc: OSError, path: object) -> str:
    """'<why> (<path>)' of an OSError, the path named once."""
    why = exc.strerror or _one_line(exc)
    return f"{why}: {path}"


FAIL_EXIT = 1  # fastdiag report --fail-on: a verdict of that severity or worse holds


def _report(args: argparse.Namespace) -> int:
    from fastdiag.report import collect, summary_text, worst, write_html
    from fastdiag.schema import SEVERITIES

    dbs = [Path(d) for d in args.db]
    where = dbs[0] if len(dbs) == 1 else ", ".join(map(str, dbs))
    for db in dbs:
        if not db.exists():
            print(f"fastdiag report: no such database: {db}", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else dbs[0].with_name(f"{dbs[0].stem}_report.html")
    try:
        data = collect(dbs, args.run, args.metric, args.exclude)
        summary = summary_text(data, args.trend_window)
    except (ValueError, TypeError, sqlite3.Error) as exc:
        print(f"fastdiag report: {_naming(exc, where)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fastdiag report: cannot read {_os_error(exc, where)}", file=sys.stderr)
        return 2
    print(summary)
    try:
        written = write_html(dbs, out, window=args.window, data=data)
    except (ValueError, sqlite3.Error) as exc:
        print(f"fastdiag report: {_naming(exc, where)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fastdiag report: cannot write the report, {_os_error(exc, out)}", file=sys.stderr)
        return 2
    print(f"\nreport: {written}")
    if args.fail_on is not None:
        found = worst(data.verdicts)
        if found is not None and SEVERITIES.index(found) >= SEVERITIES.index(args.fail_on):
            count = sum(
                SEVERITIES.index(v.severity) >= SEVERITIES.index(args.fail_on)
                for vs in data.verdicts.values()
                for v in vs
            )
            print(f"fastdiag report: {count} verdicts of severity {args.fail_on} or worse "
                  f"(--fail-on {args.fail_on}): exit {FAIL_EXIT}", file=sys.stderr)  # fmt: skip
            return FAIL_EXIT
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fastdiag.demo import run_demo

    try:
        run_demo(args.out, quick=args.quick, device=args.device, break_router=args.brk == "router")
    except RuntimeError as exc:
        print(f"fastdiag demo: {_one_line(exc)}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"fastdiag demo: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = exc.filename if exc.filename is not None else args.out
        print(
            f"fastdiag demo: cannot write to the output directory {args.out}: "
            f"{exc.strerror or _one_line(exc)} ({where})",
            file=sys.stderr,
        )
        return 2
    return 0


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _validate(args: argparse.Namespace) -> int:
    """``fastdiag validate``: the attention validation report of a ``fastdiag demo`` checkpoint
    directory (it holds ``fastdiag_demo.json``) or else of a local Hugging Face model."""
    import json

    import torch

    from fastdiag.demo.checkpoint import demo_loss, is_checkpoint, load_checkpoint, sample_ids
    from fastdiag.validation import validate_attention

    loss_fn = None
    causal = None
    demo_config = None
    try:
        if is_checkpoint(args.model_dir):
            model, demo_config = load_checkpoint(args.model_dir)
            loss_fn = demo_loss  # the demo's LM loss on the ids
            causal = bool(demo_config.get("causal", True))
        else:
            import transformers

            try:
                model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, local_files_only=True)
                loss_fn = lambda m, b: m(b, labels=b).loss  # noqa: E731  (the model's own LM loss)
            except ValueError:  # not a causal LM: the base model, without a loss
                model = transformers.AutoModel.from_pretrained(args.model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        print(f"fastdiag validate: cannot load a model from {args.model_dir}: {_one_line(exc)}", file=sys.stderr)
        return 2
    context = demo_config["kwargs"].get("context") if demo_config is not None else None
    if args.ids:
        try:
            ids = [int(t) for t in Path(args.ids).read_text(encoding="utf-8").split()]
        except (OSError, ValueError) as exc:
            print(f"fastdiag validate: --ids {args.ids}: {_one_line(exc)}", file=sys.stderr)
            return 2
        batch = torch.tensor([ids[: args.seq_len] if args.seq_len else ids], dtype=torch.long)
    elif demo_config is not None:  # real text: the demo corpus's validation characters
        try:
            batch = sample_ids(demo_config, min(args.seq_len or 32, context or 32))
        except ValueError as exc:
            print(f"fastdiag validate: {_one_line(exc)}", file=sys.stderr)
            return 2
    else:
        vocab = int(getattr(model.config, "vocab_size", 0) or 2)
        torch.manual_seed(0)
        batch = torch.randint(0, vocab, (1, args.seq_len or 32))
    if demo_config is not None:
        vocab = demo_config["kwargs"].get("vocab", 0)
        if context is not None and batch.shape[1] > context:
            print(f"fastdiag validate: {batch.shape[1]} ids exceed the demo model's context {context} "
                  "(use --seq-len)", file=sys.stderr)  # fmt: skip
            return 2
        if batch.numel() and not 0 <= int(batch.min()) <= int(batch.max()) < vocab:
            print(f"fastdiag validate: ids must be in [0, {vocab}) for this demo model", file=sys.stderr)
            return 2
    try:
        report = validate_attention(model, batch, loss_fn=loss_fn, causal=causal, local_window=args.window)
    except ValueError as exc:  # e.g. no attention layer (the set-routing model attends over sets)
        print(f"fastdiag validate: {args.model_dir}: {_one_line(exc)}", file=sys.stderr)
        return 2
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 1 if report.status == "fail" else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fastdiag`` command."""
    from fastdiag import __version__

    parser = argparse.ArgumentParser(
        prog="fastdiag", description="Fused, sync-free learning diagnostics."
    )
    parser.add_argument("--version", action="version", version=f"fastdiag {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build-ext", help="build the C++/CUDA extension and print its path")
    p.add_argument("--quiet", dest="verbose", action="store_false", help="hide compiler output")
    p.set_defaults(func=_build_ext)

    p = sub.add_parser("backends", help="which backend runs each op on this machine")
    p.set_defaults(func=_backends)

    p = sub.add_parser(
        "report",
        help="terminal summary and HTML report of one or more metrics databases",
        description="Terminal summary and HTML report of the runs of one or more databases. "
        f"Exit status: 0, or {FAIL_EXIT} with --fail-on when a verdict of that severity holds, "
        "2 on bad input.",
    )
    p.add_argument("db", nargs="+", help="SQLite files written by fastdiag.MetricsLogger")
    p.add_argument(
        "--run",
        action="append",
        help="run to include: NAME or DB:NAME when databases share a name (repeat; default: all)",
    )
    p.add_argument(
        "--metric", action="append", help="glob of the metrics to show, e.g. 'train/*' (repeat)"
    )
    p.add_argument(
        "--exclude", action="append", help="glob of metrics to leave out, e.g. 'param_norm/*'"
    )
    p.add_argument(
        "--fail-on",
        choices=("warning", "critical"),
        help=f"exit {FAIL_EXIT} when a verdict of this severity or worse holds (CI gate)",
    )
    p.add_argument("--out", help="HTML file (default: <first db stem>_report.html beside it)")
    p.add_argument(
        "--window", type=_positive_int, help="rolling window of the chart bands (points, >= 1)"
    )
    p.add_argument(
        "--trend-window", type=_positive_int, default=5, help="points of the terminal trend (>= 1)"
    )
    p.set_defaults(func=_report)

    p = sub.add_parser("demo", help="train a tiny baseline and a tiny set-routing LM, diagnosed")
    p.add_argument("--quick", action="store_true", help="a shorter run (CI)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--break", dest="brk", choices=("router",), help="freeze the router")
    p.add_argument(
        "--out",
        default="runs",
        help="directory for demo.db, demo_report.html and checkpoints/<run>/ (fastdiag validate)",
    )
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "validate",
        help="attention validation report of a demo checkpoint or a local Hugging Face model (exit 1: a fail)",
        description="Nine-section attention validation report. MODEL_DIR: a checkpoint written by "
        "'fastdiag demo' (<out>/checkpoints/baseline, recognised by its fastdiag_demo.json; "
        "default ids: demo corpus text; loss: the demo's LM loss) or a directory written by "
        "save_pretrained (read offline). Exit status: 0, 1 when a check fails, 2 on bad input.",
    )
    p.add_argument("model_dir", help="a 'fastdiag demo' checkpoint directory or a save_pretrained directory")
    p.add_argument("--ids", help="file of whitespace-separated token ids (default: random ids)")
    p.add_argument("--seq-len", type=_positive_int, help="sequence length (default 32; truncates --ids)")
    p.add_argument("--window", type=int, default=5, help="local window |i - j| <= w (default 5)")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.set_defaults(func=_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastdiag`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
