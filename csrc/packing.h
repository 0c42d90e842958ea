// Shape checks and geometry shared by the CPU and CUDA kernels of the packing
// family: visible patches of a (B, C, H, W, D) map packed as (N, C, ph, pw, pd),
// optionally extended by a halo read from the neighbour table (N, 27).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

namespace anatomask_fast {

struct PackGeometry {
  int64_t B, C, N;           // batch, channels, visible patches
  int64_t h, w, d;           // mask grid
  int64_t ph, pw, pd;        // patch side at this resolution
};

inline void check_index(const at::Tensor& t, const char* name, int64_t dim, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == dim, op, ": argument '", name,
              "' must be a ", dim, "-D int64 tensor, got ", t.scalar_type(), " of shape ",
              t.sizes());
}

// `x` (B, C, H, W, D) dense map, `patches` (N,), `slots` (B, h, w, d).
inline PackGeometry dense_geometry(const at::Tensor& x, const at::Tensor& patches,
                                   const at::Tensor& slots, const char* op) {
  TORCH_CHECK(x.dim() == 5, op, ": argument 'x' must be 5-D (B, C, H, W, D), got ", x.sizes());
  check_index(patches, "patches", 1, op);
  check_index(slots, "slots", 4, op);
  TORCH_CHECK(slots.size(0) == x.size(0), op, ": 'slots' must have batch ", x.size(0),
              ", got ", slots.sizes());
  PackGeometry g{x.size(0), x.size(1), patches.size(0), slots.size(1), slots.size(2),
                 slots.size(3), 0, 0, 0};
  TORCH_CHECK(g.h > 0 && g.w > 0 && g.d > 0 && x.size(2) % g.h == 0 &&
                  x.size(3) % g.w == 0 && x.size(4) % g.d == 0,
              op, ": the grid of 'slots' must divide the spatial shape of 'x' ", x.sizes());
  g.ph = x.size(2) / g.h;
  g.pw = x.size(3) / g.w;
  g.pd = x.size(4) / g.d;
  return g;
}

// `packed` (N, C, ph, pw, pd) with its `patches` (N,) and `slots` (B, h, w, d).
inline PackGeometry packed_geometry(const at::Tensor& packed, const at::Tensor& patches,
                                    const at::Tensor& slots, const char* op) {
  TORCH_CHECK(packed.dim() == 5, op, ": argument 'packed' must be 5-D (N, C, ph, pw, pd), got ",
              packed.sizes());
  check_index(patches, "patches", 1, op);
  check_index(slots, "slots", 4, op);
  TORCH_CHECK(patches.size(0) == packed.size(0), op, ": 'patches' must have ", packed.size(0),
              " entries, got ", patches.size(0));
  return PackGeometry{slots.size(0), packed.size(1), packed.size(0), slots.size(1),
                      slots.size(2), slots.size(3), packed.size(2), packed.size(3),
                      packed.size(4)};
}

// Checks the neighbour table against `packed` (N, C, ...) and the halo widths
// against the patch side (a halo reads at most the adjacent patch).
inline void check_halo(const at::Tensor& packed, const at::Tensor& neighbours, int64_t lo,
                       int64_t hi, int64_t min_side, const char* op) {
  check_index(neighbours, "neighbours", 2, op);
  TORCH_CHECK(neighbours.size(0) == packed.size(0) && neighbours.size(1) == 27, op,
              ": 'neighbours' must have shape (", packed.size(0), ", 27), got ",
              neighbours.sizes());
  TORCH_CHECK(lo >= 0 && hi >= 0 && lo <= min_side && hi <= min_side, op,
              ": halo widths lo=", lo, ", hi=", hi, " must lie in [0, ", min_side, "]");
}

// Validates pad_halo's arguments; returns the halo'd sizes.
inline std::vector<int64_t> pad_halo_sizes(const at::Tensor& packed, const at::Tensor& neighbours,
                                           int64_t lo, int64_t hi) {
  TORCH_CHECK(packed.dim() == 5, "pad_halo: argument 'packed' must be 5-D, got ", packed.sizes());
  check_halo(packed, neighbours, lo, hi,
             std::min({packed.size(2), packed.size(3), packed.size(4)}), "pad_halo");
  return {packed.size(0), packed.size(1), packed.size(2) + lo + hi, packed.size(3) + lo + hi,
          packed.size(4) + lo + hi};
}

// Validates pad_halo_backward's arguments; returns the interior (patch) sizes.
inline std::vector<int64_t> pad_halo_backward_sizes(const at::Tensor& grad,
                                                    const at::Tensor& neighbours, int64_t lo,
                                                    int64_t hi) {
  TORCH_CHECK(grad.dim() == 5, "pad_halo_backward: argument 'grad' must be 5-D, got ",
              grad.sizes());
  const int64_t ph = grad.size(2) - lo - hi, pw = grad.size(3) - lo - hi, pd = grad.size(4) - lo - hi;
  TORCH_CHECK(ph > 0 && pw > 0 && pd > 0, "pad_halo_backward: 'grad' ", grad.sizes(),
              " is smaller than its halo lo=", lo, ", hi=", hi);
  check_halo(grad, neighbours, lo, hi, std::min({ph, pw, pd}), "pad_halo_backward");
  return {grad.size(0), grad.size(1), ph, pw, pd};
}

// Column of the neighbour table for offset (oi, oj, ok) in {-1, 0, 1}^3.
constexpr int64_t neighbour_column(int64_t oi, int64_t oj, int64_t ok) {
  return (oi + 1) * 9 + (oj + 1) * 3 + ok + 1;
}

}  // namespace anatomask_fast
