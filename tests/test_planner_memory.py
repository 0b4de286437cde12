"""Memory model: ZeRO model-state bytes vs DeepSpeed's estimators, Piper's migration sizes, stage accounting."""
import pytest

from piper_ds.system.layout import Layout
from piper_ds.planner.memory import (KINDS, STATE_BYTES, all_stages, in_flight, migration_bytes, model_state_bytes,
                                     phase_blocks, stage_params)
from piper_ds.planner.profile import PlatformProfile
from piper_ds.system.specs import ModelSpec

ds_zero12 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2", reason="DeepSpeed is a dependency")
ds_zero3 = pytest.importorskip("deepspeed.runtime.zero.stage3", reason="DeepSpeed is a dependency")


@pytest.mark.parametrize("n,gpn,nodes", [(10_000_000, 4, 1), (1_234_567_891, 8, 2), (7, 1, 1), (5 * 10 ** 9, 8, 16)])
def test_zero2_matches_deepspeed_estimator(n, gpn, nodes):
    _, ds_gpu = ds_zero12.estimate_zero2_model_states_mem_needs(n, gpn, nodes, cpu_offload=False)
    ours = sum(model_state_bytes(n, 0, gpn * nodes, 1, zero=2).values())
    assert int(ours) == ds_gpu or abs(ours - ds_gpu) <= 1  # DeepSpeed truncates 18*N/gpus to int


def test_zero2_with_experts_is_two_estimators():
    # dense states shard over dp, expert states over expert-DP: DeepSpeed's formula applied to each part
    dense, expert, dp, edp = 300_000_000, 2_000_000_000, 16, 4
    _, ds_dense = ds_zero12.estimate_zero2_model_states_mem_needs(dense, dp, 1, cpu_offload=False)
    _, ds_expert = ds_zero12.estimate_zero2_model_states_mem_needs(expert, edp, 1, cpu_offload=False)
    ours = sum(model_state_bytes(dense, expert, dp, edp, zero=2).values())
    assert abs(ours - (ds_dense + ds_expert)) <= 2


def test_zero2_sharded_part_matches_zero3_estimator():
    n, gpus, largest = 3_000_000_000, 32, 50_000_000
    _, ds_gpu, _ = ds_zero3.estimate_zero3_model_states_mem_needs(n, largest, gpus, 1, cpu_offload=False,
                                                                  cpu_offload_params=False, zero_init=True)
    sharded = sum(sh for _, sh in STATE_BYTES[("bf16", 2)].values())
    assert abs((ds_gpu - 4 * largest) - sharded * n / gpus) <= 1


def test_state_bytes_per_param_rules():
    for zero, (rep, sh) in {0: (20, 0), 1: (4, 16), 2: (2, 18)}.items():
        got = model_state_bytes(1, 0, dp=1, edp=1, zero=zero)
        assert sum(got.values()) == rep + sh
        got = model_state_bytes(8, 0, dp=8, edp=1, zero=zero)
        assert sum(got.values()) == 8 * rep + sh
    with pytest.raises(ValueError, match="ZeRO-3 is rejected"):
        model_state_bytes(1, 0, 1, 1, zero=3)


@pytest.mark.parametrize("name,expected", [
    ("xmoe-small-swiglu", 138_412_032),   # 48 * 2048 * 1408
    ("mixtral-8x7b", 2_818_572_288),      # 48 * 4096 * 14336
    ("deepseek-v3", 704_643_072),         # 48 * 7168 * 2048
    ("qwen3-30b-a3b", 75_497_472),        # 48 * 2048 * 768
    ("xmoe-small", 92_274_688),           # GELU experts: 32 * 2048 * 1408
])
def test_piper_migration_table(name, expected):
    spec = ModelSpec.preset(name)
    assert migration_bytes(spec) == expected
    if spec.activation == "swiglu":
        assert migration_bytes(spec) == 48 * spec.d_model * spec.d_ffn_expert


