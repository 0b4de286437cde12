// The Adam(W) hyperparameters of one step, shared by the binding (adamw.cpp) and the kernels (adamw_kernels.cu).
#pragma once

namespace piper {

struct AdamWHyper {
    double lr, beta1, beta2, eps, weight_decay;
    bool decoupled;  // AdamW's decoupled weight decay (else Adam's L2 term added to the gradient)
};

}  // namespace piper
