// Token permutation for MoE dispatch (piper_ds.ops.permute): binding, checks and the CPU implementation.
//
// send_plan(topk_idx_TK, expert_rank_E, expert_slot_E, ep_size) -> [token_S, send_counts_R, slots_SK]
// expand_plan(slots_RK, num_local, align)                      -> [row_idx_N, pair_N, tokens_per_slot_L]
// gather_rows(x_MD, index_S, weight_S?)                        -> out_SD   (out[s] = w[s] * x[index[s]])
// combine_rows(y_ND, index_N, num_out, weight_N?)              -> out_OD   (out[index[n]] += w[n] * y[n])
// row_dot(y_ND, g_OD, index_N)                                 -> dot_N    (dot[n] = <y[n], g[index[n]]>)
// Semantics follow piper_ds.ops.reference (send_plan_reference, expand_plan_reference, permute_rows_reference,
// combine_rows_reference); plans are built by counting sorts. An index of -1 in gather/combine/row_dot means "no
// row": a zero output row, a skipped input row. Accumulation is fp32 (fp64 for fp64 inputs). CUDA kernels live in
// plan_kernels.cu and rows_kernels.cu and are compiled in when PIPER_WITH_CUDA is defined.
// ATen + torch's pybind casters only: torch/extension.h would triple the compile time of this file.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "piper_common.h"

