// Row movement kernels of the MoE dispatch: gather (permute), weighted combine (unpermute), the combine's backward
// (gradient rows and weight gradients in one pass), row dot (weight grad alone).
//
// One warp per row, 16-byte vectors (scalar fallback when the row length or a pointer is not 16-byte aligned),
// several vectors in flight per lane. combine reads the inverse of `index` (a CSR: starts and input rows per
// output row), which combine_index builds once per plan (counts by atomics, one scan, a fill by atomics) and every
// combine over the same index reuses: a combine is then one launch. Each output row gets one warp that sums its
// inputs in fp32 registers and writes the row once: every input row is read once and every output row written
// once, with no fp32 staging buffer. For an output row with at most 32 inputs, the warp sorts them by input id
// first, so the sum runs in the reference's order and is deterministic; rows with more inputs are summed in fill
// order.
#include "piper_cuda.cuh"

namespace piper {
namespace {

constexpr int kRowsPerBlock = 8;  // warps per block
constexpr int kUnroll = 2;        // vectors per lane per column step

template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ void fma_vec(acc_t (&acc)[V], const Vec<scalar_t, V>& v, acc_t w) {
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] += static_cast<acc_t>(v.v[i]) * w;
}

template <typename scalar_t, typename acc_t, int V, bool WEIGHTED>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp)
gather_rows_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ index, const acc_t* __restrict__ w,
                   int64_t S, int64_t M, int64_t D, scalar_t* __restrict__ out) {
    const int64_t s = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
    if (s >= S) return;
    const int lane = threadIdx.x % kWarp;
    const int64_t i = index[s], nv = D / V;
    CUDA_KERNEL_ASSERT(i >= -1 && i < M);
    Vec<scalar_t, V>* dst = reinterpret_cast<Vec<scalar_t, V>*>(out + s * D);
    if (i < 0) {  // padding row
        Vec<scalar_t, V> zero;
#pragma unroll
        for (int k = 0; k < V; ++k) zero.v[k] = scalar_t(0);
        for (int64_t c = lane; c < nv; c += kWarp) dst[c] = zero;
        return;
    }
    const Vec<scalar_t, V>* src = reinterpret_cast<const Vec<scalar_t, V>*>(x + i * D);
    const acc_t wt = WEIGHTED ? w[s] : acc_t(1);
    constexpr int U = 4;
    for (int64_t c0 = lane; c0 < nv; c0 += kWarp * U) {
        Vec<scalar_t, V> buf[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (c0 + u * kWarp < nv) buf[u] = src[c0 + u * kWarp];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (c0 + u * kWarp >= nv) continue;
            if (WEIGHTED) {
#pragma unroll
                for (int k = 0; k < V; ++k) buf[u].v[k] = static_cast<scalar_t>(static_cast<acc_t>(buf[u].v[k]) * wt);
            }
            dst[c0 + u * kWarp] = buf[u];
        }
    }
}

__global__ void csr_count_kernel(const int64_t* __restrict__ index, int64_t N, int64_t O, int32_t* __restrict__ cnt) {
    const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const int64_t o = index[n];
    CUDA_KERNEL_ASSERT(o >= -1 && o < O);
    if (o >= 0) atomicAdd(&cnt[o], 1);
}

// ends[o] holds the inclusive scan; each row takes a slot from its end, leaving ends[o] = start of row o.
__global__ void csr_fill_kernel(const int64_t* __restrict__ index, int64_t N, int32_t* __restrict__ ends,
                                int32_t* __restrict__ list) {
    const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const int64_t o = index[n];
    if (o >= 0) list[atomicSub(&ends[o], 1) - 1] = static_cast<int32_t>(n);
}

