// Rotary position embedding (piper_ds.ops.rope): binding, checks and the CPU implementation.
//
// rope(x, cos, sin, inverse) -> out    x [B, H, S, Dh] (any strides, last dim contiguous), cos/sin fp32 [S_max, Dh/2]
//   with S <= S_max; rotate-half form over the whole head dim, x = x1 | x2 (halves of Dh):
//   out = x1 * c - x2 * s | x2 * c + x1 * s          (c, s = cos[pos], sin[pos], pos the index along S)
//   inverse = true rotates back (s -> -s): the backward of the forward, as the rotation is orthogonal.
// out has x's memory layout (a transposed view of a [B, S, H, Dh] projection stays one), so neither direction
// copies. Math in fp32 (fp64 for fp64 inputs), one rounding per output, as
// piper_ds.ops.reference.rope_reference. CUDA kernels in rope_kernels.cu when PIPER_WITH_CUDA is defined.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include "piper_common.h"

namespace piper {

#ifdef PIPER_WITH_CUDA
void rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse, at::Tensor& out);
#endif

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
    check_float_tensor(x, "x");
    PIPER_CHECK_VALUE(x.dim() == 4, "x must be 4-D [batch, heads, seq, head_dim], got shape ", x.sizes());
    PIPER_CHECK_VALUE(x.size(3) % 2 == 0, "the rotary embedding needs an even head_dim, got x of shape ", x.sizes());
    PIPER_CHECK_VALUE(x.stride(3) == 1 || x.size(3) <= 1, "x's last dim must be contiguous, got strides ",
                      x.strides());
    for (const auto* t : {&cos, &sin}) {
        PIPER_CHECK_TYPE(t->scalar_type() == at::kFloat, "cos and sin must be float32, got ", t->scalar_type());
        PIPER_CHECK_VALUE(t->dim() == 2 && t->is_contiguous() && t->size(1) == x.size(3) / 2 &&
                              t->size(0) >= x.size(2),
                          "cos and sin must be contiguous [S_max >= ", x.size(2), ", ", x.size(3) / 2, "], got ",
                          t->sizes());
        check_same_device(x, *t, "x", "cos/sin");
    }
    PIPER_CHECK_VALUE(cos.sizes() == sin.sizes(), "cos ", cos.sizes(), " and sin ", sin.sizes(),
                      " must have one shape");
    at::Tensor out = at::empty_like(x);
    if (x.is_cuda()) {
        PIPER_CUDA_OR_FAIL("rope", rope_cuda(x, cos, sin, inverse, out));
        return out;
    }
    const auto math = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const int64_t S = x.size(2), half = x.size(3) / 2;
    const at::Tensor xm = x.to(math), c = cos.narrow(0, 0, S).to(math);
    const at::Tensor s = inverse ? -sin.narrow(0, 0, S).to(math) : sin.narrow(0, 0, S).to(math);
    const at::Tensor x1 = xm.narrow(3, 0, half), x2 = xm.narrow(3, half, half);
    out.narrow(3, 0, half).copy_(x1 * c - x2 * s);
    out.narrow(3, half, half).copy_(x2 * c + x1 * s);
    return out;
}

}  // namespace piper

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "piper_ds rotary position embedding (CPU implementation, plus CUDA kernels when built with CUDA)";
    m.def("rope", &piper::rope, "x rotated by the positions' angles (inverse: rotated back), in x's layout",
          py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("inverse"));
    m.def("has_cuda", &piper::has_cuda, "whether CUDA kernels are compiled in");
}
