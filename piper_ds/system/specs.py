"""Model specification: the ``"piper": {"model": {...}}`` block of a ds_config, presets, parameter counts, FLOPs.

Parameter-count convention (the reference model in ``piper_ds.models`` is built to match it exactly):

- token embedding ``V*d``; a separate LM head ``V*d`` unless ``tie_embeddings``; no positional table (RoPE);
- attention per layer: q ``d*(H*hd)``, k and v ``d*(Hkv*hd)`` each, o ``(H*hd)*d``; no biases anywhere;
- norms: two RMSNorm weight vectors of size ``d`` per layer, plus one final;
- a dense FFN layer (the first ``n_dense_layers``): SwiGLU ``3*d*f_dense``, GELU ``2*d*f_dense``;
- an MoE layer: router ``E*d``; each routed expert SwiGLU ``3*d*f`` (GELU ``2*d*f``); shared experts are one
  always-on FFN with ``n_shared*f`` hidden units (SwiGLU ``3*d*n_shared*f``).

*Active* parameters are everything except the routed experts, plus ``top_k`` routed experts per MoE layer. The
token-embedding table **counts** as active (the usual convention: Mixtral 8x7B has 12.9 B active this way);
``active_compute`` drops the embedding lookup (a gather, no matmul) and is what the FLOP formulas use.

About the X-MoE presets (X-MoE's Table 3, the models Piper compares on): the totals it prints (10.1 / 55.2 /
201.4 / 545.4 "B") are ``L*(4*d^2 + 2*E*d*f) / 2**30``, i.e. MHA attention, **2-matrix (GELU) experts**, no
embedding, counted in binary billions (2^30). The ratio to that formula is 1.000 +- 0.3% for all four
models, while every decimal/SwiGLU reading is off by 5-60%. So the xmoe-* presets here are the models X-MoE
actually ran (Megatron-DeepSpeed GPT: GELU experts, GPT-2 vocabulary padded to 50304, tied embeddings, every
layer MoE), and :data:`REPORTED` marks their figures with unit ``2**30``. ``xmoe-small-swiglu`` is the
SwiGLU variant our own end-to-end peer runs use (15.6 B, 1 dense layer, vocab 32000).
"""
from __future__ import annotations

