// Fused MoE router (piper_ds.ops.gating): binding, argument checks and the CPU implementation.
//
// forward(logits_TE, top_k, score_func, bias_E?, n_groups, topk_groups, normalize, scaling)
//     -> [topk_idx_TK int64, topk_weights_TK, scores_TE, tokens_per_expert_E int64]
// backward(grad_weights_TK?, grad_scores_TE?, scores_TE, topk_idx_TK, score_func, normalize, scaling, dtype)
//     -> grad_logits_TE
// forward_autograd(same arguments as forward) -> forward's outputs, recorded for autograd: weights and scores
//     flow back to the logits through backward, in C++ (no Python in the backward pass, nothing but the scores
//     and the indices saved). Not differentiable twice: a create_graph backward whose incoming gradients require
//     grad raises.
// Semantics are those of piper_ds.ops.reference.gating_reference. Weights and scores are fp32 (fp64 when the
// logits are fp64). Ties in a selection prefer the lower expert (or group) id; NaN scores are selected last.
// The CUDA kernels live in gating_kernels.cu and are compiled in when PIPER_WITH_CUDA is defined.
// ATen, torch's C++ custom-function header and pybind casters: torch/extension.h would triple the compile time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "piper_common.h"

namespace piper {

#ifdef PIPER_WITH_CUDA
void gating_forward_cuda(const at::Tensor& logits, const c10::optional<at::Tensor>& bias, int64_t top_k,
                         int64_t score_func, int64_t n_groups, int64_t topk_groups, bool normalize, double scaling,
                         at::Tensor& idx, at::Tensor& weights, at::Tensor& scores, at::Tensor& counts);
void gating_backward_cuda(const c10::optional<at::Tensor>& grad_w, const c10::optional<at::Tensor>& grad_s,
                          const at::Tensor& scores, const at::Tensor& idx, int64_t score_func, bool normalize,
                          double scaling, at::Tensor& grad_logits);
#endif

namespace {

enum ScoreFunc : int64_t { kSoftmax = 0, kSigmoid = 1 };

// a beats b: larger value, then lower index; NaN was mapped to -inf before, so comparisons are total.
template <typename T>
inline bool beats(T va, int64_t ia, T vb, int64_t ib) {
    return va > vb || (va == vb && ia < ib);
}

template <typename scalar_t>
void gating_forward_cpu(const at::Tensor& logits, const c10::optional<at::Tensor>& bias, int64_t K, int64_t score_func,
                        int64_t G, int64_t topk_groups, bool normalize, double scaling, at::Tensor& idx,
                        at::Tensor& weights, at::Tensor& scores) {
    using acc_t = typename OpMath<scalar_t>::type;
    const int64_t T = logits.size(0), E = logits.size(1), P = E / G;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const acc_t* b = bias.has_value() ? bias->data_ptr<acc_t>() : nullptr;
    int64_t* out_i = idx.data_ptr<int64_t>();
    acc_t* out_w = weights.data_ptr<acc_t>();
    acc_t* out_s = scores.data_ptr<acc_t>();
    const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
        std::vector<acc_t> sel(E), gscore(G);
        std::vector<char> taken(E);
        for (int64_t t = t0; t < t1; ++t) {
            const scalar_t* xr = x + t * E;
            acc_t* sr = out_s + t * E;
            if (score_func == kSoftmax) {
                acc_t m = ninf, sum = 0;
                for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<acc_t>(xr[e]));
                for (int64_t e = 0; e < E; ++e) sum += (sr[e] = std::exp(static_cast<acc_t>(xr[e]) - m));
                for (int64_t e = 0; e < E; ++e) sr[e] = sr[e] / sum;
            } else {
                for (int64_t e = 0; e < E; ++e) sr[e] = acc_t(1) / (acc_t(1) + std::exp(-static_cast<acc_t>(xr[e])));
            }
            for (int64_t e = 0; e < E; ++e) {
                acc_t v = b ? sr[e] + b[e] : sr[e];
                sel[e] = std::isnan(v) ? ninf : v;
                taken[e] = 0;
            }
            if (G > 1) {  // group score = sum of its two best biased scores (the best one if P == 1)
                for (int64_t g = 0; g < G; ++g) {
                    acc_t a1 = ninf, a2 = ninf;
                    for (int64_t e = g * P; e < (g + 1) * P; ++e) {
                        if (sel[e] > a1) { a2 = a1; a1 = sel[e]; } else if (sel[e] > a2) { a2 = sel[e]; }
                    }
                    gscore[g] = P >= 2 ? a1 + a2 : a1;
                }
                for (int64_t g = 0; g < G; ++g) {
                    int64_t rank = 0;
                    for (int64_t h = 0; h < G; ++h) rank += beats(gscore[h], h, gscore[g], g);
                    if (rank >= topk_groups)
                        for (int64_t e = g * P; e < (g + 1) * P; ++e) sel[e] = ninf;
                }
            }
            acc_t wsum = 0;
            for (int64_t k = 0; k < K; ++k) {
                int64_t best = -1;
                for (int64_t e = 0; e < E; ++e)
                    if (!taken[e] && (best < 0 || beats(sel[e], e, sel[best], best))) best = e;
                taken[best] = 1;
                out_i[t * K + k] = best;
                out_w[t * K + k] = sr[best];
                wsum += sr[best];
            }
            const acc_t denom = std::max(wsum, static_cast<acc_t>(kFloatTiny));
            for (int64_t k = 0; k < K; ++k) {
                acc_t w = normalize ? out_w[t * K + k] / denom : out_w[t * K + k];
                out_w[t * K + k] = w * static_cast<acc_t>(scaling);
            }
        }
    });
}

