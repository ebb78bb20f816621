"""Saving an unlearned model with an audit record of what was forgotten and how.

The weights go to a safetensors file and a JSON sidecar records the method, its config, the seed, fingerprints
of the forget and retain data, metrics before and after, the stop reason, the damage check when the run made one,
library versions and the source commit when orthograd runs from a git checkout. Both are written atomically (temp
file + rename), and an existing file is never overwritten unless asked. ``run_account`` is the record without the
weights, shared with the model folders of ``orthograd.model_folder``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from orthograd._version import __version__
from orthograd.damage import Damage
from orthograd.io import atomic_write_json, new_file_mode


class AuditedRun(Protocol):
    """What an audit record reads of a run (``orthograd.UnlearnResult`` has it): a protocol, so that this module
    does not import the result type that calls it."""

    model: nn.Module
    method: str
    config: dict[str, Any]
    seed: int
    data: dict[str, dict[str, Any]]
    original: dict[str, float]
    stop_reason: str
    steps: int
    epochs: int
    wall_time_s: float
    damage: Damage | None
    inferred_stop: str | None

    @property
    def final(self) -> dict[str, Any]: ...


def sidecar_path(weights: str | Path) -> Path:
    """Where the audit record of a weights file lives: ``model.safetensors`` -> ``model.json``."""
    return Path(weights).with_suffix(".json")


def save_result(result: AuditedRun, path: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``result.model``'s weights (safetensors) and the audit sidecar; returns both paths."""
    weights = Path(path)
    if weights.suffix != ".safetensors":
        raise ValueError(f"save to a .safetensors file, got {weights.name!r}")
    sidecar = sidecar_path(weights)
    existing = [p for p in (weights, sidecar) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass overwrite=True or choose another path (nothing was written)")
    weights.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{weights.name}.", suffix=".tmp", dir=weights.parent)
    os.close(fd)
    try:
        save_model(result.model, tmp, metadata={"format": "pt", "orthograd_method": result.method})
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, weights)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_json(
        sidecar, audit_record(result, weights_file=weights.name, weights_sha256=digest, version=__version__)
    )
    return weights, sidecar


def audit_record(result: AuditedRun, *, weights_file: str, weights_sha256: str, version: str) -> dict[str, Any]:
    """The JSON sidecar's content."""
    return {"weights_file": weights_file, "weights_sha256": weights_sha256, **run_account(result, version=version)}


def run_account(result: AuditedRun, *, version: str = __version__) -> dict[str, Any]:
    """What a run did, for an audit record: model class, method, config, seed, data fingerprints, metrics before and
    after, stop reason (and the inferred stop rule), retain damage past the tolerance (None: within it), versions,
    source commit and time."""
    return {
        "model_class": f"{type(result.model).__module__}.{type(result.model).__qualname__}",
        "method": result.method,
        "config": result.config,
        "seed": result.seed,
        "data": result.data,
        "metrics": {"before": result.original, "after": result.final},
        "stop_reason": result.stop_reason,
        "steps": result.steps,
        "epochs": result.epochs,
        "wall_time_s": result.wall_time_s,
        "inferred_stop": result.inferred_stop,
        "damage": result.damage.to_dict() if result.damage is not None else None,
        "versions": {"orthograd": version, "torch": torch.__version__, "python": platform.python_version()},
        "commit": source_commit(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


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