from typing import Any, Dict, Literal, Mapping, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelSpec(BaseModel):
    """Shape of a decoder-only MoE transformer, enough to count parameters, FLOPs, bytes and traffic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("custom", description="Label of the model (a preset name or 'custom').")
    vocab_size: int = Field(..., ge=1, description="Vocabulary size V (rows of the embedding table).")
    d_model: int = Field(..., ge=1, description="Hidden size d of the residual stream.")
    n_layers: int = Field(..., ge=1, description="Number of transformer blocks L (dense + MoE).")
    n_heads: int = Field(..., ge=1, description="Query heads H.")
    n_kv_heads: Optional[int] = Field(
        None, ge=1, description="Key/value heads Hkv; None = n_heads (MHA), fewer = grouped-query attention.")
    head_dim: Optional[int] = Field(None, ge=1, description="Per-head dimension hd; None = d_model // n_heads.")
    seq_len: int = Field(..., ge=1, description="Training sequence length s in tokens.")
    n_dense_layers: int = Field(
        0, ge=0, description="The FIRST n layers use a dense FFN instead of MoE (DeepSeek's first_k_dense).")
    d_ffn_dense: Optional[int] = Field(
        None, ge=1,
        description="Hidden size of the dense FFN layers; None = d_ffn_expert * (top_k + n_shared_experts).")
    num_experts: int = Field(..., ge=1, description="Routed experts E per MoE layer.")
    top_k: int = Field(..., ge=1, description="Routed experts per token k.")
    d_ffn_expert: int = Field(..., ge=1, description="Hidden size f of one routed expert.")
    n_shared_experts: int = Field(
        0, ge=0, description="Always-on shared experts, fused into one FFN of n_shared_experts*d_ffn_expert units.")
    activation: Literal["swiglu", "gelu"] = Field(
        "swiglu", description="FFN/expert type: SwiGLU (3 matrices) or GELU (2 matrices).")
    tie_embeddings: bool = Field(False, description="Share the token embedding with the LM head.")

    # ---- validation ---------------------------------------------------------------------------------
    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) "
                             "when head_dim is not given")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"n_dense_layers ({self.n_dense_layers}) must be <= n_layers ({self.n_layers})")
        return self

    # ---- derived sizes ------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used (n_kv_heads or n_heads)."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def hd(self) -> int:
        """Per-head dimension actually used."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def d_attn(self) -> int:
        """Width of the attention core H*hd (equals d_model for standard MHA)."""
        return self.n_heads * self.hd

    @property
    def n_moe_layers(self) -> int:
        """Layers with an MoE FFN (all but the first n_dense_layers)."""
        return self.n_layers - self.n_dense_layers

    @property
    def ffn_dense(self) -> int:
        """Hidden size of a dense FFN layer actually used."""
        if self.d_ffn_dense is not None:
            return self.d_ffn_dense
        return self.d_ffn_expert * (self.top_k + self.n_shared_experts)

    @property
    def n_mats(self) -> int:
        """Weight matrices per FFN: 3 for SwiGLU, 2 for GELU."""
        return 3 if self.activation == "swiglu" else 2

    def ffn_params(self, hidden: int) -> int:
        """Parameters of one FFN of ``hidden`` units (no biases)."""
        return self.n_mats * self.d_model * hidden

    def attention_params_per_layer(self) -> int:
        """q, k, v, o projections of one layer (no biases)."""
        d, h, hkv, hd = self.d_model, self.n_heads, self.kv_heads, self.hd
        return d * h * hd + 2 * d * hkv * hd + h * hd * d

    def expert_params(self) -> int:
        """Parameters of one routed expert."""
        return self.ffn_params(self.d_ffn_expert)

    def shared_params_per_layer(self) -> int:
        """Parameters of the fused shared-expert FFN of one MoE layer (0 without shared experts)."""
        return self.ffn_params(self.n_shared_experts * self.d_ffn_expert) if self.n_shared_experts else 0

    # ---- counts -------------------------------------------------------------------------------------
    def param_counts(self) -> Dict[str, int]:
        """Parameter counts by kind (numbers of scalars).

        Keys: embedding (token table V*d), lm_head (V*d, 0 if tied), attention, norms, dense_ffn, experts
        (all routed experts), shared, router, total, active_experts (top_k routed experts per MoE layer),
        active (total - experts + active_experts; the embedding table counts), active_compute (active minus
        the embedding lookup; with tied embeddings the table is still used as the LM head and stays in).
        """
        d, v, n_moe = self.d_model, self.vocab_size, self.n_moe_layers
        c = {
            "embedding": v * d,
            "lm_head": 0 if self.tie_embeddings else v * d,
            "attention": self.n_layers * self.attention_params_per_layer(),
            "norms": (2 * self.n_layers + 1) * d,
            "dense_ffn": self.n_dense_layers * self.ffn_params(self.ffn_dense),
            "experts": n_moe * self.num_experts * self.expert_params(),
            "shared": n_moe * self.shared_params_per_layer(),
            "router": n_moe * self.num_experts * d,
        }
        c["total"] = sum(c.values())
        c["active_experts"] = n_moe * self.top_k * self.expert_params()
        c["active"] = c["total"] - c["experts"] + c["active_experts"]
        c["active_compute"] = c["active"] - (0 if self.tie_embeddings else c["embedding"])
        return c

    def train_flops_per_token(self) -> float:
        """Analytic training FLOPs per token (forward + backward), in FLOP.

        ``6 * active_compute + 6 * n_layers * seq_len * d_attn`` with ``d_attn = n_heads * head_dim``:
        2 FLOP per multiply-add, x3 for forward + backward (dgrad + wgrad); the second term is causal
        attention, QK^T and AV are 4*s*d_attn per token per layer forward, halved by the causal mask.
        Recomputation under activation checkpointing is NOT counted (useful FLOPs only).
        """
        c = self.param_counts()
        return 6.0 * c["active_compute"] + 6.0 * self.n_layers * self.seq_len * self.d_attn

    def mfu_flops_per_token(self) -> float:
        """FLOPs per token used for MFU everywhere in piper_ds, in FLOP: ``6*N + 6*L*seq*d``.

        This is the MFU convention ``(6*active params + 6*L*seq*d)``, with N = ``active_compute`` (active
        parameters without the embedding lookup; this is the reading that reproduces the peers' TFLOP/s
        figures there) and ``d = d_model``. It equals :meth:`train_flops_per_token` whenever H*hd = d.
        """
        return 6.0 * self.param_counts()["active_compute"] + 6.0 * self.n_layers * self.seq_len * self.d_model

    # ---- constructors -------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelSpec":
        """A preset by name (see :data:`PRESETS`), with fields overridden; validated again."""
        if not isinstance(name, str):
            raise TypeError(f"preset name must be a str, got {type(name).__name__} ({name!r})")
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name].model_dump(), **overrides})

    @classmethod
    def from_block(cls, block: Mapping[str, Any]) -> "ModelSpec":
        """From a ``"piper.model"`` block: either all fields, or ``{"preset": name, **overrides}``."""
        if not isinstance(block, Mapping):
            raise TypeError(f"model block must be a mapping, got {type(block).__name__}")
        block = dict(block)
        if "preset" in block:
            return cls.preset(block.pop("preset"), **block)
        return cls(**block)

    def to_block(self) -> Dict[str, Any]:
        """The ``"piper.model"`` block with every field spelled out (JSON-ready)."""
        return self.model_dump()


