// Argument checks shared by the CPU, CUDA and Meta implementations of the ddfast operators
// (csrc/<op>_ops.cpp). Every entry point checks the rank, sizes, dtype and device of each tensor it
// reads, so no call can read out of bounds; the messages name the argument and what was expected.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>

namespace ddfast {
namespace ops {

inline bool is_float_or_double(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

// float32 / float64 tensor.
inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, ": expected a tensor, got an undefined one");
  TORCH_CHECK(is_float_or_double(t), op, ": ", name, ": expected float32 or float64, got ", t.scalar_type());
}

inline void check_rank(const at::Tensor& t, int64_t dim, const char* op, const char* name, const char* shape) {
  TORCH_CHECK(t.defined(), op, ": ", name, ": expected a tensor of shape ", shape, ", got an undefined one");
  TORCH_CHECK(t.dim() == dim, op, ": ", name, ": expected shape ", shape, ", got ", t.sizes());
}

// t has exactly the sizes `want` (a -1 entry matches any size).
inline void check_sizes(const at::Tensor& t, std::initializer_list<int64_t> want, const char* op, const char* name,
                        const char* shape) {
  bool ok = t.dim() == static_cast<int64_t>(want.size());
  int64_t i = 0;
  for (int64_t w : want) {
    if (!ok) break;
    ok = w < 0 || t.size(i) == w;
    ++i;
  }
  TORCH_CHECK(ok, op, ": ", name, ": expected shape ", shape, " = ", c10::IntArrayRef(want), " (-1: any), got ",
              t.sizes());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                             const char* op) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, ": expected dtype ", ref.scalar_type(),
              " (the dtype of ", ref_name, "), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                              const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, ": expected device ", ref.device(), " (the device of ",
              ref_name, "), got ", t.device());
}

}  // namespace ops
}  // namespace ddfast
