// CUDA kernel of the row-segment copy (see hier_pack.cpp for the contract).
//
// Every segment is a contiguous byte range in src and in dst (rows are contiguous), so the kernel is a batched
// memcpy: blockIdx.y walks the segments, blockIdx.x/threadIdx.x stride over the segment's words. The word is
// 16 bytes when both base pointers and the row size allow it (bf16 rows of D % 8 == 0), else 4, else 1.
// The kernel trusts meta: piper_ds.ops.hier_pack checks every segment against the tensor sizes on the host,
// from the Python lists it uploads (reading meta back here would synchronise the stream).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "piper_common.h"

namespace piper {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

template <typename Word>
__global__ void segment_copy_kernel(const char* __restrict__ src, char* __restrict__ dst,
                                    const int64_t* __restrict__ meta, int64_t K, int64_t row_bytes) {
    for (int64_t k = blockIdx.y; k < K; k += gridDim.y) {
        const int64_t s = meta[k], d = meta[K + k], n = meta[2 * K + k];
        const int64_t words = n * row_bytes / static_cast<int64_t>(sizeof(Word));
        const Word* sp = reinterpret_cast<const Word*>(src + s * row_bytes);
        Word* dp = reinterpret_cast<Word*>(dst + d * row_bytes);
        for (int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < words;
             w += static_cast<int64_t>(gridDim.x) * blockDim.x) {
            dp[w] = sp[w];
        }
    }
}

template <typename Word>
void launch(const at::Tensor& src, at::Tensor& dst, const at::Tensor& meta, int64_t max_rows, int64_t row_bytes) {
    const int64_t K = meta.size(1);
    const int64_t max_words = std::max<int64_t>(1, max_rows * row_bytes / static_cast<int64_t>(sizeof(Word)));
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, src.get_device()));
    const int64_t grid_y = std::min<int64_t>(K, kMaxGridY);
    // enough blocks to fill the GPU a few times over, never more than the longest segment needs
    const int64_t want_x = std::max<int64_t>(1, (int64_t(sms) * 8 + grid_y - 1) / grid_y);
    const int64_t grid_x = std::min<int64_t>((max_words + kThreads - 1) / kThreads, want_x);
    const dim3 grid(static_cast<unsigned>(std::max<int64_t>(grid_x, 1)), static_cast<unsigned>(grid_y));
    segment_copy_kernel<Word><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<const char*>(src.data_ptr()), static_cast<char*>(dst.data_ptr()), meta.data_ptr<int64_t>(), K,
        row_bytes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void segment_copy_cuda(const at::Tensor& src, at::Tensor& dst, const at::Tensor& meta, int64_t max_rows) {
    const c10::cuda::CUDAGuard guard(src.device());
    const int64_t row_bytes = src.nbytes() / src.size(0);
    const auto a = reinterpret_cast<std::uintptr_t>(src.data_ptr()) | reinterpret_cast<std::uintptr_t>(dst.data_ptr()) |
                   static_cast<std::uintptr_t>(row_bytes);
    if (a % 16 == 0) {
        launch<uint4>(src, dst, meta, max_rows, row_bytes);
    } else if (a % 4 == 0) {
        launch<uint32_t>(src, dst, meta, max_rows, row_bytes);
    } else {
        launch<uint8_t>(src, dst, meta, max_rows, row_bytes);
    }
}

}  // namespace piper
