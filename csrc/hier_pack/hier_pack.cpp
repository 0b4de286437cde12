// Row-segment copy for the hierarchical all-to-all (piper_ds.ops.hier_pack): binding, checks, CPU path.
//
// segment_copy(src_SD, dst_ND, meta_3K, max_rows) -> None
//   for every segment k: dst rows [meta[1][k], +meta[2][k]) = src rows [meta[0][k], +meta[2][k])
// Packing a message (dst starts consecutive) and unpacking it (src starts consecutive) are the same call.
// Rows are dim 0 of contiguous tensors of any dtype (copied as bytes); meta is int64 [3, K] on src's device;
// max_rows >= every meta[2][k] (the host knows it: it sizes the CUDA grid). Semantics follow
// piper_ds.ops.reference.segment_copy_reference. The CUDA kernel lives in hier_pack_kernels.cu and is compiled
// in when PIPER_WITH_CUDA is defined.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>

#include <cstring>

#include "piper_common.h"

namespace piper {

#ifdef PIPER_WITH_CUDA
void segment_copy_cuda(const at::Tensor& src, at::Tensor& dst, const at::Tensor& meta, int64_t max_rows);
#endif

namespace {

void check_args(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& meta, int64_t max_rows) {
    check_long_tensor(meta, "meta_3K");
    check_same_device(src, dst, "src", "dst");
    check_same_device(src, meta, "src", "meta_3K");
    PIPER_CHECK_VALUE(src.scalar_type() == dst.scalar_type(), "src (", src.scalar_type(), ") and dst (",
                      dst.scalar_type(), ") must have the same dtype");
    PIPER_CHECK_VALUE(src.is_contiguous() && dst.is_contiguous() && meta.is_contiguous(),
                      "src, dst and meta_3K must be contiguous");
    PIPER_CHECK_VALUE(src.dim() >= 1 && dst.dim() >= 1, "src and dst need a row dimension, got ", src.sizes(),
                      " and ", dst.sizes());
    PIPER_CHECK_VALUE(src.sizes().slice(1) == dst.sizes().slice(1), "src rows ", src.sizes().slice(1),
                      " and dst rows ", dst.sizes().slice(1), " differ in shape");
    PIPER_CHECK_VALUE(meta.dim() == 2 && meta.size(0) == 3, "meta_3K must have shape [3, K], got ", meta.sizes());
    PIPER_CHECK_VALUE(max_rows >= 0, "max_rows must be >= 0, got ", max_rows);
}

void segment_copy_cpu(const at::Tensor& src, at::Tensor& dst, const at::Tensor& meta) {
    const int64_t K = meta.size(1);
    const int64_t row_bytes = src.numel() == 0 ? 0 : src.nbytes() / src.size(0);
    const int64_t S = src.size(0), N = dst.size(0);
    const int64_t* m = meta.data_ptr<int64_t>();
    for (int64_t k = 0; k < K; ++k) {  // validate all before copying anything
        const int64_t s = m[k], d = m[K + k], n = m[2 * K + k];
        PIPER_CHECK_INDEX(n >= 0 && s >= 0 && d >= 0 && s + n <= S && d + n <= N, "segment ", k, ": rows [", s,
                          ", ", s + n, ") of src (", S, " rows) -> [", d, ", ", d + n, ") of dst (", N,
                          " rows) is out of range");
    }
    const char* sp = static_cast<const char*>(src.data_ptr());
    char* dp = static_cast<char*>(dst.data_ptr());
    at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
            const int64_t n = m[2 * K + k];
            if (n > 0) std::memcpy(dp + m[K + k] * row_bytes, sp + m[k] * row_bytes, n * row_bytes);
        }
    });
}

}  // namespace

void segment_copy(const at::Tensor& src, at::Tensor& dst, const at::Tensor& meta, int64_t max_rows) {
    check_args(src, dst, meta, max_rows);
    if (meta.size(1) == 0 || src.numel() == 0) return;
    if (src.is_cuda()) {
#ifdef PIPER_WITH_CUDA
        segment_copy_cuda(src, dst, meta, max_rows);
#else
        TORCH_CHECK(false, "this build of the hier_pack op has no CUDA kernels (built by the CPU builder)");
#endif
        return;
    }
    segment_copy_cpu(src, dst, meta);
}

}  // namespace piper

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("segment_copy", &piper::segment_copy,
          "dst rows [meta[1][k], +meta[2][k]) = src rows [meta[0][k], +meta[2][k]) for every segment k",
          py::arg("src"), py::arg("dst"), py::arg("meta"), py::arg("max_rows"));
}
