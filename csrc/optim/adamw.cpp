// Adam(W) step over fp32 master weights (piper_ds.ops.adamw): binding, checks and the CPU implementation.
//
// adamw_step(grads, offsets, master, exp_avg, exp_avg_sq, lowp, step, grad_multiplier,
//            lr, beta1, beta2, eps, weight_decay, decoupled)
//   grads[k] (bf16 / fp16 / fp32, any shape, contiguous) is the gradient of master[offsets[k] : offsets[k] +
//   grads[k].numel()]; master, exp_avg, exp_avg_sq are 1-D fp32 and updated in place; lowp (optional, 1-D,
//   bf16 / fp16 / fp32, as long as master) receives the updated master, rounded, over the same ranges. Elements
//   no gradient covers are left as they are.
//   step: 0-dim float tensor holding the step count of this update (already incremented, >= 1), on the CPU or
//   on the master's device. grad_multiplier (optional): 0-dim fp32 tensor on the master's device; every
//   gradient is multiplied by it first (gradient clipping and loss-scale division, without a pass of their own).
// Math as torch.optim.Adam / AdamW (decoupled) do it, in fp32; the CPU implementation makes the same ATen calls
// as piper_ds.ops.reference.adamw_reference, bit for bit. CUDA kernels live in adamw_kernels.cu.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <optional>
#include <vector>

#include "piper_common.h"
#include "adamw_hyper.h"