def test_stage_blocks_and_in_flight():
    # the pipeline's cut (piper_ds.system.stages): stage 0 also holds the embedding, the last the head
    spec = ModelSpec.preset("xmoe-small-swiglu", n_layers=10, n_dense_layers=1)
    lay = Layout(dp=1, pp=4, zero_stage=1, grad_accum=8)
    blocks = [phase_blocks(spec, lay, s)[0] for s in range(4)]
    assert [len(r) for r in blocks] == [3, 3, 2, 2] and [r.start for r in blocks] == [0, 3, 6, 8]
    assert [in_flight(lay, s) for s in range(4)] == [4, 3, 2, 1]
    assert in_flight(Layout(dp=1, pp=4, zero_stage=1, grad_accum=2), 0) == 2
    assert in_flight(Layout(dp=1, grad_accum=8), 0) == 1


def test_stage_params_cover_the_model():
    spec = ModelSpec.preset("tiny", n_layers=4, n_dense_layers=1, n_shared_experts=1)
    for pp in (1, 2, 4):
        for ep in (1, 2, 4):
            lay = Layout(dp=4, ep=ep, pp=pp, zero_stage=1)
            dense = sum(stage_params(spec, lay, s)[0] for s in range(pp))
            expert = sum(stage_params(spec, lay, s)[1] for s in range(pp))
            c = spec.param_counts()
            assert dense == c["total"] - c["experts"]
            assert expert * ep == c["experts"]


def test_tied_head_copied_on_last_stage_with_pp():
    spec = ModelSpec.preset("tiny", tie_embeddings=True, n_layers=2)
    v = spec.vocab_size * spec.d_model
    one = stage_params(spec, Layout(dp=1, pp=1), 0)[0]
    two = [stage_params(spec, Layout(dp=1, pp=2, zero_stage=1), s)[0] for s in range(2)]
    assert sum(two) == one + v


def test_stage0_is_worst_under_1f1b_without_head_dominance():
    spec = ModelSpec.preset("xmoe-small", vocab_size=1024)
    stages = all_stages(spec, Layout(dp=8, ep=8, pp=4, zero_stage=1, micro_batch=1, grad_accum=16),
                        PlatformProfile())
    totals = [m.total for m in stages]
    assert totals[0] == max(totals)
    assert stages[0].kinds["activations"] > stages[-1].kinds["activations"]
    assert set(stages[0].kinds) == set(KINDS)


def test_memory_moves_the_right_way():
    spec, prof = ModelSpec.preset("xmoe-small"), PlatformProfile()

    def mem(**kw):
        base = dict(dp=8, ep=8, zero_stage=1, micro_batch=2, grad_accum=4)
        return all_stages(spec, Layout(**{**base, **kw}), prof)[0]

    assert mem(micro_batch=4).kinds["activations"] > mem().kinds["activations"]
    assert mem(activation_checkpointing=True).kinds["activations"] < mem().kinds["activations"]
    assert mem(ep=2).kinds["weights"] > mem(ep=8).kinds["weights"]
    assert mem(zero_stage=2).total < mem(zero_stage=1).total < mem(zero_stage=0).total


def test_activation_accounting_by_hand():
    # one dense block, MHA, bf16, flash attention, no MoE layers: every term written out
    spec = ModelSpec(vocab_size=10, d_model=8, n_layers=1, n_heads=2, seq_len=4, n_dense_layers=1,
                     d_ffn_dense=16, num_experts=2, top_k=1, d_ffn_expert=4)
    prof = PlatformProfile(workspace_gib=0.0, fragmentation=0.0)
    m = all_stages(spec, Layout(dp=1, micro_batch=3), prof)[0]
    t, d, v = 12, 8, 10
    block = 2 * t * (2 * d + 2 * d + 2 * d) + 4 * 3 * 2 * 4 + 2 * t * (2 * d + 3 * 16)
    head = (2 + 4) * t * v + 2 * t * 2 * d
    assert m.kinds["activations"] == block + 2 * t * d + head
    assert m.kinds["workspace"] == block + 4 * t * v


# ---- phase accounting (backward vs step) and the optimizer term -------------------------------------------
from piper_ds.planner.memory import phase_state_bytes, stage_memory  # noqa: E402


