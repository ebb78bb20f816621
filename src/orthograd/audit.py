"""Saving an unlearned model with an audit record of what was forgotten and how.

The weights go to a safetensors file and a JSON sidecar records the method, its config, the seed, fingerprints
of the forget and retain data, metrics before and after, the stop reason, the damage check when the run made one,
library versions and the source commit when orthograd runs from a git checkout. Both are written atomically (temp
file + rename), and an existing file is never overwritten unless asked. The account of the run itself (what the
sidecar records besides the weights' file and hash) is ``UnlearnResult.account()``, which model folders record too.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from orthograd.io import atomic_write_file, atomic_write_json


def sidecar_path(weights: str | Path) -> Path:
    """Where the audit record of a weights file lives: ``model.safetensors`` -> ``model.json``."""
    return Path(weights).with_suffix(".json")


def save_weights(
    model: nn.Module, path: str | Path, *, account: Mapping[str, Any], overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``model``'s weights (safetensors) and the audit sidecar (``account``, the run's record, plus the weights'
    file name and SHA-256); returns both paths."""
    weights = Path(path)
    if weights.suffix != ".safetensors":
        raise ValueError(f"save to a .safetensors file, got {weights.name!r}")
    sidecar = sidecar_path(weights)
    existing = [p for p in (weights, sidecar) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass overwrite=True or choose another path (nothing was written)")
    digests: list[str] = []

    def write(tmp: Path) -> None:
        save_model(model, str(tmp), metadata={"format": "pt", "orthograd_method": str(account["method"])})
        digests.append(hashlib.sha256(tmp.read_bytes()).hexdigest())

    atomic_write_file(weights, write)
    atomic_write_json(sidecar, {"weights_file": weights.name, "weights_sha256": digests[0], **account})
    return weights, sidecar


@functools.cache
def source_commit() -> str | None:
    """The git commit of the orthograd source that runs (with ``-dirty`` for uncommitted changes); None when it is
    not a git checkout (an installed wheel) or git is missing."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "."],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def load_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load saved weights into ``model`` (same architecture) and return it."""
    weights = Path(path)
    if not weights.exists():
        raise FileNotFoundError(f"no weights at {weights}; pass the .safetensors file written by result.save()")
    load_model(model, str(weights))
    return model