template <typename scalar_t, typename acc_t>
void gating_backward_cpu(const c10::optional<at::Tensor>& grad_w, const c10::optional<at::Tensor>& grad_s,
                         const at::Tensor& scores, const at::Tensor& idx, int64_t score_func, bool normalize,
                         double scaling, at::Tensor& grad_logits) {
    const int64_t T = scores.size(0), E = scores.size(1), K = idx.size(1);
    const acc_t* s = scores.data_ptr<acc_t>();
    const int64_t* ix = idx.data_ptr<int64_t>();
    const acc_t* gw = grad_w.has_value() ? grad_w->data_ptr<acc_t>() : nullptr;
    const acc_t* gs = grad_s.has_value() ? grad_s->data_ptr<acc_t>() : nullptr;
    scalar_t* out = grad_logits.data_ptr<scalar_t>();
    const acc_t c = static_cast<acc_t>(scaling), tiny = static_cast<acc_t>(kFloatTiny);
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
        std::vector<acc_t> g(E);
        for (int64_t t = t0; t < t1; ++t) {
            const acc_t* sr = s + t * E;
            for (int64_t e = 0; e < E; ++e) g[e] = gs ? gs[t * E + e] : acc_t(0);
            if (gw) {  // through w_k = c * s_k / max(sum_j s_j, tiny)  (or c * s_k without normalisation)
                acc_t ssum = 0, dot = 0;
                for (int64_t k = 0; k < K; ++k) {
                    ssum += sr[ix[t * K + k]];
                    dot += gw[t * K + k] * sr[ix[t * K + k]];
                }
                const acc_t denom = std::max(ssum, tiny);
                const acc_t shared = ssum >= tiny ? dot / (denom * denom) : acc_t(0);
                for (int64_t k = 0; k < K; ++k)
                    g[ix[t * K + k]] += normalize ? c * (gw[t * K + k] / denom - shared) : c * gw[t * K + k];
            }
            if (score_func == kSoftmax) {
                acc_t dot = 0;
                for (int64_t e = 0; e < E; ++e) dot += sr[e] * g[e];
                for (int64_t e = 0; e < E; ++e) out[t * E + e] = static_cast<scalar_t>(sr[e] * (g[e] - dot));
            } else {
                for (int64_t e = 0; e < E; ++e)
                    out[t * E + e] = static_cast<scalar_t>(g[e] * sr[e] * (acc_t(1) - sr[e]));
            }
        }
    });
}

