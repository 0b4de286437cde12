// Token permutation for MoE dispatch (piper_ds.ops.permute): binding, checks and the CPU implementation.
//
// send_plan(topk_idx_TK, expert_rank_E, expert_slot_E, ep_size) -> [token_S, send_counts_R, slots_SK, pos_TR]
// route_plan(ids_RK, slot_map?, num_local, num_rows, bounded) -> [row_N, pair_N, pos_RK, counts_L, offsets_L]
// expand_rows(x_RD, pos_RK, num_rows)                        -> out_ND   (out[pos[r, k]] = x[r])
// reduce_rows(y_ND, pos_RK, weight_RK?)                      -> out_RD   (out[r] = sum_k w[r, k] * y[pos[r, k]])
// reduce_rows_backward(g_RD, y_ND?, pos_RK, weight_RK?, need_y, need_w) -> [grad_y_ND?, grad_w_RK?]
// Semantics follow piper_ds.ops.reference (send_plan_reference, route_plan_reference, expand_rows_reference,
// reduce_rows_reference); plans are built by counting sorts. pos_TR / pos_RK is the fan index of a plan: where
// each (token, rank) or (row, k) pair went among the plan's rows, -1 where it did not go. Accumulation is fp32
// (fp64 for fp64 inputs). CUDA kernels live in plan_kernels.cu and rows_kernels.cu and are compiled in when
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
std::vector<at::Tensor> route_plan_cuda(const at::Tensor& ids, const c10::optional<at::Tensor>& map, int64_t L,
                                        int64_t known, bool bounded);
void expand_rows_cuda(const at::Tensor& x, const at::Tensor& pos, at::Tensor& out);
void reduce_rows_cuda(const at::Tensor& y, const at::Tensor& pos, const c10::optional<at::Tensor>& w,
                      at::Tensor& out);
void reduce_rows_grad_cuda(const at::Tensor& g, const c10::optional<at::Tensor>& y, const at::Tensor& pos,
                           const c10::optional<at::Tensor>& w, at::Tensor& grad_y, at::Tensor& grad_w);
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
    at::Tensor pos = at::full({T, R}, -1, idx.options());
    int64_t* tok = token.data_ptr<int64_t>();
    int64_t* so = slots.data_ptr<int64_t>();
    int64_t* po = pos.data_ptr<int64_t>();
    int64_t at_ = 0;
    for (int64_t r = 0; r < R; ++r) {
        for (int64_t t = 0; t < T; ++t) {
            if (!flag[r * T + t]) continue;
            tok[at_] = t;
            po[t * R + r] = at_;
            for (int64_t k = 0; k < K; ++k) {
                const int64_t e = ix[t * K + k];
                so[at_ * K + k] = (e >= 0 && rk[e] == r) ? sl[e] : -1;
            }
            ++at_;
        }
    }
    return {token, counts, slots, pos};
}

std::vector<at::Tensor> route_plan_cpu(const at::Tensor& ids, const c10::optional<at::Tensor>& map, int64_t L,
                                       bool bounded) {
    const int64_t P = ids.numel(), K = ids.dim() == 2 ? ids.size(1) : 1;
    const int64_t* iv = ids.data_ptr<int64_t>();
    const int64_t* mp = map.has_value() ? map->data_ptr<int64_t>() : nullptr;
    const int64_t M = map.has_value() ? map->size(0) : 0;
    std::vector<int64_t> slot(P, -1), count(L, 0);
    for (int64_t p = 0; p < P; ++p) {
        const int64_t v = iv[p];
        if (v < 0) continue;
        int64_t s = v;
        if (mp != nullptr) {
            PIPER_CHECK_VALUE(v < M, "ids_RK holds expert ", v, " but slot_map has only ", M, " entries");
            s = mp[v];
        }
        PIPER_CHECK_VALUE(s < L, "route_plan: slot ", s, " >= num_local (", L, ")");
        if (s < 0) continue;
        slot[p] = s;
        ++count[s];
    }
    auto lopts = ids.options();
    at::Tensor counts = at::empty({L}, lopts), offsets = at::empty({L}, lopts.dtype(at::kInt));
    int64_t* co = counts.data_ptr<int64_t>();
    int32_t* of = offsets.data_ptr<int32_t>();
    std::vector<int64_t> cursor(L);
    int64_t N = 0;
    for (int64_t l = 0; l < L; ++l) {
        cursor[l] = N;
        N += count[l];
        co[l] = count[l];
        of[l] = static_cast<int32_t>(N);
    }
    const int64_t alloc = bounded ? P : N;
    at::Tensor row = at::full({alloc}, -1, lopts), pair = at::full({alloc}, -1, lopts);
    at::Tensor pos = at::empty(ids.sizes(), lopts);
    int64_t* ro = row.data_ptr<int64_t>();
    int64_t* pa = pair.data_ptr<int64_t>();
    int64_t* po = pos.data_ptr<int64_t>();
    for (int64_t p = 0; p < P; ++p) {  // stable: pairs of one slot keep their (row, k) order
        const int64_t s = slot[p];
        if (s < 0) {
            po[p] = -1;
            continue;
        }
        const int64_t dst = cursor[s]++;
        ro[dst] = p / K;
        pa[dst] = p;
        po[p] = dst;
    }
    return {row, pair, pos, counts, offsets};
}

