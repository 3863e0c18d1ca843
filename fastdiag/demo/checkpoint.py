"""The demo's checkpoints: ``<out>/checkpoints/<run>/`` holds ``fastdiag_demo.json`` (the
model class name, its constructor arguments, the corpus characters of the token ids, the causal
flag) and ``model.pt`` (the state dict, CPU tensors only, read back with
``torch.load(weights_only=True)``: no pickled code). ``fastdiag validate DIR`` recognises such a
directory by its JSON file and builds the model with :func:`load_checkpoint`."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdiag.demo.models import BaselineLM, SetRoutingLM

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "WEIGHTS_FILE",
    "demo_loss",
    "is_checkpoint",
    "load_checkpoint",
    "sample_ids",
    "save_checkpoint",
]

CONFIG_FILE = "fastdiag_demo.json"
WEIGHTS_FILE = "model.pt"
FORMAT = "fastdiag-demo-checkpoint/1"
MODELS: dict[str, type[nn.Module]] = {"BaselineLM": BaselineLM, "SetRoutingLM": SetRoutingLM}


def save_checkpoint(
    model: nn.Module, directory: str | Path, kwargs: dict[str, int], chars: list[str]
) -> Path:
    """Write ``model`` (a demo model built as ``type(model)(**kwargs)``) to ``directory``;
    ``chars``: the character of each token id. Returns the directory."""
    name = type(model).__name__
    if name not in MODELS:
        raise ValueError(f"not a demo model: {name} (one of {sorted(MODELS)})")
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    torch.save(state, path / WEIGHTS_FILE)
    config = {"format": FORMAT, "model": name, "kwargs": dict(kwargs), "chars": "".join(chars),
              "causal": True}  # fmt: skip
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def is_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` is a demo checkpoint (holds ``fastdiag_demo.json``)."""
    return (Path(directory) / CONFIG_FILE).is_file()


def load_checkpoint(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(the model in eval mode on the CPU, its JSON config) of a demo checkpoint. Raises
    ValueError on a malformed config or state dict, OSError when a file cannot be read."""
    path = Path(directory)
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path / CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_FILE}: not a {FORMAT} config")
    cls = MODELS.get(config.get("model"))  # type: ignore[arg-type]
    kwargs = config.get("kwargs")
    if cls is None:
        raise ValueError(f"{path / CONFIG_FILE}: unknown model {config.get('model')!r}")
    if not isinstance(kwargs, dict) or not all(isinstance(v, int) for v in kwargs.values()):
        raise ValueError(f"{path / CONFIG_FILE}: kwargs must map names to ints")
    try:
        model = cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{path / CONFIG_FILE}: bad kwargs for {cls.__name__}: {exc}") from exc
    try:
        state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (
        RuntimeError,
        KeyError,
        TypeError,
        AttributeError,
        EOFError,
        pickle.UnpicklingError,
    ) as exc:
        # a corrupt file, an unsafe pickle (weights_only) or a state dict of another shape
        raise ValueError(f"{path / WEIGHTS_FILE}: cannot load the state dict: {exc}") from exc
    return model.eval(), config


def demo_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """The demo's LM loss on ``ids`` [B, N]: cross-entropy of each next token (N - 1 targets)."""
    logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def sample_ids(config: dict[str, Any], length: int) -> Tensor:
    """int64 [1, length]: the first ``length`` characters of the demo corpus's validation part,
    as the checkpoint's token ids (real text, so the token-level section has repeats)."""
    from fastdiag.demo.train import load_corpus

    lookup = {c: i for i, c in enumerate(config.get("chars", ""))}
    text = load_corpus()
    ids = [lookup[c] for c in text[int(0.9 * len(text)) :] if c in lookup][:length]
    if len(ids) < length:
        raise ValueError(f"the demo corpus has fewer than {length} known characters")
    return torch.tensor([ids], dtype=torch.long)
