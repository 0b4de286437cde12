// Row movement of the MoE dispatch through a fan index pos[R, K]: row r of a "wide" tensor owns the K rows
// pos[r, 0..K) of an "expanded" tensor (-1: none). Every expanded row is owned by at most one (r, k), so:
//
//   expand_rows:          out[pos[r, k]] = x[r]                          (gather into expert order)
//   reduce_rows:          out[r] = sum_k w[r, k] * y[pos[r, k]]          (weighted combine; no weight: plain sum)
//   reduce_rows_backward: grad_y[pos[r, k]] = w[r, k] * g[r],  grad_w[r, k] = <y[pos[r, k]], g[r]>
//
// Each is one launch, writes every output element once and needs no atomics: a warp per wide row r (its K
// positions and weights staged in shared memory), 16-byte vectors along the row (scalar when the row length or
// a pointer is not 16-byte aligned). Sums run over k in order in fp32 (fp64 for fp64 rows): deterministic.
#include "piper_cuda.cuh"

namespace piper {
namespace {

constexpr int kRowsPerBlock = 8;  // warps per block
constexpr int kMaxFan = 32;       // K <= 32: one lane per (r, k) when staging

template <typename acc_t>
__device__ __forceinline__ void stage_fan(const int64_t* __restrict__ pos, const acc_t* __restrict__ w, int64_t r,
                                          int K, int lane, int64_t* sp, acc_t* sw) {
    if (lane < K) {
        sp[lane] = pos[r * K + lane];
        sw[lane] = w != nullptr ? w[r * K + lane] : acc_t(1);
    }
    __syncwarp();
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp)
expand_rows_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ pos, int64_t R, int K, int64_t D,
                   scalar_t* __restrict__ out) {
    __shared__ int64_t sp_all[kRowsPerBlock][kMaxFan];
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp;
    if (r >= R) return;  // warp-uniform
    int64_t* sp = sp_all[warp];
    if (lane < K) sp[lane] = pos[r * K + lane];
    __syncwarp();
    const int64_t nv = D / V;
    const Vec<scalar_t, V>* src = reinterpret_cast<const Vec<scalar_t, V>*>(x + r * D);
    for (int64_t c = lane; c < nv; c += kWarp) {
        const Vec<scalar_t, V> v = src[c];
        for (int k = 0; k < K; ++k) {
            const int64_t p = sp[k];
            if (p >= 0) reinterpret_cast<Vec<scalar_t, V>*>(out + p * D)[c] = v;
        }
    }
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp)
reduce_rows_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ pos, const acc_t* __restrict__ w,
                   int64_t R, int K, int64_t D, scalar_t* __restrict__ out) {
    __shared__ int64_t sp_all[kRowsPerBlock][kMaxFan];
    __shared__ acc_t sw_all[kRowsPerBlock][kMaxFan];
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp;
    if (r >= R) return;
    int64_t* sp = sp_all[warp];
    acc_t* sw = sw_all[warp];
    stage_fan<acc_t>(pos, w, r, K, lane, sp, sw);
    const int64_t nv = D / V;
    Vec<scalar_t, V>* dst = reinterpret_cast<Vec<scalar_t, V>*>(out + r * D);
    for (int64_t c = lane; c < nv; c += kWarp) {
        acc_t acc[V];
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] = 0;
        for (int k = 0; k < K; ++k) {
            const int64_t p = sp[k];
            if (p < 0) continue;
            const Vec<scalar_t, V> v = reinterpret_cast<const Vec<scalar_t, V>*>(y + p * D)[c];
            const acc_t wt = sw[k];
#pragma unroll
            for (int i = 0; i < V; ++i) acc[i] += static_cast<acc_t>(v.v[i]) * wt;
        }
        Vec<scalar_t, V> o;
#pragma unroll
        for (int i = 0; i < V; ++i) o.v[i] = static_cast<scalar_t>(acc[i]);
        dst[c] = o;
    }
}

// grad_y and/or grad_w (nullptr when not wanted); y is read only for grad_w.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp)
reduce_rows_grad_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                        const int64_t* __restrict__ pos, const acc_t* __restrict__ w, int64_t R, int K, int64_t D,
                        scalar_t* __restrict__ grad_y, acc_t* __restrict__ grad_w) {
    __shared__ int64_t sp_all[kRowsPerBlock][kMaxFan];
    __shared__ acc_t sw_all[kRowsPerBlock][kMaxFan];
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp;
    if (r >= R) return;
    int64_t* sp = sp_all[warp];
    acc_t* sw = sw_all[warp];
    stage_fan<acc_t>(pos, w, r, K, lane, sp, sw);
    const int64_t nv = D / V;
    const Vec<scalar_t, V>* gr = reinterpret_cast<const Vec<scalar_t, V>*>(g + r * D);
    for (int k = 0; k < K; ++k) {  // warp-uniform: every lane sees the same p
        const int64_t p = sp[k];
        if (p < 0) {
            if (grad_w != nullptr && lane == 0) grad_w[r * K + k] = 0;
            continue;
        }
        const acc_t wt = sw[k];
        acc_t dot = 0;
        // unrolled so that several rows' loads are in flight per lane: one load at a time leaves the kernel
        // waiting on memory latency well below the bandwidth it needs
#pragma unroll 4
        for (int64_t c = lane; c < nv; c += kWarp) {
            const Vec<scalar_t, V> gv = gr[c];
            if (grad_y != nullptr) {
                Vec<scalar_t, V> o;
#pragma unroll
                for (int i = 0; i < V; ++i) o.v[i] = static_cast<scalar_t>(static_cast<acc_t>(gv.v[i]) * wt);
                reinterpret_cast<Vec<scalar_t, V>*>(grad_y + p * D)[c] = o;
            }
            if (grad_w != nullptr) {
                const Vec<scalar_t, V> yv = reinterpret_cast<const Vec<scalar_t, V>*>(y + p * D)[c];
#pragma unroll
                for (int i = 0; i < V; ++i) dot += static_cast<acc_t>(yv.v[i]) * static_cast<acc_t>(gv.v[i]);
            }
        }
        if (grad_w != nullptr) {
            dot = warp_sum(dot);
            if (lane == 0) grad_w[r * K + k] = dot;
        }
    }
}