template <typename scalar_t, typename acc_t, int V, bool WEIGHTED>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp)
combine_rows_kernel(const scalar_t* __restrict__ y, const int32_t* __restrict__ starts,
                    const int32_t* __restrict__ list, const acc_t* __restrict__ w, int64_t O, int64_t D,
                    scalar_t* __restrict__ out) {
    const int64_t o = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
    if (o >= O) return;
    const int lane = threadIdx.x % kWarp;
    const int beg = starts[o], m = starts[o + 1] - beg;
    int my_n = 0;
    acc_t my_w = 0;
    if (m <= kWarp) {  // sort the (few) inputs by id: the reference's summation order, deterministic
        const int n = lane < m ? list[beg + lane] : 0x7fffffff;
        int rank = 0, src = 0;
        for (int j = 0; j < m; ++j) rank += __shfl_sync(kFullMask, n, j) < n ? 1 : 0;
        for (int j = 0; j < m; ++j) src = __shfl_sync(kFullMask, rank, j) == lane ? j : src;
        my_n = __shfl_sync(kFullMask, n, src);
        if (lane < m) my_w = WEIGHTED ? w[my_n] : acc_t(1);
    }
    const int64_t nv = D / V;
    Vec<scalar_t, V>* dst = reinterpret_cast<Vec<scalar_t, V>*>(out + o * D);
    // The column loop must be warp-uniform: every lane takes part in the shuffles below, also a lane whose
    // columns ran out (a row of fewer than 32 * kUnroll vectors, or not a multiple of it).
    for (int64_t base = 0; base < nv; base += kWarp * kUnroll) {
        const int64_t c0 = base + lane;
        acc_t acc[kUnroll][V];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
            for (int k = 0; k < V; ++k) acc[u][k] = 0;
        for (int b0 = 0; b0 < m; b0 += kWarp) {
            const int cnt = m - b0 < kWarp ? m - b0 : kWarp;
            int bn = my_n;
            acc_t bw = my_w;
            if (m > kWarp) {
                bn = lane < cnt ? list[beg + b0 + lane] : 0;
                bw = lane < cnt ? (WEIGHTED ? w[bn] : acc_t(1)) : acc_t(0);
            }
#pragma unroll 4
            for (int p = 0; p < cnt; ++p) {
                const int n = __shfl_sync(kFullMask, bn, p);
                const acc_t wt = __shfl_sync(kFullMask, bw, p);
                const Vec<scalar_t, V>* src = reinterpret_cast<const Vec<scalar_t, V>*>(y + n * D);
#pragma unroll
                for (int u = 0; u < kUnroll; ++u)
                    if (c0 + u * kWarp < nv) fma_vec<scalar_t, acc_t, V>(acc[u], src[c0 + u * kWarp], wt);
            }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (c0 + u * kWarp >= nv) continue;
            Vec<scalar_t, V> r;
#pragma unroll
            for (int k = 0; k < V; ++k) r.v[k] = static_cast<scalar_t>(acc[u][k]);
            dst[c0 + u * kWarp] = r;
        }
    }
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp)
row_dot_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ g, const int64_t* __restrict__ index,
               int64_t N, int64_t O, int64_t D, acc_t* __restrict__ out) {
    const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
    if (n >= N) return;
    const int lane = threadIdx.x % kWarp;
    const int64_t i = index[n], nv = D / V;
    CUDA_KERNEL_ASSERT(i >= -1 && i < O);
    acc_t dot = 0;
    if (i >= 0) {
        const Vec<scalar_t, V>* a = reinterpret_cast<const Vec<scalar_t, V>*>(y + n * D);
        const Vec<scalar_t, V>* b = reinterpret_cast<const Vec<scalar_t, V>*>(g + i * D);
        for (int64_t c = lane; c < nv; c += kWarp) {
            const Vec<scalar_t, V> va = a[c], vb = b[c];
#pragma unroll
            for (int k = 0; k < V; ++k) dot += static_cast<acc_t>(va.v[k]) * static_cast<acc_t>(vb.v[k]);
        }
    }
    dot = warp_sum(dot);
    if (lane == 0) out[n] = dot;
}