def _spec(**kw: Any) -> ModelSpec:
    return ModelSpec(**kw)


#: Model presets. See the module docstring for the X-MoE counting and X-MoE's Table 3 for the sources.
PRESETS: Dict[str, ModelSpec] = {
    "xmoe-small": _spec(name="xmoe-small", vocab_size=50304, d_model=2048, n_layers=28, n_heads=16,
                        seq_len=2048, num_experts=64, top_k=6, d_ffn_expert=1408, activation="gelu",
                        tie_embeddings=True),
    "xmoe-medium": _spec(name="xmoe-medium", vocab_size=50304, d_model=5120, n_layers=28, n_heads=40,
                         seq_len=4096, num_experts=128, top_k=6, d_ffn_expert=1536, activation="gelu",
                         tie_embeddings=True),
    "xmoe-large": _spec(name="xmoe-large", vocab_size=50304, d_model=7168, n_layers=28, n_heads=56,
                        seq_len=4096, num_experts=256, top_k=8, d_ffn_expert=2048, activation="gelu",
                        tie_embeddings=True),
    "xmoe-super": _spec(name="xmoe-super", vocab_size=50304, d_model=7168, n_layers=61, n_heads=56,
                        seq_len=4096, num_experts=256, top_k=8, d_ffn_expert=2560, activation="gelu",
                        tie_embeddings=True),
    # our end-to-end peer runs (README, Performance): xmoe-small dimensions, SwiGLU, first layer dense
    "xmoe-small-swiglu": _spec(name="xmoe-small-swiglu", vocab_size=32000, d_model=2048, n_layers=28,
                               n_heads=16, seq_len=2048, n_dense_layers=1, num_experts=64, top_k=6,
                               d_ffn_expert=1408),
    "mixtral-8x7b": _spec(name="mixtral-8x7b", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
                          n_kv_heads=8, seq_len=4096, num_experts=8, top_k=2, d_ffn_expert=14336),
    # MLA is not modelled: GQA sized to ~MLA's per-layer parameters (176 M vs 187 M), total within 0.1%
    "deepseek-v3": _spec(name="deepseek-v3", vocab_size=129280, d_model=7168, n_layers=61, n_heads=128,
                         n_kv_heads=64, head_dim=64, seq_len=4096, n_dense_layers=3, d_ffn_dense=18432,
                         num_experts=256, top_k=8, d_ffn_expert=2048, n_shared_experts=1),
    "qwen3-30b-a3b": _spec(name="qwen3-30b-a3b", vocab_size=151936, d_model=2048, n_layers=48, n_heads=32,
                           n_kv_heads=4, head_dim=128, seq_len=4096, num_experts=128, top_k=8,
                           d_ffn_expert=768),
    # tiny model for CPU tests and the CPU example config
    "tiny": _spec(name="tiny", vocab_size=256, d_model=64, n_layers=2, n_heads=4, seq_len=32,
                  num_experts=4, top_k=2, d_ffn_expert=32),
}

#: Published (total, active, unit) per preset; unit 2**30 = X-MoE's binary billions, 1e9 = decimal.
REPORTED: Dict[str, Tuple[float, Optional[float], float]] = {
    "xmoe-small": (10.1, 1.3, 2.0 ** 30),
    "xmoe-medium": (55.2, 5.2, 2.0 ** 30),
    "xmoe-large": (201.4, 11.5, 2.0 ** 30),
    "xmoe-super": (545.4, 28.7, 2.0 ** 30),
    "xmoe-small-swiglu": (15.6, None, 1e9),
    "mixtral-8x7b": (46.7, 12.9, 1e9),
    "deepseek-v3": (671.0, 37.0, 1e9),
    "qwen3-30b-a3b": (30.5, 3.3, 1e9),
}