namespace piper {

#ifdef PIPER_WITH_CUDA
void adamw_step_cuda(const at::Tensor& grad, at::Tensor& master, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                     at::Tensor* lowp, const at::Tensor& step, const at::Tensor* grad_multiplier,
                     const AdamWHyper& hyper);
#endif

namespace {

void check_state(const at::Tensor& t, const at::Tensor& master, const char* name) {
    PIPER_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be fp32, got ", t.scalar_type());
    PIPER_CHECK_VALUE(t.dim() == 1 && t.is_contiguous(), name, " must be 1-D and contiguous, got shape ",
                      t.sizes());
    PIPER_CHECK_VALUE(t.numel() == master.numel(), name, " has ", t.numel(), " elements, master ",
                      master.numel());
    check_same_device(t, master, name, "master");
}

// One range on the CPU: the ATen calls of torch.optim.Adam's single-tensor path, in its order.
void adamw_range_cpu(const at::Tensor& grad, at::Tensor p, at::Tensor m, at::Tensor v, std::optional<at::Tensor> low,
                     double step, const std::optional<at::Tensor>& mult, const AdamWHyper& h) {
    at::Tensor g = grad.reshape({-1}).to(at::kFloat);
    if (mult.has_value()) g = g * mult->to(g.device());
    if (h.weight_decay != 0) {
        if (h.decoupled) p.mul_(1 - h.lr * h.weight_decay);
        else g = g.add(p, h.weight_decay);
    }
    m.lerp_(g, 1 - h.beta1);
    v.mul_(h.beta2).addcmul_(g, g, 1 - h.beta2);
    const double bias_correction1 = 1 - std::pow(h.beta1, step);
    const double bias_correction2 = 1 - std::pow(h.beta2, step);
    const double step_size = h.lr / bias_correction1;
    const double bias_correction2_sqrt = std::pow(bias_correction2, 0.5);  // Python's ** 0.5, as torch
    const at::Tensor denom = (v.sqrt() / bias_correction2_sqrt).add_(h.eps);
    p.addcdiv_(m, denom, -step_size);
    if (low.has_value()) low->copy_(p);
}

}  // namespace

void adamw_step(const std::vector<at::Tensor>& grads, const std::vector<int64_t>& offsets, at::Tensor master,
                at::Tensor exp_avg, at::Tensor exp_avg_sq, std::optional<at::Tensor> lowp, const at::Tensor& step,
                std::optional<at::Tensor> grad_multiplier, double lr, double beta1, double beta2, double eps,
                double weight_decay, bool decoupled) {
    PIPER_CHECK_TYPE(master.scalar_type() == at::kFloat, "master must be fp32, got ", master.scalar_type());
    PIPER_CHECK_VALUE(master.dim() == 1 && master.is_contiguous(), "master must be 1-D and contiguous, got shape ",
                      master.sizes());
    check_state(exp_avg, master, "exp_avg");
    check_state(exp_avg_sq, master, "exp_avg_sq");
    if (lowp.has_value()) {
        check_float_tensor(*lowp, "lowp");
        PIPER_CHECK_VALUE(lowp->dim() == 1 && lowp->is_contiguous() && lowp->numel() == master.numel(),
                          "lowp must be 1-D, contiguous and as long as master (", master.numel(), "), got shape ",
                          lowp->sizes());
        check_same_device(*lowp, master, "lowp", "master");
    }
    PIPER_CHECK_VALUE(grads.size() == offsets.size(), "grads (", grads.size(), ") and offsets (", offsets.size(),
                      ") must have the same length");
    PIPER_CHECK_VALUE(step.numel() == 1 && at::isFloatingType(step.scalar_type()),
                      "step must be a one-element float tensor, got ", step.scalar_type(), " ", step.sizes());
    PIPER_CHECK_VALUE(step.is_cpu() || step.device() == master.device(), "step must be on the CPU or on master's ",
                      "device (", master.device(), "), got ", step.device());
    if (grad_multiplier.has_value()) {
        PIPER_CHECK_VALUE(grad_multiplier->numel() == 1 && grad_multiplier->scalar_type() == at::kFloat,
                          "grad_multiplier must be a one-element fp32 tensor, got ", grad_multiplier->scalar_type(),
                          " ", grad_multiplier->sizes());
        check_same_device(*grad_multiplier, master, "grad_multiplier", "master");
    }
    PIPER_CHECK_VALUE(lr >= 0 && eps >= 0 && weight_decay >= 0 && beta1 >= 0 && beta1 < 1 && beta2 >= 0 &&
                          beta2 < 1,
                      "Adam hyperparameters out of range: lr ", lr, ", betas (", beta1, ", ", beta2, "), eps ", eps,
                      ", weight_decay ", weight_decay);
    for (size_t k = 0; k < grads.size(); ++k) {
        check_float_tensor(grads[k], "grads[k]");
        check_same_device(grads[k], master, "grads[k]", "master");
        PIPER_CHECK_VALUE(offsets[k] >= 0 && offsets[k] + grads[k].numel() <= master.numel(), "grads[", k,
                          "] (", grads[k].numel(), " elements at offset ", offsets[k], ") reaches past master (",
                          master.numel(), " elements)");
    }
    const AdamWHyper hyper{lr, beta1, beta2, eps, weight_decay, decoupled};
    for (size_t k = 0; k < grads.size(); ++k) {
        const int64_t n = grads[k].numel();
        if (n == 0) continue;
        at::Tensor p = master.narrow(0, offsets[k], n), m = exp_avg.narrow(0, offsets[k], n),
                   v = exp_avg_sq.narrow(0, offsets[k], n);
        std::optional<at::Tensor> low;
        if (lowp.has_value()) low = lowp->narrow(0, offsets[k], n);
        if (master.is_cuda()) {
            const at::Tensor g = grads[k].contiguous();
            PIPER_CUDA_OR_FAIL("adamw", adamw_step_cuda(g, p, m, v, low.has_value() ? &*low : nullptr, step,
                                                        grad_multiplier.has_value() ? &*grad_multiplier : nullptr,
                                                        hyper));
        } else {
            adamw_range_cpu(grads[k], p, m, v, low, step.item<double>(), grad_multiplier, hyper);
        }
    }
}

}  // namespace piper

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "piper_ds Adam(W) step over fp32 master weights (CPU implementation, plus CUDA kernels when built "
              "with CUDA)";
    m.def("adamw_step", &piper::adamw_step, "one Adam(W) step of master ranges from their gradients, in place",
          py::arg("grads"), py::arg("offsets"), py::arg("master"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
          py::arg("lowp"), py::arg("step"), py::arg("grad_multiplier"), py::arg("lr"), py::arg("beta1"),
          py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"));
    m.def("has_cuda", &piper::has_cuda, "whether CUDA kernels are compiled in");
}
