"""piper_ds.runtime.optim_state on 2 gloo ranks, ep = 1 (so the expert state is partitioned over both ranks too):
after 3 AdamW steps under ZeRO-0 (fp32; bf16, which DeepSpeed wraps in FP16_UnfusedOptimizer), ZeRO-1 (fp32;
bf16 with fp32 gradients, DeepSpeed's BF16_Optimizer) and ZeRO-2 (fp32, bf16), GET of every parameter equals
DeepSpeed's own reconstruction (``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` for the
partitioned optimizers, the torch optimizer's state of the fp32 copy for ZeRO-0) bit for bit, the master weights equal the module
parameters (cast to bf16 where the module is bf16), a row slice equals those rows of the whole, and the fp32
runs' moments equal the unsharded ZeRO-0 run's (to 1e-5: ZeRO reduces gradients in another order). SET then GET
round-trips; SET into a fresh engine's optimizer, then one more step in both engines, gives the same parameters
and moments bit for bit. DeepSpeed's FP16_Optimizer (flat fp32 copies, unpartitioned) is checked on its own, and
ZeRO-3 and optimizer offload are refused."""
import pytest
import torch

from piper_ds.testing import run_distributed

WORLD, EP, STEPS = 2, 1, 3
CASES = [(0, "fp32"), (0, "bf16"), (1, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16")]  # (ZeRO stage, dtype)
OPTIONS = {"fp32": {}, "bf16": {"bf16": True}}
FRESH = [(0, "fp32"), (0, "bf16"), (1, "bf16"), (2, "fp32")]  # SET into a fresh engine
OPTIONS_OF = {(1, "bf16"): {"bf16": True, "fp32_grads": True}}  # DeepSpeed's BF16_Optimizer


def _options(case):
    return OPTIONS_OF.get(case, OPTIONS[case[1]])


def _moment_from_fragments(opt, p, key):
    """Moment ``key`` of p rebuilt from DeepSpeed's fragment addresses (``p._hp_mapping``). DeepSpeed's own
    ``safe_get_full_optimizer_state`` cannot serve here: ZeRO-1/2 link the moments to the fragments after the
    first optimizer group's first step, when the other groups have none yet, and never again."""
    import deepspeed.comm as dist
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    full = torch.zeros(p.numel(), dtype=torch.float32)
    mapping = p._hp_mapping
    if mapping is not None:
        flats = opt.fp32_groups_flat_partition if isinstance(opt, BF16_Optimizer) else \
            opt.single_partition_of_fp32_groups
        moment = opt.optimizer.state[flats[mapping.param_group_index]][key]
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        full[lp.start:lp.start + lp.numel] = moment[hp.start:hp.start + hp.numel]
    dist.all_reduce(full, group=p._dp_group)
    return full.reshape(p.shape)


def _oracle(eng, p, keys):
    """DeepSpeed's own view of p's master, moments and step (a collective for the partitioned optimizers)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param
    from piper_ds.runtime.optim_state import PartitionedState, optimizer_state
    opt = eng.optimizer
    if isinstance(optimizer_state(opt), PartitionedState):
        return safe_get_full_fp32_param(p), {k: _moment_from_fragments(opt, p, k) for k in keys}
    if isinstance(opt, FP16_UnfusedOptimizer):
        master = next(hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps) if lp is p)
        return master, {k: opt.optimizer.state[master][k] for k in keys}
    return p.detach(), {k: opt.state[p][k] for k in keys}


def _same(a, b):
    return a.shape == b.shape and torch.equal(a, b)


def _check_case(eng, model, rank):
    """Problems found (strings) and the GET of every parameter (name -> (master, moments, step))."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from piper_ds.runtime.optim_state import SliceState, optimizer_state, step_value
    access, problems, got = optimizer_state(eng.optimizer), [], {}
    for name, p in eng.module.named_parameters():
        s = access.get(p)
        got[name] = (s.master, s.moments, step_value(s.step))
        # FP16_UnfusedOptimizer takes one step with zero gradients when it is built
        want = STEPS + isinstance(eng.optimizer, FP16_UnfusedOptimizer)
        if sorted(s.moments) != ["exp_avg", "exp_avg_sq"] or step_value(s.step) != want:
            problems.append(f"{name}: moments {sorted(s.moments)}, step {s.step}")
        master, moments = _oracle(eng, p, sorted(s.moments))
        if not _same(s.master, master.float()) or not all(_same(s.moments[k], moments[k]) for k in moments):
            problems.append(f"{name}: GET differs from DeepSpeed's own reconstruction")
        if not torch.equal(s.master.to(p.dtype), p.detach()):
            problems.append(f"{name}: master weights are not the module parameter")
        if p.dim() >= 1 and p.shape[0] >= 3:
            part = access.get(p, rows=(1, 3))
            if not _same(part.master, s.master[1:3]) or \
                    not all(_same(part.moments[k], s.moments[k][1:3]) for k in s.moments):
                problems.append(f"{name}: rows 1:3 differ from the whole's")
        # SET then GET, on a row slice where there is one, else the whole parameter
        rows = (1, 3) if p.dim() >= 1 and p.shape[0] >= 3 else None
        base = access.get(p, rows)
        new = SliceState(base.master * 0.5 + 0.25, {k: v * 2 + 1 for k, v in base.moments.items()}, base.step)
        access.set(p, new, rows)
        back = access.get(p, rows)
        if not _same(back.master, new.master) or not all(_same(back.moments[k], new.moments[k]) for k in new.moments):
            problems.append(f"{name}: SET then GET does not round-trip")
        seen, _ = _oracle(eng, p, [])
        part = seen if rows is None else seen[rows[0]:rows[1]]
        if not _same(part.float(), new.master) or not torch.equal(p.detach()[rows[0]:rows[1]] if rows else p.detach(),
                                                                   new.master.to(p.dtype)):
            problems.append(f"{name}: DeepSpeed or the module does not see the SET master weights")
        access.set(p, base, rows)
    return problems, got


def _fresh_copy(eng, world, rank, case):
    """A differently seeded engine whose empty optimizer is filled by SET from ``eng``; one more step in both.
    Returns the parameters and moments of both afterwards."""
    from expert_runs import engine, train, training_state
    from piper_ds.runtime.optim_state import optimizer_state
    fresh, fresh_model = engine(world, EP, case[0], seed=99, **_options(case))
    src, dst = optimizer_state(eng.optimizer), optimizer_state(fresh.optimizer)
    for (name, p), (name2, q) in zip(eng.module.named_parameters(), fresh.module.named_parameters()):
        assert name == name2
        dst.set(q, src.get(p))
        dst.param_group(q).update({k: v for k, v in src.param_group(p).items() if k != "params"})
    fresh.lr_scheduler.load_state_dict(eng.lr_scheduler.state_dict())
    train(eng, eng.module, STEPS, STEPS + 1, rank, world)
    train(fresh, fresh_model, STEPS, STEPS + 1, rank, world)
    a, b = training_state(eng), training_state(fresh)
    fresh.destroy()
    return a, b


def _worker(rank, world):
    from expert_runs import engine, train
    out = {}
    for case in CASES:
        eng, model = engine(world, EP, case[0], **_options(case))
        train(eng, model, 0, STEPS, rank, world)
        problems, got = _check_case(eng, model, rank)
        out[case] = dict(problems=problems, got=got, optimizer=type(eng.optimizer).__name__)
        if case in FRESH:
            out[case]["fresh"] = _fresh_copy(eng, world, rank, case)
        eng.destroy()
    return out


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_worker, WORLD, timeout=400)


def test_each_stage_uses_the_expected_optimizer(runs):
    names = {case: runs[0][case]["optimizer"] for case in CASES}
    assert names == {(0, "fp32"): "AdamW", (0, "bf16"): "FP16_UnfusedOptimizer", (1, "fp32"): "FusedStepZeroOptimizer",
                     (1, "bf16"): "BF16_Optimizer", (2, "fp32"): "FusedStepZeroOptimizer",
                     (2, "bf16"): "FusedStepZeroOptimizer"}  # the fused step: piper.optimizer.fused_step auto


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"zero{c[0]}-{c[1]}")
def test_get_and_set_agree_with_deepspeed(runs, case):
    for rank, res in enumerate(runs):
        assert res[case]["problems"] == [], f"rank {rank}: {res[case]['problems'][:5]}"
        assert len(res[case]["got"]) > 20


