"""What a complete checkpoint is: its layout, its manifest (every file's size and SHA-256) and how to check it.

A published checkpoint folder ``<save_dir>/<tag>/`` holds DeepSpeed's files unchanged (one per expert, ZeRO
optimizer shards, model states) plus ``piper_manifest.json``::

    {"format": 1, "tag": "global_step10", "step": 10, "published_at": 1767000000.0,
     "layout": {"world_size": 2, "dp_size": 2, "ep_size": 2, "pp_size": 1, "zero_stage": 2,
                "num_experts": 4},
     "files": {"mp_rank_00_model_states.pt": {"size": 123, "sha256": "..."}, ...}}

Nothing here talks to other ranks; :mod:`piper_ds.runtime.checkpoint` does.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field

MANIFEST = "piper_manifest.json"
STAGING_PREFIX = ".staging."
FORMAT = 1


class Layout(BaseModel):
    """The parallel layout a checkpoint was saved under; a resume must run under the same one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    world_size: int = Field(description="Ranks of the run.")
    dp_size: int = Field(description="Data-parallel ranks (DeepSpeed's dp world size, ZeRO's shard count).")
    ep_size: int = Field(description="Expert-parallel group size of the MoE layers (1 without MoE).")
    pp_size: int = Field(description="Pipeline stages.")
    zero_stage: int = Field(description="ZeRO stage.")
    num_experts: int = Field(description="Routed experts per MoE layer (the most of any layer; 0 without MoE).")

    def describe(self) -> str:
        """One line, e.g. ``world 2, dp 2, ep 2, pp 1, ZeRO-2, 4 experts``."""
        return (f"world {self.world_size}, dp {self.dp_size}, ep {self.ep_size}, pp {self.pp_size}, "
                f"ZeRO-{self.zero_stage}, {self.num_experts} experts")


class FileEntry(BaseModel):
    """One file of a checkpoint: bytes and SHA-256 (hex)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int
    sha256: str


class Manifest(BaseModel):
    """The manifest of one complete checkpoint (``piper_manifest.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = FORMAT
    tag: str
    step: int
    published_at: float
    layout: Layout
    files: Dict[str, FileEntry]


def sha256_of(path: str, chunk: int = 1 << 22) -> Tuple[int, str]:
    """(size in bytes, SHA-256 hex digest) of the file at ``path``."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


#: Problems :func:`check_file` reports (0 = the file matches its manifest entry).
MISSING, WRONG_SIZE, WRONG_HASH = 1, 2, 3


def check_file(folder: str, name: str, want: FileEntry, verify: str) -> Tuple[int, int]:
    """(problem, size): 0 when file ``name`` of ``folder`` matches ``want``, else MISSING, WRONG_SIZE or
    WRONG_HASH; and its size in bytes (-1 when missing). ``verify``: 'sha256' reads the file, 'size' stats it."""
    if verify not in ("sha256", "size"):
        raise ValueError(f"verify must be 'sha256' or 'size', got {verify!r}")
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return MISSING, -1
    size = os.path.getsize(path)
    if size != want.size:
        return WRONG_SIZE, size
    if verify == "sha256" and sha256_of(path)[1] != want.sha256:
        return WRONG_HASH, size
    return 0, size


def describe_problem(name: str, problem: int, size: int, want: FileEntry) -> str:
    """The sentence for a :func:`check_file` result, naming the file."""
    if problem == MISSING:
        return f"{name} is missing"
    if problem == WRONG_SIZE:
        return f"{name} has {size} bytes, its manifest says {want.size} (truncated or overwritten)"
    if problem == WRONG_HASH:
        return f"{name} does not match the SHA-256 in its manifest (corrupted)"
    raise ValueError(f"unknown problem code {problem} for {name}")


def fsync_file(path: str) -> None:
    """Flushes ``path`` to stable storage (a checkpoint is published only after its files are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and ``os.replace``: readers see the old or the new
    content, never a partial one."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(folder: str) -> None:
    """Makes renames inside ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_manifest(folder: str) -> Optional[Manifest]:
    """The manifest of checkpoint ``folder``; None when it has none (a checkpoint DeepSpeed wrote itself).
    ValueError naming the file when it exists but cannot be parsed."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return Manifest.model_validate(json.load(f))
    except (ValueError, OSError) as err:
        raise ValueError(f"unreadable checkpoint manifest {path}: {err}") from None


def read_latest(save_dir: str) -> Optional[str]:
    """The tag named by ``<save_dir>/latest``, or None."""
    path = os.path.join(save_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def complete_checkpoints(save_dir: str) -> List[Manifest]:
    """Manifests of the published checkpoints of ``save_dir``, newest first (by step, then publication time).
    Staging folders and folders without a readable manifest are left out."""
    found = []
    if not os.path.isdir(save_dir):
        return found
    for name in os.listdir(save_dir):
        folder = os.path.join(save_dir, name)
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        try:
            manifest = read_manifest(folder)
        except ValueError:
            continue  # a damaged manifest: not a complete checkpoint
        if manifest is not None and manifest.tag == name:
            found.append(manifest)
    return sorted(found, key=lambda m: (m.step, m.published_at), reverse=True)
