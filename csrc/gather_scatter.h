// Argument checks shared by the CPU and CUDA kernels of the gather/scatter family:
// per-channel parameters, the sparse-norm statistics a backward receives, and the
// token layout (B, L, C) with its ids.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "checks.h"
#include "mask_geometry.h"

namespace anatomask_fast {

// A float parameter of `numel` values on the device of `like` (named `like_name`).
inline void check_param(const at::Tensor& p, int64_t numel, const at::Tensor& like, const char* op,
                        const char* name, const char* like_name) {
  check_float(p, op, name);
  TORCH_CHECK_VALUE(p.numel() == numel, op, ": argument '", name, "' must have ", numel,
                    " values, got shape ", p.sizes());
  check_device(p, like, op, name, like_name);
}

// The optional affine weight and bias (C,) of sparse_norm(_backward).
inline void check_affine(const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, const MaskGeometry& g,
                         const at::Tensor& x, const char* op) {
  if (weight.has_value() && weight->defined()) check_param(*weight, g.C, x, op, "weight", "x");
  if (bias.has_value() && bias->defined()) check_param(*bias, g.C, x, op, "bias", "x");
}

// sparse_norm_backward's `grad` (like `x`) and the forward's statistics `mean`, `rstd`
// ((1, C) pooled or (B, C) per sample, accumulation dtype); returns the groups.
inline int64_t check_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                   const at::Tensor& mean, const at::Tensor& rstd,
                                   const MaskGeometry& g, const char* op) {
  check_like(grad, x, op, "grad", "x");
  const int64_t groups = mean.dim() == 2 ? mean.size(0) : -1;
  TORCH_CHECK_VALUE(mean.dim() == 2 && (groups == 1 || groups == g.B) && mean.size(1) == g.C, op,
                    ": argument 'mean' must have shape (1, C=", g.C, ") or (B=", g.B, ", C=", g.C,
                    "), got ", mean.sizes());
  const at::ScalarType acc = accumulation_type(x);
  check_table(mean, mean.sizes(), acc, x, op, "mean", "x");
  check_table(rstd, mean.sizes(), acc, x, op, "rstd", "x");
  return groups;
}

// Tokens (B, L, C) named `name`.
inline void check_tokens(const at::Tensor& t, const char* op, const char* name) {
  check_float(t, op, name);
  TORCH_CHECK_VALUE(t.dim() == 3, op, ": argument '", name, "' must be 3-D (B, L, C), got ",
                    t.sizes());
}

// `tokens` (B, n, C) named `tokens_name` and their int64 ids (B, m) named `ids_name`;
// `ids_width` >= 0 also requires m == ids_width.
inline void check_token_ids(const at::Tensor& ids, const at::Tensor& tokens, const char* op,
                            const char* ids_name, const char* tokens_name, int64_t ids_width = -1) {
  check_tokens(tokens, op, tokens_name);
  check_dtype(ids, at::kLong, op, ids_name);
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == tokens.size(0) &&
                        (ids_width < 0 || ids.size(1) == ids_width),
                    op, ": argument '", ids_name, "' must have shape (B=", tokens.size(0), ", ",
                    ids_width < 0 ? std::string("n") : std::to_string(ids_width), "), got ",
                    ids.sizes());
  check_device(ids, tokens, op, ids_name, tokens_name);
}

}  // namespace anatomask_fast