def test_phase_accounting_by_hand_zero2_bf16():
    # 1000 dense params over dp 4 (partition 250), 4000 expert params over edp 2 (partition 2000)
    dense, expert, dp, edp = 1000, 4000, 4, 2
    weights, opt, part = 2 * 5000, 12 * (250 + 2000), 250 + 2000
    # the engines' fused step (the default): the updates read the 16-bit buffer in place, nothing is allocated
    # whatever torch's AdamW implementation, so the step phase holds the buffer alone
    for fused_adam in (True, False):
        ph = phase_state_bytes(dense, expert, dp, edp, zero=2, precision="bf16", fused=fused_adam)
        assert ph["backward"] == {"weights": weights, "grads": 2 * part, "optimizer": opt}
        assert ph["step"] == {"weights": weights, "grads": 2 * part, "optimizer": opt}
    # DeepSpeed's own step (fused_step: off)
    fused = phase_state_bytes(dense, expert, dp, edp, zero=2, precision="bf16", fused=True, fused_step=False)
    assert fused["backward"] == {"weights": weights, "grads": 2 * part, "optimizer": opt}
    # step: the largest instant is the expert group's fp32 cast: 16-bit buffer 2*2250 + flat 2*2000 + fp32 4*2000
    assert fused["step"] == {"weights": weights, "grads": 2 * part + 6 * 2000, "optimizer": opt}
    foreach = phase_state_bytes(dense, expert, dp, edp, zero=2, precision="bf16", fused=False, fused_step=False)
    # the expert update: buffer already freed (last group), fp32 grad 4*2000 + exp_avg_sq_sqrt 4*2000 = 16000,
    # below the cast (16500); the dense update with foreach: 4500 + 4*250 + 4*250 = 6500
    assert foreach["step"] == fused["step"]
    # one group only: cast 2*P + 6*P = 8P vs update 4P + 4P = 8P: equal; the cast is kept (strictly larger wins)
    one = phase_state_bytes(0, 800, 1, 4, zero=2, precision="bf16", fused=False, fused_step=False)["step"]
    assert one["grads"] + one["optimizer"] == 8 * 200 + 12 * 200
    # the backward phase holds DeepSpeed's estimator sum (2 + 18/D) less the fp32 gradients (4/D)
    total = sum(model_state_bytes(dense, expert, dp, edp, zero=2).values())
    assert sum(fused["backward"].values()) == total - 4 * part  # the fp32 grads (4/D) are not held in backward


def test_phase_accounting_by_hand_zero1_bf16_foreach():
    dense, expert, dp, edp = 1000, 4000, 4, 2
    weights, opt = 2 * 5000, 12 * 2250
    # the fused step: the dense group's update (the first) holds the buffer 2*2250 and the expert group's
    # gradients outside the partition, not yet freed, 2*(4000 - 2000); no copies, no foreach temporary
    ph = phase_state_bytes(dense, expert, dp, edp, zero=1, precision="bf16", fused=False)
    assert ph["backward"]["grads"] == 2 * 5000  # every parameter keeps its 16-bit grad until the boundary
    assert ph["step"] == {"weights": weights, "grads": 2 * 2250 + 2 * (4000 - 2000), "optimizer": opt}
    # DeepSpeed's step
    ph = phase_state_bytes(dense, expert, dp, edp, zero=1, precision="bf16", fused=False, fused_step=False)
    assert ph["backward"]["grads"] == 2 * 5000
    # dense cast: buffer 4500 + expert non-partition 2*2000 + 6*250 = 10000; dense update: 4500 + 4000 + 1000 + 1000
    # expert cast: 4500 + 12000 = 16500; expert update: 0 + 8000 + temporaries 8000 = 16000
    assert ph["step"] == {"weights": weights, "grads": 16500, "optimizer": opt}
    ph = phase_state_bytes(dense, expert, dp, edp=4, zero=1, precision="bf16", fused=False, fused_step=False)
    # expert partition 1000: expert cast = buffer 2*1250 + 6*1000 = 8500; dense update = buffer 2500 +
    # expert non-partition 2*3000 + fp32 4*250 + temporaries 4*250 = 10500 is the largest instant
    assert ph["step"] == {"weights": weights, "grads": 2500 + 6000 + 1000, "optimizer": 12 * 1250 + 1000}