namespace piper {

#ifdef PIPER_WITH_CUDA
std::vector<at::Tensor> send_plan_cuda(const at::Tensor& idx, const at::Tensor& rank, const at::Tensor& slot,
                                       int64_t R);
std::vector<at::Tensor> expand_plan_cuda(const at::Tensor& slots, int64_t K, int64_t L, int64_t align);
void gather_rows_cuda(const at::Tensor& x, const at::Tensor& index, const c10::optional<at::Tensor>& w,
                      at::Tensor& out);
void combine_rows_cuda(const at::Tensor& y, const at::Tensor& index, const c10::optional<at::Tensor>& w,
                       at::Tensor& out);
void row_dot_cuda(const at::Tensor& y, const at::Tensor& g, const at::Tensor& index, at::Tensor& out);
#define PIPER_CUDA_OR_FAIL(call) \
    do {                         \
        call;                    \
    } while (0)
#else
#define PIPER_CUDA_OR_FAIL(call) \
    TORCH_CHECK(false, "this build of the permute op has no CUDA kernels (built by the CPU builder)")
#endif

namespace {

at::ScalarType acc_dtype(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::vector<at::Tensor> send_plan_cpu(const at::Tensor& idx, const at::Tensor& rank, const at::Tensor& slot,
                                      int64_t R) {
    const int64_t T = idx.size(0), K = idx.size(1), E = rank.size(0);
    const int64_t* ix = idx.data_ptr<int64_t>();
    const int64_t* rk = rank.data_ptr<int64_t>();
    const int64_t* sl = slot.data_ptr<int64_t>();
    std::vector<uint8_t> flag(R * T, 0);
    for (int64_t i = 0; i < T * K; ++i) {
        const int64_t e = ix[i];
        if (e < 0) continue;  // dropped assignment
        PIPER_CHECK_VALUE(e < E, "topk_idx_TK holds expert ", e, " but expert_rank_E has only ", E, " entries");
        PIPER_CHECK_VALUE(rk[e] >= 0 && rk[e] < R, "expert_rank_E[", e, "] = ", rk[e], " is outside [0, ep_size (",
                          R, "))");
        PIPER_CHECK_VALUE(sl[e] >= 0, "expert_slot_E[", e, "] = ", sl[e], " is negative");
        flag[rk[e] * T + i / K] = 1;
    }
    at::Tensor counts = at::zeros({R}, idx.options());
    int64_t* cnt = counts.data_ptr<int64_t>();
    int64_t S = 0;
    for (int64_t r = 0; r < R; ++r) {
        for (int64_t t = 0; t < T; ++t) cnt[r] += flag[r * T + t];
        S += cnt[r];
    }
    at::Tensor token = at::empty({S}, idx.options());
    at::Tensor slots = at::empty({S, K}, idx.options());
    int64_t* tok = token.data_ptr<int64_t>();
    int64_t* so = slots.data_ptr<int64_t>();
    int64_t pos = 0;
    for (int64_t r = 0; r < R; ++r) {
        for (int64_t t = 0; t < T; ++t) {
            if (!flag[r * T + t]) continue;
            tok[pos] = t;
            for (int64_t k = 0; k < K; ++k) {
                const int64_t e = ix[t * K + k];
                so[pos * K + k] = (e >= 0 && rk[e] == r) ? sl[e] : -1;
            }
            ++pos;
        }
    }
    return {token, counts, slots};
}

std::vector<at::Tensor> expand_plan_cpu(const at::Tensor& slots, int64_t K, int64_t L, int64_t align) {
    const int64_t P = slots.numel();
    const int64_t* sl = slots.data_ptr<int64_t>();
    std::vector<int64_t> count(L, 0), cursor(L, 0);
    for (int64_t p = 0; p < P; ++p) {
        const int64_t s = sl[p];
        if (s < 0) continue;
        PIPER_CHECK_VALUE(s < L, "slots_RK holds slot ", s, " but num_local is ", L);
        ++count[s];
    }
    at::Tensor per_slot = at::empty({L}, slots.options());
    int64_t* ps = per_slot.data_ptr<int64_t>();
    int64_t N = 0;
    for (int64_t l = 0; l < L; ++l) {
        ps[l] = (count[l] + align - 1) / align * align;
        cursor[l] = N;
        N += ps[l];
    }
    at::Tensor row = at::full({N}, -1, slots.options());
    at::Tensor pair = at::full({N}, -1, slots.options());
    int64_t* ro = row.data_ptr<int64_t>();
    int64_t* pa = pair.data_ptr<int64_t>();
    for (int64_t p = 0; p < P; ++p) {  // stable: pairs of one slot keep their (row, k) order
        const int64_t s = sl[p];
        if (s < 0) continue;
        const int64_t at_ = cursor[s]++;
        ro[at_] = p / K;
        pa[at_] = p;
    }
    return {row, pair, per_slot};
}

void check_index_range(const at::Tensor& index, int64_t limit, const char* what) {
    if (index.numel() == 0) return;
    const int64_t lo = index.min().item<int64_t>(), hi = index.max().item<int64_t>();
    PIPER_CHECK_INDEX(lo >= -1 && hi < limit, what, " index values must lie in [-1, ", limit, "), got [", lo, ", ",
                      hi, "]");
}

template <typename scalar_t, typename acc_t>
void gather_rows_cpu(const at::Tensor& x, const at::Tensor& index, const acc_t* w, at::Tensor& out) {
    const int64_t S = index.size(0), D = x.size(1);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t* ip = index.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, S, 64, [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; ++s) {
            scalar_t* o = op + s * D;
            const int64_t i = ip[s];
            if (i < 0) {
                for (int64_t d = 0; d < D; ++d) o[d] = scalar_t(0);
            } else if (w == nullptr) {
                std::copy(xp + i * D, xp + (i + 1) * D, o);
            } else {
                for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(static_cast<acc_t>(xp[i * D + d]) * w[s]);
            }
        }
    });
}

template <typename scalar_t, typename acc_t>
void combine_rows_cpu(const at::Tensor& y, const at::Tensor& index, const acc_t* w, at::Tensor& out) {
    const int64_t N = index.size(0), D = y.size(1), O = out.size(0);
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t* ip = index.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    std::vector<int64_t> start(O + 1, 0), order;  // stable counting sort of the rows by destination
    for (int64_t n = 0; n < N; ++n)
        if (ip[n] >= 0) ++start[ip[n] + 1];
    for (int64_t o = 0; o < O; ++o) start[o + 1] += start[o];
    order.resize(start[O]);
    std::vector<int64_t> cursor(start.begin(), start.end() - 1);
    for (int64_t n = 0; n < N; ++n)
        if (ip[n] >= 0) order[cursor[ip[n]]++] = n;
    at::parallel_for(0, O, 16, [&](int64_t o0, int64_t o1) {
        std::vector<acc_t> acc(D);
        for (int64_t o = o0; o < o1; ++o) {
            std::fill(acc.begin(), acc.end(), acc_t(0));
            for (int64_t j = start[o]; j < start[o + 1]; ++j) {  // ascending n: the reference's order
                const int64_t n = order[j];
                const scalar_t* yr = yp + n * D;
                if (w == nullptr) {
                    for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(yr[d]);
                } else {
                    for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(yr[d]) * w[n];
                }
            }
            for (int64_t d = 0; d < D; ++d) op[o * D + d] = static_cast<scalar_t>(acc[d]);
        }
    });
}

template <typename scalar_t, typename acc_t>
void row_dot_cpu(const at::Tensor& y, const at::Tensor& g, const at::Tensor& index, at::Tensor& out) {
    const int64_t N = index.size(0), D = y.size(1);
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const int64_t* ip = index.data_ptr<int64_t>();
    acc_t* op = out.data_ptr<acc_t>();
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
            acc_t dot = 0;
            if (ip[n] >= 0)
                for (int64_t d = 0; d < D; ++d)
                    dot += static_cast<acc_t>(yp[n * D + d]) * static_cast<acc_t>(gp[ip[n] * D + d]);
            op[n] = dot;
        }
    });
}