int64_t blocks_for(int64_t rows) { return (rows + kRowsPerBlock - 1) / kRowsPerBlock; }

}  // namespace

void expand_rows_cuda(const at::Tensor& x, const at::Tensor& pos, at::Tensor& out) {
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t R = pos.size(0), K = pos.size(1), D = x.size(1);
    if (R == 0 || D == 0 || out.size(0) == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    PIPER_DISPATCH_FLOATS(x.scalar_type(), "expand_rows_cuda", [&] {
        const scalar_t* xp = x.data_ptr<scalar_t>();
        scalar_t* op = out.data_ptr<scalar_t>();
        if (can_vectorize<scalar_t>(D, {xp, op}))
            expand_rows_kernel<scalar_t, vec16<scalar_t>()><<<blocks_for(R), kRowsPerBlock * kWarp, 0, stream>>>(
                xp, pos.data_ptr<int64_t>(), R, static_cast<int>(K), D, op);
        else
            expand_rows_kernel<scalar_t, 1><<<blocks_for(R), kRowsPerBlock * kWarp, 0, stream>>>(
                xp, pos.data_ptr<int64_t>(), R, static_cast<int>(K), D, op);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
}

void reduce_rows_cuda(const at::Tensor& y, const at::Tensor& pos, const c10::optional<at::Tensor>& w,
                      at::Tensor& out) {
    const c10::cuda::CUDAGuard guard(y.device());
    const int64_t R = pos.size(0), K = pos.size(1), D = y.size(1);
    if (R == 0 || D == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    PIPER_DISPATCH_FLOATS(y.scalar_type(), "reduce_rows_cuda", [&] {
        using acc_t = typename OpMath<scalar_t>::type;
        const scalar_t* yp = y.data_ptr<scalar_t>();
        scalar_t* op = out.data_ptr<scalar_t>();
        const acc_t* wp = w.has_value() ? w->data_ptr<acc_t>() : nullptr;
        if (can_vectorize<scalar_t>(D, {yp, op}))
            reduce_rows_kernel<scalar_t, acc_t, vec16<scalar_t>()>
                <<<blocks_for(R), kRowsPerBlock * kWarp, 0, stream>>>(yp, pos.data_ptr<int64_t>(), wp, R,
                                                                      static_cast<int>(K), D, op);
        else
            reduce_rows_kernel<scalar_t, acc_t, 1><<<blocks_for(R), kRowsPerBlock * kWarp, 0, stream>>>(
                yp, pos.data_ptr<int64_t>(), wp, R, static_cast<int>(K), D, op);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
}

void reduce_rows_grad_cuda(const at::Tensor& g, const c10::optional<at::Tensor>& y, const at::Tensor& pos,
                           const c10::optional<at::Tensor>& w, at::Tensor& grad_y, at::Tensor& grad_w) {
    const c10::cuda::CUDAGuard guard(g.device());
    const int64_t R = pos.size(0), K = pos.size(1), D = g.size(1);
    if (R == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    PIPER_DISPATCH_FLOATS(g.scalar_type(), "reduce_rows_grad_cuda", [&] {
        using acc_t = typename OpMath<scalar_t>::type;
        const scalar_t* gp = g.data_ptr<scalar_t>();
        const scalar_t* yp = y.has_value() ? y->data_ptr<scalar_t>() : nullptr;
        const acc_t* wp = w.has_value() ? w->data_ptr<acc_t>() : nullptr;
        scalar_t* gy = grad_y.defined() ? grad_y.data_ptr<scalar_t>() : nullptr;
        acc_t* gw = grad_w.defined() ? grad_w.data_ptr<acc_t>() : nullptr;
        if (can_vectorize<scalar_t>(D, {gp, yp, gy}))
            reduce_rows_grad_kernel<scalar_t, acc_t, vec16<scalar_t>()>
                <<<blocks_for(R), kRowsPerBlock * kWarp, 0, stream>>>(gp, yp, pos.data_ptr<int64_t>(), wp, R,
                                                                      static_cast<int>(K), D, gy, gw);
        else
            reduce_rows_grad_kernel<scalar_t, acc_t, 1><<<blocks_for(R), kRowsPerBlock * kWarp, 0, stream>>>(
                gp, yp, pos.data_ptr<int64_t>(), wp, R, static_cast<int>(K), D, gy, gw);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
}

}  // namespace piper
