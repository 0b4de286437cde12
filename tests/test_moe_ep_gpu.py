"""EP invariance on GPUs over NCCL: the overlapped dispatch (chunks in flight on NCCL's stream while experts
compute) gives the outputs and gradients of the ep=1 CPU reference. Needs 2+ GPUs; runs on the GPU machine."""
import pytest
import torch
import torch.distributed as dist

from piper_ds.testing import run_distributed
from test_moe_ep import CASES, build, grads_of, reference

pytestmark = pytest.mark.gpu

GPU_CASES = {
    **{name: CASES[name] for name in ("softmax-top2-swiglu-shared", "skewed-sigmoid-groups-gelu", "five-chunks-top3")},
    # enough rows that a missing wait would read a buffer NCCL is still writing
    "many-tokens-four-chunks": dict(config=dict(top_k=3, overlap_chunks=4), tokens=[3000, 2500, 0, 3500],
                                    skew=False),
}


def _worker(rank, world_size):
    torch.cuda.set_device(rank)
    CASES.update(GPU_CASES)  # build() looks cases up by name (spawned workers re-import the test module)
    out = {}
    for case in GPU_CASES:
        layer, xs, gs = build(case, world_size, rank, dist.group.WORLD)
        layer = layer.cuda()
        x = xs[rank].cuda().requires_grad_(True)
        y, l_aux, _ = layer(x)
        ((y * gs[rank].cuda()).sum() + l_aux).backward()
        grads = {k: v.cpu() for k, v in grads_of(layer, x).items()}
        for name in list(grads):
            if name == "router" or name.startswith("shared."):
                t = grads[name].cuda()
                dist.all_reduce(t)
                grads[name] = t.cpu()
        out[case] = dict(y=y.detach().cpu(), grads=grads, local=layer.placement.local_experts(rank))
    return out


def test_overlapped_dispatch_on_nccl_matches_reference():
    n = torch.cuda.device_count()
    if n < 2:
        pytest.skip(f"needs 2 or more GPUs for NCCL expert parallelism, found {n}")
    world = 4 if n >= 4 else 2
    CASES.update(GPU_CASES)
    results = run_distributed(_worker, world, timeout=300, backend="nccl")
    for case in GPU_CASES:
        ref_y, ref_xg, _, ref_grads, _ = reference(case)
        for r, by_case in enumerate(results):
            res = by_case[case]
            torch.testing.assert_close(res["y"], ref_y[r], rtol=1e-4, atol=1e-4, msg=f"{case}: output rank {r}")
            torch.testing.assert_close(res["grads"]["x"], ref_xg[r], rtol=1e-4, atol=1e-4,
                                       msg=f"{case}: input grad rank {r}")
            if world < len(CASES[case]["tokens"]):
                continue  # dense gradients sum over all token chunks: compared at world 4 only
            for name, g in res["grads"].items():
                if name == "x":
                    continue
                want = ref_grads[name][res["local"]] if name in ("w_up", "w_down") else ref_grads[name]
                torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-4, msg=f"{case}: grad {name} rank {r}")
