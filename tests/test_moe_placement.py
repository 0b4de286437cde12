"""ExpertPlacement: explicit slots, swaps that keep the slots, in-place assignment (the dispatcher holds the
object), and bad maps refused naming the values; the rules for resuming a checkpoint under another layout
(piper_ds.runtime.manifest.resume_refusal)."""
import pytest
import torch

from piper_ds.moe.dispatcher import make_dispatcher
from piper_ds.moe.placement import ExpertPlacement
from piper_ds.runtime.manifest import Layout, Manifest, MoELayerRecord, resume_refusal


def test_a_swap_trades_rank_and_slot():
    p = ExpertPlacement(6, 3)
    assert p.is_contiguous() and p.local_experts(1) == [2, 3]
    q = p.swapped([(0, 3), (5, 2)])
    assert q.local_experts(0) == [3, 1] and q.local_experts(1) == [5, 0] and q.local_experts(2) == [4, 2]
    assert q.as_lists() == ([1, 0, 2, 0, 2, 1], [1, 1, 1, 0, 0, 0]) and not q.is_contiguous()
    assert p.is_contiguous()  # swapped() returns a new placement
    back = ExpertPlacement(6, 3, *q.as_lists())
    assert back.as_lists() == q.as_lists()


def test_assign_rewrites_the_object_the_dispatcher_reads():
    p = ExpertPlacement(4, 1)
    dispatcher = make_dispatcher(p, "reference")
    p.assign(ExpertPlacement(4, 1))
    assert dispatcher.placement is p
    with pytest.raises(ValueError, match="a placement of 4 experts over 2 ranks cannot replace one of 4 experts "
                                         "over 1 ranks"):
        p.assign(ExpertPlacement(4, 2))
    wide = ExpertPlacement(4, 2)
    wide.assign(wide.swapped([(0, 3)]))
    assert torch.equal(wide.rank_of, torch.tensor([1, 0, 1, 0])) and torch.equal(wide.slot_of, torch.tensor([1, 1, 0, 0]))


def test_bad_maps_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"exactly 2 experts, got \[0, 0, 0, 1\]"):
        ExpertPlacement(4, 2, [0, 0, 0, 1])
    with pytest.raises(ValueError, match=r"slot_of \[0, 0, 0, 1\] with rank_of \[0, 0, 1, 1\] must give every "
                                         r"expert its own slot"):
        ExpertPlacement(4, 2, [0, 0, 1, 1], [0, 0, 0, 1])
    p = ExpertPlacement(4, 2)
    with pytest.raises(ValueError, match="expert id 4 out of range"):
        p.swapped([(0, 4)])
    with pytest.raises(ValueError, match="expert 1 appears in more than one swap"):
        p.swapped([(0, 2), (1, 3), (1, 2)])


def _manifest(layout, records, layout_free=True, fmt=2):
    return Manifest(format=fmt, tag="t", step=1, published_at=0.0, layout=layout, moe_layers=records,
                    layout_free_state=layout_free, files={})


def _layout(**kw):
    base = dict(world_size=4, dp_size=4, ep_size=2, pp_size=1, zero_stage=2, num_experts=4)
    return Layout(**{**base, **kw})


def _record(num_experts=4, ep=2, shapes=None):
    placement = ExpertPlacement(num_experts, ep)
    return MoELayerRecord(num_experts=num_experts, ep_size=ep, rank_of=placement.as_lists()[0],
                          slot_of=placement.as_lists()[1], expert_shapes=shapes or {"w_up": [8, 8], "w_down": [4, 8]})


def test_resume_rules():
    saved = _manifest(_layout(), {"m": _record()})
    assert resume_refusal(saved, _layout(), {"m": _record()}) is None
    assert resume_refusal(saved, _layout(ep_size=4, world_size=2, dp_size=2), {"m": _record(ep=4)}) is None
    assert "no layout-free optimizer state" in resume_refusal(_manifest(_layout(), {"m": _record()}, False),
                                                              _layout(ep_size=1), {"m": _record(ep=1)})
    assert "pipeline size or ZeRO stage" in resume_refusal(saved, _layout(pp_size=2), {"m": _record()})
    assert "pipeline size or ZeRO stage" in resume_refusal(saved, _layout(zero_stage=1), {"m": _record()})
    assert resume_refusal(saved, _layout(num_experts=8), {"m": _record(8)}) == \
        "MoE layer 'm' has 4 experts in the checkpoint and 8 here"
    assert resume_refusal(saved, _layout(), {"n": _record()}) == "its MoE layers ['m'] are not this model's ['n']"
    assert "have shapes" in resume_refusal(saved, _layout(), {"m": _record(shapes={"w_up": [8, 16]})})
    old = _manifest(_layout(), {}, False, fmt=1)  # written before placements were recorded
    assert resume_refusal(old, _layout(), {"m": _record()}) is None
    assert "no layout-free optimizer state" in resume_refusal(old, _layout(ep_size=1), {"m": _record(ep=1)})