// The CPU plans count their rows anyway: a caller's count that differs is a bug on its side, reported here.
void check_num_rows(int64_t rows, int64_t known, const char* what) {
    PIPER_CHECK_VALUE(known < 0 || known == rows, what, ": num_rows is ", known, " but the plan has ", rows,
                      " rows");
}

// pos values must lie in [-1, rows) and no two pairs may share a row (checked on the CPU; trusted on the GPU).
void check_fan(const at::Tensor& pos, int64_t rows, const char* what) {
    const int64_t* pp = pos.data_ptr<int64_t>();
    std::vector<uint8_t> seen(rows, 0);
    for (int64_t i = 0; i < pos.numel(); ++i) {
        const int64_t p = pp[i];
        PIPER_CHECK_INDEX(p >= -1 && p < rows, what, ": pos values must lie in [-1, ", rows, "), got ", p);
        if (p < 0) continue;
        PIPER_CHECK_VALUE(!seen[p], what, ": row ", p, " appears twice in pos");
        seen[p] = 1;
    }
}

template <typename scalar_t>
void expand_rows_cpu(const at::Tensor& x, const at::Tensor& pos, at::Tensor& out) {
    const int64_t R = pos.size(0), K = pos.size(1), D = x.size(1);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t* pp = pos.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
            for (int64_t k = 0; k < K; ++k)
                if (pp[r * K + k] >= 0) std::copy(xp + r * D, xp + (r + 1) * D, op + pp[r * K + k] * D);
    });
}

template <typename scalar_t, typename acc_t>
void reduce_rows_cpu(const at::Tensor& y, const at::Tensor& pos, const acc_t* w, at::Tensor& out) {
    const int64_t R = pos.size(0), K = pos.size(1), D = y.size(1);
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t* pp = pos.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
        std::vector<acc_t> acc(D);
        for (int64_t r = r0; r < r1; ++r) {
            std::fill(acc.begin(), acc.end(), acc_t(0));
            for (int64_t k = 0; k < K; ++k) {  // k in order: the reference's summation order
                const int64_t p = pp[r * K + k];
                if (p < 0) continue;
                const acc_t wt = w == nullptr ? acc_t(1) : w[r * K + k];
                for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(yp[p * D + d]) * wt;
            }
            for (int64_t d = 0; d < D; ++d) op[r * D + d] = static_cast<scalar_t>(acc[d]);
        }
    });
}

template <typename scalar_t, typename acc_t>
void reduce_rows_grad_cpu(const at::Tensor& g, const scalar_t* yp, const at::Tensor& pos, const acc_t* w,
                          scalar_t* gy, acc_t* gw) {
    const int64_t R = pos.size(0), K = pos.size(1), D = g.size(1);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const int64_t* pp = pos.data_ptr<int64_t>();
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
            for (int64_t k = 0; k < K; ++k) {
                const int64_t p = pp[r * K + k];
                acc_t dot = 0;
                if (p >= 0) {
                    const acc_t wt = w == nullptr ? acc_t(1) : w[r * K + k];
                    for (int64_t d = 0; d < D; ++d) {
                        const acc_t gv = static_cast<acc_t>(gp[r * D + d]);
                        if (gy != nullptr) gy[p * D + d] = static_cast<scalar_t>(gv * wt);
                        if (gw != nullptr) dot += static_cast<acc_t>(yp[p * D + d]) * gv;
                    }
                }
                if (gw != nullptr) gw[r * K + k] = dot;
            }
    });
}

void check_pos(const at::Tensor& pos, const at::Tensor& rows, const char* rows_name) {
    check_long_tensor(pos, "pos_RK");
    PIPER_CHECK_VALUE(pos.dim() == 2 && pos.size(1) <= 32, "pos_RK must be 2-D [rows, fan] with fan <= 32, got "
                      "shape ", pos.sizes());
    check_same_device(rows, pos, rows_name, "pos_RK");
}

