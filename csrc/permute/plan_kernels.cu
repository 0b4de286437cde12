// Dispatch plans on the GPU, built by counting sorts (no nonzero, no argsort).
//
// send_plan: a flag per (destination rank, token) pair, one inclusive scan over the rank-major [R, T] flags, and
// each flagged pair writes its row at (scan - 1): rank-major, token order, exactly the reference's order. Every
// (token, rank) also writes where its row went (pos_TR, -1 when the token does not go to that rank): the inverse
// that gathers the sent rows and sums the returned ones without atomics.
//
// route_plan: a stable counting sort of the (row, k) pairs of ids_RK by local slot, in three launches:
//   1. count: a warp per chunk of kChunk pairs counts the chunk's slots in shared memory -> hist[chunk, slot];
//   2. scan: one block turns hist into each (chunk, slot)'s first position among its slot's pairs, sums the
//      slots, and writes the per-slot counts, the grouped GEMM's int32 offsets and each slot's start;
//   3. place: a warp per chunk places its pairs in order (ranking equal slots inside a 32-pair step with
//      __match_any_sync) and writes each pair's position back into pos_RK (-1 for pairs not on this rank).
// ids may be expert ids read through a slot map (ep = 1: the router's top-k straight in) or local slots.
//
// Both plans need their row count on the host to allocate. A caller that knows it passes it as `known` (>= 0):
// no copy, no wait on the device, and the validation flag is not read (the caller vouches for its inputs: the
// router's own top-k and the placement). route_plan can also be `bounded`: it allocates one row per pair and
// fills the rows past the real count with -1, again without waiting. Otherwise one device-to-host copy reads the
// count and the validation flag together.
#include <cub/block/block_scan.cuh>

#include "piper_cuda.cuh"

namespace piper {
namespace {

constexpr int kItems = 16;                 // pairs per lane per chunk
constexpr int kChunk = kWarp * kItems;     // pairs per chunk (one warp)
constexpr int64_t kMaxLocalSlots = 12288;  // shared-memory counters of one warp (48 KiB)
constexpr int kScanThreads = 1024;

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
                                 const int32_t* __restrict__ incl, int64_t T, int K, int64_t R,
                                 int64_t* __restrict__ token, int64_t* __restrict__ slots_out,
                                 int64_t* __restrict__ pos_TR) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= R * T) return;
    const int64_t r = i / T, t = i - r * T;
    if (!flags[i]) {
        pos_TR[t * R + r] = -1;
        return;
    }
    const int64_t pos = incl[i] - 1;
    token[pos] = t;
    pos_TR[t * R + r] = pos;
    for (int k = 0; k < K; ++k) {
        const int64_t e = idx[t * K + k];
        slots_out[pos * K + k] = (e >= 0 && rank[e] == r) ? slot[e] : -1;
    }
}

// The local slot of pair p (-1: not on this rank, dropped, or invalid; invalid ids raise the error flag).
__device__ __forceinline__ int64_t slot_of_pair(const int64_t* __restrict__ ids, int64_t p,
                                                const int64_t* __restrict__ map, int64_t M, int64_t L,
                                                int32_t* __restrict__ err) {
    const int64_t v = ids[p];
    if (v < 0) return -1;
    int64_t s = v;
    if (map != nullptr) {
        if (v >= M) {
            if (err) atomicMax(err, kExpertOutOfRange);
            return -1;
        }
        s = map[v];
    }
    if (s >= L) {
        if (err) atomicMax(err, kSlotOutOfRange);
        return -1;
    }
    return s < 0 ? -1 : s;
}

__global__ void route_count_kernel(const int64_t* __restrict__ ids, int64_t P, const int64_t* __restrict__ map,
                                   int64_t M, int64_t L, int32_t* __restrict__ hist, int32_t* __restrict__ err) {
    extern __shared__ int32_t cnt[];
    for (int64_t b = threadIdx.x; b < L; b += kWarp) cnt[b] = 0;
    __syncwarp();
    const int64_t base = static_cast<int64_t>(blockIdx.x) * kChunk;
    for (int it = 0; it < kItems; ++it) {
        const int64_t p = base + it * kWarp + threadIdx.x;
        if (p >= P) break;
        const int64_t s = slot_of_pair(ids, p, map, M, L, err);
        if (s >= 0) atomicAdd(&cnt[s], 1);
    }
    __syncwarp();
    for (int64_t b = threadIdx.x; b < L; b += kWarp) hist[blockIdx.x * L + b] = cnt[b];
}

