// Fused MoE router kernels: one warp per token.
//
// Lane l holds the EPL contiguous experts [l*EPL, l*EPL + EPL) (EPL = 32 * EPL >= E, so E <= 1024), loaded as
// 16-byte vectors when the row is full. In one pass a warp computes the fp32 scores, adds the selection bias,
// ranks expert groups (group score = sum of the group's two best biased scores; lanes of a group merge their
// top-2 with xor shuffles when a group spans a power-of-two number of lanes, else a warp-wide merge per group),
// picks the top-k by K rounds of warp argmax (ties: lower expert id), normalises and scales the weights, and
// counts tokens per expert in a shared-memory histogram flushed once per block. The backward kernel recomputes
// nothing but the top-k weight sum: it reads the saved scores.
#include "piper_cuda.cuh"

namespace piper {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kNoExpert = 0x7fffffff;

template <typename T> __device__ __forceinline__ T exp_(T x);
template <> __device__ __forceinline__ float exp_<float>(float x) { return expf(x); }
template <> __device__ __forceinline__ double exp_<double>(double x) { return exp(x); }

template <typename T>
__device__ __forceinline__ T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// (va, ia) ranks before (vb, ib): a real candidate, larger value, then lower id.
template <typename T>
__device__ __forceinline__ bool ranks_before(T va, int ia, T vb, int ib) {
    return ia != kNoExpert && (ib == kNoExpert || va > vb || (va == vb && ia < ib));
}

template <typename T>
__device__ __forceinline__ void merge_top2(T& a1, T& a2, T o1, T o2) {
    const T hi = a1 > o1 ? a1 : o1, lo = a1 > o1 ? o1 : a1;
    const T second = a2 > o2 ? a2 : o2;
    a1 = hi;
    a2 = lo > second ? lo : second;
}

// Loads EPL elements of `row` starting at e0 into acc_t registers; vectorised when the whole row is present.
template <typename scalar_t, typename acc_t, int EPL>
__device__ __forceinline__ void load_lane(const scalar_t* row, int e0, int E, bool vec, acc_t (&v)[EPL], acc_t fill) {
    constexpr int V = EPL < vec16<scalar_t>() ? EPL : vec16<scalar_t>();
    if (vec) {
#pragma unroll
        for (int c = 0; c < EPL; c += V) {
            const Vec<scalar_t, V> x = load_vec<scalar_t, V>(row + e0 + c);
#pragma unroll
            for (int i = 0; i < V; ++i) v[c + i] = static_cast<acc_t>(x.v[i]);
        }
    } else {
#pragma unroll
        for (int j = 0; j < EPL; ++j) v[j] = e0 + j < E ? static_cast<acc_t>(row[e0 + j]) : fill;
    }
}

template <typename out_t, typename acc_t, int EPL>
__device__ __forceinline__ void store_lane(out_t* row, int e0, int E, bool vec, const acc_t (&v)[EPL]) {
    constexpr int V = EPL < vec16<out_t>() ? EPL : vec16<out_t>();
    if (vec) {
#pragma unroll
        for (int c = 0; c < EPL; c += V) {
            Vec<out_t, V> x;
#pragma unroll
            for (int i = 0; i < V; ++i) x.v[i] = static_cast<out_t>(v[c + i]);
            store_vec<out_t, V>(row + e0 + c, x);
        }
    } else {
#pragma unroll
        for (int j = 0; j < EPL; ++j)
            if (e0 + j < E) row[e0 + j] = static_cast<out_t>(v[j]);
    }
}

struct FwdArgs {
    int64_t T;
    int E, K, score_func, G, topk_groups, lanes_per_group;  // lanes_per_group 0: generic group merge
    bool normalize, vec;
    double scaling;
};

// Bitmask of the groups a token may route into (bit g set), from the biased selection scores.
template <typename acc_t, int EPL>
__device__ __forceinline__ unsigned kept_groups(const acc_t (&sel)[EPL], int lane, int e0, const FwdArgs& a) {
    const int P = a.E / a.G;
    acc_t my_gs = neg_inf<acc_t>();
    if (a.lanes_per_group > 0) {  // a group is exactly lanes_per_group (a power of two) whole lanes
        acc_t a1 = neg_inf<acc_t>(), a2 = neg_inf<acc_t>();
#pragma unroll
        for (int j = 0; j < EPL; ++j) merge_top2(a1, a2, sel[j], neg_inf<acc_t>());
        for (int off = a.lanes_per_group >> 1; off > 0; off >>= 1)
            merge_top2(a1, a2, __shfl_xor_sync(kFullMask, a1, off), __shfl_xor_sync(kFullMask, a2, off));
        const acc_t gs = P >= 2 ? a1 + a2 : a1;
        my_gs = __shfl_sync(kFullMask, gs, (lane < a.G ? lane : 0) * a.lanes_per_group);
    } else {
        for (int g = 0; g < a.G; ++g) {
            acc_t a1 = neg_inf<acc_t>(), a2 = neg_inf<acc_t>();
#pragma unroll
            for (int j = 0; j < EPL; ++j)
                if (e0 + j < a.E && (e0 + j) / P == g) merge_top2(a1, a2, sel[j], neg_inf<acc_t>());
#pragma unroll
            for (int off = 16; off > 0; off >>= 1)
                merge_top2(a1, a2, __shfl_xor_sync(kFullMask, a1, off), __shfl_xor_sync(kFullMask, a2, off));
            if (lane == g) my_gs = P >= 2 ? a1 + a2 : a1;
        }
    }
    int rank = 0;
    for (int h = 0; h < a.G; ++h) {
        const acc_t v = __shfl_sync(kFullMask, my_gs, h);
        rank += (v > my_gs || (v == my_gs && h < lane)) ? 1 : 0;
    }
    return __ballot_sync(kFullMask, lane < a.G && rank < a.topk_groups);
}

template <typename scalar_t, typename acc_t, int EPL>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarp)
gating_fwd_kernel(const scalar_t* __restrict__ logits, const acc_t* __restrict__ bias, FwdArgs a,
                  int64_t* __restrict__ out_idx, acc_t* __restrict__ out_w, acc_t* __restrict__ out_s,
                  unsigned long long* __restrict__ counts) {
    extern __shared__ int hist[];
    for (int e = threadIdx.x; e < a.E; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    const int lane = threadIdx.x % kWarp, e0 = lane * EPL;
    const acc_t ninf = neg_inf<acc_t>();
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; t < a.T;
         t += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
        acc_t s[EPL], sel[EPL];
        load_lane<scalar_t, acc_t, EPL>(logits + t * a.E, e0, a.E, a.vec, s, ninf);
        if (a.score_func == 0) {  // softmax over the row, fp32 (fp64 for fp64 logits)
            acc_t m = ninf;
#pragma unroll
            for (int j = 0; j < EPL; ++j) m = s[j] > m ? s[j] : m;
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                const acc_t o = __shfl_xor_sync(kFullMask, m, off);
                m = o > m ? o : m;
            }
            acc_t sum = 0;
#pragma unroll
            for (int j = 0; j < EPL; ++j) {
                s[j] = e0 + j < a.E ? exp_(s[j] - m) : acc_t(0);
                sum += s[j];
            }
            sum = warp_sum(sum);
#pragma unroll
            for (int j = 0; j < EPL; ++j) s[j] = s[j] / sum;
        } else {
#pragma unroll
            for (int j = 0; j < EPL; ++j) s[j] = acc_t(1) / (acc_t(1) + exp_(-s[j]));
        }
        store_lane<acc_t, acc_t, EPL>(out_s + t * a.E, e0, a.E, a.vec, s);
#pragma unroll
        for (int j = 0; j < EPL; ++j) {
            const bool real = e0 + j < a.E;  // lanes past E hold no expert: never selectable
            const acc_t v = (bias != nullptr && real) ? s[j] + bias[e0 + j] : s[j];
            sel[j] = (real && !isnan(v)) ? v : ninf;
        }
        if (a.G > 1) {
            const unsigned keep = kept_groups<acc_t, EPL>(sel, lane, e0, a);
            const int P = a.E / a.G;
#pragma unroll
            for (int j = 0; j < EPL; ++j)
                if (e0 + j < a.E && !((keep >> ((e0 + j) / P)) & 1u)) sel[j] = ninf;
        }
        unsigned taken = 0;
        acc_t bv = ninf, bs = 0, wsum = 0, my_w = 0;
        int bi = kNoExpert, my_i = 0;
#pragma unroll
        for (int j = 0; j < EPL; ++j)
            if (e0 + j < a.E && ranks_before(sel[j], e0 + j, bv, bi)) { bv = sel[j]; bi = e0 + j; bs = s[j]; }
        for (int k = 0; k < a.K; ++k) {
            acc_t wv = bv, ws = bs;
            int wi = bi;
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                const acc_t ov = __shfl_xor_sync(kFullMask, wv, off), os = __shfl_xor_sync(kFullMask, ws, off);
                const int oi = __shfl_xor_sync(kFullMask, wi, off);
                if (ranks_before(ov, oi, wv, wi)) { wv = ov; wi = oi; ws = os; }
            }
            wsum += ws;
            if (lane == k) { my_i = wi; my_w = ws; }
            if (wi / EPL == lane) {  // the owner retires the winner and finds its next best
                taken |= 1u << (wi - e0);
                bv = ninf; bi = kNoExpert;
#pragma unroll
                for (int j = 0; j < EPL; ++j)
                    if (e0 + j < a.E && !((taken >> j) & 1u) && ranks_before(sel[j], e0 + j, bv, bi)) {
                        bv = sel[j]; bi = e0 + j; bs = s[j];
                    }
            }
        }
        if (lane < a.K) {
            const acc_t denom = wsum > acc_t(kFloatTiny) ? wsum : acc_t(kFloatTiny);
            const acc_t w = a.normalize ? my_w / denom : my_w;
            out_idx[t * a.K + lane] = my_i;
            out_w[t * a.K + lane] = w * static_cast<acc_t>(a.scaling);
            atomicAdd(&hist[my_i], 1);
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < a.E; e += blockDim.x)
        if (hist[e]) atomicAdd(&counts[e], static_cast<unsigned long long>(hist[e]));
}

