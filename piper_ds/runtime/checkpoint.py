"""Atomic checkpoints on top of DeepSpeed's own save_checkpoint / load_checkpoint.

DeepSpeed writes its files rank by rank and rank 0 writes ``latest`` when its own files are done, so a rank that
dies during a save leaves ``latest`` naming a torn checkpoint. :class:`AtomicCheckpoints` (a mixin of
PiperEngine and the pipeline engines) keeps DeepSpeed's file formats (one file per expert, ZeRO shards, model
states: stock DeepSpeed still reads them) and changes how a checkpoint becomes visible:

save (every rank calls it)
  1. every rank writes its DeepSpeed files into ``<save_dir>/.staging.<tag>/`` (DeepSpeed's save under that
     tag; a staging folder left by an earlier, killed save of the tag is removed first);
  2. every rank fsyncs and hashes the files it wrote and leaves its part of the manifest; barrier;
  3. rank 0 checks every part arrived and every file has its size, writes ``piper_manifest.json`` (with the
     layout), renames the folder to ``<tag>`` and rewrites ``latest`` through a temporary file and
     ``os.replace``; older checkpoints beyond ``keep_last`` are deleted; barrier.

So ``latest`` only ever names a complete checkpoint.

Experts are stored by global id: DeepSpeed's per-expert files are written under the id of the expert each slot
really holds (:mod:`piper_ds.runtime.expert_files`), the manifest records every PiperMoE layer's placement, and
``piper_state/`` holds the optimizer state by parameter name and global expert id
(:mod:`piper_ds.runtime.layout_free`; ``piper.checkpoint.layout_free_state``). Every file is in the manifest.

load
  Every file must match its manifest entry (the ranks share the checks). With a tag: that checkpoint or a
  :class:`CheckpointError` naming the bad file. Without: the one ``latest`` names, else the newest complete
  one, saying which and why. A folder without a manifest (written by DeepSpeed itself) loads unverified, with
  a warning. Any file DeepSpeed cannot read is a CheckpointError naming it.

  Under the saved layout DeepSpeed loads everything itself; the saved placements are then restored. Under
  another world, data-parallel or EP size DeepSpeed loads the module, the LR scheduler and the step counters,
  the placements are restored (EP size unchanged) or reset to contiguous, and the optimizer state comes from
  ``piper_state/``. Another pipeline size or ZeRO stage, other expert counts or shapes: a ValueError naming both
  (:func:`piper_ds.runtime.manifest.resume_refusal`).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Dict, List, Optional, Tuple

import torch
from deepspeed.moe.layer import MoE
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from piper_ds.runtime import layout_free
from piper_ds.runtime.expert_files import (expert_file_redirects, gather_records, has_only_piper_moe,
                                           restore_placements, rekey_expert)
from piper_ds.runtime.faults import inject
from piper_ds.runtime.manifest import (MANIFEST, STAGING_PREFIX, FileEntry, Layout, Manifest, MoELayerRecord,
                                       check_file, complete_checkpoints, describe_problem, fsync_dir, fsync_file,
                                       read_latest, read_manifest, resume_refusal, sha256_of, write_atomic)
from piper_ds.runtime.messages import say

_PARTS = ".parts"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or loaded; the message names the folder and the file."""


class RecordingCheckpointEngine(CheckpointEngine):
    """Wraps DeepSpeed's checkpoint engine: records the files this rank writes into the staging folder (and
    reports each to :func:`piper_ds.runtime.faults.inject`), writes expert files under their true global id
    (``redirects``, see :func:`piper_ds.runtime.expert_files.expert_file_redirects`), and names the file when a
    load fails."""

    def __init__(self, inner: CheckpointEngine):
        super().__init__()
        self.inner, self.name = inner, inner.name
        self.written: List[str] = []
        self._staging: Optional[Tuple[str, str]] = None  # (staging folder, published tag) during a save
        self._redirects: Dict[str, Tuple[str, int, int]] = {}

    def begin(self, staging: str, tag: str, redirects: Optional[Dict[str, Tuple[str, int, int]]] = None) -> None:
        """Starts recording files written under ``staging`` (to be published as ``tag``); a path of
        ``redirects`` is written to its target with the expert id in its keys replaced."""
        self._staging, self.written, self._redirects = (staging, tag), [], dict(redirects or {})

    def end(self) -> List[str]:
        """Stops recording; the paths (relative to the staging folder) written since :meth:`begin`."""
        self._staging, self._redirects = None, {}
        return list(self.written)

    def save(self, state_dict, path: str):
        if path in self._redirects:
            path, deepspeed_id, true_id = self._redirects[path]
            state_dict = rekey_expert(state_dict, deepspeed_id, true_id)
        result = self.inner.save(state_dict, path)
        if self._staging is not None:
            folder, tag = self._staging
            rel = os.path.relpath(path, folder)
            if not rel.startswith(os.pardir):
                self.written.append(rel)
                inject(f"save:{tag}/{rel}")
        return result

    def load(self, path: str, map_location=None):
        try:
            return self.inner.load(path, map_location=map_location)
        except Exception as err:  # PyTorch's messages ("failed finding central directory") omit the file
            raise CheckpointError(f"cannot read checkpoint file {path}: {type(err).__name__}: {err}") from err

    # the rest is DeepSpeed's engine unchanged
    def create(self, info):
        return self.inner.create(info)

    def makedirs(self, path, exist_ok=False):
        return self.inner.makedirs(path, exist_ok=exist_ok)

    def commit(self, info):
        return self.inner.commit(info)

    def is_data_parallel_writer(self, dp_rank):
        return self.inner.is_data_parallel_writer(dp_rank)

    def is_decoupled(self):
        return self.inner.is_decoupled()

    def set_commit_info(self, info):
        return self.inner.set_commit_info(info)

    def get_commit_info(self):
        return self.inner.get_commit_info()

    def cleanup(self):
        return self.inner.cleanup()

    def preserves_storage_sharing(self):
        return self.inner.preserves_storage_sharing()