void check_rows(const at::Tensor& x, const char* name) {
    check_float_tensor(x, name);
    PIPER_CHECK_VALUE(x.dim() == 2, name, " must be 2-D [rows, dim], got shape ", x.sizes());
}

c10::optional<at::Tensor> prep_weight(const c10::optional<at::Tensor>& w, const at::Tensor& x,
                                      const at::Tensor& pos) {
    if (!w.has_value()) return c10::nullopt;
    check_float_tensor(*w, "weight_RK");
    PIPER_CHECK_VALUE(w->sizes() == pos.sizes(), "weight_RK must have pos_RK's shape ", pos.sizes(), ", got ",
                      w->sizes());
    check_same_device(x, *w, "rows", "weight_RK");
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
        PIPER_CUDA_OR_FAIL("permute", return send_plan_cuda(idx, rank, slot, ep_size, num_rows));
    }
    auto out = send_plan_cpu(idx, rank, slot, ep_size);
    check_num_rows(out[0].size(0), num_rows, "send_plan");
    return out;
}

std::vector<at::Tensor> route_plan(const at::Tensor& ids_in, const c10::optional<at::Tensor>& map_in,
                                   int64_t num_local, int64_t num_rows, bool bounded) {
    check_long_tensor(ids_in, "ids_RK");
    PIPER_CHECK_VALUE(ids_in.dim() == 2, "ids_RK must be 2-D [rows, fan], got shape ", ids_in.sizes());
    PIPER_CHECK_VALUE(num_local >= 1, "num_local must be >= 1, got ", num_local);
    PIPER_CHECK_VALUE(num_rows < 0 || !bounded, "num_rows (", num_rows, ") and bounded exclude each other");
    c10::optional<at::Tensor> map;
    if (map_in.has_value()) {
        check_long_tensor(*map_in, "slot_map");
        PIPER_CHECK_VALUE(map_in->dim() == 1, "slot_map must be 1-D, got shape ", map_in->sizes());
        check_same_device(ids_in, *map_in, "ids_RK", "slot_map");
        map = map_in->contiguous();
    }
    const at::Tensor ids = ids_in.contiguous();
    if (ids.is_cuda()) {
        PIPER_CUDA_OR_FAIL("permute", return route_plan_cuda(ids, map, num_local, num_rows, bounded));
    }
    auto out = route_plan_cpu(ids, map, num_local, bounded);
    if (!bounded) check_num_rows(out[0].size(0), num_rows, "route_plan");
    return out;
}

at::Tensor expand_rows(const at::Tensor& x_in, const at::Tensor& pos_in, int64_t num_rows) {
    check_rows(x_in, "x_RD");
    check_pos(pos_in, x_in, "x_RD");
    PIPER_CHECK_VALUE(pos_in.size(0) == x_in.size(0), "pos_RK has ", pos_in.size(0), " rows but x_RD has ",
                      x_in.size(0));
    PIPER_CHECK_VALUE(num_rows >= 0, "num_rows must be >= 0, got ", num_rows);
    const at::Tensor x = x_in.contiguous(), pos = pos_in.contiguous();
    at::Tensor out = at::empty({num_rows, x.size(1)}, x.options());
    if (x.is_cuda()) {
        PIPER_CUDA_OR_FAIL("permute", expand_rows_cuda(x, pos, out));
        return out;
    }
    check_fan(pos, num_rows, "expand_rows");
    out.zero_();  // rows no pair points at: zero on the CPU (left unwritten on the GPU)
    PIPER_DISPATCH_FLOATS(x.scalar_type(), "expand_rows_cpu", [&] { expand_rows_cpu<scalar_t>(x, pos, out); });
    return out;
}

at::Tensor reduce_rows(const at::Tensor& y_in, const at::Tensor& pos_in, const c10::optional<at::Tensor>& w_in) {
    check_rows(y_in, "y_ND");
    check_pos(pos_in, y_in, "y_ND");
    const at::Tensor y = y_in.contiguous(), pos = pos_in.contiguous();
    const auto w = prep_weight(w_in, y, pos);
    at::Tensor out = at::empty({pos.size(0), y.size(1)}, y.options());
    if (y.is_cuda()) {
        PIPER_CUDA_OR_FAIL("permute", reduce_rows_cuda(y, pos, w, out));
        return out;
    }
    check_fan(pos, y.size(0), "reduce_rows");
    PIPER_DISPATCH_FLOATS(y.scalar_type(), "reduce_rows_cpu", [&] {
        using acc_t = typename OpMath<scalar_t>::type;
        reduce_rows_cpu<scalar_t, acc_t>(y, pos, w ? w->data_ptr<acc_t>() : nullptr, out);
    });
    return out;
}