template <typename scalar_t, typename acc_t, int EPL>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarp)
gating_bwd_kernel(const acc_t* __restrict__ gw, const acc_t* __restrict__ gs, const acc_t* __restrict__ scores,
                  const int64_t* __restrict__ idx, FwdArgs a, scalar_t* __restrict__ out) {
    const int lane = threadIdx.x % kWarp, e0 = lane * EPL;
    const acc_t c = static_cast<acc_t>(a.scaling), tiny = static_cast<acc_t>(kFloatTiny);
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; t < a.T;
         t += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
        acc_t s[EPL], g[EPL];
        load_lane<acc_t, acc_t, EPL>(scores + t * a.E, e0, a.E, a.vec, s, acc_t(0));
        if (gs != nullptr) {
            load_lane<acc_t, acc_t, EPL>(gs + t * a.E, e0, a.E, a.vec, g, acc_t(0));
        } else {
#pragma unroll
            for (int j = 0; j < EPL; ++j) g[j] = 0;
        }
        if (gw != nullptr) {  // w_k = c * s_k / max(sum_j s_j, tiny), or c * s_k without normalisation
            int ik = 0;
            acc_t sk = 0, gk = 0;
            if (lane < a.K) {
                ik = static_cast<int>(idx[t * a.K + lane]);
                sk = scores[t * a.E + ik];
                gk = gw[t * a.K + lane];
            }
            const acc_t ssum = warp_sum(sk), dot = warp_sum(gk * sk);
            const acc_t denom = ssum > tiny ? ssum : tiny;
            const acc_t shared = ssum >= tiny ? dot / (denom * denom) : acc_t(0);
            const acc_t dk = a.normalize ? c * (gk / denom - shared) : c * gk;
            for (int k = 0; k < a.K; ++k) {
                const int i = __shfl_sync(kFullMask, ik, k);
                const acc_t d = __shfl_sync(kFullMask, dk, k);
#pragma unroll
                for (int j = 0; j < EPL; ++j)
                    if (e0 + j == i) g[j] += d;
            }
        }
        if (a.score_func == 0) {
            acc_t dot = 0;
#pragma unroll
            for (int j = 0; j < EPL; ++j) dot += s[j] * g[j];
            dot = warp_sum(dot);
#pragma unroll
            for (int j = 0; j < EPL; ++j) g[j] = s[j] * (g[j] - dot);
        } else {
#pragma unroll
            for (int j = 0; j < EPL; ++j) g[j] = g[j] * s[j] * (acc_t(1) - s[j]);
        }
        store_lane<scalar_t, acc_t, EPL>(out + t * a.E, e0, a.E, a.vec, g);
    }
}

