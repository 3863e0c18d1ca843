"""What a report reads: runs of one or more databases, metric selection by glob, families.

A report reads the runs of one or more SQLite files written by ``MetricsLogger``. Each run is
shown by its name, or ``<db stem>:<run>`` when two databases hold a run of the same name.
``--run`` filters take either form. Metrics are chosen by glob patterns (``fnmatch``:
``*``, ``?``, ``[...]``, case-sensitive) on the full key, then ``exclude`` patterns drop keys.

Families: a key ``<family>/<member>`` whose family is a per-layer producer's prefix
(``attention_top1``, ``grad_norm``, ``router_top1``, ... of ``KNOWN_FAMILIES``, also under a
prefix such as ``moe/``), or any ``<prefix>/<member>`` where at least ``MIN_FAMILY`` keys share
the prefix and their members carry a layer index (``layers.3``, ``block_3``, ``layer3``), is drawn as one family: a heatmap
(member x step) and one small-multiples chart, not one chart per key.
"""

from __future__ import annotations

import fnmatch
import re
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastdiag.store.database import RunInfo, Series, list_runs, load_metrics

__all__ = [
    "KNOWN_FAMILIES",
    "MIN_FAMILY",
    "RunRef",
    "family_of",
    "group_metrics",
    "load_runs",
    "natural_key",
    "resolve_runs",
    "select_metrics",
    "training_curve",
]

KNOWN_FAMILIES = frozenset(
    {
        "attention_entropy",
        "attention_entropy_norm",
        "attention_sparsity",
        "attention_top1",
        "attention_effective_heads",
        "grad_norm",
        "param_norm",
        "update_ratio",
        "router_entropy_norm",
        "router_top1",
        "expert_load_gini",
        "expert_active_ratio",
        "expert_load_max_over_mean",
        "router_topk_jaccard",
        "expert_over_capacity",
    }
)
MIN_FAMILY = 3  # keys sharing an unknown prefix, with a digit in each member, to form a family
# a layer index in a member name: "layers.3.attn", "block_3", "h.11", "layer3" (not "top1")
_DIGIT = re.compile(r"(^|[._\-])\d+([._\-]|$)|^(layers?|blocks?|h|l|stage)\d+([._\-]|$)")
_TRAINING = re.compile(r"(^|/)(train|val|valid|validation|eval|test)(/|_)|loss|perplexity|ppl")


@dataclass(frozen=True)
class RunRef:
    """One run of one database: where it is, its stored name, its label in the report."""

    db: Path
    run: str
    label: str
    info: RunInfo