// One block. hist [C, L] becomes, in place, the number of pairs of slot s in the chunks before c (the chunk's
// first position inside its slot's group). Then counts/offsets/starts per slot, and the bounded tail.
__global__ void __launch_bounds__(kScanThreads)
route_scan_kernel(int32_t* __restrict__ hist, int64_t C, int64_t L, int64_t* __restrict__ counts,
                  int32_t* __restrict__ offsets, int64_t* __restrict__ starts, int64_t* __restrict__ row,
                  int64_t* __restrict__ pair, int64_t n_alloc) {
    extern __shared__ int32_t part[];  // [G * L] group partial sums, then [L] slot totals
    const int64_t G = L >= kScanThreads ? 1 : (kScanThreads / L < C ? kScanThreads / L : (C > 0 ? C : 1));
    const int64_t per = (C + G - 1) / G;
    int32_t* total = part + G * L;
    for (int64_t i = threadIdx.x; i < G * L; i += kScanThreads) {  // (a) each (chunk range, slot) sums
        const int64_t g = i / L, s = i - g * L, c1 = (g + 1) * per < C ? (g + 1) * per : C;
        int32_t sum = 0;
        for (int64_t c = g * per; c < c1; ++c) sum += hist[c * L + s];
        part[i] = sum;
    }
    __syncthreads();
    for (int64_t s = threadIdx.x; s < L; s += kScanThreads) {  // (b) exclusive over ranges, slot totals
        int32_t run = 0;
        for (int64_t g = 0; g < G; ++g) {
            const int32_t t = part[g * L + s];
            part[g * L + s] = run;
            run += t;
        }
        total[s] = run;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < G * L; i += kScanThreads) {  // (c) exclusive over chunks, in place
        const int64_t g = i / L, s = i - g * L, c1 = (g + 1) * per < C ? (g + 1) * per : C;
        int32_t run = part[i];
        for (int64_t c = g * per; c < c1; ++c) {
            const int32_t t = hist[c * L + s];
            hist[c * L + s] = run;
            run += t;
        }
    }
    // (d) exclusive scan of the slot totals: each thread takes a contiguous run of slots
    const int64_t seg = (L + kScanThreads - 1) / kScanThreads;
    const int64_t s0 = threadIdx.x * seg, s1 = s0 + seg < L ? s0 + seg : L;
    int64_t local = 0;
    for (int64_t s = s0; s < s1; ++s) local += total[s];
    using Scan = cub::BlockScan<int64_t, kScanThreads>;
    __shared__ typename Scan::TempStorage scan_tmp;
    int64_t first = 0, all = 0;
    Scan(scan_tmp).ExclusiveSum(local, first, all);
    for (int64_t s = s0; s < s1; ++s) {
        starts[s] = first;
        counts[s] = total[s];
        first += total[s];
        offsets[s] = static_cast<int32_t>(first);
    }
    if (row != nullptr)  // bounded: the rows past the real count are not any expert's
        for (int64_t i = all + threadIdx.x; i < n_alloc; i += kScanThreads) row[i] = pair[i] = -1;
}

