// Expert activations, forward and backward, one elementwise pass each (piper_ds.ops.activation).
//
// SwiGLU reads h [N, 2F] as gate | up halves of one row (the output of the experts' fused gate/up GEMM):
//   forward   a = silu(gate) * up
//   backward  d_gate = da * up * s * (1 + gate * (1 - s)),  d_up = da * silu(gate)   (s = sigmoid(gate))
// GELU (exact, erf) reads h [N, F]:  a = h * Phi(h),  d_h = da * (Phi(h) + h * phi(h)).
// The backward can also rewrite a (recompute) in the same pass, so the forward need not keep it for the down
// projection's weight gradient. Math in fp32 (fp64 for fp64), one rounding per output. 16-byte vectors along F
// when F and the pointers allow, else one element at a time; 32-bit index math when N * F allows (the 64-bit
// division per vector costs more than the vector's arithmetic).
#include <limits>
#include <type_traits>

#include "piper_cuda.cuh"

namespace piper {
namespace {

constexpr int kThreads = 256;

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t x) {
    return acc_t(1) / (acc_t(1) + exp(-x));
}

// For 16-bit outputs the hardware exp and reciprocal (a few fp32 ulp, far below the output's rounding): with the
// IEEE ones the SwiGLU backward is bound by its arithmetic rather than by memory. fp32/fp64 outputs keep IEEE math.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t gate_sigmoid(acc_t x) {
    if constexpr (sizeof(scalar_t) == 2 && std::is_same<acc_t, float>::value) {
        return __frcp_rn(1.f + __expf(-x));
    } else {
        return sigmoid(x);
    }
}

template <typename acc_t>
__device__ __forceinline__ acc_t normal_cdf(acc_t x) {
    return acc_t(0.5) * (acc_t(1) + erf(x * acc_t(0.70710678118654752440)));
}

template <typename acc_t>
__device__ __forceinline__ acc_t normal_pdf(acc_t x) {
    return acc_t(0.39894228040143267794) * exp(acc_t(-0.5) * x * x);
}

// Element (n, j .. j+V) of the [N, F] activation from one grid-stride index.
template <typename index_t>
__device__ __forceinline__ void split_index(index_t i, index_t fv, int V, int64_t& n, int64_t& j) {
    const index_t q = i / fv;
    n = q;
    j = static_cast<int64_t>(i - q * fv) * V;
}

template <typename scalar_t, typename acc_t, int V, bool SWIGLU, typename index_t>
__global__ void __launch_bounds__(kThreads)
act_forward_kernel(const scalar_t* __restrict__ h, int64_t N, int64_t F, scalar_t* __restrict__ a) {
    const int64_t W = SWIGLU ? 2 * F : F;
    const index_t fv = static_cast<index_t>(F / V), total = static_cast<index_t>(N) * fv;
    for (index_t i = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
         i += static_cast<index_t>(gridDim.x) * kThreads) {
        int64_t n, j;
        split_index<index_t>(i, fv, V, n, j);
        const Vec<scalar_t, V> x = load_vec<scalar_t, V>(h + n * W + j);
        Vec<scalar_t, V> out;
        if (SWIGLU) {
            const Vec<scalar_t, V> u = load_vec<scalar_t, V>(h + n * W + F + j);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const acc_t g = static_cast<acc_t>(x.v[k]);
                out.v[k] = static_cast<scalar_t>(g * gate_sigmoid<scalar_t>(g) * static_cast<acc_t>(u.v[k]));
            }
        } else {
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const acc_t g = static_cast<acc_t>(x.v[k]);
                out.v[k] = static_cast<scalar_t>(g * normal_cdf(g));
            }
        }
        store_vec<scalar_t, V>(a + n * F + j, out);
    }
}

template <typename scalar_t, typename acc_t, int V, bool SWIGLU, typename index_t>
__global__ void __launch_bounds__(kThreads)
act_backward_kernel(const scalar_t* __restrict__ da, const scalar_t* __restrict__ h, int64_t N, int64_t F,
                    scalar_t* __restrict__ dh, scalar_t* __restrict__ a) {
    const int64_t W = SWIGLU ? 2 * F : F;
    const index_t fv = static_cast<index_t>(F / V), total = static_cast<index_t>(N) * fv;
    for (index_t i = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
         i += static_cast<index_t>(gridDim.x) * kThreads) {
        int64_t n, j;
        split_index<index_t>(i, fv, V, n, j);
        const Vec<scalar_t, V> x = load_vec<scalar_t, V>(h + n * W + j);
        const Vec<scalar_t, V> d = load_vec<scalar_t, V>(da + n * F + j);
        Vec<scalar_t, V> dx, out;
        if (SWIGLU) {
            const Vec<scalar_t, V> u = load_vec<scalar_t, V>(h + n * W + F + j);
            Vec<scalar_t, V> du;
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const acc_t g = static_cast<acc_t>(x.v[k]), up = static_cast<acc_t>(u.v[k]);
                const acc_t dv = static_cast<acc_t>(d.v[k]), s = gate_sigmoid<scalar_t>(g), silu = g * s;
                dx.v[k] = static_cast<scalar_t>(dv * up * s * (acc_t(1) + g * (acc_t(1) - s)));
                du.v[k] = static_cast<scalar_t>(dv * silu);
                out.v[k] = static_cast<scalar_t>(silu * up);
            }
            store_vec<scalar_t, V>(dh + n * W + F + j, du);
        } else {
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const acc_t g = static_cast<acc_t>(x.v[k]), dv = static_cast<acc_t>(d.v[k]), cdf = normal_cdf(g);
                dx.v[k] = static_cast<scalar_t>(dv * (cdf + g * normal_pdf(g)));
                out.v[k] = static_cast<scalar_t>(g * cdf);
            }
        }
        store_vec<scalar_t, V>(dh + n * W + j, dx);
        if (a != nullptr) store_vec<scalar_t, V>(a + n * F + j, out);
    }
}

