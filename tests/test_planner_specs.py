"""ModelSpec: presets against published totals, hand-computed counts, validation, FLOP formulas."""
import pytest

from piper_ds.system.specs import PRESETS, REPORTED, ModelSpec


@pytest.mark.parametrize("name", sorted(REPORTED))
def test_preset_totals_within_1pct(name):
    total, active, unit = REPORTED[name]
    got = ModelSpec.preset(name).param_counts()["total"] / unit
    assert abs(got / total - 1) < 0.01, (name, got, total)


@pytest.mark.parametrize("name", ["mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b"])
def test_preset_active_within_2pct(name):
    _, active, unit = REPORTED[name]
    got = ModelSpec.preset(name).param_counts()["active"] / unit
    assert abs(got / active - 1) < 0.02, (name, got, active)


def test_xmoe_counting_is_binary_billions_of_gelu_experts():
    # X-MoE's Table 3: L*(4d^2 + 2*E*d*f) / 2**30, no embedding
    for name in ("xmoe-small", "xmoe-medium", "xmoe-large", "xmoe-super"):
        s = ModelSpec.preset(name)
        table = s.n_layers * (4 * s.d_model ** 2 + 2 * s.num_experts * s.d_model * s.d_ffn_expert) / 2 ** 30
        assert abs(table / REPORTED[name][0] - 1) < 0.004, (name, table)


def test_hand_counts_swiglu_gqa_dense_shared_untied():
    s = ModelSpec(vocab_size=100, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2, seq_len=8,
                  n_dense_layers=1, num_experts=4, top_k=2, d_ffn_expert=8, n_shared_experts=1)
    c = s.param_counts()
    # hd = 4; q 16*16, k 16*8, v 16*8, o 16*16 = 768 per layer
    assert c["attention"] == 3 * 768
    assert c["embedding"] == 1600 and c["lm_head"] == 1600
    assert c["norms"] == (2 * 3 + 1) * 16
    assert c["dense_ffn"] == 1 * 3 * 16 * (8 * 3)            # default f_dense = f*(k+shared)
    assert c["experts"] == 2 * 4 * 3 * 16 * 8
    assert c["shared"] == 2 * 3 * 16 * 8
    assert c["router"] == 2 * 4 * 16
    assert c["total"] == 1600 * 2 + 2304 + 112 + 1152 + 3072 + 768 + 128
    assert c["active"] == c["total"] - 3072 + 2 * 2 * 3 * 16 * 8
    assert c["active_compute"] == c["active"] - 1600


def test_hand_counts_gelu_tied_headdim():
    s = ModelSpec(vocab_size=50, d_model=8, n_layers=2, n_heads=2, head_dim=6, seq_len=4, num_experts=3,
                  top_k=1, d_ffn_expert=5, activation="gelu", tie_embeddings=True)
    c = s.param_counts()
    assert c["attention"] == 2 * (8 * 12 * 4)
    assert c["lm_head"] == 0 and c["embedding"] == 400
    assert c["experts"] == 2 * 3 * 2 * 8 * 5
    assert c["total"] == 400 + 768 + 5 * 8 + 480 + 48
    assert c["active_compute"] == c["active"]          # tied: the table is the LM head
    assert s.train_flops_per_token() == 6 * c["active"] + 6 * 2 * 4 * 12
    assert s.mfu_flops_per_token() == 6 * c["active"] + 6 * 2 * 4 * 8


def test_mfu_formula_reproduces_peer_table():
    # our 4x H200 peer runs: 6,516 tok/s -> 82.5 TFLOP/s; 10,840 tok/s -> 137.2 TFLOP/s
    f = ModelSpec.preset("xmoe-small-swiglu").mfu_flops_per_token()
    assert round(f * 6516 / 1e12, 1) == 82.5
    assert round(f * 10840 / 1e12, 1) == 137.2


def test_from_block_and_overrides():
    a = ModelSpec.from_block({"preset": "tiny", "n_layers": 4})
    assert a.n_layers == 4 and a.d_model == PRESETS["tiny"].d_model
    b = ModelSpec.from_block(a.to_block())
    assert a == b
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        ModelSpec.preset("nope")
    with pytest.raises(TypeError):
        ModelSpec.from_block(["tiny"])


@pytest.mark.parametrize("kw,msg", [
    (dict(n_heads=3), r"d_model \(64\) must be divisible by n_heads \(3\)"),
    (dict(n_kv_heads=3), r"n_heads \(4\) must be divisible by n_kv_heads \(3\)"),
    (dict(top_k=5), r"top_k \(5\) must be <= num_experts \(4\)"),
    (dict(n_dense_layers=3), r"n_dense_layers \(3\) must be <= n_layers \(2\)"),
    (dict(bogus=1), "bogus"),
])
def test_validation_names_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ModelSpec.preset("tiny", **kw)