// Backward of the weighted combine in one pass over the rows: g = grad_out[index[n]] is read once and gives both
// grad_y[n] = w[n] * g (in y's dtype, as the weighted gather) and grad_w[n] = <y[n], g> (as row_dot).
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp)
combine_grad_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                    const int64_t* __restrict__ index, const acc_t* __restrict__ w, int64_t N, int64_t O, int64_t D,
                    scalar_t* __restrict__ grad_y, acc_t* __restrict__ grad_w) {
    const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
    if (n >= N) return;  // warp-uniform: one row per warp
    const int lane = threadIdx.x % kWarp;
    const int64_t i = index[n], nv = D / V;
    CUDA_KERNEL_ASSERT(i >= -1 && i < O);
    Vec<scalar_t, V>* dst = reinterpret_cast<Vec<scalar_t, V>*>(grad_y + n * D);
    acc_t dot = 0;
    if (i < 0) {  // a skipped input row: zero gradient row, zero weight gradient
        Vec<scalar_t, V> zero;
#pragma unroll
        for (int k = 0; k < V; ++k) zero.v[k] = scalar_t(0);
        for (int64_t c = lane; c < nv; c += kWarp) dst[c] = zero;
    } else {
        const Vec<scalar_t, V>* src = reinterpret_cast<const Vec<scalar_t, V>*>(g + i * D);
        const Vec<scalar_t, V>* yr = reinterpret_cast<const Vec<scalar_t, V>*>(y + n * D);
        const acc_t wt = w[n];
        constexpr int U = 2;
        for (int64_t c0 = lane; c0 < nv; c0 += kWarp * U) {
            Vec<scalar_t, V> gb[U], yb[U];
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (c0 + u * kWarp < nv) {
                    gb[u] = src[c0 + u * kWarp];
                    yb[u] = yr[c0 + u * kWarp];
                }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (c0 + u * kWarp >= nv) continue;
                Vec<scalar_t, V> r;
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    const acc_t gv = static_cast<acc_t>(gb[u].v[k]);
                    dot += static_cast<acc_t>(yb[u].v[k]) * gv;
                    r.v[k] = static_cast<scalar_t>(gv * wt);
                }
                dst[c0 + u * kWarp] = r;
            }
        }
    }
    dot = warp_sum(dot);
    if (lane == 0) grad_w[n] = dot;
}

// 16-byte vectors when every row starts 16-byte aligned, else one element at a time.
template <typename scalar_t>
bool use_vec(int64_t D, std::initializer_list<const void*> ptrs) {
    if (D % vec16<scalar_t>() != 0) return false;
    for (const void* p : ptrs)
        if (!aligned16(p)) return false;
    return true;
}

// Calls launch(V, W) with V the vector width (a 16-byte vector or one element, as std::integral_constant) and W
// whether rows are weighted (std::true_type / std::false_type): the one place that picks a kernel instantiation.
template <typename scalar_t, typename F>
void launch_rows(bool vec, bool weighted, F&& launch) {
    using VV = std::integral_constant<int, vec16<scalar_t>()>;
    using V1 = std::integral_constant<int, 1>;
    if (vec) {
        weighted ? launch(VV{}, std::true_type{}) : launch(VV{}, std::false_type{});
    } else {
        weighted ? launch(V1{}, std::true_type{}) : launch(V1{}, std::false_type{});
    }
}

int64_t row_blocks(int64_t rows) { return (rows + kRowsPerBlock - 1) / kRowsPerBlock; }

}  // namespace

