// Shape checks and patch geometry shared by the CPU and CUDA kernels that read a
// low-resolution visible mask (B, 1, h, w, d) next to a volume (B, C, H, W, D).
// Header-light on purpose: it is included by every kernel file.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace anatomask_fast {

struct MaskGeometry {
  int64_t B, C, H, W, D;     // volume
  int64_t h, w, d;           // mask grid
  int64_t ph, pw, pd;        // patch (cell) size at this resolution
};

// Validates `active` against `x` and returns the cell geometry.
inline MaskGeometry mask_geometry(const at::Tensor& x, const at::Tensor& active,
                                  const char* op) {
  TORCH_CHECK(x.dim() == 5, op, ": argument 'x' must be 5-D (B, C, H, W, D), got ",
              x.dim(), "-D");
  TORCH_CHECK(active.scalar_type() == at::kBool, op,
              ": argument 'active' must be a bool tensor, got ", active.scalar_type());
  TORCH_CHECK(active.dim() == 5 && active.size(0) == x.size(0) && active.size(1) == 1,
              op, ": argument 'active' must have shape (B=", x.size(0),
              ", 1, h, w, d), got ", active.sizes());
  TORCH_CHECK(active.device() == x.device(), op, ": argument 'active' is on ",
              active.device(), " but 'x' is on ", x.device());
  MaskGeometry g{x.size(0), x.size(1), x.size(2), x.size(3), x.size(4),
                 active.size(2), active.size(3), active.size(4), 0, 0, 0};
  TORCH_CHECK(g.h > 0 && g.w > 0 && g.d > 0 && g.H % g.h == 0 && g.W % g.w == 0 &&
                  g.D % g.d == 0,
              op, ": the mask grid of 'active' (", g.h, ", ", g.w, ", ", g.d,
              ") must divide the spatial shape of 'x' (", g.H, ", ", g.W, ", ", g.D, ")");
  g.ph = g.H / g.h;
  g.pw = g.W / g.w;
  g.pd = g.D / g.d;
  return g;
}

}  // namespace anatomask_fast
