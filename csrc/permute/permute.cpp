// Token permutation for MoE dispatch (piper_ds.ops.permute): binding, checks and the CPU implementation.
//
// send_plan(topk_idx_TK, expert_rank_E, expert_slot_E, ep_size) -> [token_S, send_counts_R, slots_SK]
// expand_plan(slots_RK, num_local, align)                      -> [row_idx_N, pair_N, tokens_per_slot_L]
// gather_rows(x_MD, index_S, weight_S?)                        -> out_SD   (out[s] = w[s] * x[index[s]])
// combine_index(index_N, num_out)                             -> [starts_O1, rows_N]  (int32 CSR inverse)
// combine_rows(y_ND, index_N, num_out, weight_N?, starts?, rows?) -> out_OD (out[index[n]] += w[n] * y[n])
// combine_rows_backward(g_OD, y_ND?, index_N, weight_N?, need_y, need_w) -> [grad_y_ND?, grad_w_N?]
// row_dot(y_ND, g_OD, index_N)                                 -> dot_N    (dot[n] = <y[n], g[index[n]]>)
// Semantics follow piper_ds.ops.reference (send_plan_reference, expand_plan_reference, permute_rows_reference,
// combine_rows_reference); plans are built by counting sorts. An index of -1 in gather/combine/row_dot means "no
// row": a zero output row, a skipped input row. Accumulation is fp32 (fp64 for fp64 inputs). combine_rows reads the
// inverse of its index (the input rows of output row o are rows[starts[o]:starts[o+1]]): a caller that combines
// over one index more than once builds it once with combine_index and passes it in; without it combine_rows
// builds it per call. CUDA kernels live in plan_kernels.cu and rows_kernels.cu and are compiled in when
// PIPER_WITH_CUDA is defined.
// ATen + torch's pybind casters only: torch/extension.h would triple the compile time of this file.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "piper_common.h"

