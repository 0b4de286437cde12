"""Checkpoints by global expert id resume under another layout (gloo, fp32 AdamW with a warm-up schedule, the
same global batch of 4 sequences at every world size).

On 4 ranks: an ep = 2 ZeRO-2 run saves at step 2, swaps experts after step 3 and saves again at step 4; an
ep = 4 ZeRO-2 run and an ep = 2 ZeRO-0 run save at step 2; each goes on uninterrupted. Resumed for 10 steps:

* the migrated ep = 2 checkpoint at ep = 4 (placement reset to contiguous, optimizer state from piper_state/),
* the same checkpoint under its own layout (DeepSpeed's own load, the saved placement restored): bit for bit,
* the ep = 4 checkpoint at ep = 2;

on 2 ranks (another world and data-parallel size):

* the ep = 2 checkpoint at ep = 1 (ZeRO-2), the migrated one at ep = 2 (its placement restored), the ZeRO-0 one
  at ep = 1;

each continues the uninterrupted run's losses to 1e-6 relative (the gradient all-reduce and ZeRO's partitions
sum in another order under another layout, so the last bits may differ). Stock DeepSpeed loading the migrated
checkpoint at ep = 2 gets every expert's saved weights (contiguous placement). A ZeRO stage change and other
expert shapes are refused with a ValueError naming both, and so are dense parameters the layout-free state does
not hold (before any is written); the manifest lists the piper_state/ files."""
import json
import os

import pytest
import torch

from piper_ds.testing import run_distributed

RESUMED = 10
MOVES = {0: [(0, 2), (1, 3)], 1: [(1, 2)]}  # after step 3 of the ep = 2 run


def _by_expert(eng):
    """{(layer, param, global id): module value} of this rank's experts."""
    from expert_runs import training_state
    return {k: v[0] for k, v in training_state(eng).items() if "#" in k}


def _reference(rank, world, save_dir):
    from expert_runs import engine, train
    from piper_ds.balance.mover import migrate_experts
    out = {}
    eng, model = engine(world, 2, 2)
    losses = train(eng, model, 0, 2, rank, world)
    eng.save_checkpoint(save_dir, tag="ep2")
    losses += train(eng, model, 2, 4, rank, world, at_step=lambda s: s == 3 and migrate_experts(eng, MOVES))
    eng.save_checkpoint(save_dir, tag="ep2_moved")
    out["moved_placements"] = [layer.placement.as_lists() for layer in eng.piper_moe_layers]
    out["moved_experts"] = _by_expert(eng)
    out["ep2"] = losses + train(eng, model, 4, 4 + RESUMED, rank, world)
    eng.destroy()
    for name, ep, stage in (("ep4", 4, 2), ("z0", 2, 0)):
        eng, model = engine(world, ep, stage)
        losses = train(eng, model, 0, 2, rank, world)
        eng.save_checkpoint(save_dir, tag=name)
        out[name] = losses + train(eng, model, 2, 2 + RESUMED, rank, world)
        eng.destroy()
    return out


def _resume(rank, world, save_dir, tag, ep, stage, start):
    from expert_runs import engine, train
    eng, model = engine(world, ep, stage, seed=99)  # other weights: everything must come from the checkpoint
    path, _ = eng.load_checkpoint(save_dir, tag=tag)
    assert path is not None and eng.global_steps == start
    placements = [layer.placement.as_lists() for layer in eng.piper_moe_layers]
    losses = train(eng, model, start, start + RESUMED, rank, world)
    eng.destroy()
    return dict(losses=losses, placements=placements)


