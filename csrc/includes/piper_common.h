// Shared helpers of the piper_ds ops: argument checks that raise the right Python exception, and the math type
// every kernel computes in. Included by the bindings (.cpp) and by the CUDA kernels (.cu).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

// TORCH_CHECK_VALUE raises ValueError in Python, TORCH_CHECK_TYPE TypeError, TORCH_CHECK_INDEX IndexError.
#define PIPER_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
#define PIPER_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, __VA_ARGS__)
#define PIPER_CHECK_INDEX(cond, ...) TORCH_CHECK_INDEX(cond, __VA_ARGS__)

// A binding's call of its CUDA kernels: made when the op is built with them (PIPER_WITH_CUDA), else an error
// naming the op (the CPU builders compile the same bindings without kernels).
#ifdef PIPER_WITH_CUDA
#define PIPER_CUDA_OR_FAIL(op, call) \
    do {                             \
        call;                        \
    } while (0)
#else
#define PIPER_CUDA_OR_FAIL(op, call) \
    TORCH_CHECK(false, "this build of the " op " op has no CUDA kernels (built by the CPU builder)")
#endif

namespace piper {

// Math type: fp32 for bf16/fp16/fp32 inputs (what the references do), fp64 for fp64 inputs (gradcheck).
template <typename T>
struct OpMath {
    using type = float;
};
template <>
struct OpMath<double> {
    using type = double;
};

// Smallest normal fp32: the clamp of the top-k weight sum, in every precision (as the reference does).
constexpr double kFloatTiny = 1.17549435082228750797e-38;

// Error codes that a plan kernel leaves in a device flag; the host turns them into a ValueError.
enum PlanError : int32_t {
    kPlanOk = 0,
    kExpertOutOfRange = 1,  // an expert id >= the length of the expert map
    kRankOutOfRange = 2,    // expert_rank_E[e] outside [0, ep_size)
    kSlotNegative = 3,      // expert_slot_E[e] < 0 for a routed expert
    kSlotOutOfRange = 4,    // route: slot >= num_local
};

inline const char* plan_error_message(int32_t code) {
    switch (code) {
        case kExpertOutOfRange: return "an expert id is >= the length of the expert map (expert_rank_E or slot_map)";
        case kRankOutOfRange: return "expert_rank_E maps a routed expert to a rank outside [0, ep_size)";
        case kSlotNegative: return "expert_slot_E holds a negative slot for a routed expert";
        case kSlotOutOfRange: return "ids_RK holds a slot >= num_local";
        default: return "no error";
    }
}

inline void check_float_tensor(const at::Tensor& t, const char* name) {
    PIPER_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, " must be a floating tensor (bf16, fp16, fp32 or",
                     " fp64), got ", t.scalar_type());
}

inline void check_long_tensor(const at::Tensor& t, const char* name) {
    PIPER_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb) {
    PIPER_CHECK_VALUE(a.device() == b.device(), na, " (", a.device(), ") and ", nb, " (", b.device(),
                      ") must be on the same device");
}

// Whether this build of the op compiled its CUDA kernels in (the builders pass -DPIPER_WITH_CUDA).
inline bool has_cuda() {
#ifdef PIPER_WITH_CUDA
    return true;
#else
    return false;
#endif
}

}  // namespace piper

// bf16, fp16, fp32 and fp64 (the dtypes the references accept).
#define PIPER_DISPATCH_FLOATS(TYPE, NAME, ...) \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