void check_rows(const at::Tensor& x, const at::Tensor& index, const char* xname) {
    check_float_tensor(x, xname);
    PIPER_CHECK_VALUE(x.dim() == 2, xname, " must be 2-D [rows, dim], got shape ", x.sizes());
    check_long_tensor(index, "index");
    PIPER_CHECK_VALUE(index.dim() == 1, "index must be 1-D, got shape ", index.sizes());
    check_same_device(x, index, xname, "index");
}

c10::optional<at::Tensor> prep_weight(const c10::optional<at::Tensor>& w, const at::Tensor& x, int64_t n) {
    if (!w.has_value()) return c10::nullopt;
    check_float_tensor(*w, "weight");
    PIPER_CHECK_VALUE(w->dim() == 1 && w->size(0) == n, "weight must have shape [", n, "], got ", w->sizes());
    check_same_device(x, *w, "rows", "weight");
    return w->to(acc_dtype(x)).contiguous();
}

}  // namespace

std::vector<at::Tensor> send_plan(const at::Tensor& idx_in, const at::Tensor& rank_in, const at::Tensor& slot_in,
                                  int64_t ep_size) {
    check_long_tensor(idx_in, "topk_idx_TK");
    PIPER_CHECK_VALUE(idx_in.dim() == 2, "topk_idx_TK must be 2-D [tokens, top_k], got shape ", idx_in.sizes());
    PIPER_CHECK_VALUE(ep_size >= 1, "ep_size must be >= 1, got ", ep_size);
    PIPER_CHECK_VALUE(rank_in.dim() == 1 && slot_in.sizes() == rank_in.sizes(), "expert_rank_E ", rank_in.sizes(),
                      " and expert_slot_E ", slot_in.sizes(), " must be 1-D of the same length");
    check_same_device(idx_in, rank_in, "topk_idx_TK", "expert_rank_E");
    check_same_device(idx_in, slot_in, "topk_idx_TK", "expert_slot_E");
    const at::Tensor idx = idx_in.contiguous(), rank = rank_in.to(at::kLong).contiguous();
    const at::Tensor slot = slot_in.to(at::kLong).contiguous();
    if (idx.is_cuda()) {
        PIPER_CUDA_OR_FAIL(return send_plan_cuda(idx, rank, slot, ep_size));
    }
    return send_plan_cpu(idx, rank, slot, ep_size);
}

std::vector<at::Tensor> expand_plan(const at::Tensor& slots_in, int64_t num_local, int64_t align) {
    check_long_tensor(slots_in, "slots_RK");
    PIPER_CHECK_VALUE(slots_in.dim() == 1 || slots_in.dim() == 2, "slots_RK must be 1-D or 2-D, got shape ",
                      slots_in.sizes());
    PIPER_CHECK_VALUE(num_local >= 1, "num_local must be >= 1, got ", num_local);
    PIPER_CHECK_VALUE(align >= 1, "align must be >= 1, got ", align);
    const at::Tensor slots = slots_in.contiguous();
    const int64_t K = slots.dim() == 2 ? std::max<int64_t>(slots.size(1), 1) : 1;
    if (slots.is_cuda()) {
        PIPER_CUDA_OR_FAIL(return expand_plan_cuda(slots, K, num_local, align));
    }
    return expand_plan_cpu(slots, K, num_local, align);
}

