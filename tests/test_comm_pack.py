"""Tier 2: pack / unpack of row segments (the hierarchical all-to-all's message packing) against the reference.

The reference is checked against a plain loop; every backend of ``piper_ds.ops.hier_pack`` against the
reference. The C++ CPU op is built only when it is already in the JIT cache or ``PIPER_JIT_CPU_OPS=1`` (a
build takes a minute on a small machine); the CUDA op runs on the GPU machine.
"""
import random

import pytest
import torch

from piper_ds.ops import hier_pack, reference


def _segments(rng, src_rows, dst_rows, k):
    """k non-overlapping destination segments and arbitrary (possibly overlapping) source segments."""
    lengths = [rng.choice([0, 1, 2, 5, 9]) for _ in range(k)]
    gaps = [rng.randint(0, 2) for _ in range(k)]
    dst_starts, pos = [], 0
    for n, gap in zip(lengths, gaps):
        pos += gap
        dst_starts.append(pos)
        pos += n
    assert pos <= dst_rows
    src_starts = [rng.randint(0, src_rows - n) for n in lengths]
    order = list(range(k))
    rng.shuffle(order)  # destination segments in any order
    return [src_starts[o] for o in order], [dst_starts[o] for o in order], [lengths[o] for o in order]


def _loop_copy(src, src_starts, dst, dst_starts, lengths):
    for a, b, n in zip(src_starts, dst_starts, lengths):
        for r in range(n):
            dst[b + r] = src[a + r]
    return dst


@pytest.mark.parametrize("dtype, tail", [(torch.float32, (7, )), (torch.bfloat16, (8, )), (torch.int64, (2, 3))])
def test_reference_equals_loop(dtype, tail):
    rng = random.Random(0)
    src = (torch.randn((50, ) + tail) * 100).to(dtype)
    for k in (0, 1, 3, 17):
        s, d, n = _segments(rng, 50, 200, k)
        want = _loop_copy(src, s, torch.zeros((200, ) + tail, dtype=dtype), d, n)
        got = reference.segment_copy_reference(src, torch.tensor(s, dtype=torch.long),
                                               torch.zeros((200, ) + tail, dtype=dtype),
                                               torch.tensor(d, dtype=torch.long), torch.tensor(n, dtype=torch.long))
        assert torch.equal(got, want)
        packed = reference.pack_segments_reference(src, torch.tensor(s, dtype=torch.long),
                                                   torch.tensor(n, dtype=torch.long))
        assert packed.shape[0] == sum(n)
        unpacked = reference.unpack_segments_reference(packed, torch.zeros((200, ) + tail, dtype=dtype),
                                                       torch.tensor(d, dtype=torch.long),
                                                       torch.tensor(n, dtype=torch.long))
        assert torch.equal(unpacked, want)


def _check_backend(backend, device):
    rng = random.Random(1)
    for dtype, tail in [(torch.float32, (7, )), (torch.bfloat16, (8, )), (torch.float16, (3, )),
                        (torch.uint8, (5, ))]:
        src = (torch.randn((64, ) + tail) * 50).to(dtype).to(device)
        for k in (1, 4, 9, 40):
            s, d, n = _segments(rng, 64, 500, k)
            want = _loop_copy(src.cpu(), s, torch.zeros((500, ) + tail, dtype=dtype), d, n)
            got = hier_pack.segment_copy(src, s, torch.zeros((500, ) + tail, dtype=dtype, device=device), d, n,
                                         backend)
            assert torch.equal(got.cpu(), want), (backend, dtype, k)
        packed = hier_pack.pack(src, [3, 40, 10], [4, 0, 6], backend)
        assert torch.equal(packed, torch.cat([src[3:7], src[10:16]]))
        dst = hier_pack.unpack(packed, torch.zeros_like(src), [30, 0], [4, 6], backend)
        assert torch.equal(dst[30:34], src[3:7]) and torch.equal(dst[0:6], src[10:16])


@pytest.mark.parametrize("backend", ["auto", "slices", "reference"])
def test_backends_on_cpu(backend):
    _check_backend(backend, "cpu")


def test_errors_name_values():
    src, dst = torch.zeros(10, 2), torch.zeros(5, 2)
    with pytest.raises(ValueError, match=r"segment 0: rows \[8, 11\) of src \(10 rows\)"):
        hier_pack.segment_copy(src, [8], dst, [0], [3])
    with pytest.raises(ValueError, match="segment lists differ in length"):
        hier_pack.segment_copy(src, [0, 1], dst, [0], [1])
    with pytest.raises(ValueError, match="must agree in row shape"):
        hier_pack.segment_copy(src, [0], torch.zeros(5, 3), [0], [1])
    with pytest.raises(ValueError, match="backend must be one of"):
        hier_pack.segment_copy(src, [0], dst, [0], [1], backend="fast")


def test_cpu_op():
    """The C++ CPU path of the pack op (built here on first use, then cached)."""
    _check_backend("cpu", "cpu")
    with pytest.raises(IndexError, match=r"segment 0: rows \[8, 11\) of src \(10 rows\)"):
        hier_pack.load_op(cuda=False).segment_copy(torch.zeros(10, 2), torch.zeros(5, 2),
                                                   torch.tensor([[8], [0], [3]]), 3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "auto", "slices", "reference"])
def test_backends_on_gpu(backend):
    _check_backend(backend, "cuda")
    # misaligned views take the narrow-word paths of the kernel
    src = torch.arange(3 * 7 * 5, dtype=torch.uint8, device="cuda").view(-1, 5)[1:]
    got = hier_pack.segment_copy(src, [0, 7, 2], torch.zeros(30, 5, dtype=torch.uint8, device="cuda")[3:],
                                 [0, 10, 20], [3, 4, 5], backend)
    want = torch.zeros(27, 5, dtype=torch.uint8)
    want[0:3], want[10:14], want[20:25] = src[0:3].cpu(), src[7:11].cpu(), src[2:7].cpu()
    assert torch.equal(got.cpu(), want)
