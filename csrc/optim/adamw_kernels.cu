// Adam(W) step over fp32 master weights, one memory pass per gradient range (piper_ds.ops.adamw).
//
// Per element, in fp32 (torch.optim.Adam's formula; lerp as torch computes it):
//   g  = grad * multiplier                        (gradient clipping / loss-scale division folded in)
//   decoupled: p *= 1 - lr * wd      else: g += wd * p
//   m  = lerp(m, g, 1 - beta1),   v = beta2 * v + (1 - beta2) * g * g
//   p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps),   lowp = round(p)
// It reads the low-precision gradient and writes the low-precision weights itself, so a ZeRO step moves
// 2 + 3 * 8 + 2 bytes per bf16 parameter instead of materialising an fp32 gradient, scaling it in a pass of its
// own and copying the master back. The step count and the multiplier are read on the device: no host wait.
// 4-element vectors when every pointer allows, else one element at a time; the ragged tail of a range runs in
// a second, scalar launch.
#include <cmath>
#include <limits>

#include "piper_cuda.cuh"
#include "adamw_hyper.h"

namespace piper {

namespace {

constexpr int kThreads = 256;

// What every element of a launch shares, computed once per thread from the device-side step and multiplier.
struct StepConstants {
    float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, weight_decay, step_size, bc2_sqrt, mult;
};

__device__ __forceinline__ StepConstants step_constants(const AdamWHyper h, const float* step_ptr, float step_value,
                                                        const float* mult_ptr) {
    const double t = step_ptr != nullptr ? static_cast<double>(*step_ptr) : static_cast<double>(step_value);
    StepConstants c;
    c.lr = static_cast<float>(h.lr);
    c.beta1 = static_cast<float>(h.beta1);
    c.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
    c.beta2 = static_cast<float>(h.beta2);
    c.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
    c.eps = static_cast<float>(h.eps);
    c.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
    c.weight_decay = static_cast<float>(h.weight_decay);
    c.step_size = static_cast<float>(h.lr / (1.0 - pow(h.beta1, t)));
    c.bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(h.beta2, t)));
    c.mult = mult_ptr != nullptr ? *mult_ptr : 1.f;
    return c;
}

template <bool DECOUPLED>
__device__ __forceinline__ void adamw_element(float g, float& p, float& m, float& v, const StepConstants& c) {
    g *= c.mult;
    if (DECOUPLED) p *= c.decay;
    else g += c.weight_decay * p;
    // torch's lerp: the form that is exact at the end the weight is nearer to
    const float diff = g - m;
    m = c.one_minus_beta1 < 0.5f ? m + c.one_minus_beta1 * diff : g - diff * c.beta1;
    v = c.beta2 * v + c.one_minus_beta2 * g * g;
    const float denom = sqrtf(v) / c.bc2_sqrt + c.eps;
    p -= c.step_size * (m / denom);
}

template <typename grad_t, typename low_t, int V, bool DECOUPLED>
__global__ void __launch_bounds__(kThreads)
adamw_kernel(const grad_t* __restrict__ grad, float* __restrict__ master, float* __restrict__ exp_avg,
             float* __restrict__ exp_avg_sq, low_t* __restrict__ lowp, int64_t chunks, AdamWHyper hyper,
             const float* __restrict__ step_ptr, float step_value, const float* __restrict__ mult_ptr) {
    const StepConstants c = step_constants(hyper, step_ptr, step_value, mult_ptr);
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < chunks;
         i += static_cast<int64_t>(gridDim.x) * kThreads) {
        const int64_t at = i * V;
        const Vec<grad_t, V> g = load_vec<grad_t, V>(grad + at);
        Vec<float, V> p = load_vec<float, V>(master + at), m = load_vec<float, V>(exp_avg + at),
                      v = load_vec<float, V>(exp_avg_sq + at);
#pragma unroll
        for (int k = 0; k < V; ++k) adamw_element<DECOUPLED>(static_cast<float>(g.v[k]), p.v[k], m.v[k], v.v[k], c);
        store_vec<float, V>(master + at, p);
        store_vec<float, V>(exp_avg + at, m);
        store_vec<float, V>(exp_avg_sq + at, v);
        if (lowp != nullptr) {
            Vec<low_t, V> out;
#pragma unroll
            for (int k = 0; k < V; ++k) out.v[k] = static_cast<low_t>(p.v[k]);
            store_vec<low_t, V>(lowp + at, out);
        }
    }
}

template <typename T, int V>
bool aligned_for(const T* p) {
    return p == nullptr || reinterpret_cast<uintptr_t>(p) % (sizeof(T) * V) == 0;
}