at::Tensor gather_rows(const at::Tensor& x_in, const at::Tensor& index_in, const c10::optional<at::Tensor>& w_in) {
    check_rows(x_in, index_in, "x");
    const at::Tensor x = x_in.contiguous(), index = index_in.contiguous();
    const auto w = prep_weight(w_in, x, index.size(0));
    at::Tensor out = at::empty({index.size(0), x.size(1)}, x.options());
    if (x.is_cuda()) {
        PIPER_CUDA_OR_FAIL(gather_rows_cuda(x, index, w, out));
        return out;
    }
    check_index_range(index, x.size(0), "permute_rows:");
    PIPER_DISPATCH_FLOATS(x.scalar_type(), "gather_rows_cpu", [&] {
        using acc_t = typename OpMath<scalar_t>::type;
        gather_rows_cpu<scalar_t, acc_t>(x, index, w ? w->data_ptr<acc_t>() : nullptr, out);
    });
    return out;
}

at::Tensor combine_rows(const at::Tensor& y_in, const at::Tensor& index_in, int64_t num_out,
                        const c10::optional<at::Tensor>& w_in) {
    check_rows(y_in, index_in, "y");
    PIPER_CHECK_VALUE(index_in.size(0) == y_in.size(0), "index has ", index_in.size(0), " entries but y has ",
                      y_in.size(0), " rows");
    PIPER_CHECK_VALUE(num_out >= 0, "num_out must be >= 0, got ", num_out);
    const at::Tensor y = y_in.contiguous(), index = index_in.contiguous();
    const auto w = prep_weight(w_in, y, index.size(0));
    at::Tensor out = at::empty({num_out, y.size(1)}, y.options());
    if (y.is_cuda()) {
        PIPER_CUDA_OR_FAIL(combine_rows_cuda(y, index, w, out));
        return out;
    }
    check_index_range(index, num_out, "combine_rows:");
    PIPER_DISPATCH_FLOATS(y.scalar_type(), "combine_rows_cpu", [&] {
        using acc_t = typename OpMath<scalar_t>::type;
        combine_rows_cpu<scalar_t, acc_t>(y, index, w ? w->data_ptr<acc_t>() : nullptr, out);
    });
    return out;
}

at::Tensor row_dot(const at::Tensor& y_in, const at::Tensor& g_in, const at::Tensor& index_in) {
    check_rows(y_in, index_in, "y");
    PIPER_CHECK_VALUE(g_in.dim() == 2 && g_in.size(1) == y_in.size(1) && g_in.scalar_type() == y_in.scalar_type(),
                      "grad rows ", g_in.sizes(), " ", g_in.scalar_type(), " must match y rows ", y_in.sizes(), " ",
                      y_in.scalar_type());
    PIPER_CHECK_VALUE(index_in.size(0) == y_in.size(0), "index has ", index_in.size(0), " entries but y has ",
                      y_in.size(0), " rows");
    const at::Tensor y = y_in.contiguous(), g = g_in.contiguous(), index = index_in.contiguous();
    at::Tensor out = at::empty({y.size(0)}, y.options().dtype(acc_dtype(y)));
    if (y.is_cuda()) {
        PIPER_CUDA_OR_FAIL(row_dot_cuda(y, g, index, out));
        return out;
    }
    check_index_range(index, g.size(0), "row_dot:");
    PIPER_DISPATCH_FLOATS(y.scalar_type(), "row_dot_cpu", [&] {
        row_dot_cpu<scalar_t, typename OpMath<scalar_t>::type>(y, g, index, out);
    });
    return out;
}

}  // namespace piper

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "piper_ds MoE token permutation (CPU implementation, plus CUDA kernels when built with CUDA)";
    m.def("send_plan", &piper::send_plan, "rows to send per destination rank (dedup), rank-major, token order",
          py::arg("topk_idx"), py::arg("expert_rank"), py::arg("expert_slot"), py::arg("ep_size"));
    m.def("expand_plan", &piper::expand_plan, "received (row, k) pairs grouped by local expert, optionally padded",
          py::arg("slots"), py::arg("num_local"), py::arg("align"));
    m.def("gather_rows", &piper::gather_rows, "out[s] = w[s] * x[index[s]] (zero row where index is -1)",
          py::arg("x"), py::arg("index"), py::arg("weight"));
    m.def("combine_rows", &piper::combine_rows, "out[index[n]] += w[n] * y[n], fp32 accumulation", py::arg("y"),
          py::arg("index"), py::arg("num_out"), py::arg("weight"));
    m.def("row_dot", &piper::row_dot, "dot[n] = <y[n], g[index[n]]> (0 where index is -1)", py::arg("y"),
          py::arg("g"), py::arg("index"));
    m.def("has_cuda", &piper::has_cuda, "whether CUDA kernels are compiled in");
}
