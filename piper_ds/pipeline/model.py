"""The reference MoE LM as a ``deepspeed.pipe.PipelineModule``: embedding, blocks and head as layer specs.

Every layer maps ``(h [B,S,D], aux)`` to ``(h, aux)``: the MoE aux loss (fp32) travels with the activations
across stage boundaries and :func:`lm_loss` adds it to the cross-entropy on the last stage, so its gradient
flows back through every stage to every router. ``aux`` is a scalar under 1F1B and a ``[2]`` vector (one per
half micro-batch) under the overlap schedule.

Stages are cut by :func:`piper_ds.system.stages.stage_bounds` (``partition_method="planner"``, the default):
each layer weighs its share of the model's training FLOPs plus its share of the memory it pins, and DeepSpeed's
balanced partition cuts the sequence. The planner predicts every stage from the same cut.

Weights are drawn per layer from ``seed + layer index`` (``seed_layers``), so :func:`reference_layers` builds
exactly the same weights unpipelined, at ep = 1, for numerics tests.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.pipe.dualpipev import DualPipeVModule
from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from piper_ds.config import merge_moe_with_model
from piper_ds.models.layers import Embedding, Head, RMSNorm
from piper_ds.models.transformer import MoETransformer
from piper_ds.moe import MoEConfig
from piper_ds.pipeline.schedules import half_program
from piper_ds.system.specs import ModelSpec
from piper_ds.system.stages import stage_bounds

PARTITION_METHODS = ("planner", "uniform", "parameters")


class EmbeddingLayer(Embedding):
    """The first layer: ``ids [B,S] int64 -> (h [B,S,D], aux 0.0 fp32)``; ``aux`` is tied to the graph (a zero
    times one weight) so a first stage without MoE blocks still has a differentiable aux output."""

    def forward(self, ids_BS: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = F.embedding(ids_BS, self.weight)
        return h, self.weight[0, 0].float() * 0.0


class BlockLayer(nn.Module):
    """A transformer block exactly as :class:`MoETransformer` builds block ``index`` (dense for the first
    ``n_dense_layers``, else PiperMoE); ``BlockLayer(...)`` returns that ``Block`` instance."""

    def __new__(cls, spec: ModelSpec, moe: Dict[str, Any], ep_size: int, index: int):
        owner = SimpleNamespace(spec=spec, stock_moe=False, moe_config=MoEConfig(**moe), ep_size=ep_size)
        return MoETransformer._block(owner, index, 1.25)


class HeadLayer(Head):
    """The last layer: final norm and untied LM head, ``(h, aux) -> (logits [B,S,V], aux)``."""

    def __init__(self, vocab_size: int, d_model: int):
        super().__init__(vocab_size, d_model)


class FinalNormLayer(nn.Module):
    """The final RMSNorm before a tied LM head: ``(h, aux) -> (norm(h), aux)`` (the untied :class:`HeadLayer`
    holds its own)."""

    def __init__(self, d_model: int, norm_eps: float = 1e-6):
        super().__init__()
        self.norm = RMSNorm(d_model, norm_eps)

    def forward(self, inputs: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        h, aux = inputs
        return self.norm(h), aux


def tied_head_forward(embedding: EmbeddingLayer, inputs: Tuple[torch.Tensor, torch.Tensor]):
    """The LM head on the embedding table: ``(h [B,S,D], aux) -> (h @ table^T [B,S,V], aux)``."""
    h, aux = inputs
    return F.linear(h, embedding.weight.to(h.dtype)), aux


#: TiedLayerSpec key of the table shared by the embedding and the LM head.
TIED_KEY = "embedding"


def lm_loss(outputs: Tuple[torch.Tensor, torch.Tensor], labels_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats, fp32) plus the aux loss (the mean over halves when aux is [2])."""
    logits, aux = outputs
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels_BS.reshape(-1))
    return ce + aux.float().mean()