void gather_rows_cuda(const at::Tensor& x, const at::Tensor& index, const c10::optional<at::Tensor>& w,
                      at::Tensor& out) {
    const int64_t S = index.size(0), M = x.size(0), D = x.size(1);
    if (S == 0 || D == 0) return;
    const c10::cuda::CUDAGuard guard(x.device());
    auto stream = c10::cuda::getCurrentCUDAStream();
    PIPER_DISPATCH_FLOATS(x.scalar_type(), "gather_rows_cuda", [&] {
        using acc_t = typename OpMath<scalar_t>::type;
        const acc_t* wp = w.has_value() ? w->data_ptr<acc_t>() : nullptr;
        launch_rows<scalar_t>(use_vec<scalar_t>(D, {x.data_ptr(), out.data_ptr()}), wp != nullptr,
                              [&](auto vtag, auto wtag) {
            constexpr int V = decltype(vtag)::value;
            constexpr bool W = decltype(wtag)::value;
            gather_rows_kernel<scalar_t, acc_t, V, W><<<row_blocks(S), kRowsPerBlock * kWarp, 0, stream>>>(
                x.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), wp, S, M, D, out.data_ptr<scalar_t>());
        });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void combine_index_cuda(const at::Tensor& index, int64_t O, at::Tensor& starts, at::Tensor& rows) {
    const int64_t N = index.size(0);
    PIPER_CHECK_VALUE(N < (int64_t(1) << 31), "combine_rows supports fewer than 2^31 rows, got ", N);
    const c10::cuda::CUDAGuard guard(index.device());
    auto stream = c10::cuda::getCurrentCUDAStream();
    at::Tensor cnt = at::zeros({O + 1}, index.options().dtype(at::kInt));
    if (N > 0) {
        csr_count_kernel<<<(N + 255) / 256, 256, 0, stream>>>(index.data_ptr<int64_t>(), N, O,
                                                              cnt.data_ptr<int32_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    starts = at::cumsum(cnt, 0, at::kInt);  // inclusive ends; the fill turns them into starts; [O] = valid rows
    rows = at::full({N}, -1, cnt.options());
    if (N > 0) {
        csr_fill_kernel<<<(N + 255) / 256, 256, 0, stream>>>(index.data_ptr<int64_t>(), N,
                                                             starts.data_ptr<int32_t>(), rows.data_ptr<int32_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
}

void combine_rows_cuda(const at::Tensor& y, const at::Tensor& starts, const at::Tensor& rows,
                       const c10::optional<at::Tensor>& w, at::Tensor& out) {
    const int64_t O = out.size(0), D = y.size(1);
    if (O == 0 || D == 0) return;
    const c10::cuda::CUDAGuard guard(y.device());
    auto stream = c10::cuda::getCurrentCUDAStream();
    PIPER_DISPATCH_FLOATS(y.scalar_type(), "combine_rows_cuda", [&] {
        using acc_t = typename OpMath<scalar_t>::type;
        const acc_t* wp = w.has_value() ? w->data_ptr<acc_t>() : nullptr;
        launch_rows<scalar_t>(use_vec<scalar_t>(D, {y.data_ptr(), out.data_ptr()}), wp != nullptr,
                              [&](auto vtag, auto wtag) {
            constexpr int V = decltype(vtag)::value;
            constexpr bool W = decltype(wtag)::value;
            combine_rows_kernel<scalar_t, acc_t, V, W><<<row_blocks(O), kRowsPerBlock * kWarp, 0, stream>>>(
                y.data_ptr<scalar_t>(), starts.data_ptr<int32_t>(), rows.data_ptr<int32_t>(), wp, O, D,
                out.data_ptr<scalar_t>());
        });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void combine_grad_cuda(const at::Tensor& g, const at::Tensor& y, const at::Tensor& index, const at::Tensor& w,
                       at::Tensor& grad_y, at::Tensor& grad_w) {
    const int64_t N = index.size(0), O = g.size(0), D = y.size(1);
    if (N == 0) return;
    const c10::cuda::CUDAGuard guard(y.device());
    auto stream = c10::cuda::getCurrentCUDAStream();
    PIPER_DISPATCH_FLOATS(y.scalar_type(), "combine_grad_cuda", [&] {
        using acc_t = typename OpMath<scalar_t>::type;
        launch_rows<scalar_t>(use_vec<scalar_t>(D, {g.data_ptr(), y.data_ptr(), grad_y.data_ptr()}), true,
                              [&](auto vtag, auto) {
            constexpr int V = decltype(vtag)::value;
            combine_grad_kernel<scalar_t, acc_t, V><<<row_blocks(N), kRowsPerBlock * kWarp, 0, stream>>>(
                g.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), w.data_ptr<acc_t>(), N,
                O, D, grad_y.data_ptr<scalar_t>(), grad_w.data_ptr<acc_t>());
        });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void row_dot_cuda(const at::Tensor& y, const at::Tensor& g, const at::Tensor& index, at::Tensor& out) {
    const int64_t N = index.size(0), O = g.size(0), D = y.size(1);
    if (N == 0) return;
    const c10::cuda::CUDAGuard guard(y.device());
    auto stream = c10::cuda::getCurrentCUDAStream();
    PIPER_DISPATCH_FLOATS(y.scalar_type(), "row_dot_cuda", [&] {
        using acc_t = typename OpMath<scalar_t>::type;
        launch_rows<scalar_t>(use_vec<scalar_t>(D, {y.data_ptr(), g.data_ptr()}), false, [&](auto vtag, auto) {
            constexpr int V = decltype(vtag)::value;
            row_dot_kernel<scalar_t, acc_t, V><<<row_blocks(N), kRowsPerBlock * kWarp, 0, stream>>>(
                y.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), N, O, D,
                out.data_ptr<acc_t>());
        });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace piper
