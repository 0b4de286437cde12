// CUDA helpers shared by the piper_ds kernels: warp reductions, 16-byte vector moves, grid sizing.
// (Only c10's CUDA headers: ATen/cuda/CUDAContext.h would pull cuBLAS/cuSPARSE headers into every kernel file.)
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <initializer_list>

#include "piper_common.h"

namespace piper {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
    return v;
}

// Plain load/store of N elements as one aligned vector (N * sizeof(T) must be 2, 4, 8 or 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
    T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
    return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
    *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int vec16() {
    return 16 / sizeof(T) > 0 ? 16 / sizeof(T) : 1;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte vectors of T along rows of n elements when n and every (non-null) pointer allow it.
template <typename T>
bool can_vectorize(int64_t n, std::initializer_list<const void*> ptrs) {
    if (n % vec16<T>() != 0) return false;
    for (const void* p : ptrs)
        if (p != nullptr && !aligned16(p)) return false;
    return true;
}

// Multiprocessors of the current device, asked once per device (a kernel launch path runs this every call).
inline int sm_count() {
    constexpr int kMaxDevices = 64;
    static std::atomic<int> cached[kMaxDevices] = {};
    int device = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    int sms = device < kMaxDevices ? cached[device].load(std::memory_order_relaxed) : 0;
    if (sms == 0) {
        C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
        if (device < kMaxDevices) cached[device].store(sms, std::memory_order_relaxed);
    }
    return sms;
}

// Number of blocks for a grid-stride kernel: enough to fill the GPU, never more than the work needs.
inline int64_t fill_grid(int64_t work_blocks, int blocks_per_sm) {
    const int64_t cap = static_cast<int64_t>(sm_count()) * blocks_per_sm;
    return work_blocks < cap ? (work_blocks > 0 ? work_blocks : 1) : cap;
}

}  // namespace piper