def layer_specs(spec: ModelSpec, moe: Dict[str, Any], ep_size: int) -> List[LayerSpec]:
    """``[embedding, block 0..L-1, head]`` as DeepSpeed layer specs (built lazily, per stage).

    With ``spec.tie_embeddings`` the embedding and the head are one ``TiedLayerSpec`` (key
    :data:`TIED_KEY`): each stage holding either builds the table, DeepSpeed broadcasts the first stage's
    copy at start and all-reduces the two copies' gradients every step (``ReduceTiedGrads``); the head is then
    ``[FinalNormLayer, tied head]``, one layer more than untied.
    """
    blocks = [LayerSpec(BlockLayer, spec, moe, ep_size, i) for i in range(spec.n_layers)]
    if not spec.tie_embeddings:
        return ([LayerSpec(EmbeddingLayer, spec.vocab_size, spec.d_model)] + blocks
                + [LayerSpec(HeadLayer, spec.vocab_size, spec.d_model)])
    return ([TiedLayerSpec(TIED_KEY, EmbeddingLayer, spec.vocab_size, spec.d_model)] + blocks
            + [LayerSpec(FinalNormLayer, spec.d_model),
               TiedLayerSpec(TIED_KEY, EmbeddingLayer, spec.vocab_size, spec.d_model, forward_fn=tied_head_forward)])