def _check_paths(dbs: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(dbs, (str, Path)):
        return [Path(dbs)]
    if not isinstance(dbs, Sequence) or not dbs:
        raise ValueError(f"db must be a path or a non-empty sequence of paths, got {dbs!r}")
    return [Path(d) for d in dbs]


def resolve_runs(
    dbs: str | Path | Sequence[str | Path], runs: Sequence[str] | None = None
) -> list[RunRef]:
    """The runs of ``dbs`` (in database then start order), filtered by ``runs``.

    A filter is a run name (every database's run of that name) or ``<db>:<run>`` where
    ``<db>`` is the database's path as given or its stem. Unknown names raise ValueError.
    """
    paths = _check_paths(dbs)
    found: list[tuple[Path, RunInfo]] = []
    for path in paths:
        if not path.exists():
            raise ValueError(f"no such database: {path}")
        try:
            infos = list_runs(path)
        except sqlite3.Error as exc:
            text = " ".join(str(exc).split())
            raise ValueError(text if str(path) in text else f"{text} ({path})") from exc
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
        found += [(path, info) for info in infos]
    counts: dict[str, int] = {}
    for _, info in found:
        counts[info.name] = counts.get(info.name, 0) + 1
    stems = [p.stem for p in paths]
    refs = []
    for path, info in found:
        clash = counts[info.name] > 1
        where = path.stem if stems.count(path.stem) == 1 else str(path)
        refs.append(RunRef(path, info.name, f"{where}:{info.name}" if clash else info.name, info))
    if not runs:
        return refs
    chosen: list[RunRef] = []
    for wanted in runs:
        hits = [r for r in refs if wanted in (r.label, r.run) or _qualified(wanted, r)]
        if not hits:
            held = [r.label for r in refs]
            where = str(paths[0]) if len(paths) == 1 else f"{len(paths)} databases"
            raise ValueError(f"runs [{wanted!r}] are not in {where!r}; it holds {held}")
        chosen += [r for r in hits if r not in chosen]
    return chosen


def _qualified(wanted: str, ref: RunRef) -> bool:
    db, sep, run = wanted.rpartition(":")
    return bool(sep) and run == ref.run and db in (str(ref.db), ref.db.stem, ref.db.name)


def load_runs(
    refs: Sequence[RunRef], names: Iterable[str] | None = None
) -> dict[str, dict[str, Series]]:
    """``{label: {name: Series}}``: one query per database."""
    names = None if names is None else list(names)
    by_db: dict[Path, list[RunRef]] = {}
    for ref in refs:
        by_db.setdefault(ref.db, []).append(ref)
    out: dict[str, dict[str, Series]] = {}
    for db, group in by_db.items():
        data = load_metrics(db, [r.run for r in group], names)
        for ref in group:
            out[ref.label] = data.get(ref.run, {})
    return {ref.label: out.get(ref.label, {}) for ref in refs}


def _patterns(patterns: str | Sequence[str] | None, what: str) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    if not all(isinstance(p, str) and p for p in patterns):
        raise TypeError(f"{what} must be a sequence of non-empty glob strings, got {patterns!r}")
    return list(patterns)


def select_metrics(
    available: Iterable[str],
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    runs: Sequence[str] = (),
) -> list[str]:
    """The keys of ``available`` matching any ``include`` glob (all when None) and no
    ``exclude`` glob, in the order of the include patterns (then natural order). A pattern
    also matches the key spelled exactly like it (a name holding ``[`` needs no escaping).

    An include pattern matching no key raises ValueError (a typo must not give an empty report).
    """
    include_p = _patterns(include, "metric")
    exclude_p = _patterns(exclude, "exclude")
    names = sorted(set(available), key=natural_key)
    if include_p:
        chosen: list[str] = []
        unknown = []
        for pattern in include_p:
            hits = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                unknown.append(pattern)
            chosen += [n for n in hits if n not in chosen]
        if unknown:
            raise ValueError(f"metrics {unknown} were not logged by runs {list(runs)}")
    else:
        chosen = names
    return [n for n in chosen if not any(n == p or fnmatch.fnmatchcase(n, p) for p in exclude_p)]


def natural_key(name: str) -> list[object]:
    """Sort key: digits compare as numbers (``layers.2`` before ``layers.10``)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def family_of(name: str) -> tuple[str, str] | None:
    """(family, member) of a key of a known per-layer family, else None (see the module doc)."""
    parts = name.split("/")
    if parts[0] == "health":
        return None
    for i, part in enumerate(parts[:-1]):
        if part in KNOWN_FAMILIES:
            return "/".join(parts[: i + 1]), "/".join(parts[i + 1 :])
    return None


def training_curve(name: str) -> bool:
    """Whether ``name`` is a training curve (loss, validation) shown first."""
    return bool(_TRAINING.search(name.lower()))


def group_metrics(names: Sequence[str]) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """(training curves, {family: members' full keys}, other keys), each in natural order."""
    families: dict[str, list[str]] = {}
    rest: list[str] = []
    for name in names:
        fam = family_of(name)
        if fam is not None:
            families.setdefault(fam[0], []).append(name)
        else:
            rest.append(name)
    # unknown prefixes: >= MIN_FAMILY keys <prefix>/<member with a digit>
    by_prefix: dict[str, list[str]] = {}
    for name in rest:
        prefix, sep, member = name.rpartition("/")
        if sep and _DIGIT.search(member) and not training_curve(name):
            by_prefix.setdefault(prefix, []).append(name)
    for prefix, members in by_prefix.items():
        if len(members) >= MIN_FAMILY:
            families[prefix] = members
    in_family = {n for members in families.values() for n in members}
    rest = [n for n in rest if n not in in_family]
    curves = [n for n in rest if training_curve(n)]
    others = [n for n in rest if not training_curve(n)]
    ordered = {f: sorted(m, key=natural_key) for f, m in sorted(families.items())}
    return curves, ordered, others


def member(family: str, key: str) -> str:
    """The member part of a family's key."""
    return key[len(family) + 1 :] if key.startswith(family + "/") else key


def describe(refs: Sequence[RunRef]) -> Mapping[str, RunRef]:
    """``{label: ref}``."""
    return {r.label: r for r in refs}