@pytest.mark.parametrize("case", [(1, "fp32"), (2, "fp32")], ids=["zero1", "zero2"])
def test_sharded_moments_match_the_unsharded_run(runs, case):
    for rank, res in enumerate(runs):
        ref, got = res[(0, "fp32")]["got"], res[case]["got"]
        assert set(ref) == set(got)
        for name, (master, moments, step) in got.items():
            torch.testing.assert_close(master, ref[name][0], rtol=1e-5, atol=1e-7, msg=f"rank {rank} {name}")
            for key, value in moments.items():
                torch.testing.assert_close(value, ref[name][1][key], rtol=1e-5, atol=1e-9,
                                           msg=f"rank {rank} {name} {key}")


@pytest.mark.parametrize("case", FRESH, ids=lambda c: f"zero{c[0]}-{c[1]}")
def test_set_fills_a_fresh_optimizer(runs, case):
    for rank, res in enumerate(runs):
        trained, filled = res[case]["fresh"]
        assert set(trained) == set(filled)
        for key, (value, master, moments, step) in trained.items():
            other = filled[key]
            assert torch.equal(value, other[0]) and torch.equal(master, other[1]), f"rank {rank} {key}"
            assert step == other[3] and step >= STEPS + 1, f"rank {rank} {key}: steps {step}, {other[3]}"
            assert sorted(moments) == sorted(other[2]) == ["exp_avg", "exp_avg_sq"]
            assert all(torch.equal(moments[k], other[2][k]) for k in moments), f"rank {rank} {key}"