class PiperPipelineModule(PipelineModule):
    """A ``PipelineModule`` of the reference MoE LM with balanced stages and a two-half forward.

    Args:
        spec: model shape. moe: MoE options (dict or MoEConfig; top_k etc. taken from ``spec``).
        ep_size: EP group size. num_stages / topology: as for ``PipelineModule``.
        partition_method: 'planner' (default), 'uniform' or 'parameters'.
        micro_batch: sequences per micro-batch (weighs the activations in the stage cut).
        seed: per-layer seed base (layer i is drawn after seeding ``seed + i``).
        activation_checkpoint_interval: as for ``PipelineModule`` (non-reentrant with
            ``"pipeline": {"use_reentrant": false}``); the two-half forward checkpoints each layer.
    """

    def __init__(self, spec: ModelSpec, moe: Union[MoEConfig, Dict[str, Any], None] = None, ep_size: int = 1,
                 num_stages: Optional[int] = None, topology=None, partition_method: str = "planner",
                 micro_batch: int = 1, seed: int = 1234, activation_checkpoint_interval: int = 0):
        if partition_method not in PARTITION_METHODS:
            raise ValueError(f"partition_method {partition_method!r} is not one of {PARTITION_METHODS}")
        self.spec, self.ep_size = spec, ep_size
        self.moe_config = merge_moe_with_model(spec, moe)
        self.micro_batch = micro_batch
        self.halves = 1  # 2 while an overlap instruction runs (set by the engine)
        self.timeline = None  # a TimelineRecorder, set by its attach()
        self._streams: Optional[List[Any]] = None
        super().__init__(layer_specs(spec, self.moe_config.model_dump(), ep_size), num_stages=num_stages,
                         topology=topology, loss_fn=lm_loss, seed_layers=True, base_seed=seed,
                         partition_method=partition_method,
                         activation_checkpoint_interval=activation_checkpoint_interval)
        self.seed_layers = False  # seeds were for building; forward must not reseed the global RNG

    # ------------------------------------------------------------------------------------ partition
    def _partition_layers(self, method: str = "uniform") -> None:
        if method != "planner":
            PipelineModule._partition_layers(self, method)
        else:
            self.parts = list(stage_bounds(self.spec, self.micro_batch, self.ep_size, self.num_stages))
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])
        sizes = [b - a for a, b in zip(self.parts, self.parts[1:])]
        if min(sizes) < 1:
            raise ValueError(f"partition {method!r} of {len(self._layer_specs)} layers into {self.num_stages} "
                             f"stages left a stage empty (layers per stage {sizes})")
        moe_per_stage = [sum(1 for j in range(a, b) if self._is_moe_layer(j))
                         for a, b in zip(self.parts, self.parts[1:])]
        per_rank = self._per_rank(moe_per_stage)
        if any(per_rank) and not all(per_rank):
            # DeepSpeed builds the expert process groups and ZeRO reduces the gradient norm over the stages once
            # per optimizer parameter group: a rank without MoE layers would issue different collectives.
            raise ValueError(f"partition {method!r} gives pipeline ranks without MoE layers (MoE layers per stage "
                             f"{moe_per_stage}, layers per stage {sizes}); every rank needs at least one: use fewer "
                             f"stages (pp={self._topo.get_dim('pipe')}) or fewer dense layers (n_dense_layers="
                             f"{self.spec.n_dense_layers})")

    def _per_rank(self, per_stage: List[int]) -> List[int]:
        """Per pipeline rank, the sum over the stages it holds (one stage per rank here)."""
        return list(per_stage)

    def _is_moe_layer(self, j: int) -> bool:
        """Whether layer spec ``j`` (0 = embedding, 1..n_layers = blocks, then the head) is an MoE block."""
        return 1 <= j <= self.spec.n_layers and j - 1 >= self.spec.n_dense_layers

    # -------------------------------------------------------------------------------------- forward
    def forward(self, forward_input):
        if self.halves == 1:
            return super().forward(forward_input)
        return self._forward_halves(forward_input)

    def _forward_halves(self, inputs):
        """Runs this stage's layers on two halves of the micro-batch in :func:`half_program` order, half h on
        CUDA stream h (no streams on CPU: the same order, sequential). Output: (cat of halves, aux [2])."""
        parts = self._split(inputs)
        streams = self._half_streams(parts[0][0] if isinstance(parts[0], tuple) else parts[0])
        main = torch.cuda.current_stream() if streams else None
        for s in streams or ():
            s.wait_stream(main)
        for half, layer in half_program(len(self.forward_funcs)):
            ctx = torch.cuda.stream(streams[half]) if streams else contextlib.nullcontext()
            with ctx:
                parts[half] = self._run_layer_timed(layer, parts[half], f"h{half}")
        for s in streams or ():
            main.wait_stream(s)
        if self.timeline is not None:
            self.timeline.lane = "main"
        return torch.cat([p[0] for p in parts]), torch.stack([p[1].float().reshape(()) for p in parts])

    def _split(self, inputs) -> List[Any]:
        if torch.is_tensor(inputs):  # first stage: token ids [B, S]
            b = inputs.shape[0]
            if b % 2:
                raise ValueError(f"the overlap schedule splits each micro-batch in two halves; micro-batch size "
                                 f"{b} is odd")
            return list(inputs.chunk(2))
        h, aux = inputs
        if aux.dim() != 1 or aux.numel() != 2:
            raise ValueError(f"overlap stage input: aux must have shape [2] (one per half), got {tuple(aux.shape)}")
        return [(hh, aux[i]) for i, hh in enumerate(h.chunk(2))]

    def _run_layer_timed(self, idx: int, x, lane: str):
        rec = self.timeline
        if rec is None:
            return self._run_layer(idx, x)
        rec.lane, key = lane, rec.new_key()
        first = lambda v, f: (f(v[0]), *v[1:]) if isinstance(v, tuple) else f(v)  # noqa: E731
        x = first(x, lambda t: rec.mark_backward(t, "layer_bwd", lane, key, opens=False))
        with rec.interval("layer_fwd", lane, layer=idx):
            y = self._run_layer(idx, x)
        return first(y, lambda t: rec.mark_backward(t, "layer_bwd", lane, key, opens=True))

    def _run_layer(self, idx: int, x):
        layer = self.forward_funcs[idx]
        if self.activation_checkpoint_interval > 0 and isinstance(layer, nn.Module) and \
                any(p.requires_grad for p in layer.parameters()):
            args = x if isinstance(x, tuple) else (x, )
            return self.activation_checkpoint_func(lambda *a: layer(a if len(a) > 1 else a[0]), *args)
        return layer(x)

    def _half_streams(self, x: torch.Tensor) -> Optional[List[Any]]:
        if not x.is_cuda:
            return None
        if self._streams is None:
            self._streams = [torch.cuda.Stream(device=x.device) for _ in range(2)]
        return self._streams

    def moe_layers(self) -> List[nn.Module]:
        """This stage's MoE modules (PiperMoE), in layer order."""
        from deepspeed.moe.layer import MoE
        return [m for m in self.modules() if isinstance(m, MoE)]