__global__ void route_place_kernel(const int64_t* __restrict__ ids, int64_t P, int K,
                                   const int64_t* __restrict__ map, int64_t M, int64_t L,
                                   const int32_t* __restrict__ prefix, const int64_t* __restrict__ starts,
                                   int64_t* __restrict__ row, int64_t* __restrict__ pair,
                                   int64_t* __restrict__ pos) {
    extern __shared__ int32_t cursor[];
    const int lane = threadIdx.x;
    for (int64_t b = lane; b < L; b += kWarp)
        cursor[b] = static_cast<int32_t>(starts[b]) + prefix[static_cast<int64_t>(blockIdx.x) * L + b];
    __syncwarp();
    const unsigned lower = (1u << lane) - 1u;
    const int64_t base = static_cast<int64_t>(blockIdx.x) * kChunk;
    for (int it = 0; it < kItems; ++it) {
        const int64_t p = base + it * kWarp + lane;
        const int64_t s = p < P ? slot_of_pair(ids, p, map, M, L, nullptr) : -1;
        const unsigned peers = __match_any_sync(kFullMask, s);  // every lane takes part, also past P
        int64_t dst = -1;
        if (s >= 0) dst = cursor[s] + __popc(peers & lower);
        __syncwarp();
        if (s >= 0 && (peers & lower) == 0) cursor[s] += __popc(peers);  // the group's first lane advances
        __syncwarp();
        if (p < P) pos[p] = dst;
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
    if (T == 0)
        return {at::empty({0}, lopts), at::zeros({R}, lopts), at::empty({0, K}, lopts), at::empty({0, R}, lopts)};
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
    at::Tensor token = at::empty({S}, lopts), slots_out = at::empty({S, K}, lopts), pos = at::empty({T, R}, lopts);
    send_rows_kernel<<<(RT + 255) / 256, 256, 0, stream>>>(
        idx.data_ptr<int64_t>(), rank.data_ptr<int64_t>(), slot.data_ptr<int64_t>(), flags.data_ptr<int32_t>(),
        incl.data_ptr<int32_t>(), T, static_cast<int>(K), R, token.data_ptr<int64_t>(),
        slots_out.data_ptr<int64_t>(), pos.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {token, counts, slots_out, pos};
}

std::vector<at::Tensor> route_plan_cuda(const at::Tensor& ids, const c10::optional<at::Tensor>& map, int64_t L,
                                        int64_t known, bool bounded) {
    const c10::cuda::CUDAGuard guard(ids.device());
    PIPER_CHECK_VALUE(L <= kMaxLocalSlots, "CUDA route_plan supports num_local up to ", kMaxLocalSlots, ", got ", L);
    const int64_t P = ids.numel(), K = ids.dim() == 2 ? ids.size(1) : 1;
    auto lopts = ids.options();
    at::Tensor counts = at::empty({L}, lopts), offsets = at::empty({L}, lopts.dtype(at::kInt));
    at::Tensor pos = at::empty(ids.sizes(), lopts);
    if (P == 0) {
        counts.zero_();
        offsets.zero_();
        return {at::empty({0}, lopts), at::empty({0}, lopts), pos, counts, offsets};
    }
    PIPER_CHECK_VALUE(P < (int64_t(1) << 31), "route_plan: rows * top_k (", P, ") must be < 2^31");
    const int64_t chunks = (P + kChunk - 1) / kChunk;
    const int64_t* map_ptr = map.has_value() ? map->data_ptr<int64_t>() : nullptr;
    const int64_t M = map.has_value() ? map->size(0) : 0;
    auto iopts = lopts.dtype(at::kInt);
    at::Tensor hist = at::empty({chunks, L}, iopts), starts = at::empty({L}, lopts);
    at::Tensor err = known < 0 && !bounded ? at::zeros({1}, iopts) : at::Tensor();
    int32_t* err_ptr = err.defined() ? err.data_ptr<int32_t>() : nullptr;
    auto stream = c10::cuda::getCurrentCUDAStream();
    route_count_kernel<<<chunks, kWarp, L * sizeof(int32_t), stream>>>(ids.data_ptr<int64_t>(), P, map_ptr, M, L,
                                                                        hist.data_ptr<int32_t>(), err_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor row, pair;
    if (bounded) {
        row = at::empty({P}, lopts);
        pair = at::empty({P}, lopts);
    }
    const int64_t G = L >= kScanThreads ? 1 : std::min<int64_t>(kScanThreads / L, chunks);
    const size_t smem = static_cast<size_t>(G * L + L) * sizeof(int32_t);
    if (smem > 48 * 1024)
        C10_CUDA_CHECK(cudaFuncSetAttribute(route_scan_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
    route_scan_kernel<<<1, kScanThreads, smem, stream>>>(
        hist.data_ptr<int32_t>(), chunks, L, counts.data_ptr<int64_t>(), offsets.data_ptr<int32_t>(),
        starts.data_ptr<int64_t>(), bounded ? row.data_ptr<int64_t>() : nullptr,
        bounded ? pair.data_ptr<int64_t>() : nullptr, P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!bounded) {
        int64_t N = known;
        if (known < 0) {
            const at::Tensor host = at::cat({offsets.slice(0, L - 1), err}).cpu();  // the one sync
            raise_plan_error(host.data_ptr<int32_t>()[1]);
            N = host.data_ptr<int32_t>()[0];
        }
        row = at::empty({N}, lopts);
        pair = at::empty({N}, lopts);
    }
    route_place_kernel<<<chunks, kWarp, L * sizeof(int32_t), stream>>>(
        ids.data_ptr<int64_t>(), P, static_cast<int>(K), map_ptr, M, L, hist.data_ptr<int32_t>(),
        starts.data_ptr<int64_t>(), row.data_ptr<int64_t>(), pair.data_ptr<int64_t>(), pos.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {row, pair, pos, counts, offsets};
}

}  // namespace piper
