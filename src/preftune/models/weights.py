"""A checkpoint's trainable weights, stored once.

A checkpoint holds the model as the stage saves it (``save_pretrained``: ``model.safetensors``,
so it loads with ``from_pretrained``) and the loop's own record of the trainable weights
(``weights.safetensors``, by the names of the module the loop trains). For a full fine-tune the
two hold the same tensors; each one found, bit for bit, in an exported file is not written again:
``weights_in_export.json`` says where it is (file and key), and :func:`read_weights` reads it
from there. What is not found (LoRA adapters, which peft saves under other names; anything whose
saved copy differs) stays in ``weights.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WEIGHTS_FILE = "weights.safetensors"
IN_EXPORT_FILE = "weights_in_export.json"


def split_exported(weights: dict[str, torch.Tensor], folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """(the weights not found in ``folder``'s exported safetensors files, {name: [file, key]} of
    those found). A weight's exported key is its name without the loop module's first part
    (``model.`` of a scorer, ``lm.`` of a reward model, ``head.`` of its head); a match counts only
    when the saved tensor is equal, dtype and all."""
    from safetensors import safe_open

    where: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        if path.name == WEIGHTS_FILE:
            continue
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for name, value in weights.items():
                key = name.split(".", 1)[-1]
                if name in where or key not in keys:
                    continue
                saved = f.get_tensor(key)
                if saved.dtype == value.dtype and saved.shape == value.shape and torch.equal(saved, value):
                    where[name] = [path.name, key]
    return {name: value for name, value in weights.items() if name not in where}, where


def write_weights(weights: dict[str, torch.Tensor], folder: Path) -> None:
    """``weights.safetensors`` with what the export in ``folder`` does not already hold, and where the rest is."""
    from safetensors.torch import save_file

    rest, where = split_exported(weights, folder)
    save_file(rest, str(folder / WEIGHTS_FILE))
    if where:
        (folder / IN_EXPORT_FILE).write_text(json.dumps(where, indent=0, sort_keys=True), encoding="utf-8")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every trainable weight of a checkpoint: ``weights.safetensors`` and those kept in the export."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = load_file(str(folder / WEIGHTS_FILE))
    index = folder / IN_EXPORT_FILE
    if index.is_file():
        where = json.loads(index.read_text(encoding="utf-8"))
        for file in sorted({file for file, _ in where.values()}):
            with safe_open(str(folder / file), framework="pt") as f:
                for name, (in_file, key) in where.items():
                    if in_file == file:
                        weights[name] = f.get_tensor(key)
    return weights
