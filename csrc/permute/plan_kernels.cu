// Dispatch plans on the GPU, built by counting sorts (no nonzero, no argsort).
//
// send_plan: a flag per (destination rank, token) pair, one inclusive scan over the rank-major [R, T] flags, and
// each flagged pair writes its row at (scan - 1): rank-major, token order, exactly the reference's order.
// expand_plan: a stable counting sort of the (row, k) pairs by local slot. Pairs are cut into chunks of
// kChunk; a warp per chunk counts its slots (pass 1); a column scan over chunks gives every (chunk, slot) its
// first position (torch's cumsum); a warp per chunk then places its pairs in order, ranking equal slots inside a
// 32-pair step with __match_any_sync (pass 2). Groups can be padded to a multiple of `align` rows (-1 rows).
// Both plans need the row count on the host to allocate: one device-to-host copy, which also carries the error
// flag of the validation done on the way. A caller that already knows the count (the dispatcher exchanges it
// with the row counts) passes it as `known` (>= 0): no copy, no wait on the device, and the validation flag is
// not read (the caller vouches for its inputs: the router's own top-k and the placement).
#include "piper_cuda.cuh"

namespace piper {
namespace {

constexpr int kItems = 16;                 // pairs per lane per chunk
constexpr int kChunk = kWarp * kItems;     // pairs per chunk (one warp)
constexpr int64_t kMaxLocalSlots = 12288;  // shared-memory counters of one warp (48 KiB)

__global__ void send_flags_kernel(const int64_t* __restrict__ idx, const int64_t* __restrict__ rank,
                                  const int64_t* __restrict__ slot, int64_t T, int K, int64_t E, int64_t R,
                                  int32_t* __restrict__ flags, int32_t* __restrict__ err) {
    const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (t >= T) return;
    for (int k = 0; k < K; ++k) {
        const int64_t e = idx[t * K + k];
        if (e < 0) continue;  // dropped assignment
        if (e >= E) { atomicMax(err, kExpertOutOfRange); continue; }
        const int64_t r = rank[e];
        if (r < 0 || r >= R) { atomicMax(err, kRankOutOfRange); continue; }
        if (slot[e] < 0) atomicMax(err, kSlotNegative);
        flags[r * T + t] = 1;
    }
}

__global__ void send_rows_kernel(const int64_t* __restrict__ idx, const int64_t* __restrict__ rank,
                                 const int64_t* __restrict__ slot, const int32_t* __restrict__ flags,
                                 const int32_t* __restrict__ incl, int64_t T, int K, int64_t* __restrict__ token,
                                 int64_t* __restrict__ slots_out, int64_t RT) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= RT || !flags[i]) return;
    const int64_t r = i / T, t = i - r * T, pos = incl[i] - 1;
    token[pos] = t;
    for (int k = 0; k < K; ++k) {
        const int64_t e = idx[t * K + k];
        slots_out[pos * K + k] = (e >= 0 && rank[e] == r) ? slot[e] : -1;
    }
}

__global__ void expand_count_kernel(const int64_t* __restrict__ slots, int64_t P, int64_t L,
                                    int32_t* __restrict__ hist, int32_t* __restrict__ err) {
    extern __shared__ int32_t cnt[];
    for (int64_t b = threadIdx.x; b < L; b += kWarp) cnt[b] = 0;
    __syncwarp();
    const int64_t base = static_cast<int64_t>(blockIdx.x) * kChunk;
    for (int it = 0; it < kItems; ++it) {
        const int64_t p = base + it * kWarp + threadIdx.x;
        if (p >= P) break;
        const int64_t s = slots[p];
        if (s < 0) continue;
        if (s >= L) { atomicMax(err, kSlotOutOfRange); continue; }
        atomicAdd(&cnt[s], 1);
    }
    __syncwarp();
    for (int64_t b = threadIdx.x; b < L; b += kWarp) hist[blockIdx.x * L + b] = cnt[b];
}

__global__ void expand_place_kernel(const int64_t* __restrict__ slots, int64_t P, int K, int64_t L,
                                    const int32_t* __restrict__ hist, const int32_t* __restrict__ incl,
                                    const int64_t* __restrict__ start, int64_t* __restrict__ row,
                                    int64_t* __restrict__ pair) {
    extern __shared__ int32_t cursor[];
    const int lane = threadIdx.x;
    for (int64_t b = lane; b < L; b += kWarp) {
        const int64_t c = static_cast<int64_t>(blockIdx.x) * L + b;
        // first position of this chunk's pairs of slot b
        cursor[b] = static_cast<int32_t>(start[b]) + incl[c] - hist[c];
    }
    __syncwarp();
    const unsigned lower = (1u << lane) - 1u;
    const int64_t base = static_cast<int64_t>(blockIdx.x) * kChunk;
    for (int it = 0; it < kItems; ++it) {
        const int64_t p = base + it * kWarp + lane;
        const int64_t s = p < P ? slots[p] : -1;
        const unsigned peers = __match_any_sync(kFullMask, s);
        int64_t dst = 0;
        if (s >= 0) dst = cursor[s] + __popc(peers & lower);
        __syncwarp();
        if (s >= 0 && (peers & lower) == 0) cursor[s] += __popc(peers);  // the group's first lane advances
        __syncwarp();
        if (s >= 0) {
            row[dst] = p / K;
            pair[dst] = p;
        }
    }
}