def _stock_load(rank, world, save_dir):
    """DeepSpeed's own load_checkpoint (module only) of the migrated checkpoint at ep = 2."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from expert_runs import engine
    eng, _ = engine(world, 2, 2, seed=99)
    DeepSpeedEngine.load_checkpoint(eng, save_dir, tag="ep2_moved", load_module_only=True,
                                    load_optimizer_states=False)
    experts = _by_expert(eng)
    contiguous = all(layer.placement.is_contiguous() for layer in eng.piper_moe_layers)
    eng.destroy()
    return experts, contiguous


def _world4(rank, world, save_dir):
    out = {"ref": _reference(rank, world, save_dir)}
    out["moved@ep4"] = _resume(rank, world, save_dir, "ep2_moved", 4, 2, 4)
    out["moved@ep2"] = _resume(rank, world, save_dir, "ep2_moved", 2, 2, 4)
    out["ep4@ep2"] = _resume(rank, world, save_dir, "ep4", 2, 2, 2)
    out["stock"] = _stock_load(rank, world, save_dir)
    return out


def _refused(rank, world, save_dir, tag, stage, model=None, strict=True):
    from expert_runs import engine
    eng, _ = engine(world, 2, stage, model=model)
    try:
        eng.load_checkpoint(save_dir, tag=tag, load_module_strict=strict)
    except ValueError as err:
        return str(err)
    finally:
        eng.destroy()
    return None


def _world2(rank, world, save_dir):
    return {"ep2@ep1": _resume(rank, world, save_dir, "ep2", 1, 2, 2),
            "moved@ep2": _resume(rank, world, save_dir, "ep2_moved", 2, 2, 4),
            "z0@ep1": _resume(rank, world, save_dir, "z0", 1, 0, 2),
            "zero_stage": _refused(rank, world, save_dir, "ep2", 1),
            "shapes": _refused(rank, world, save_dir, "ep2", 2, model={"d_ffn_expert": 48}),
            # a tied LM head: DeepSpeed's non-strict module load passes, the layout-free state does not
            "dense": _refused(rank, world, save_dir, "ep2", 2, model={"tie_embeddings": True}, strict=False)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    save_dir = str(tmp_path_factory.mktemp("ckpt"))
    return save_dir, run_distributed(_world4, 4, save_dir, timeout=500)


@pytest.fixture(scope="module")
def world2(saved):
    return run_distributed(_world2, 2, saved[0], timeout=400)


def _close(got, want):
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-6, atol=0)


def test_resume_at_another_ep_size_continues_the_run(saved):
    _, runs = saved
    ref = runs[0]["ref"]
    for rank, res in enumerate(runs):
        _close(res["moved@ep4"]["losses"], ref["ep2"][4:4 + RESUMED])
        _close(res["ep4@ep2"]["losses"], ref["ep4"][2:2 + RESUMED])
        contiguous = [(list(range(4)), [0] * 4)]
        assert res["moved@ep4"]["placements"] == contiguous * 2  # another EP size: contiguous again


def test_resume_under_the_saved_layout_is_bit_exact_with_the_saved_placement(saved):
    _, runs = saved
    for rank, res in enumerate(runs):
        assert res["moved@ep2"]["losses"] == res["ref"]["ep2"][4:4 + RESUMED], f"rank {rank}"
        assert res["moved@ep2"]["placements"] == res["ref"]["moved_placements"]
        assert res["ref"]["moved_placements"][0] == ([1, 1, 0, 0], [0, 1, 0, 1])  # the experts had moved


def test_resume_at_another_world_size(saved, world2):
    ref = saved[1][0]["ref"]
    for rank, res in enumerate(world2):
        _close(res["ep2@ep1"]["losses"], ref["ep2"][2:2 + RESUMED])
        _close(res["moved@ep2"]["losses"], ref["ep2"][4:4 + RESUMED])
        _close(res["z0@ep1"]["losses"], ref["z0"][2:2 + RESUMED])
        assert res["moved@ep2"]["placements"] == ref["moved_placements"]  # same EP size: placement restored


def test_stock_deepspeed_reads_experts_by_global_id(saved):
    _, runs = saved
    saved_experts, loaded = {}, {}
    for res in runs:
        saved_experts.update(res["ref"]["moved_experts"])
        experts, contiguous = res["stock"]
        loaded.update(experts)
        assert contiguous
    assert set(saved_experts) == set(loaded) and len(loaded) == 2 * 2 * 4
    assert all(torch.equal(loaded[k], saved_experts[k]) for k in loaded)


def test_other_zero_stage_expert_shapes_or_dense_parameters_are_refused(saved, world2):
    save_dir = saved[0]
    folder = os.path.join(save_dir, "ep2")
    for res in world2:
        assert res["zero_stage"] == (
            f"checkpoint {folder} was saved under layout [world 4, dp 4, ep 2, pp 1, ZeRO-2, 4 experts], this run has "
            "[world 2, dp 2, ep 2, pp 1, ZeRO-1, 4 experts]: resuming under another pipeline size or ZeRO stage is "
            "refused (the optimizer state is saved per stage and sharded the way that ZeRO stage shards it): resume "
            "with pp 1 and ZeRO-2")
        assert res["dense"].startswith(f"checkpoint {folder}: its parameters differ from this model's: missing from "
                                       "the checkpoint [] (0 in all), not in this model ['head.")
        assert "the experts of MoE layer 'blocks.1.ffn.moe' have shapes {'w_up': [64, 64], 'w_down': [32, 64]} in " \
               "the checkpoint and {'w_up': [64, 96], 'w_down': [48, 64]} here" in res["shapes"]


def test_manifest_covers_the_layout_free_state(saved):
    with open(os.path.join(saved[0], "ep2_moved", "piper_manifest.json")) as f:
        manifest = json.load(f)
    files = set(manifest["files"])
    state = {f for f in files if f.startswith("piper_state/")}
    assert state == {"piper_state/dense_mp_rank_00.pt"} | {f"piper_state/expert_blocks.{b}.ffn.moe_{e}.pt"
                                                           for b in (1, 2) for e in range(4)}
    assert {f"layer_{i}_expert_{e}_mp_rank_00_model_states.pt" for i in (0, 1) for e in range(4)} <= files
    assert manifest["layout_free_state"] and manifest["moe_layers"]["blocks.1.ffn.moe"]["rank_of"] == [1, 1, 0, 0]
