"""What made a record: the source commit (and whether the tree had uncommitted changes), package versions, config.

Every record in a results log carries these (``bench.records.record_envelope`` the versions of the process that ran
the job, ``bench.engine.Engine`` the commit and the config hash), so a published table names the code and the
config behind each of its numbers.
"""

from __future__ import annotations

import functools
import importlib.metadata
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import orthograd
from orthograd._version import __version__
from orthograd.bench.config import ExperimentConfig, content_hash

PACKAGES = ("orthograd", "torch", "transformers", "peft")


@functools.cache
def package_versions() -> dict[str, str | None]:
    """The installed version of each package in ``PACKAGES`` (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    # the imported copies (a checkout is not the install; torch's local build tag, e.g. +cpu, is part of it)
    versions.update(orthograd=__version__, torch=torch.__version__)
    return versions


def _git(*args: str, cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def git_state(source: Path | None = None) -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the git checkout holding ``source`` (default: the imported package);
    both None when it is not in one (an installed wheel)."""
    folder = source or Path(orthograd.__file__).resolve().parent
    commit = _git("rev-parse", "HEAD", cwd=folder)
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=folder)
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def config_hash(raw: Mapping[str, Any]) -> str:
    """Hash of a config mapping without the settings that only say where and how fast it runs."""
    return content_hash({k: v for k, v in raw.items() if k not in ExperimentConfig.EXECUTION_FIELDS})


def run_provenance(raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fields the engine adds to every record it logs: commit, dirty, config hash (None without a config)."""
    return {**git_state(), "config_hash": config_hash(raw) if raw is not None else None}