int experts_per_lane(int64_t E) {
    int epl = 2;  // EPL 1 would add instantiations for E <= 32 only; two experts a lane costs nothing there
    while (epl * kWarp < E) epl *= 2;
    return epl;
}

#define PIPER_EPL_SWITCH(EPL_VALUE, ...)                                        \
    switch (EPL_VALUE) {                                                        \
        case 2: { constexpr int EPL = 2; __VA_ARGS__(); break; }               \
        case 4: { constexpr int EPL = 4; __VA_ARGS__(); break; }               \
        case 8: { constexpr int EPL = 8; __VA_ARGS__(); break; }               \
        case 16: { constexpr int EPL = 16; __VA_ARGS__(); break; }             \
        case 32: { constexpr int EPL = 32; __VA_ARGS__(); break; }             \
        default: TORCH_CHECK(false, "unsupported experts per lane ", EPL_VALUE); \
    }

void check_cuda_limits(int64_t E, int64_t K, int64_t G) {
    PIPER_CHECK_VALUE(E <= 32 * kWarp, "CUDA gating supports up to 1024 experts, got ", E);
    PIPER_CHECK_VALUE(K <= kWarp, "CUDA gating supports top_k up to 32, got ", K);
    PIPER_CHECK_VALUE(G <= kWarp, "CUDA gating supports up to 32 groups, got n_groups ", G);
}

}  // namespace

