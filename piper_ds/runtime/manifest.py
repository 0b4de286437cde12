"""What a complete checkpoint is: its layout, its manifest (every file's size and SHA-256) and how to check it.

A published checkpoint folder ``<save_dir>/<tag>/`` holds DeepSpeed's files (one per expert, keyed by the
expert's global id; ZeRO optimizer shards; model states), the layout-free optimizer state under ``piper_state/``
(:mod:`piper_ds.runtime.layout_free`) and ``piper_manifest.json``::

    {"format": 2, "tag": "global_step10", "step": 10, "published_at": 1767000000.0,
     "layout": {"world_size": 2, "dp_size": 2, "ep_size": 2, "pp_size": 1, "zero_stage": 2,
                "num_experts": 4},
     "moe_layers": {"blocks.1.ffn.moe": {"num_experts": 4, "ep_size": 2, "rank_of": [0, 1, 1, 0],
                                         "slot_of": [0, 1, 0, 1],
                                         "expert_shapes": {"w_up": [64, 64], "w_down": [32, 64]}}, ...},
     "layout_free_state": true,
     "files": {"mp_rank_00_model_states.pt": {"size": 123, "sha256": "..."}, ...}}

Every file of the folder, ``piper_state/`` included, is in ``files``. Format 1 manifests (no ``moe_layers``, no
layout-free state) still load, under their own layout only.

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
FORMAT = 2


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


class MoELayerRecord(BaseModel):
    """One PiperMoE layer as saved: its expert count, EP size, placement and the shape of one expert's stacked
    parameters (``w_up`` [D, W], ``w_down`` [F, D]): what a resume under another layout checks and restores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_experts: int
    ep_size: int
    rank_of: List[int] = Field(description="EP rank of each global expert id.")
    slot_of: List[int] = Field(description="Slot of each global expert id on its rank.")
    expert_shapes: Dict[str, List[int]] = Field(description="Parameter name -> shape of one expert's slice.")


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
    moe_layers: Dict[str, MoELayerRecord] = Field(
        default_factory=dict, description="PiperMoE layers by module name (all pipeline stages).")
    layout_free_state: bool = Field(
        False, description="piper_state/ holds the optimizer state by parameter name and global expert id.")
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


def resume_refusal(manifest: Manifest, layout: Layout, records: Dict[str, MoELayerRecord]) -> Optional[str]:
    """Why a run with ``layout`` and PiperMoE layers ``records`` (by module name) cannot resume from the
    checkpoint of ``manifest``, or None when it can: under the saved layout through DeepSpeed's own load, under
    another world, data-parallel or EP size through the layout-free state. The expert counts and shapes of every
    MoE layer must match; the pipeline size and the ZeRO stage must stay."""
    saved = manifest.layout
    if manifest.moe_layers or manifest.format >= 2:
        if set(manifest.moe_layers) != set(records):
            return (f"its MoE layers {sorted(manifest.moe_layers)} are not this model's {sorted(records)}")
        for name, record in sorted(records.items()):
            was = manifest.moe_layers[name]
            if was.num_experts != record.num_experts:
                return (f"MoE layer {name!r} has {was.num_experts} experts in the checkpoint and "
                        f"{record.num_experts} here")
            if was.expert_shapes != record.expert_shapes:
                return (f"the experts of MoE layer {name!r} have shapes {was.expert_shapes} in the checkpoint and "
                        f"{record.expert_shapes} here")
    if saved == layout:
        return None
    if saved.num_experts != layout.num_experts:
        return f"it has {saved.num_experts} experts per MoE layer and this model {layout.num_experts}"
    if (saved.pp_size, saved.zero_stage) != (layout.pp_size, layout.zero_stage):
        return (f"resuming under another pipeline size or ZeRO stage is refused (the optimizer state is saved per "
                f"stage and sharded the way that ZeRO stage shards it): resume with pp {saved.pp_size} and "
                f"ZeRO-{saved.zero_stage}")
    if not manifest.layout_free_state:
        return ("it has no layout-free optimizer state (saved by DeepSpeed itself, by an older piper_ds, with "
                "piper.checkpoint.layout_free_state false or with stock DeepSpeed MoE layers), so it loads only "
                "under the saved layout")
    return None
