// Expert activations (piper_ds.ops.activation): binding, checks and the CPU implementation.
//
// act_forward(h, swiglu)                 -> a       SwiGLU: h [N, 2F] = gate | up, a = silu(gate) * up  [N, F]
//                                                   GELU:   h [N, F], a = gelu(h) (exact, erf)          [N, F]
// act_backward(da, h, swiglu, recompute) -> [dh, a] dh like h; a (recomputed in the same pass) when asked for
// Math in fp32 (fp64 for fp64 inputs), as piper_ds.ops.reference.activation_reference. CUDA kernels live in
// activation_kernels.cu and are compiled in when PIPER_WITH_CUDA is defined.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "piper_common.h"

namespace piper {

#ifdef PIPER_WITH_CUDA
void act_forward_cuda(const at::Tensor& h, bool swiglu, at::Tensor& a);
void act_backward_cuda(const at::Tensor& da, const at::Tensor& h, bool swiglu, at::Tensor& dh, at::Tensor& a);
#endif

namespace {

int64_t width_of(const at::Tensor& h, bool swiglu) {
    check_float_tensor(h, "h");
    PIPER_CHECK_VALUE(h.dim() == 2, "h must be 2-D [rows, width], got shape ", h.sizes());
    PIPER_CHECK_VALUE(!swiglu || h.size(1) % 2 == 0, "SwiGLU needs an even width (gate | up), got h of shape ",
                      h.sizes());
    return swiglu ? h.size(1) / 2 : h.size(1);
}

at::ScalarType math_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

at::Tensor act_forward(const at::Tensor& h_in, bool swiglu) {
    const int64_t F = width_of(h_in, swiglu);
    const at::Tensor h = h_in.contiguous();
    at::Tensor a = at::empty({h.size(0), F}, h.options());
    if (h.is_cuda()) {
        PIPER_CUDA_OR_FAIL("activation", act_forward_cuda(h, swiglu, a));
        return a;
    }
    const at::Tensor x = h.to(math_type(h));
    if (swiglu) a.copy_(at::silu(x.narrow(1, 0, F)) * x.narrow(1, F, F));
    else a.copy_(at::gelu(x));
    return a;
}

std::vector<at::Tensor> act_backward(const at::Tensor& da_in, const at::Tensor& h_in, bool swiglu, bool recompute) {
    const int64_t F = width_of(h_in, swiglu);
    check_float_tensor(da_in, "grad_a");
    PIPER_CHECK_VALUE(da_in.dim() == 2 && da_in.size(0) == h_in.size(0) && da_in.size(1) == F, "grad_a must have "
                      "shape [", h_in.size(0), ", ", F, "], got ", da_in.sizes());
    PIPER_CHECK_VALUE(da_in.scalar_type() == h_in.scalar_type(), "grad_a (", da_in.scalar_type(), ") and h (",
                      h_in.scalar_type(), ") must have the same dtype");
    check_same_device(da_in, h_in, "grad_a", "h");
    const at::Tensor h = h_in.contiguous(), da = da_in.contiguous();
    at::Tensor dh = at::empty_like(h);
    at::Tensor a = recompute ? at::empty({h.size(0), F}, h.options()) : at::Tensor();
    if (h.is_cuda()) {
        PIPER_CUDA_OR_FAIL("activation", act_backward_cuda(da, h, swiglu, dh, a));
        return {dh, a};
    }
    const at::Tensor x = h.to(math_type(h)), d = da.to(math_type(h));
    if (swiglu) {
        const at::Tensor g = x.narrow(1, 0, F), u = x.narrow(1, F, F), s = at::sigmoid(g), silu = g * s;
        dh.narrow(1, 0, F).copy_(d * u * s * (1 + g * (1 - s)));
        dh.narrow(1, F, F).copy_(d * silu);
        if (recompute) a.copy_(at::silu(g) * u);  // as the forward computes it, bit for bit
    } else {
        dh.copy_(at::gelu_backward(d, x));
        if (recompute) a.copy_(at::gelu(x));
    }
    return {dh, a};
}

}  // namespace piper

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "piper_ds expert activations (CPU implementation, plus CUDA kernels when built with CUDA)";
    m.def("act_forward", &piper::act_forward, "SwiGLU (h = gate | up) or GELU of the experts' hidden rows",
          py::arg("h"), py::arg("swiglu"));
    m.def("act_backward", &piper::act_backward, "[dh, a (recomputed, when asked for)]", py::arg("grad_a"),
          py::arg("h"), py::arg("swiglu"), py::arg("recompute"));
    m.def("has_cuda", &piper::has_cuda, "whether CUDA kernels are compiled in");
}