def test_phase_accounting_fp32_and_zero0():
    # fp32 ZeRO-2, DeepSpeed's step: no cast; the flat copy is the fp32 grad. buffer 4*2250 + 4*2000 = 17000 at
    # the expert cast; the fused step reads the fp32 buffer in place
    ph = phase_state_bytes(1000, 4000, 4, 2, zero=2, precision="fp32", fused=True, fused_step=False)
    assert ph["backward"]["grads"] == 4 * 2250 and ph["step"]["grads"] == 4 * 2250 + 4 * 2000
    ph = phase_state_bytes(1000, 4000, 4, 2, zero=2, precision="fp32", fused=True)
    assert ph["backward"]["grads"] == 4 * 2250 and ph["step"]["grads"] == 4 * 2250
    # fp32 ZeRO-0 keeps its grads in both phases; foreach adds exp_avg_sq_sqrt of the largest group
    z0 = phase_state_bytes(1000, 4000, 1, 1, zero=0, precision="fp32", fused=False)
    assert z0["backward"] == model_state_bytes(1000, 4000, 1, 1, zero=0, precision="fp32")
    assert z0["step"]["optimizer"] == 8 * 5000 + 4 * 4000
    # ZeRO-0 builds no ZeRO optimizer: the fused step changes nothing there
    assert phase_state_bytes(1000, 4000, 1, 1, zero=0, precision="fp32", fused=False, fused_step=False) == z0
    with pytest.raises(ValueError, match="zero_stage=3"):
        phase_state_bytes(1, 1, 1, 1, zero=3)


def test_phase_accounting_zero0_bf16_follows_deepspeeds_optimizer_wrapper():
    n = 1000
    # pp = 1, FP16_UnfusedOptimizer: 16-bit grads in backward, an fp32 copy of every one in step(), fp32 master
    # and moments unsharded (dp 4 changes nothing)
    z = phase_state_bytes(n, 0, 4, 4, zero=0, precision="bf16", fused=True)
    assert z["backward"] == {"weights": 2 * n, "grads": 2 * n, "optimizer": 12 * n}
    assert z["step"] == {"weights": 2 * n, "grads": 6 * n, "optimizer": 12 * n}
    # without accumulation only the gradients of about one layer exist at the start of backward
    assert phase_state_bytes(n, 0, 1, 1, zero=0, first_grads=100)["backward"]["grads"] == 200
    assert phase_state_bytes(n, 0, 1, 1, zero=0, first_grads=100, grad_accum=2)["backward"]["grads"] == 2 * n
    # pp > 1, BF16_Optimizer: 16-bit accumulators beside the grads, fp32 master and moments over dp, the
    # partition cast to fp32 in step()
    p = phase_state_bytes(n, 0, 4, 4, zero=0, precision="bf16", fused=True, pp=2)
    assert p["backward"] == {"weights": 2 * n, "grads": 4 * n, "optimizer": 3 * n}
    assert p["step"] == {"weights": 2 * n, "grads": 4 * n + n, "optimizer": 3 * n}


