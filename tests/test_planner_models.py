"""ModelSpec counts equal the reference model's actual parameters exactly (piper_ds.models)."""
import pytest

from piper_ds.planner.memory import stage_params
from piper_ds.system.layout import Layout
from piper_ds.system.specs import PRESETS, ModelSpec

import piper_ds.models as models  # noqa: E402

VARIANTS = [
    {},
    {"n_kv_heads": 2, "n_dense_layers": 1, "n_shared_experts": 2},
    {"activation": "gelu", "tie_embeddings": True, "head_dim": 8},
    {"d_ffn_dense": 48, "n_dense_layers": 2, "n_layers": 3, "top_k": 1},
    {"n_heads": 8, "n_kv_heads": 1, "head_dim": 4, "num_experts": 8, "n_shared_experts": 1, "activation": "gelu"},
]


def _numel(module):
    return sum(p.numel() for p in module.parameters())  # parameters() yields a tied weight once


def _small(name):
    """The preset's structure (GQA, head_dim, dense layers, shared experts, activation, tying) at toy size."""
    s = PRESETS[name]
    return ModelSpec.preset(
        name, vocab_size=128, d_model=64, n_heads=4, n_kv_heads=None if s.n_kv_heads is None else 2,
        head_dim=None if s.head_dim is None else 8, n_layers=min(s.n_layers, 4),
        n_dense_layers=min(s.n_dense_layers, 2), d_ffn_dense=None if s.d_ffn_dense is None else 40,
        num_experts=min(s.num_experts, 8), top_k=min(s.top_k, 3), d_ffn_expert=16, seq_len=16)


@pytest.mark.parametrize("spec", [ModelSpec.preset("tiny", **v) for v in VARIANTS]
                         + [_small(n) for n in sorted(PRESETS) if n != "tiny"], ids=lambda s: s.name)
def test_total_equals_reference_model(spec):
    model = models.MoETransformer(spec)
    c = spec.param_counts()
    assert _numel(model) == c["total"]
    assert _numel(model.embed) == c["embedding"]
    # per block: what the planner puts on a one-block pipeline stage, minus embedding/head extras
    lay = Layout(dp=1, pp=spec.n_layers, zero_stage=1)
    for i, block in enumerate(model.blocks):
        dense, expert = stage_params(spec, lay, i)
        if i == 0:
            dense -= c["embedding"]
        if i == spec.n_layers - 1:
            dense -= spec.d_model + spec.vocab_size * spec.d_model
        assert _numel(block) == dense + expert, f"block {i}"