void check_gating_args(const at::Tensor& logits, int64_t K, int64_t score_func, const c10::optional<at::Tensor>& bias,
                       int64_t G, int64_t topk_groups) {
    check_float_tensor(logits, "logits_TE");
    PIPER_CHECK_VALUE(logits.dim() == 2, "logits_TE must be 2-D [tokens, experts], got shape ", logits.sizes());
    const int64_t E = logits.size(1);
    PIPER_CHECK_VALUE(E >= 1, "logits_TE needs at least one expert, got shape ", logits.sizes());
    PIPER_CHECK_VALUE(score_func == kSoftmax || score_func == kSigmoid, "score_func must be 0 (softmax) or 1 ",
                      "(sigmoid), got ", score_func);
    PIPER_CHECK_VALUE(G >= 1 && E % G == 0, "num_experts (", E, ") must be divisible by n_groups (", G, ")");
    PIPER_CHECK_VALUE(topk_groups >= 1 && topk_groups <= G, "topk_groups (", topk_groups, ") must be in [1, n_groups",
                      " (", G, ")]");
    const int64_t reachable = G > 1 ? topk_groups * (E / G) : E;
    PIPER_CHECK_VALUE(K >= 1 && K <= reachable, "top_k (", K, ") must be in [1, ", reachable, "] (the experts ",
                      "reachable in topk_groups (", topk_groups, ") of n_groups (", G, ") groups of ", E, ")");
    if (bias.has_value()) {
        check_float_tensor(*bias, "bias_E");
        PIPER_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == E, "bias_E must have shape [", E, "], got ",
                          bias->sizes());
        check_same_device(logits, *bias, "logits_TE", "bias_E");
    }
}

}  // namespace

std::vector<at::Tensor> gating_forward(const at::Tensor& logits_in, int64_t top_k, int64_t score_func,
                                       const c10::optional<at::Tensor>& bias_in, int64_t n_groups,
                                       int64_t topk_groups, bool normalize, double scaling) {
    check_gating_args(logits_in, top_k, score_func, bias_in, n_groups, topk_groups);
    const at::Tensor logits = logits_in.contiguous();
    const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    c10::optional<at::Tensor> bias;
    if (bias_in.has_value()) bias = bias_in->to(acc).contiguous();
    const int64_t T = logits.size(0), E = logits.size(1);
    auto opts = logits.options();
    at::Tensor idx = at::empty({T, top_k}, opts.dtype(at::kLong));
    at::Tensor weights = at::empty({T, top_k}, opts.dtype(acc));
    at::Tensor scores = at::empty({T, E}, opts.dtype(acc));
    at::Tensor counts = at::empty({E}, opts.dtype(at::kLong));  // zeroed by the CUDA path or below
    if (logits.is_cuda()) {
#ifdef PIPER_WITH_CUDA
        gating_forward_cuda(logits, bias, top_k, score_func, n_groups, topk_groups, normalize, scaling, idx, weights,
                            scores, counts);
        return {idx, weights, scores, counts};
#else
        TORCH_CHECK(false, "this build of the gating op has no CUDA kernels (built by the CPU builder)");
#endif
    }
    PIPER_CHECK_VALUE(logits.is_cpu(), "gating: unsupported device ", logits.device());
    counts.zero_();
    PIPER_DISPATCH_FLOATS(logits.scalar_type(), "gating_forward_cpu", [&] {
        gating_forward_cpu<scalar_t>(logits, bias, top_k, score_func, n_groups, topk_groups, normalize, scaling, idx,
                                     weights, scores);
    });
    if (T > 0) counts.index_add_(0, idx.reshape(-1), at::ones({T * top_k}, counts.options()));
    return {idx, weights, scores, counts};
}

at::Tensor gating_backward(const c10::optional<at::Tensor>& grad_w_in, const c10::optional<at::Tensor>& grad_s_in,
                           const at::Tensor& scores_in, const at::Tensor& idx_in, int64_t score_func, bool normalize,
                           double scaling, at::ScalarType logits_dtype) {
    const at::Tensor scores = scores_in.contiguous();
    const at::Tensor idx = idx_in.contiguous();
    PIPER_CHECK_VALUE(scores.dim() == 2 && idx.dim() == 2 && idx.size(0) == scores.size(0),
                      "gating backward: scores_TE ", scores.sizes(), " and topk_idx_TK ", idx.sizes(), " disagree");
    c10::optional<at::Tensor> grad_w, grad_s;
    if (grad_w_in.has_value()) grad_w = grad_w_in->to(scores.scalar_type()).contiguous();
    if (grad_s_in.has_value()) grad_s = grad_s_in->to(scores.scalar_type()).contiguous();
    at::Tensor grad_logits = at::empty(scores.sizes(), scores.options().dtype(logits_dtype));
    if (scores.is_cuda()) {
#ifdef PIPER_WITH_CUDA
        gating_backward_cuda(grad_w, grad_s, scores, idx, score_func, normalize, scaling, grad_logits);
        return grad_logits;
#else
        TORCH_CHECK(false, "this build of the gating op has no CUDA kernels (built by the CPU builder)");
#endif
    }
    PIPER_DISPATCH_FLOATS(logits_dtype, "gating_backward_cpu", [&] {
        if (scores.scalar_type() == at::kDouble)
            gating_backward_cpu<scalar_t, double>(grad_w, grad_s, scores, idx, score_func, normalize, scaling,
                                                  grad_logits);
        else
            gating_backward_cpu<scalar_t, float>(grad_w, grad_s, scores, idx, score_func, normalize, scaling,
                                                 grad_logits);
    });
    return grad_logits;
}

