"""Memory model: ZeRO model-state bytes vs DeepSpeed's estimators, Piper's migration sizes, stage accounting."""
import pytest

from piper_ds.planner.cluster import Layout
from piper_ds.planner.memory import (KINDS, STATE_BYTES, all_stages, in_flight, migration_bytes, model_state_bytes,
                                     stage_blocks, stage_params)
from piper_ds.planner.profile import PlatformProfile
from piper_ds.planner.specs import ModelSpec

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
    for zero, (rep, sh) in {0: (8, 12), 1: (4, 16), 2: (2, 18)}.items():
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
    assert [len(r) for r in stage_blocks(10, 4)] == [2, 2, 3, 3]
    assert [r.start for r in stage_blocks(10, 4)] == [0, 2, 4, 7]
    with pytest.raises(ValueError, match=r"pp \(5\) must be <= n_layers \(4\)"):
        stage_blocks(4, 5)
    lay = Layout(dp=1, pp=4, zero_stage=1, grad_accum=8)
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