def test_zero0_peak_of_the_one_gpu_plan_matches_its_run():
    import json
    import os
    from piper_ds.planner.cluster import ClusterSpec
    from piper_ds.planner.resources import estimate
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    with open(os.path.join(root, "ds_configs", "h200_x1_gb32.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(root, "docs", "results", "train_h200_x1_gb32_6df3763.json")) as f:
        measured_gb = json.load(f)["peak_memory_gb"]  # max_memory_allocated, 1e9 bytes
    # the run (commit 6df3763) took the layout the planner chose then, ZeRO-0; the file now holds the ZeRO-1 layout
    # it chooses since it models the fused step, with the same model, micro-batch and accumulation
    layout = Layout(**{**cfg["piper_plan"]["layout"], "zero_stage": 0})
    est = estimate(ModelSpec.from_block(cfg["piper"]["model"]), ClusterSpec.preset("h200-nvlink-ib400"), layout)
    assert est.layout.micro_batch == 16 and est.layout.grad_accum == 2
    assert abs(est.worst.total / 1e9 / measured_gb - 1) < 0.05


def test_stage_peak_is_the_larger_phase():
    spec = ModelSpec.preset("tiny")
    prof = PlatformProfile(workspace_gib=0.0, fragmentation=0.0)
    lay = Layout(dp=2, ep=2, zero_stage=2, micro_batch=1)
    m = stage_memory(spec, lay, prof, 0)
    n_dense, n_expert = stage_params(spec, lay, 0)
    states = phase_state_bytes(n_dense, n_expert, 2, 1, 2, "bf16", True)
    for kind in ("weights", "grads", "optimizer"):
        assert m.phases["backward"][kind] == states["backward"][kind]
        assert m.phases["step"][kind] == states["step"][kind]
    assert m.phases["step"]["activations"] == 0.0 and m.phases["backward"]["activations"] > 0
    totals = {ph: sum(k.values()) for ph, k in m.phases.items()}
    assert m.total == max(totals.values()) and m.peak_phase == max(totals, key=totals.get)
    # large expert states and short sequences: DeepSpeed's step, with its per-group copies, is the peak
    big_spec = ModelSpec.preset("tiny", d_model=512, d_ffn_expert=4096, seq_len=8)
    big = stage_memory(big_spec, lay.model_copy(update={"fused_step": False}), prof, 0)
    assert big.peak_phase == "step" and big.total == sum(big.phases["step"].values())
    # the fused step allocates nothing above the backward phase's gradients: backward is the peak
    fused = stage_memory(big_spec, lay, prof, 0)
    assert fused.peak_phase == "backward" and fused.phases["step"]["fragmentation"] == 0.0
    assert fused.phases["step"]["grads"] <= fused.phases["backward"]["grads"] < big.phases["step"]["grads"]


@pytest.mark.parametrize("zero,accum,precision", [(1, 1, "bf16"), (1, 4, "bf16"), (2, 1, "bf16"), (2, 4, "fp32")])
def test_fused_step_phase_never_exceeds_backward(zero, accum, precision):
    # several groups, the expert groups over another expert-DP degree: at every instant of the fused step the
    # gradients held are at most those of the backward phase, and the optimizer states never grow
    groups = [300.0, 500.0, 200.0]
    for foreach in (False, True):
        ph = phase_state_bytes(700, sum(groups), 4, 2, zero=zero, precision=precision, fused=not foreach,
                               expert_groups=groups, grad_accum=accum)
        assert ph["step"]["grads"] <= ph["backward"]["grads"]
        assert ph["step"]["optimizer"] == ph["backward"]["optimizer"]


def test_optimizer_term_reads_the_config():
    from piper_ds.planner.cluster import ClusterSpec
    from piper_ds.planner.resources import (ADAM_FOREACH_PASSES, adam_bytes_per_param, fused_step_bytes_per_param,
                                            optimizer_fused, optimizer_seconds, zero_step_bytes_per_param)
    assert len(ADAM_FOREACH_PASSES) == 8 and adam_bytes_per_param(False) == 80 and adam_bytes_per_param(True) == 28
    # the fused step: norm read + gradient read (g each), master and moments read and written (24), weight write
    assert fused_step_bytes_per_param("bf16") == 2 + 2 + 24 + 2 == 30
    assert fused_step_bytes_per_param("fp32") == 4 + 4 + 24 + 4 == 36
    with pytest.raises(ValueError, match="fp16"):
        fused_step_bytes_per_param("fp16")
    assert zero_step_bytes_per_param("bf16", 2) == 2 + 4 + 6 + 8 + 6
    assert optimizer_fused({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})  # DeepSpeed FusedAdam
    assert optimizer_fused({"optimizer": {"type": "AdamW", "params": {"torch_adam": True, "fused": True}}})
    assert not optimizer_fused({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}})
    with pytest.raises(ValueError, match="'Lion' is not modelled"):
        optimizer_fused({"optimizer": {"type": "Lion"}})
    spec, h200, prof = ModelSpec.preset("tiny"), ClusterSpec.preset("h200-nvlink-ib400"), PlatformProfile()
    lay = Layout(dp=2, ep=2, zero_stage=2)
    n_dense, n_expert = stage_params(spec, lay, 0)
    n, hbm = n_dense / 2 + n_expert / 1, prof.hbm_rate(h200)
    # the default, the fused step: its bytes, whatever torch's AdamW implementation, at ZeRO-1 and 2
    for z in (1, 2):
        for fused_adam in (True, False):
            other = lay.model_copy(update={"zero_stage": z, "fused_optimizer": fused_adam})
            assert optimizer_seconds(spec, h200, other, prof, 0) == pytest.approx(
                fused_step_bytes_per_param("bf16") * n / hbm)
    fp32 = lay.model_copy(update={"precision": "fp32"})
    assert optimizer_seconds(spec, h200, fp32, prof, 0) == pytest.approx(fused_step_bytes_per_param("fp32") * n / hbm)
    # DeepSpeed's step (fused_step: off): its bytes around torch's AdamW, fused or foreach
    ds = lay.model_copy(update={"fused_step": False})
    want = (zero_step_bytes_per_param("bf16", 2) + adam_bytes_per_param(True)) * n / hbm
    assert optimizer_seconds(spec, h200, ds, prof, 0) == pytest.approx(want)
    slow = optimizer_seconds(spec, h200, ds.model_copy(update={"fused_optimizer": False}), prof, 0)
    assert slow == pytest.approx(want * (26 + 80) / (26 + 28))
    # ZeRO-0 has no ZeRO step: DeepSpeed's engine runs torch's AdamW, the fused step changes nothing
    z0 = lay.model_copy(update={"zero_stage": 0})
    want0 = (zero_step_bytes_per_param("bf16", 0) + adam_bytes_per_param(True)) * n / hbm
    assert optimizer_seconds(spec, h200, z0, prof, 0) == pytest.approx(want0)
    assert optimizer_seconds(spec, h200, z0.model_copy(update={"fused_step": False}), prof, 0) == pytest.approx(want0)


def test_optimizer_term_uses_the_measured_step_rate():
    from piper_ds.planner.cluster import ClusterSpec
    from piper_ds.planner.resources import adam_bytes_per_param, optimizer_seconds
    spec, h200 = ModelSpec.preset("tiny"), ClusterSpec.preset("h200-nvlink-ib400")
    prof = PlatformProfile(optimizer_ns_per_param=30.0, optimizer_step="fused")
    lay = Layout(dp=2, ep=2, zero_stage=2)
    n_dense, n_expert = stage_params(spec, lay, 0)
    n = n_dense / 2 + n_expert / 1
    assert optimizer_seconds(spec, h200, lay, prof, 0) == pytest.approx(30e-9 * n)
    # the fused step runs no torch AdamW: foreach is no slower
    foreach = lay.model_copy(update={"fused_optimizer": False})
    assert optimizer_seconds(spec, h200, foreach, prof, 0) == pytest.approx(30e-9 * n)
    # the measurement is of bf16 ZeRO-1/2 with the fused step: ZeRO-0, fp32 and DeepSpeed's step keep the
    # analytic bytes model
    for other in (lay.model_copy(update={"zero_stage": 0}), lay.model_copy(update={"precision": "fp32"}),
                  lay.model_copy(update={"fused_step": False})):
        assert optimizer_seconds(spec, h200, other, prof, 0) == optimizer_seconds(spec, h200, other,
                                                                                  PlatformProfile(), 0)
    # a figure that timed DeepSpeed's step serves layouts that run it; torch's foreach AdamW adds its extra
    # passes over the fused kernel at the HBM rate
    ds_prof = PlatformProfile(optimizer_ns_per_param=30.0, optimizer_step="deepspeed")
    ds = lay.model_copy(update={"fused_step": False})
    assert optimizer_seconds(spec, h200, ds, ds_prof, 0) == pytest.approx(30e-9 * n)
    extra = (adam_bytes_per_param(False) - adam_bytes_per_param(True)) / ds_prof.hbm_rate(h200)
    assert optimizer_seconds(spec, h200, ds.model_copy(update={"fused_optimizer": False}), ds_prof,
                             0) == pytest.approx(n * (30e-9 + extra))
    with pytest.raises(ValueError):
        PlatformProfile(optimizer_ns_per_param=0.0)
    with pytest.raises(ValueError):
        PlatformProfile(optimizer_step="foreach")


def test_old_profile_figure_is_ignored_for_the_fused_step(tmp_path):
    import json
    from piper_ds.planner.cluster import ClusterSpec
    from piper_ds.planner.resources import fused_step_bytes_per_param, optimizer_seconds
    # a profile written before optimizer_step existed: its figure timed DeepSpeed's step
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"source": "old calibration", "optimizer_ns_per_param": 0.05}))
    prof = PlatformProfile.load(str(old))
    assert prof.optimizer_step == "deepspeed"
    spec, h200 = ModelSpec.preset("tiny"), ClusterSpec.preset("h200-nvlink-ib400")
    lay = Layout(dp=2, ep=2, zero_stage=1)
    n_dense, n_expert = stage_params(spec, lay, 0)
    n = n_dense / 2 + n_expert / 1
    analytic = fused_step_bytes_per_param("bf16") * n / prof.hbm_rate(h200)
    assert analytic != pytest.approx(0.05e-9 * n)  # the two rules give different times here
    assert optimizer_seconds(spec, h200, lay, prof, 0) == pytest.approx(analytic)
    # the same figure tagged as the fused step's (what calibration now writes) is used
    new = tmp_path / "new.json"
    new.write_text(json.dumps({**json.loads(old.read_text()), "optimizer_step": "fused"}))
    assert optimizer_seconds(spec, h200, lay, PlatformProfile.load(str(new)), 0) == pytest.approx(0.05e-9 * n)


