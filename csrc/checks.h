// Argument checks shared by every raw operator (CPU and CUDA): each error names the
// op, the argument, what was expected and what came. Value errors raise ValueError
// in Python (TORCH_CHECK_VALUE), dtype errors TypeError (TORCH_CHECK_TYPE).
// Header-light on purpose: it is included by every kernel file.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>

namespace anatomask_fast {

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A float32/float64/float16/bfloat16 tensor.
inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), op, ": argument '", name, "' must be a tensor, got None");
  TORCH_CHECK_TYPE(is_float_type(t.scalar_type()), op, ": argument '", name,
                   "' must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* op,
                        const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, op, ": argument '", name, "' must be ", expected,
                   ", got ", t.scalar_type());
}

// `t` on the device of `like` (a kernel would otherwise read a foreign pointer).
inline void check_device(const at::Tensor& t, const at::Tensor& like, const char* op,
                         const char* name, const char* like_name) {
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": argument '", name, "' is on ", t.device(),
                    ", expected ", like.device(), " like '", like_name, "'");
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op,
                        const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": argument '", name, "' must have shape ", expected,
                    ", got ", t.sizes());
}

// A statistics / gradient table of `expected` shape in dtype `acc` on `like`'s device
// (the tensors a backward receives from its forward).
inline void check_table(const at::Tensor& t, at::IntArrayRef expected, at::ScalarType acc,
                        const at::Tensor& like, const char* op, const char* name,
                        const char* like_name) {
  check_shape(t, expected, op, name);
  check_dtype(t, acc, op, name);
  check_device(t, like, op, name, like_name);
}

// Smallest and largest value of a contiguous int64 CPU tensor, one pass.
struct IndexRange {
  int64_t low, high;
};

inline IndexRange index_range(const at::Tensor& ids) {
  const int64_t* p = ids.const_data_ptr<int64_t>();
  int64_t low = std::numeric_limits<int64_t>::max(), high = std::numeric_limits<int64_t>::min();
  for (int64_t i = 0, n = ids.numel(); i < n; ++i) {
    low = std::min(low, p[i]);
    high = std::max(high, p[i]);
  }
  return {low, high};
}

// Every value of the contiguous int64 CPU tensor `ids` in [low, high); `what` says
// what the indices address, e.g. "the (1, 2, 8, 8, 8) map's cells".
inline void check_index_values(const at::Tensor& ids, int64_t low, int64_t high, const char* op,
                               const char* name, const std::string& what) {
  if (ids.numel() == 0) return;
  const IndexRange r = index_range(ids);
  TORCH_CHECK_VALUE(r.low >= low, op, ": argument '", name, "' must hold indices in [", low, ", ",
                    high, ") of ", what, "; got a minimum of ", r.low);
  TORCH_CHECK_VALUE(r.high < high, op, ": argument '", name, "' must hold indices in [", low, ", ",
                    high, ") of ", what, "; got a maximum of ", r.high);
}

// A non-negative length argument (allocations of negative sizes fail obscurely).
inline void check_length(int64_t value, int64_t low, int64_t high, const char* op,
                         const char* name) {
  TORCH_CHECK_VALUE(value >= low && value <= high, op, ": argument '", name, "' must lie in [", low,
                    ", ", high, "], got ", value);
}

}  // namespace anatomask_fast
