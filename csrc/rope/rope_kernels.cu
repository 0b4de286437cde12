// Rotary position embedding, one elementwise pass (piper_ds.ops.rope). Each thread takes V elements of the first
// half of one (b, h, s) row and their partners in the second half: reads x1, x2 and the fp32 angles, writes both
// output halves. x and out may have any (b, h, s) strides with a contiguous last dim, so a transposed view of a
// [B, S, H, Dh] projection is read and written in place of a copy. 16-byte vectors when the half head dim, every
// stride and the pointers allow, else one element at a time; 32-bit index math when the work allows.
#include <limits>

#include "piper_cuda.cuh"

namespace piper {
namespace {

constexpr int kThreads = 256;

struct Strides3 {
    int64_t b, h, s;
};

template <typename scalar_t, typename acc_t, int V, typename index_t>
__global__ void __launch_bounds__(kThreads)
rope_kernel(const scalar_t* __restrict__ x, Strides3 xs, const float* __restrict__ cos,
            const float* __restrict__ sin, int64_t H, int64_t S, int64_t half, acc_t sign,
            scalar_t* __restrict__ out, Strides3 os, index_t total) {
    const index_t hv = static_cast<index_t>(half / V), S_ = static_cast<index_t>(S), H_ = static_cast<index_t>(H);
    for (index_t i = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
         i += static_cast<index_t>(gridDim.x) * kThreads) {
        const index_t row = i / hv, j = (i - row * hv) * V;
        const index_t bh = row / S_, s = row - bh * S_;
        const index_t b = bh / H_, h = bh - b * H_;
        const scalar_t* xr = x + b * xs.b + h * xs.h + s * xs.s;
        scalar_t* orow = out + b * os.b + h * os.h + s * os.s;
        const Vec<scalar_t, V> x1 = load_vec<scalar_t, V>(xr + j), x2 = load_vec<scalar_t, V>(xr + half + j);
        const float* cr = cos + static_cast<int64_t>(s) * half + j;
        const float* sr = sin + static_cast<int64_t>(s) * half + j;
        Vec<scalar_t, V> o1, o2;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const acc_t c = static_cast<acc_t>(cr[k]), sn = sign * static_cast<acc_t>(sr[k]);
            const acc_t a = static_cast<acc_t>(x1.v[k]), d = static_cast<acc_t>(x2.v[k]);
            o1.v[k] = static_cast<scalar_t>(a * c - d * sn);
            o2.v[k] = static_cast<scalar_t>(d * c + a * sn);
        }
        store_vec<scalar_t, V>(orow + j, o1);
        store_vec<scalar_t, V>(orow + half + j, o2);
    }
}

int64_t grid_for(int64_t work) { return fill_grid((work + kThreads - 1) / kThreads, 8); }

template <typename scalar_t, int V>
void launch(const scalar_t* x, Strides3 xs, const float* cos, const float* sin, int64_t B, int64_t H, int64_t S,
            int64_t half, bool inverse, scalar_t* out, Strides3 os, cudaStream_t stream) {
    using acc_t = typename OpMath<scalar_t>::type;
    const int64_t work = B * H * S * (half / V);
    const acc_t sign = inverse ? acc_t(-1) : acc_t(1);
    const int64_t grid = grid_for(work);
    if (work + grid * kThreads < static_cast<int64_t>(std::numeric_limits<int32_t>::max()))
        rope_kernel<scalar_t, acc_t, V, uint32_t><<<grid, kThreads, 0, stream>>>(
            x, xs, cos, sin, H, S, half, sign, out, os, static_cast<uint32_t>(work));
    else
        rope_kernel<scalar_t, acc_t, V, int64_t><<<grid, kThreads, 0, stream>>>(
            x, xs, cos, sin, H, S, half, sign, out, os, work);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse, at::Tensor& out) {
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t B = x.size(0), H = x.size(1), S = x.size(2), half = x.size(3) / 2;
    if (B * H * S * half == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    const Strides3 xs{x.stride(0), x.stride(1), x.stride(2)}, os{out.stride(0), out.stride(1), out.stride(2)};
    PIPER_DISPATCH_FLOATS(x.scalar_type(), "rope_cuda", [&] {
        constexpr int V = vec16<scalar_t>();
        const scalar_t* xp = x.data_ptr<scalar_t>();
        scalar_t* op = out.data_ptr<scalar_t>();
        bool vec = can_vectorize<scalar_t>(half, {xp, op});
        for (int64_t st : {xs.b, xs.h, xs.s, os.b, os.h, os.s}) vec = vec && st % V == 0;
        if (vec) launch<scalar_t, V>(xp, xs, cos.data_ptr<float>(), sin.data_ptr<float>(), B, H, S, half, inverse,
                                     op, os, stream);
        else launch<scalar_t, 1>(xp, xs, cos.data_ptr<float>(), sin.data_ptr<float>(), B, H, S, half, inverse, op,
                                 os, stream);
    });
}

}  // namespace piper