def test_stored_profile_timed_deepspeeds_step():
    import os
    from piper_ds.planner.cluster import ClusterSpec
    from piper_ds.planner.resources import fused_step_bytes_per_param, optimizer_seconds
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ds_configs", "profiles", "h200_x4.json")
    prof = PlatformProfile.load(path)
    assert prof.optimizer_ns_per_param and prof.optimizer_step == "deepspeed"
    spec, h200 = ModelSpec.preset("tiny"), ClusterSpec.preset("h200-nvlink-ib400")
    lay = Layout(dp=2, ep=2, zero_stage=2)
    n_dense, n_expert = stage_params(spec, lay, 0)
    n = n_dense / 2 + n_expert / 1
    assert optimizer_seconds(spec, h200, lay, prof, 0) == pytest.approx(
        fused_step_bytes_per_param("bf16") * n / prof.hbm_rate(h200))
    ds = lay.model_copy(update={"fused_step": False})
    assert optimizer_seconds(spec, h200, ds, prof, 0) == pytest.approx(prof.optimizer_ns_per_param * 1e-9 * n)


def test_moe_optimizer_groups_follow_deepspeeds_cap():
    from piper_ds.planner.memory import moe_group_sizes
    from piper_ds.system.deepspeed_rules import MOE_GROUP_MAX_NUMEL, greedy_group_sizes
    assert greedy_group_sizes([3, 3, 3, 10, 1], max_numel=6) == [6, 3, 10, 1]
    assert greedy_group_sizes([], max_numel=6) == []
    spec = ModelSpec.preset("xmoe-small-swiglu", n_layers=4, n_dense_layers=1)
    stack = spec.num_experts * spec.d_model * spec.d_ffn_expert  # 185M > the cap: one group per tensor
    assert stack > MOE_GROUP_MAX_NUMEL
    assert moe_group_sizes(spec, Layout(dp=1), 0) == [2 * stack, stack] * 3  # w_up (gate | up), w_down
    lay = Layout(dp=4, ep=4)  # 46M per matrix: one block's w_up and w_down per group
    assert moe_group_sizes(spec, lay, 0) == [3 * stack // 4] * 3
    assert sum(moe_group_sizes(spec, lay, 0)) == stage_params(spec, lay, 0)[1]
    # DeepSpeed's step casts one group at a time: with the cut, far less than one group of all experts
    n_dense, n_expert = stage_params(spec, Layout(dp=1), 0)
    one = phase_state_bytes(n_dense, n_expert, 1, 1, zero=1, fused_step=False)["step"]["grads"]
    cut = phase_state_bytes(n_dense, n_expert, 1, 1, zero=1, expert_groups=[stack] * 9,
                            fused_step=False)["step"]["grads"]
    assert cut == 2 * (n_dense + n_expert) + 6 * max(n_dense, stack) < one
    # the fused step casts nothing: the 16-bit gradients alone, however the groups are cut
    for groups in (None, [stack] * 9):
        assert phase_state_bytes(n_dense, n_expert, 1, 1, zero=1,
                                 expert_groups=groups)["step"]["grads"] == 2 * (n_dense + n_expert)
    with pytest.raises(ValueError, match="expert_groups sum"):
        phase_state_bytes(n_dense, n_expert, 1, 1, zero=1, expert_groups=[stack])


def test_partition_tensor_elements_counts_whole_tensors_touching_each_partition():
    from piper_ds.planner.memory import grad_buffer_elements, partition_tensor_elements
    # one tensor of 10 over 4 ranks: padded to 16, partitions of 4; it starts in rank 0's and straddles the
    # starts of ranks 1 and 2; rank 3's partition is padding only
    assert partition_tensor_elements([10], 4) == [10, 10, 10, 0]
    assert partition_tensor_elements([3, 3, 3, 3], 2) == [6, 6]  # boundaries on tensor edges: the exact halves
    assert partition_tensor_elements([5, 1, 1], 2) == [5, 7]  # partitions of 4: the 5 straddles rank 1's start
    assert partition_tensor_elements([4, 0, 4], 2) == [4, 4]  # an empty tensor adds nothing
    assert partition_tensor_elements([], 3) == [0, 0, 0]
    assert partition_tensor_elements([7, 9], 1) == [16]
    # per rank summed over groups, then the largest rank
    assert grad_buffer_elements([[10], [10], [3, 3, 3, 3]], 2) == 26
    assert grad_buffer_elements([], 4) == 0
    with pytest.raises(ValueError, match="dp"):
        partition_tensor_elements([4], 0)
    with pytest.raises(ValueError, match="sizes"):
        partition_tensor_elements([4, -1], 2)


def test_zero2_gradient_buffer_in_the_phases():
    # ZeRO-2, one 800-element expert group over 4 expert-DP ranks, held whole: 800 instead of 200 elements
    exact = phase_state_bytes(0, 800, 1, 4, zero=2, precision="bf16", fused=True, grad_accum=1)
    whole = phase_state_bytes(0, 800, 1, 4, zero=2, precision="bf16", fused=True, grad_accum=1, grad_buffer=800)
    assert exact["backward"]["grads"] == 2 * 200 and whole["backward"]["grads"] == 2 * 800
    accum = phase_state_bytes(0, 800, 1, 4, zero=2, precision="bf16", fused=True, grad_accum=4, grad_buffer=800)
    assert accum["backward"]["grads"] == 2 * 2 * 800  # the sum so far and the boundary's buffer
    # DeepSpeed's step(): one group, so the buffer's last views go before its update; the cast holds buffer +
    # copies; the fused step reads the whole buffer in place
    ds = phase_state_bytes(0, 800, 1, 4, zero=2, precision="bf16", fused=True, grad_accum=1, grad_buffer=800,
                           fused_step=False)
    assert ds["step"]["grads"] == 2 * 800 + 6 * 200 and whole["step"]["grads"] == 2 * 800
    # ZeRO-1 keeps its rules: the buffer argument is ZeRO-2's
    z1 = phase_state_bytes(0, 800, 1, 4, zero=1, precision="bf16", fused=True, grad_accum=1)
    assert phase_state_bytes(0, 800, 1, 4, zero=1, precision="bf16", fused=True, grad_accum=1,
                             grad_buffer=800) == z1
    with pytest.raises(ValueError, match="grad_buffer"):
        phase_state_bytes(0, 800, 1, 4, zero=2, grad_buffer=100)


def test_stage_grad_buffer_at_ep1_holds_every_expert_stack_whole():
    from piper_ds.planner.memory import stage_grad_buffer
    spec = ModelSpec.preset("xmoe-small-swiglu", n_layers=14, n_dense_layers=1)
    lay = Layout(dp=4, ep=1, zero_stage=2, micro_batch=1, grad_accum=4, activation_checkpointing=True)
    n_dense, n_expert = stage_params(spec, lay, 0)
    # 185M-element stacks, one per optimizer group, over 4 ranks: every rank's partition touches each stack
    assert stage_grad_buffer(spec, lay, 0) == pytest.approx(n_dense / 4 + n_expert)
    # ep=4 at expert-DP 1: nothing to add over the exact partition
    lay4 = Layout(dp=4, ep=4, zero_stage=2, micro_batch=4)
    d4, e4 = stage_params(spec, lay4, 0)
    assert stage_grad_buffer(spec, lay4, 0) == pytest.approx(d4 / 4 + e4)
    mem = stage_memory(spec, lay, PlatformProfile(), 0)
    assert mem.phases["backward"]["grads"] == pytest.approx(2 * 2 * (n_dense / 4 + n_expert))