template <typename grad_t, typename low_t, int V>
void launch(const grad_t* g, float* p, float* m, float* v, low_t* low, int64_t n, const AdamWHyper& h,
            const float* step_ptr, float step_value, const float* mult_ptr, cudaStream_t stream) {
    const int64_t chunks = n / V;
    if (chunks == 0) return;
    const int64_t blocks = fill_grid((chunks + kThreads - 1) / kThreads, 8);
    if (h.decoupled)
        adamw_kernel<grad_t, low_t, V, true>
            <<<blocks, kThreads, 0, stream>>>(g, p, m, v, low, chunks, h, step_ptr, step_value, mult_ptr);
    else
        adamw_kernel<grad_t, low_t, V, false>
            <<<blocks, kThreads, 0, stream>>>(g, p, m, v, low, chunks, h, step_ptr, step_value, mult_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename grad_t, typename low_t>
void launch_range(const grad_t* g, float* p, float* m, float* v, low_t* low, int64_t n, const AdamWHyper& h,
                  const float* step_ptr, float step_value, const float* mult_ptr, cudaStream_t stream) {
    constexpr int V = 4;
    const bool vec = aligned_for<grad_t, V>(g) && aligned_for<float, V>(p) && aligned_for<float, V>(m) &&
                     aligned_for<float, V>(v) && aligned_for<low_t, V>(low);
    int64_t done = 0;
    if (vec) {
        launch<grad_t, low_t, V>(g, p, m, v, low, n, h, step_ptr, step_value, mult_ptr, stream);
        done = n / V * V;
    }
    if (done < n)
        launch<grad_t, low_t, 1>(g + done, p + done, m + done, v + done, low == nullptr ? nullptr : low + done,
                                 n - done, h, step_ptr, step_value, mult_ptr, stream);
}

// low_t of a launch without lowp: any type serves (the pointer is null).
template <typename grad_t>
void dispatch_low(const at::Tensor& grad, at::Tensor& master, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                  at::Tensor* lowp, const AdamWHyper& h, const float* step_ptr, float step_value,
                  const float* mult_ptr, cudaStream_t stream) {
    const grad_t* g = grad.data_ptr<grad_t>();
    float *p = master.data_ptr<float>(), *m = exp_avg.data_ptr<float>(), *v = exp_avg_sq.data_ptr<float>();
    const int64_t n = grad.numel();
    if (lowp == nullptr) {
        launch_range<grad_t, float>(g, p, m, v, nullptr, n, h, step_ptr, step_value, mult_ptr, stream);
        return;
    }
    switch (lowp->scalar_type()) {
        case at::kBFloat16:
            launch_range<grad_t, at::BFloat16>(g, p, m, v, lowp->data_ptr<at::BFloat16>(), n, h, step_ptr,
                                               step_value, mult_ptr, stream);
            break;
        case at::kHalf:
            launch_range<grad_t, at::Half>(g, p, m, v, lowp->data_ptr<at::Half>(), n, h, step_ptr, step_value,
                                           mult_ptr, stream);
            break;
        case at::kFloat:
            launch_range<grad_t, float>(g, p, m, v, lowp->data_ptr<float>(), n, h, step_ptr, step_value, mult_ptr,
                                        stream);
            break;
        default:
            PIPER_CHECK_TYPE(false, "lowp must be bf16, fp16 or fp32 on CUDA, got ", lowp->scalar_type());
    }
}

}  // namespace

void adamw_step_cuda(const at::Tensor& grad, at::Tensor& master, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                     at::Tensor* lowp, const at::Tensor& step, const at::Tensor* grad_multiplier,
                     const AdamWHyper& hyper) {
    const c10::cuda::CUDAGuard guard(master.device());
    auto stream = c10::cuda::getCurrentCUDAStream();
    // The step count stays where the optimizer keeps it: read on the device when it lives there (torch's fused
    // and capturable AdamW), else its value goes in as an argument (no host wait either way).
    at::Tensor step_f;
    const float* step_ptr = nullptr;
    float step_value = 0.f;
    if (step.is_cuda()) {
        step_f = step.scalar_type() == at::kFloat ? step : step.to(at::kFloat);
        step_ptr = step_f.data_ptr<float>();
    } else {
        step_value = static_cast<float>(step.item<double>());
    }
    const float* mult_ptr = grad_multiplier != nullptr ? grad_multiplier->data_ptr<float>() : nullptr;
    switch (grad.scalar_type()) {
        case at::kBFloat16:
            dispatch_low<at::BFloat16>(grad, master, exp_avg, exp_avg_sq, lowp, hyper, step_ptr, step_value,
                                       mult_ptr, stream);
            break;
        case at::kHalf:
            dispatch_low<at::Half>(grad, master, exp_avg, exp_avg_sq, lowp, hyper, step_ptr, step_value, mult_ptr,
                                   stream);
            break;
        case at::kFloat:
            dispatch_low<float>(grad, master, exp_avg, exp_avg_sq, lowp, hyper, step_ptr, step_value, mult_ptr,
                                stream);
            break;
        default:
            PIPER_CHECK_TYPE(false, "grads must be bf16, fp16 or fp32 on CUDA, got ", grad.scalar_type());
    }
}

}  // namespace piper