int64_t grid_for(int64_t work) { return fill_grid((work + kThreads - 1) / kThreads, 8); }

// 32-bit grid-stride indices when every index (plus one grid stride) fits, else 64-bit.
bool fits_int32(int64_t work) {
    return work + grid_for(work) * kThreads < static_cast<int64_t>(std::numeric_limits<int32_t>::max());
}

template <typename scalar_t, int V, bool SWIGLU>
void launch_forward(const scalar_t* h, int64_t N, int64_t F, scalar_t* a, cudaStream_t stream) {
    using acc_t = typename OpMath<scalar_t>::type;
    const int64_t work = N * (F / V);
    if (fits_int32(work))
        act_forward_kernel<scalar_t, acc_t, V, SWIGLU, uint32_t><<<grid_for(work), kThreads, 0, stream>>>(h, N, F, a);
    else
        act_forward_kernel<scalar_t, acc_t, V, SWIGLU, int64_t><<<grid_for(work), kThreads, 0, stream>>>(h, N, F, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int V, bool SWIGLU>
void launch_backward(const scalar_t* da, const scalar_t* h, int64_t N, int64_t F, scalar_t* dh, scalar_t* a,
                     cudaStream_t stream) {
    using acc_t = typename OpMath<scalar_t>::type;
    const int64_t work = N * (F / V);
    if (fits_int32(work))
        act_backward_kernel<scalar_t, acc_t, V, SWIGLU, uint32_t><<<grid_for(work), kThreads, 0, stream>>>(
            da, h, N, F, dh, a);
    else
        act_backward_kernel<scalar_t, acc_t, V, SWIGLU, int64_t><<<grid_for(work), kThreads, 0, stream>>>(
            da, h, N, F, dh, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void act_forward_cuda(const at::Tensor& h, bool swiglu, at::Tensor& a) {
    const c10::cuda::CUDAGuard guard(h.device());
    const int64_t N = a.size(0), F = a.size(1);
    if (N == 0 || F == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    PIPER_DISPATCH_FLOATS(h.scalar_type(), "act_forward_cuda", [&] {
        constexpr int V = vec16<scalar_t>();
        const scalar_t* hp = h.data_ptr<scalar_t>();
        scalar_t* ap = a.data_ptr<scalar_t>();
        const bool vec = can_vectorize<scalar_t>(F, {hp, ap});
        if (vec && swiglu) launch_forward<scalar_t, V, true>(hp, N, F, ap, stream);
        else if (vec) launch_forward<scalar_t, V, false>(hp, N, F, ap, stream);
        else if (swiglu) launch_forward<scalar_t, 1, true>(hp, N, F, ap, stream);
        else launch_forward<scalar_t, 1, false>(hp, N, F, ap, stream);
    });
}

void act_backward_cuda(const at::Tensor& da, const at::Tensor& h, bool swiglu, at::Tensor& dh, at::Tensor& a) {
    const c10::cuda::CUDAGuard guard(h.device());
    const int64_t N = da.size(0), F = da.size(1);
    if (N == 0 || F == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    PIPER_DISPATCH_FLOATS(h.scalar_type(), "act_backward_cuda", [&] {
        constexpr int V = vec16<scalar_t>();
        const scalar_t *dp = da.data_ptr<scalar_t>(), *hp = h.data_ptr<scalar_t>();
        scalar_t* dhp = dh.data_ptr<scalar_t>();
        scalar_t* ap = a.defined() ? a.data_ptr<scalar_t>() : nullptr;
        const bool vec = can_vectorize<scalar_t>(F, {dp, hp, dhp, ap});
        if (vec && swiglu) launch_backward<scalar_t, V, true>(dp, hp, N, F, dhp, ap, stream);
        else if (vec) launch_backward<scalar_t, V, false>(dp, hp, N, F, dhp, ap, stream);
        else if (swiglu) launch_backward<scalar_t, 1, true>(dp, hp, N, F, dhp, ap, stream);
        else launch_backward<scalar_t, 1, false>(dp, hp, N, F, dhp, ap, stream);
    });
}

}  // namespace piper