def _fused_fp16_worker(rank, world):
    """DeepSpeed's FP16_Optimizer (what ZeRO-0 with bf16 and DeepSpeed's fused Adam builds on GPUs; here around
    torch's AdamW, which it accepts): flat fp32 copies per group, not partitioned."""
    import deepspeed
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from torch._utils import _unflatten_dense_tensors
    from piper_ds.runtime.optim_state import SliceState, optimizer_state, step_value
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4)).to(torch.bfloat16)
    opt = FP16_Optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), low_precision_dtype=torch.bfloat16)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    access, problems = optimizer_state(opt), []
    for i, group in enumerate(opt.fp16_groups):
        flat = opt.fp32_groups_flat[i]
        views = {k: _unflatten_dense_tensors(t, group) for k, t in
                 [("master", flat)] + [(k, opt.optimizer.state[flat][k]) for k in ("exp_avg", "exp_avg_sq")]}
        for j, p in enumerate(group):
            s = access.get(p)
            if not torch.equal(s.master, views["master"][j]) or step_value(s.step) != 3 or \
                    not all(torch.equal(s.moments[k], views[k][j]) for k in ("exp_avg", "exp_avg_sq")):
                problems.append(f"group {i} param {j}: GET differs from the flat fp32 copy")
            new = SliceState(s.master[1:3] + 1, {k: v[1:3] * 3 for k, v in s.moments.items()}, s.step)
            access.set(p, new, rows=(1, 3))
            back = access.get(p, rows=(1, 3))
            if not torch.equal(back.master, new.master) or not torch.equal(p.detach()[1:3], new.master.to(p.dtype)) \
                    or not all(torch.equal(back.moments[k], new.moments[k]) for k in new.moments):
                problems.append(f"group {i} param {j}: SET then GET does not round-trip")
    return problems, type(access).__name__


def test_fused_fp16_optimizer_flat_groups():
    (problems, kind), = run_distributed(_fused_fp16_worker, 1, timeout=120)
    assert kind == "PartitionedState" and problems == []


def test_optimizers_without_reachable_state_are_refused():
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from piper_ds.runtime.optim_state import optimizer_state
    with pytest.raises(TypeError, match="got DeepSpeedZeroOptimizer_Stage3 \\(ZeRO-3 is not supported\\)"):
        optimizer_state(object.__new__(DeepSpeedZeroOptimizer_Stage3))  # the class decides; no state needed
    offloading = object.__new__(DeepSpeedZeroOptimizer)
    offloading.cpu_offload = True
    with pytest.raises(TypeError, match="optimizer offload"):
        optimizer_state(offloading)
    with pytest.raises(TypeError, match="got dict"):
        optimizer_state({})