namespace {

// The autograd node of the fused router, in C++: the engine calls backward without taking the GIL, and the
// forward records the graph without a Python ctx object.
struct GatingFunction : public torch::autograd::Function<GatingFunction> {
    static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                                                  const c10::optional<at::Tensor>& bias, int64_t top_k,
                                                  int64_t score_func, int64_t n_groups, int64_t topk_groups,
                                                  bool normalize, double scaling) {
        auto out = gating_forward(logits, top_k, score_func, bias, n_groups, topk_groups, normalize, scaling);
        ctx->save_for_backward({out[2], out[0]});  // scores, indices
        ctx->saved_data["score_func"] = score_func;
        ctx->saved_data["normalize"] = normalize;
        ctx->saved_data["scaling"] = scaling;
        ctx->saved_data["dtype"] = static_cast<int64_t>(logits.scalar_type());
        ctx->mark_non_differentiable({out[0], out[3]});
        ctx->set_materialize_grads(false);  // an unused output's gradient arrives undefined: nothing to read
        return out;
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grads) {
        torch::autograd::variable_list result(8);  // logits, bias, then six non-tensor arguments
        const at::Tensor &g_w = grads[1], &g_s = grads[2];
        if (!g_w.defined() && !g_s.defined()) return result;
        // The kernel's gradient is not itself recorded: refuse a graph of the backward through it rather than
        // return a gradient that silently lacks the higher-order terms.
        TORCH_CHECK(!(at::GradMode::is_enabled() && ((g_w.defined() && g_w.requires_grad()) ||
                                                     (g_s.defined() && g_s.requires_grad()))),
                    "fused_gating's backward is not differentiable (a create_graph backward with gradients that "
                    "require grad reached it); use backend='reference' for higher-order gradients");
        const auto saved = ctx->get_saved_variables();
        const auto& d = ctx->saved_data;
        result[0] = gating_backward(g_w.defined() ? c10::optional<at::Tensor>(g_w) : c10::nullopt,
                                    g_s.defined() ? c10::optional<at::Tensor>(g_s) : c10::nullopt, saved[0],
                                    saved[1], d.at("score_func").toInt(), d.at("normalize").toBool(),
                                    d.at("scaling").toDouble(), static_cast<at::ScalarType>(d.at("dtype").toInt()));
        return result;
    }
};

}  // namespace

std::vector<at::Tensor> gating_forward_autograd(const at::Tensor& logits, int64_t top_k, int64_t score_func,
                                                const c10::optional<at::Tensor>& bias, int64_t n_groups,
                                                int64_t topk_groups, bool normalize, double scaling) {
    return GatingFunction::apply(logits, bias, top_k, score_func, n_groups, topk_groups, normalize, scaling);
}

}  // namespace piper

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "piper_ds fused MoE gating (CPU implementation, plus CUDA kernels when built with CUDA)";
    m.def("forward", &piper::gating_forward, "scores, biased group-limited top-k, weights, tokens per expert",
          py::arg("logits"), py::arg("top_k"), py::arg("score_func"), py::arg("bias"), py::arg("n_groups"),
          py::arg("topk_groups"), py::arg("normalize"), py::arg("scaling"));
    m.def("backward", &piper::gating_backward, "grad of the logits from grads of weights and scores",
          py::arg("grad_weights"), py::arg("grad_scores"), py::arg("scores"), py::arg("topk_idx"),
          py::arg("score_func"), py::arg("normalize"), py::arg("scaling"), py::arg("logits_dtype"));
    m.def("forward_autograd", &piper::gating_forward_autograd, "forward, recorded for autograd (C++ backward)",
          py::arg("logits"), py::arg("top_k"), py::arg("score_func"), py::arg("bias"), py::arg("n_groups"),
          py::arg("topk_groups"), py::arg("normalize"), py::arg("scaling"));
    m.def("has_cuda", &piper::has_cuda, "whether CUDA kernels are compiled in");
}