void gating_forward_cuda(const at::Tensor& logits, const c10::optional<at::Tensor>& bias, int64_t top_k,
                         int64_t score_func, int64_t n_groups, int64_t topk_groups, bool normalize, double scaling,
                         at::Tensor& idx, at::Tensor& weights, at::Tensor& scores, at::Tensor& counts) {
    const int64_t T = logits.size(0), E = logits.size(1);
    check_cuda_limits(E, top_k, n_groups);
    const c10::cuda::CUDAGuard guard(logits.device());
    auto stream = c10::cuda::getCurrentCUDAStream();
    // counts arrive uninitialised: one memset on the stream (at::zeros would be a fill kernel through the dispatcher)
    C10_CUDA_CHECK(cudaMemsetAsync(counts.data_ptr(), 0, counts.nbytes(), stream));
    if (T == 0) return;
    const int epl = experts_per_lane(E);
    const int P = static_cast<int>(E / n_groups);
    int lpg = 0;  // fast group merge: a group is a power-of-two number of whole lanes
    if (n_groups > 1 && P % epl == 0 && ((P / epl) & (P / epl - 1)) == 0) lpg = P / epl;
    FwdArgs a{T, static_cast<int>(E), static_cast<int>(top_k), static_cast<int>(score_func),
              static_cast<int>(n_groups), static_cast<int>(topk_groups), lpg, normalize, false, scaling};
    a.vec = E == epl * kWarp && aligned16(logits.data_ptr()) && aligned16(scores.data_ptr());
    const int64_t blocks = fill_grid((T + kWarpsPerBlock - 1) / kWarpsPerBlock, 4);
    const size_t smem = static_cast<size_t>(E) * sizeof(int);
    PIPER_DISPATCH_FLOATS(logits.scalar_type(), "gating_forward_cuda", [&] {
        using acc_t = typename OpMath<scalar_t>::type;
        const acc_t* b = bias.has_value() ? bias->data_ptr<acc_t>() : nullptr;
        PIPER_EPL_SWITCH(epl, [&] {
            gating_fwd_kernel<scalar_t, acc_t, EPL><<<blocks, kWarpsPerBlock * kWarp, smem, stream>>>(
                logits.data_ptr<scalar_t>(), b, a, idx.data_ptr<int64_t>(), weights.data_ptr<acc_t>(),
                scores.data_ptr<acc_t>(), reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
        });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gating_backward_cuda(const c10::optional<at::Tensor>& grad_w, const c10::optional<at::Tensor>& grad_s,
                          const at::Tensor& scores, const at::Tensor& idx, int64_t score_func, bool normalize,
                          double scaling, at::Tensor& grad_logits) {
    const int64_t T = scores.size(0), E = scores.size(1), K = idx.size(1);
    check_cuda_limits(E, K, 1);
    if (T == 0) return;
    const c10::cuda::CUDAGuard guard(scores.device());
    const int epl = experts_per_lane(E);
    FwdArgs a{T, static_cast<int>(E), static_cast<int>(K), static_cast<int>(score_func), 1, 1, 0, normalize, false,
              scaling};
    a.vec = E == epl * kWarp && aligned16(scores.data_ptr()) && aligned16(grad_logits.data_ptr()) &&
            (!grad_s.has_value() || aligned16(grad_s->data_ptr()));
    const int64_t blocks = fill_grid((T + kWarpsPerBlock - 1) / kWarpsPerBlock, 4);
    auto stream = c10::cuda::getCurrentCUDAStream();
    PIPER_DISPATCH_FLOATS(grad_logits.scalar_type(), "gating_backward_cuda", [&] {
        using acc_t = typename OpMath<scalar_t>::type;
        TORCH_CHECK(scores.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "gating backward: scores dtype ",
                    scores.scalar_type(), " does not match the logits dtype ", grad_logits.scalar_type());
        const acc_t* gw = grad_w.has_value() ? grad_w->data_ptr<acc_t>() : nullptr;
        const acc_t* gs = grad_s.has_value() ? grad_s->data_ptr<acc_t>() : nullptr;
        PIPER_EPL_SWITCH(epl, [&] {
            gating_bwd_kernel<scalar_t, acc_t, EPL><<<blocks, kWarpsPerBlock * kWarp, 0, stream>>>(
                gw, gs, scores.data_ptr<acc_t>(), idx.data_ptr<int64_t>(), a, grad_logits.data_ptr<scalar_t>());
        });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace piper