// Gradients of reduce_rows: grad_y[pos[r, k]] = w[r, k] * g[r], grad_w[r, k] = <y[pos[r, k]], g[r]> in the weight's
// dtype. One pass for both. Rows of y no pair points at get zero gradient, except on the GPU when the caller vouches
// that every row is some pair's (``all_covered``: the plan's exact row count), which skips zeroing grad_y first.
std::vector<at::Tensor> reduce_rows_backward(const at::Tensor& g_in, const c10::optional<at::Tensor>& y_in,
                                             const at::Tensor& pos_in, const c10::optional<at::Tensor>& w_in,
                                             int64_t num_rows, bool need_y, bool need_w, bool all_covered) {
    check_rows(g_in, "grad_out");
    check_pos(pos_in, g_in, "grad_out");
    PIPER_CHECK_VALUE(pos_in.size(0) == g_in.size(0), "pos_RK has ", pos_in.size(0), " rows but grad_out has ",
                      g_in.size(0));
    PIPER_CHECK_VALUE(!need_w || (y_in.has_value() && w_in.has_value()), "the weight gradient needs y and weight");
    const at::Tensor pos = pos_in.contiguous();
    c10::optional<at::Tensor> y;
    at::Tensor g = g_in.contiguous();
    if (need_w) {
        y = y_in->contiguous();
        PIPER_CHECK_VALUE(y->dim() == 2 && y->size(0) == num_rows && y->size(1) == g.size(1), "y ", y->sizes(),
                          " does not match num_rows ", num_rows, " and grad_out ", g.sizes());
        g = g.to(y->scalar_type());
    }
    const auto w = prep_weight(w_in, g, pos);
    at::Tensor grad_y;
    if (need_y)
        grad_y = all_covered && g.is_cuda() ? at::empty({num_rows, g.size(1)}, g.options())
                                            : at::zeros({num_rows, g.size(1)}, g.options());
    at::Tensor grad_w = need_w ? at::empty(pos.sizes(), g.options().dtype(acc_dtype(g))) : at::Tensor();
    if (g.is_cuda()) {
        PIPER_CUDA_OR_FAIL("permute", reduce_rows_grad_cuda(g, y, pos, w, grad_y, grad_w));
    } else {
        check_fan(pos, num_rows, "reduce_rows backward");
        PIPER_DISPATCH_FLOATS(g.scalar_type(), "reduce_rows_grad_cpu", [&] {
            using acc_t = typename OpMath<scalar_t>::type;
            reduce_rows_grad_cpu<scalar_t, acc_t>(g, y ? y->data_ptr<scalar_t>() : nullptr, pos,
                                                  w ? w->data_ptr<acc_t>() : nullptr,
                                                  need_y ? grad_y.data_ptr<scalar_t>() : nullptr,
                                                  need_w ? grad_w.data_ptr<acc_t>() : nullptr);
        });
    }
    if (grad_w.defined()) grad_w = grad_w.to(w_in->scalar_type());
    return {grad_y, grad_w};
}

}  // namespace piper

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "piper_ds MoE token permutation (CPU implementation, plus CUDA kernels when built with CUDA)";
    m.def("send_plan", &piper::send_plan, "rows to send per destination rank (dedup), rank-major, token order, "
          "and the fan index pos_TR", py::arg("topk_idx"), py::arg("expert_rank"), py::arg("expert_slot"),
          py::arg("ep_size"), py::arg("num_rows") = -1);
    m.def("route_plan", &piper::route_plan, "(row, k) pairs grouped by local slot (stable), their fan index, "
          "per-slot counts and int32 grouped-GEMM offsets", py::arg("ids"), py::arg("slot_map"),
          py::arg("num_local"), py::arg("num_rows") = -1, py::arg("bounded") = false);
    m.def("expand_rows", &piper::expand_rows, "out[pos[r, k]] = x[r]", py::arg("x"), py::arg("pos"),
          py::arg("num_rows"));
    m.def("reduce_rows", &piper::reduce_rows, "out[r] = sum_k w[r, k] * y[pos[r, k]], fp32 accumulation",
          py::arg("y"), py::arg("pos"), py::arg("weight"));
    m.def("reduce_rows_backward", &piper::reduce_rows_backward, "[grad_y, grad_w] of reduce_rows (None where not "
          "needed), one pass", py::arg("grad_out"), py::arg("y"), py::arg("pos"), py::arg("weight"),
          py::arg("num_rows"), py::arg("need_y"), py::arg("need_w"), py::arg("all_covered") = false);
    m.def("has_cuda", &piper::has_cuda, "whether CUDA kernels are compiled in");
}
