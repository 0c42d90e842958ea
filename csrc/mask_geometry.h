// Shape checks and patch geometry shared by the CPU and CUDA kernels that read a
// low-resolution visible mask (B, 1, h, w, d) next to a volume (B, C, H, W, D).
// Header-light on purpose: it is included by every kernel file.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "checks.h"

namespace anatomask_fast {

struct MaskGeometry {
  int64_t B, C, H, W, D;  // volume
  int64_t h, w, d;        // mask grid
  int64_t ph, pw, pd;     // patch (cell) size at this resolution
};

// Validates the float volume `x` (named `name`) and `active` against it; returns the
// cell geometry.
inline MaskGeometry mask_geometry(const at::Tensor& x, const at::Tensor& active, const char* op,
                                  const char* name = "x") {
  check_float(x, op, name);
  TORCH_CHECK_VALUE(x.dim() == 5, op, ": argument '", name, "' must be 5-D (B, C, H, W, D), got ",
                    x.sizes());
  TORCH_CHECK_TYPE(active.scalar_type() == at::kBool, op,
                   ": argument 'active' must be a bool tensor, got ", active.scalar_type());
  TORCH_CHECK_VALUE(active.dim() == 5 && active.size(0) == x.size(0) && active.size(1) == 1, op,
                    ": argument 'active' must have shape (B=", x.size(0), ", 1, h, w, d), got ",
                    active.sizes());
  check_device(active, x, op, "active", name);
  MaskGeometry g{x.size(0),      x.size(1),      x.size(2), x.size(3), x.size(4), active.size(2),
                 active.size(3), active.size(4), 0,         0,         0};
  TORCH_CHECK_VALUE(
      g.h > 0 && g.w > 0 && g.d > 0 && g.H % g.h == 0 && g.W % g.w == 0 && g.D % g.d == 0, op,
      ": the mask grid of 'active' (", g.h, ", ", g.w, ", ", g.d,
      ") must divide the spatial shape of 'x' (", g.H, ", ", g.W, ", ", g.D, ")");
  g.ph = g.H / g.h;
  g.pw = g.W / g.w;
  g.pd = g.D / g.d;
  return g;
}

// Reductions and statistics: fp32, fp64 for fp64 inputs.
inline at::ScalarType accumulation_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A finite, positive epsilon (eps <= 0 turns a zero variance into NaN or Inf).
inline void check_eps(double eps, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, op,
                    ": argument 'eps' must be positive and finite, got ", eps);
}

// `t` of the shape, dtype and device of `like` (named `like_name`).
inline void check_like(const at::Tensor& t, const at::Tensor& like, const char* op,
                       const char* name, const char* like_name) {
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), op, ": argument '", name,
                    "' must have the shape of '", like_name, "' ", like.sizes(), ", got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), op, ": argument '", name,
                   "' must have the dtype of '", like_name, "' (", like.scalar_type(), "), got ",
                   t.scalar_type());
  check_device(t, like, op, name, like_name);
}

// patch_recon_loss(_backward): `rec` like `x`, and for the backward the (B, L)
// tables `grad_per_patch`, `mean`, `rstd` in the accumulation dtype.
inline MaskGeometry patch_loss_geometry(const at::Tensor& rec, const at::Tensor& x,
                                        const at::Tensor& active, const char* op) {
  const MaskGeometry g = mask_geometry(x, active, op);
  check_like(rec, x, op, "rec", "x");
  return g;
}

inline void check_patch_tables(const MaskGeometry& g, const at::Tensor& x,
                               const at::Tensor& grad_per_patch, const at::Tensor& mean,
                               const at::Tensor& rstd, const char* op) {
  const int64_t shape[2] = {g.B, g.h * g.w * g.d};
  const at::ScalarType acc = accumulation_type(x);
  check_table(grad_per_patch, shape, acc, x, op, "grad_per_patch", "x");
  check_table(mean, shape, acc, x, op, "mean", "x");
  check_table(rstd, shape, acc, x, op, "rstd", "x");
}

}  // namespace anatomask_fast