class PiperDualPipeVModule(PiperPipelineModule, DualPipeVModule):
    """:class:`PiperPipelineModule` cut into ``2 * pp`` virtual stages for DeepSpeed's DualPipeV schedule.

    Pipeline rank r holds virtual stages r (phase 0, activations flow towards the last rank) and
    ``2 pp - 1 - r`` (phase 1, flowing back), so rank 0 holds the embedding and the head and computes the loss
    (:class:`deepspeed.runtime.pipe.dualpipev.DualPipeVModule`). The planner partition balances the 2 pp
    virtual stages. Every rank needs an MoE block in one of its two stages. After construction
    ``num_stages`` counts the virtual stages, as in DeepSpeed; the pipeline ranks are
    ``topology().get_dim('pipe')``. Runs only under ``schedule='dualpipev'``
    (:class:`~piper_ds.pipeline.engine.PiperDualPipeVEngine`), with at least 2 pp micro-batches per step.
    """

    def _partition_layers(self, method: str = "uniform") -> None:
        self.num_stages *= 2
        PiperPipelineModule._partition_layers(self, method)
        mirror = self.num_stages - 1 - self.stage_id
        self.phase_bounds = [(self._local_start, self._local_stop), (self.parts[mirror], self.parts[mirror + 1])]

    def _per_rank(self, per_stage: List[int]) -> List[int]:
        n = len(per_stage)
        return [per_stage[r] + per_stage[n - 1 - r] for r in range(n // 2)]

    def forward(self, forward_input):
        if self.halves != 1:
            raise ValueError("the two-half overlap schedule does not run on DualPipeV virtual stages")
        return PipelineModule.forward(self, forward_input)


# ------------------------------------------------------------------------------------------ reference
def reference_layers(spec: ModelSpec, moe: Union[MoEConfig, Dict[str, Any], None] = None,
                     seed: int = 1234) -> nn.ModuleList:
    """The same layers, unpipelined, at ep = 1 and with the same weights as :class:`PiperPipelineModule`
    (built under the same per-layer seeds). Run with :func:`reference_loss`."""
    cfg = merge_moe_with_model(spec, moe).model_dump()
    layers, tied = nn.ModuleList(), {}
    for i, ls in enumerate(layer_specs(spec, cfg, 1)):
        ds_utils.set_random_seed(seed + i)
        if isinstance(ls, TiedLayerSpec) and ls.key in tied:  # the head: the embedding's own table
            layers.append(_Applied(tied[ls.key], ls.forward_fn))
            continue
        layer = ls.build()
        if isinstance(ls, TiedLayerSpec):
            tied[ls.key] = layer
        layers.append(layer)
    return layers


class _Applied(nn.Module):
    """``fn(module, x)`` as a layer (a tied layer's second use in :func:`reference_layers`)."""

    def __init__(self, module: nn.Module, fn):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, x):
        return self.fn(self.module, x)


def reference_loss(layers: Sequence[nn.Module], ids_BS: torch.Tensor, labels_BS: torch.Tensor,
                   halves: int = 1) -> torch.Tensor:
    """:func:`lm_loss` of one micro-batch run through ``layers``; with ``halves=2`` the aux loss is computed
    per half and averaged, as the overlap schedule does (cross-entropy is the same either way)."""
    outs = []
    for ids in ids_BS.chunk(halves):
        x: Any = ids
        for layer in layers:
            x = layer(x)
        outs.append(x)
    logits = torch.cat([o[0] for o in outs])
    aux = torch.stack([o[1].float().reshape(()) for o in outs])
    return lm_loss((logits, aux), labels_BS)