void raise_plan_error(int32_t code) {
    PIPER_CHECK_VALUE(code == kPlanOk, plan_error_message(code));
}

}  // namespace

std::vector<at::Tensor> send_plan_cuda(const at::Tensor& idx, const at::Tensor& rank, const at::Tensor& slot,
                                       int64_t R, int64_t known) {
    const c10::cuda::CUDAGuard guard(idx.device());
    const int64_t T = idx.size(0), K = idx.size(1), E = rank.size(0), RT = R * T;
    auto lopts = idx.options();
    if (T == 0) return {at::empty({0}, lopts), at::zeros({R}, lopts), at::empty({0, K}, lopts)};
    PIPER_CHECK_VALUE(RT < (int64_t(1) << 31), "send_plan: ep_size * tokens (", RT, ") must be < 2^31");
    auto iopts = lopts.dtype(at::kInt);
    at::Tensor flags = at::zeros({RT}, iopts), err = at::zeros({1}, iopts);
    auto stream = c10::cuda::getCurrentCUDAStream();
    send_flags_kernel<<<(T + 255) / 256, 256, 0, stream>>>(idx.data_ptr<int64_t>(), rank.data_ptr<int64_t>(),
                                                           slot.data_ptr<int64_t>(), T, static_cast<int>(K), E, R,
                                                           flags.data_ptr<int32_t>(), err.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor incl = at::cumsum(flags, 0, at::kInt);
    int64_t S = known;
    if (known < 0) {
        const at::Tensor host = at::cat({incl.slice(0, RT - 1), err}).cpu();  // the one sync: total and error
        raise_plan_error(host.data_ptr<int32_t>()[1]);
        S = host.data_ptr<int32_t>()[0];
    }
    at::Tensor last = incl.view({R, T}).select(1, T - 1).to(at::kLong);
    at::Tensor counts = at::diff(last, 1, 0, at::zeros({1}, lopts));
    at::Tensor token = at::empty({S}, lopts), slots_out = at::empty({S, K}, lopts);
    if (S > 0) {
        send_rows_kernel<<<(RT + 255) / 256, 256, 0, stream>>>(
            idx.data_ptr<int64_t>(), rank.data_ptr<int64_t>(), slot.data_ptr<int64_t>(), flags.data_ptr<int32_t>(),
            incl.data_ptr<int32_t>(), T, static_cast<int>(K), token.data_ptr<int64_t>(),
            slots_out.data_ptr<int64_t>(), RT);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return {token, counts, slots_out};
}

std::vector<at::Tensor> expand_plan_cuda(const at::Tensor& slots, int64_t K, int64_t L, int64_t align,
                                         int64_t known) {
    const c10::cuda::CUDAGuard guard(slots.device());
    PIPER_CHECK_VALUE(L <= kMaxLocalSlots, "CUDA expand_plan supports num_local up to ", kMaxLocalSlots, ", got ", L);
    const int64_t P = slots.numel();
    auto lopts = slots.options();
    if (P == 0) return {at::empty({0}, lopts), at::empty({0}, lopts), at::zeros({L}, lopts)};
    PIPER_CHECK_VALUE(P < (int64_t(1) << 31), "expand_plan: rows * top_k (", P, ") must be < 2^31");
    const int64_t chunks = (P + kChunk - 1) / kChunk;
    auto iopts = lopts.dtype(at::kInt);
    at::Tensor hist = at::empty({chunks, L}, iopts), err = at::zeros({1}, iopts);
    auto stream = c10::cuda::getCurrentCUDAStream();
    expand_count_kernel<<<chunks, kWarp, L * sizeof(int32_t), stream>>>(slots.data_ptr<int64_t>(), P, L,
                                                                         hist.data_ptr<int32_t>(),
                                                                         err.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor incl = at::cumsum(hist, 0, at::kInt);  // per slot, over chunks
    at::Tensor counts = incl.select(0, chunks - 1).to(at::kLong);
    at::Tensor padded = align > 1 ? at::floor_divide(counts + (align - 1), align) * align : counts;
    at::Tensor ends = at::cumsum(padded, 0);
    at::Tensor start = ends - padded;
    int64_t N = known;
    if (known < 0) {
        const at::Tensor host = at::cat({ends.slice(0, L - 1), err.to(at::kLong)}).cpu();
        raise_plan_error(static_cast<int32_t>(host.data_ptr<int64_t>()[1]));
        N = host.data_ptr<int64_t>()[0];
    }
    PIPER_CHECK_VALUE(N < (int64_t(1) << 31), "expand_plan: padded rows (", N, ") must be < 2^31");
    at::Tensor row = align > 1 ? at::full({N}, -1, lopts) : at::empty({N}, lopts);
    at::Tensor pair = align > 1 ? at::full({N}, -1, lopts) : at::empty({N}, lopts);
    expand_place_kernel<<<chunks, kWarp, L * sizeof(int32_t), stream>>>(
        slots.data_ptr<int64_t>(), P, static_cast<int>(K), L, hist.data_ptr<int32_t>(), incl.data_ptr<int32_t>(),
        start.data_ptr<int64_t>(), row.data_ptr<int64_t>(), pair.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {row, pair, padded};
}

}  // namespace piper