def _check_tag(tag: str) -> None:
    if not tag or tag != os.path.basename(tag) or tag.startswith(".") or tag == "latest":
        raise ValueError(f"checkpoint tag {tag!r} must be a plain folder name (no '/', not starting with '.', "
                         "not 'latest')")


class AtomicCheckpoints:
    """Mixin for DeepSpeed engines (before the DeepSpeed class in the bases): atomic save, verified load with
    fallback, experts by global id, resume under another layout, keep-last-N. Call
    :meth:`_setup_atomic_checkpoints` after DeepSpeed's __init__."""

    def _setup_atomic_checkpoints(self, cfg) -> None:
        """``cfg``: the ``piper.checkpoint`` block (:class:`piper_ds.config.CheckpointConfig`)."""
        if self.checkpoint_engine.is_decoupled():
            raise ValueError(f"DeepSpeed's checkpoint engine {self.checkpoint_engine.name!r} writes in the "
                             "background; piper_ds's atomic checkpoints need a synchronous one (drop the "
                             "decoupled/async checkpoint writer from the ds_config)")
        if self.use_node_local_storage():
            raise ValueError('"checkpoint": {"use_node_local_storage": true} is not supported: piper_ds publishes a '
                             "checkpoint from rank 0, which needs one folder shared by all ranks")
        self.piper_checkpoint = cfg
        self.checkpoint_engine = RecordingCheckpointEngine(self.checkpoint_engine)

    def _pipeline_stages(self) -> int:
        """Pipeline stages of this engine (the pipeline engines override it)."""
        return 1

    def checkpoint_layout(self) -> Layout:
        """This run's layout (a collective: the expert settings are the maxima over all ranks, since pipeline
        stages hold different layers)."""
        import deepspeed.comm as dist
        moe = [m for m in self.module.modules() if isinstance(m, MoE)]
        t = torch.tensor([max((m.ep_size for m in moe), default=1), max((m.num_experts for m in moe), default=0)],
                         dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return Layout(world_size=dist.get_world_size(), dp_size=self.seq_dp_world_size, ep_size=int(t[0]),
                      pp_size=self._pipeline_stages(), zero_stage=int(self.zero_optimization_stage()),
                      num_experts=int(t[1]))

    # ------------------------------------------------------------------------------------------------ save
    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True,
                        exclude_frozen_parameters=False):
        """DeepSpeed's save_checkpoint (same arguments; every rank calls it), published atomically: ``latest``
        and ``<save_dir>/<tag>`` appear only once every rank's files are written, fsynced and in the manifest.
        Returns True."""
        import deepspeed.comm as dist
        if not save_dir:
            raise ValueError(f"save_dir must be a non-empty string, got {save_dir!r}")
        tag = f"global_step{self.global_steps}" if tag is None else str(tag)
        _check_tag(tag)
        staging = os.path.join(save_dir, STAGING_PREFIX + tag)
        layout, records = self.checkpoint_layout(), gather_records(self)
        layout_free_state = self._layout_free_state()
        if self.global_rank == 0:
            os.makedirs(save_dir, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)  # left by a save of this tag that was killed half-way
        # DeepSpeed's save opens with a barrier, so no rank writes into `staging` before it was cleared
        recorder = self.checkpoint_engine
        recorder.begin(staging, tag, expert_file_redirects(self, save_dir, STAGING_PREFIX + tag))
        try:
            super().save_checkpoint(save_dir, tag=STAGING_PREFIX + tag, client_state=client_state or {},
                                    save_latest=False, exclude_frozen_parameters=exclude_frozen_parameters)
            if layout_free_state:
                layout_free.save_state(self, staging)
        finally:
            written = recorder.end()
        self._write_part(staging, written)
        dist.barrier()
        if self.global_rank == 0:
            self._publish(save_dir, tag, staging, save_latest,
                          dict(layout=layout, moe_layers=records, layout_free_state=layout_free_state))
        dist.barrier()  # nobody goes on (or exits) before the checkpoint is visible
        return True

    def _layout_free_state(self) -> bool:
        """Whether this save writes piper_state/: asked for, and every MoE layer of the run a PiperMoE (a
        collective: pipeline stages hold different layers)."""
        import deepspeed.comm as dist
        ok = torch.tensor([int(self.piper_checkpoint.layout_free_state and has_only_piper_moe(self))],
                          dtype=torch.int64, device=self.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok)

    def _write_part(self, staging: str, written: List[str]) -> None:
        """This rank's part of the manifest: its files, fsynced, with sizes and SHA-256."""
        entries = {}
        for rel in sorted(set(written)):
            path = os.path.join(staging, rel)
            fsync_file(path)
            size, digest = sha256_of(path)
            entries[rel] = {"size": size, "sha256": digest}
        parts = os.path.join(staging, _PARTS)
        os.makedirs(parts, exist_ok=True)
        write_atomic(os.path.join(parts, f"rank{self.global_rank:06d}.json"), json.dumps(entries))

    def _publish(self, save_dir: str, tag: str, staging: str, save_latest: bool, described: dict) -> None:
        """Rank 0: merge the parts into the manifest (with ``described``: the layout, the MoE layer records and
        whether the layout-free state was written), rename the staging folder to ``tag``, point ``latest``."""
        import deepspeed.comm as dist
        parts = os.path.join(staging, _PARTS)
        names = sorted(os.listdir(parts))
        if len(names) != dist.get_world_size():
            raise CheckpointError(f"{staging}: {len(names)} of {dist.get_world_size()} ranks reported their files")
        files: Dict[str, FileEntry] = {}
        for name in names:
            with open(os.path.join(parts, name)) as f:
                files.update({k: FileEntry(**v) for k, v in json.load(f).items()})
        shutil.rmtree(parts)
        for folder, _, found in os.walk(staging):  # files DeepSpeed wrote without its checkpoint engine
            for name in found:
                rel = os.path.relpath(os.path.join(folder, name), staging)
                if rel not in files:
                    fsync_file(os.path.join(staging, rel))
                    files[rel] = FileEntry(**dict(zip(("size", "sha256"), sha256_of(os.path.join(staging, rel)))))
        for rel, entry in sorted(files.items()):
            problem, size = check_file(staging, rel, entry, "size")
            if problem:
                raise CheckpointError(f"{staging}: {describe_problem(rel, problem, size, entry)} after the save")
        manifest = Manifest(tag=tag, step=int(self.global_steps), published_at=time.time(), files=files, **described)
        write_atomic(os.path.join(staging, MANIFEST), manifest.model_dump_json(indent=1))
        final, replaced = os.path.join(save_dir, tag), os.path.join(save_dir, f".replaced.{tag}")
        if os.path.exists(final):  # saving a tag again: move the old one aside, then swap
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
        os.rename(staging, final)
        fsync_dir(save_dir)
        shutil.rmtree(replaced, ignore_errors=True)
        if save_latest:
            write_atomic(os.path.join(save_dir, "latest"), tag)
        say(f"saved checkpoint {final} (step {manifest.step}, {len(files)} files)")
        self._prune(save_dir)

    def _prune(self, save_dir: str) -> None:
        """Rank 0: deletes complete checkpoints beyond the newest ``keep_last`` (never the one ``latest`` names)."""
        keep = self.piper_checkpoint.keep_last
        if keep is None:
            return
        latest = read_latest(save_dir)
        for manifest in complete_checkpoints(save_dir)[keep:]:
            if manifest.tag != latest:
                shutil.rmtree(os.path.join(save_dir, manifest.tag))
                say(f"removed checkpoint {os.path.join(save_dir, manifest.tag)} (piper.checkpoint.keep_last = {keep})")

    # ------------------------------------------------------------------------------------------------ load
    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        """DeepSpeed's load_checkpoint (same arguments and return value), verified first.

        ``tag`` None: the checkpoint ``latest`` names, or when it is damaged or missing, the newest complete
        one (saying which and why); (None, None) when the folder holds none. A ``tag``: that checkpoint, or a
        :class:`CheckpointError` naming the damaged file. Under the saved layout DeepSpeed loads everything; under
        another world, data-parallel or EP size the optimizer state comes from the layout-free state (see the
        module docstring). A checkpoint this run cannot resume from is refused with a ValueError naming both
        layouts and the reason. Prints the folder and step loaded (rank 0)."""
        layout, records = self.checkpoint_layout(), gather_records(self)
        chosen = self._choose(load_dir, tag, layout, records)
        if chosen is None:
            return None, None
        folder = os.path.join(load_dir, chosen)
        manifest = read_manifest(folder)
        elastic = manifest is not None and manifest.layout != layout
        path, client_state = super().load_checkpoint(
            load_dir, tag=chosen, load_module_strict=load_module_strict,
            load_optimizer_states=load_optimizer_states and not elastic,
            load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
            custom_load_fn=custom_load_fn)
        if path is None:
            return path, client_state
        restore_placements(self, manifest.moe_layers if manifest is not None else {}, load_dir, chosen)
        if elastic and load_optimizer_states and not load_module_only:
            layout_free.load_state(self, folder)
        how = f", saved under [{manifest.layout.describe()}], optimizer state from {layout_free.STATE_DIR}/" \
            if elastic else ""
        say(f"loaded checkpoint {folder} (step {self.global_steps}{how})")
        return path, client_state

    def _choose(self, load_dir: str, tag: Optional[str], layout: Layout,
                records: Dict[str, MoELayerRecord]) -> Optional[str]:
        """The tag to load (see :meth:`load_checkpoint`); the same on every rank."""
        if tag is not None:
            folder = os.path.join(load_dir, str(tag))
            manifest = read_manifest(folder) if os.path.isdir(folder) else None
            if manifest is None:
                if not os.path.isdir(folder):
                    raise CheckpointError(f"no checkpoint {tag!r} in {load_dir}")
                say(f"warning: {folder} has no {MANIFEST} (saved by DeepSpeed itself?): loading it unverified, "
                    "its layout unchecked")
                return str(tag)
            problem = self._problem(folder, manifest, layout, records)
            if problem:
                raise CheckpointError(f"checkpoint {folder} is damaged: {problem}")
            return str(tag)
        latest = read_latest(load_dir)
        rejected: List[str] = []
        candidates = complete_checkpoints(load_dir)
        if latest is not None:
            folder = os.path.join(load_dir, latest)
            try:
                manifest = read_manifest(folder) if os.path.isdir(folder) else None
            except ValueError as err:
                manifest, rejected = None, [str(err)]
            if manifest is None and os.path.isdir(folder) and not rejected:
                say(f"warning: {folder} has no {MANIFEST} (saved by DeepSpeed itself?): loading it unverified, "
                    "its layout unchecked")
                return latest
            if manifest is None and not rejected:
                rejected.append(f"{os.path.join(load_dir, 'latest')} names {latest!r}, which does not exist")
            candidates = sorted(candidates, key=lambda m: m.tag != latest)  # latest's first, then newest first
        for manifest in candidates:
            folder = os.path.join(load_dir, manifest.tag)
            problem = self._problem(folder, manifest, layout, records)
            if problem is None:
                if rejected:
                    say(f"{'; '.join(rejected)}: loading {folder} (step {manifest.step}) instead")
                return manifest.tag
            rejected.append(f"checkpoint {folder} is damaged: {problem}")
        if rejected:
            raise CheckpointError(f"no complete checkpoint in {load_dir}: {'; '.join(rejected)}")
        return None

    def _problem(self, folder: str, manifest: Manifest, layout: Layout,
                 records: Dict[str, MoELayerRecord]) -> Optional[str]:
        """None when checkpoint ``folder`` is whole; else its first problem, naming the file (a collective: file
        i is checked by rank i mod world size). ValueError when this run cannot resume from it (its layout or
        model does not fit, :func:`piper_ds.runtime.manifest.resume_refusal`)."""
        import deepspeed.comm as dist
        refusal = resume_refusal(manifest, layout, records)
        if refusal is not None:
            raise ValueError(f"checkpoint {folder} was saved under layout [{manifest.layout.describe()}], this run "
                             f"has [{layout.describe()}]: {refusal}")
        names = sorted(manifest.files)
        found = torch.zeros(2, max(len(names), 1), dtype=torch.int64, device=self.device)  # (problem, size + 1)
        world, rank = dist.get_world_size(), dist.get_rank()
        for i in range(rank, len(names), world):
            problem, size = check_file(folder, names[i], manifest.files[names[i]], self.piper_checkpoint.verify)
            found[0, i], found[1, i] = problem, size + 1
        dist.all_reduce(found, op=dist.ReduceOp.MAX)  # every file was checked by one rank; the others add 0
        for i, name in enumerate(names):
            if found[0, i]:
                return describe_problem(name, int(found[0, i]), int(found[1, i]) - 1, manifest.files[name])
        return None