namespace piper {

#ifdef PIPER_WITH_CUDA
std::vector<at::Tensor> send_plan_cuda(const at::Tensor& idx, const at::Tensor& rank, const at::Tensor& slot,
                                       int64_t R, int64_t known);
std::vector<at::Tensor> expand_plan_cuda(const at::Tensor& slots, int64_t K, int64_t L, int64_t align,
                                         int64_t known);
void gather_rows_cuda(const at::Tensor& x, const at::Tensor& index, const c10::optional<at::Tensor>& w,
                      at::Tensor& out);
void combine_index_cuda(const at::Tensor& index, int64_t O, at::Tensor& starts, at::Tensor& rows);
void combine_rows_cuda(const at::Tensor& y, const at::Tensor& starts, const at::Tensor& rows,
                       const c10::optional<at::Tensor>& w, at::Tensor& out);
void combine_grad_cuda(const at::Tensor& g, const at::Tensor& y, const at::Tensor& index, const at::Tensor& w,
                       at::Tensor& grad_y, at::Tensor& grad_w);
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

// The CPU plans count their rows anyway: a caller's count that differs is a bug on its side, reported here.
void check_num_rows(int64_t rows, int64_t known, const char* what) {
    PIPER_CHECK_VALUE(known < 0 || known == rows, what, ": num_rows is ", known, " but the plan has ", rows,
                      " rows");
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

// Stable counting sort of the rows by destination: output row o takes rows[starts[o]:starts[o+1]] in ascending
// order; the entries past starts[O] (there are as many as rows with index -1) are -1.
void combine_index_cpu(const at::Tensor& index, int64_t O, at::Tensor& starts, at::Tensor& rows) {
    const int64_t N = index.size(0);
    const int64_t* ip = index.data_ptr<int64_t>();
    int32_t* st = starts.data_ptr<int32_t>();
    int32_t* ro = rows.data_ptr<int32_t>();
    std::fill(st, st + O + 1, 0);
    for (int64_t n = 0; n < N; ++n)
        if (ip[n] >= 0) ++st[ip[n] + 1];
    for (int64_t o = 0; o < O; ++o) st[o + 1] += st[o];
    std::vector<int32_t> cursor(st, st + O);
    std::fill(ro, ro + N, -1);
    for (int64_t n = 0; n < N; ++n)
        if (ip[n] >= 0) ro[cursor[ip[n]]++] = static_cast<int32_t>(n);
}

template <typename scalar_t, typename acc_t>
void combine_rows_cpu(const at::Tensor& y, const at::Tensor& starts, const at::Tensor& rows, const acc_t* w,
                      at::Tensor& out) {
    const int64_t D = y.size(1), O = out.size(0);
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const int32_t* st = starts.data_ptr<int32_t>();
    const int32_t* ro = rows.data_ptr<int32_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, O, 16, [&](int64_t o0, int64_t o1) {
        std::vector<acc_t> acc(D);
        for (int64_t o = o0; o < o1; ++o) {
            std::fill(acc.begin(), acc.end(), acc_t(0));
            for (int64_t j = st[o]; j < st[o + 1]; ++j) {  // ascending n: the reference's order
                const int64_t n = ro[j];
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
                                  int64_t ep_size, int64_t num_rows) {
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
        PIPER_CUDA_OR_FAIL(return send_plan_cuda(idx, rank, slot, ep_size, num_rows));
    }
    auto out = send_plan_cpu(idx, rank, slot, ep_size);
    check_num_rows(out[0].size(0), num_rows, "send_plan");
    return out;
}

std::vector<at::Tensor> expand_plan(const at::Tensor& slots_in, int64_t num_local, int64_t align,
                                    int64_t num_rows) {
    check_long_tensor(slots_in, "slots_RK");
    PIPER_CHECK_VALUE(slots_in.dim() == 1 || slots_in.dim() == 2, "slots_RK must be 1-D or 2-D, got shape ",
                      slots_in.sizes());
    PIPER_CHECK_VALUE(num_local >= 1, "num_local must be >= 1, got ", num_local);
    PIPER_CHECK_VALUE(align >= 1, "align must be >= 1, got ", align);
    PIPER_CHECK_VALUE(num_rows < 0 || align == 1, "num_rows (", num_rows, ") needs align 1, got align ", align);
    const at::Tensor slots = slots_in.contiguous();
    const int64_t K = slots.dim() == 2 ? std::max<int64_t>(slots.size(1), 1) : 1;
    if (slots.is_cuda()) {
        PIPER_CUDA_OR_FAIL(return expand_plan_cuda(slots, K, num_local, align, num_rows));
    }
    auto out = expand_plan_cpu(slots, K, num_local, align);
    check_num_rows(out[0].size(0), num_rows, "expand_plan");
    return out;
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

std::vector<at::Tensor> combine_index(const at::Tensor& index_in, int64_t num_out) {
    check_long_tensor(index_in, "index");
    PIPER_CHECK_VALUE(index_in.dim() == 1, "index must be 1-D, got shape ", index_in.sizes());
    PIPER_CHECK_VALUE(num_out >= 0, "num_out must be >= 0, got ", num_out);
    PIPER_CHECK_VALUE(index_in.size(0) < (int64_t(1) << 31), "combine_rows supports fewer than 2^31 rows, got ",
                      index_in.size(0));
    const at::Tensor index = index_in.contiguous();
    at::Tensor starts, rows;
    if (index.is_cuda()) {
        PIPER_CUDA_OR_FAIL(combine_index_cuda(index, num_out, starts, rows));
        return {starts, rows};
    }
    check_index_range(index, num_out, "combine_rows:");
    starts = at::empty({num_out + 1}, index.options().dtype(at::kInt));
    rows = at::empty({index.size(0)}, starts.options());
    combine_index_cpu(index, num_out, starts, rows);
    return {starts, rows};
}

// The caller's inverse of index (from combine_index): checked for dtype, shape and device only (its values are
// trusted, as the index's are on the GPU).
void check_inverse(const at::Tensor& starts, const at::Tensor& rows, const at::Tensor& y, int64_t num_out) {
    PIPER_CHECK_TYPE(starts.scalar_type() == at::kInt && rows.scalar_type() == at::kInt,
                     "the inverse (starts, rows) must be int32, got ", starts.scalar_type(), " and ",
                     rows.scalar_type());
    PIPER_CHECK_VALUE(starts.dim() == 1 && starts.size(0) == num_out + 1 && rows.dim() == 1 &&
                          rows.size(0) == y.size(0),
                      "the inverse must have shapes [", num_out + 1, "] and [", y.size(0), "], got ", starts.sizes(),
                      " and ", rows.sizes());
    check_same_device(y, starts, "y", "starts");
    check_same_device(y, rows, "y", "rows");
}

at::Tensor combine_rows(const at::Tensor& y_in, const at::Tensor& index_in, int64_t num_out,
                        const c10::optional<at::Tensor>& w_in, const c10::optional<at::Tensor>& starts_in,
                        const c10::optional<at::Tensor>& rows_in) {
    check_rows(y_in, index_in, "y");
    PIPER_CHECK_VALUE(index_in.size(0) == y_in.size(0), "index has ", index_in.size(0), " entries but y has ",
                      y_in.size(0), " rows");
    PIPER_CHECK_VALUE(num_out >= 0, "num_out must be >= 0, got ", num_out);
    PIPER_CHECK_VALUE(starts_in.has_value() == rows_in.has_value(), "pass both halves of the inverse or neither");
    const at::Tensor y = y_in.contiguous();
    const auto w = prep_weight(w_in, y, y.size(0));
    at::Tensor starts, rows;
    if (starts_in.has_value()) {  // built once per plan by the caller: this call is the combine alone
        check_inverse(*starts_in, *rows_in, y, num_out);
        starts = starts_in->contiguous();
        rows = rows_in->contiguous();
    } else {
        auto inv = combine_index(index_in, num_out);
        starts = inv[0];
        rows = inv[1];
    }
    at::Tensor out = at::empty({num_out, y.size(1)}, y.options());
    if (y.is_cuda()) {
        PIPER_CUDA_OR_FAIL(combine_rows_cuda(y, starts, rows, w, out));
        return out;
    }
    PIPER_DISPATCH_FLOATS(y.scalar_type(), "combine_rows_cpu", [&] {
        using acc_t = typename OpMath<scalar_t>::type;
        combine_rows_cpu<scalar_t, acc_t>(y, starts, rows, w ? w->data_ptr<acc_t>() : nullptr, out);
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

// Gradients of combine_rows: grad_y[n] = w[n] * g[index[n]] (no weight: w = 1), grad_w[n] = <y[n], g[index[n]]>
// in the weight's dtype. Each is computed only when asked for; both at once take one pass over the rows.
std::vector<at::Tensor> combine_rows_backward(const at::Tensor& g_in, const c10::optional<at::Tensor>& y_in,
                                              const at::Tensor& index_in, const c10::optional<at::Tensor>& w_in,
                                              bool need_y, bool need_w) {
    check_rows(g_in, index_in, "grad_out");
    PIPER_CHECK_VALUE(!need_w || (y_in.has_value() && w_in.has_value()), "the weight gradient needs y and weight");
    at::Tensor grad_y, grad_w;
    if (need_w && need_y) {
        const at::Tensor y = y_in->contiguous();
        PIPER_CHECK_VALUE(y.dim() == 2 && y.size(0) == index_in.size(0) && y.size(1) == g_in.size(1), "y ",
                          y.sizes(), " does not match index ", index_in.sizes(), " and grad_out ", g_in.sizes());
        const at::Tensor g = g_in.to(y.scalar_type()).contiguous(), index = index_in.contiguous();
        const auto w = prep_weight(w_in, y, y.size(0));
        grad_y = at::empty_like(y);
        grad_w = at::empty({y.size(0)}, w->options());
        if (y.is_cuda()) {
            PIPER_CUDA_OR_FAIL(combine_grad_cuda(g, y, index, *w, grad_y, grad_w));
        } else {
            check_index_range(index, g.size(0), "combine_rows backward:");
            PIPER_DISPATCH_FLOATS(y.scalar_type(), "combine_grad_cpu", [&] {
                using acc_t = typename OpMath<scalar_t>::type;
                gather_rows_cpu<scalar_t, acc_t>(g, index, w->data_ptr<acc_t>(), grad_y);
                row_dot_cpu<scalar_t, acc_t>(y, g, index, grad_w);
            });
        }
    } else if (need_w) {
        grad_w = row_dot(*y_in, g_in.to(y_in->scalar_type()), index_in);
    } else if (need_y) {
        grad_y = gather_rows(y_in.has_value() ? g_in.to(y_in->scalar_type()) : g_in, index_in, w_in);
    }
    if (grad_w.defined()) grad_w = grad_w.to(w_in->scalar_type());
    return {grad_y, grad_w};
}

}  // namespace piper

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "piper_ds MoE token permutation (CPU implementation, plus CUDA kernels when built with CUDA)";
    m.def("send_plan", &piper::send_plan, "rows to send per destination rank (dedup), rank-major, token order",
          py::arg("topk_idx"), py::arg("expert_rank"), py::arg("expert_slot"), py::arg("ep_size"),
          py::arg("num_rows") = -1);
    m.def("expand_plan", &piper::expand_plan, "received (row, k) pairs grouped by local expert, optionally padded",
          py::arg("slots"), py::arg("num_local"), py::arg("align"), py::arg("num_rows") = -1);
    m.def("gather_rows", &piper::gather_rows, "out[s] = w[s] * x[index[s]] (zero row where index is -1)",
          py::arg("x"), py::arg("index"), py::arg("weight"));
    m.def("combine_index", &piper::combine_index, "inverse of index (CSR): [starts int32 [num_out + 1], rows "
          "int32 [N]]", py::arg("index"), py::arg("num_out"));
    m.def("combine_rows", &piper::combine_rows, "out[index[n]] += w[n] * y[n], fp32 accumulation; (starts, rows) "
          "from combine_index skip building the inverse", py::arg("y"), py::arg("index"), py::arg("num_out"),
          py::arg("weight"), py::arg("starts") = py::none(), py::arg("rows") = py::none());
    m.def("combine_rows_backward", &piper::combine_rows_backward, "[grad_y, grad_w] of combine_rows (None where not "
          "needed), one pass when both are", py::arg("grad_out"), py::arg("y"), py::arg("index"), py::arg("weight"),
          py::arg("need_y"), py::arg("need_w"));
    m.def("row_dot", &piper::row_dot, "dot[n] = <y[n], g[index[n]]> (0 where index is -1)", py::arg("y"),
          py::arg("g"), py::arg("index"));
    m.def("has_cuda", &piper::has_cuda, "whether CUDA kernels are compiled in");
}
