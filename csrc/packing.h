// Shape checks and geometry shared by the CPU and CUDA kernels of the packing
// family: visible patches of a (B, C, H, W, D) map packed as (N, C, ph, pw, pd),
// optionally extended by a halo read from the neighbour table (N, 27).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

#include "checks.h"

namespace anatomask_fast {

struct PackGeometry {
  int64_t B, C, N;     // batch, channels, visible patches
  int64_t h, w, d;     // mask grid
  int64_t ph, pw, pd;  // patch side at this resolution
};

inline void check_index(const at::Tensor& t, const char* name, int64_t dim, const char* op) {
  check_dtype(t, at::kLong, op, name);
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": argument '", name, "' must be a ", dim,
                    "-D int64 tensor, got shape ", t.sizes());
}

// `x` (B, C, H, W, D) dense map, `patches` (N,), `slots` (B, h, w, d).
inline PackGeometry dense_geometry(const at::Tensor& x, const at::Tensor& patches,
                                   const at::Tensor& slots, const char* op) {
  check_float(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() == 5, op, ": argument 'x' must be 5-D (B, C, H, W, D), got ",
                    x.sizes());
  check_index(patches, "patches", 1, op);
  check_index(slots, "slots", 4, op);
  check_device(patches, x, op, "patches", "x");
  check_device(slots, x, op, "slots", "x");
  TORCH_CHECK_VALUE(slots.size(0) == x.size(0), op, ": argument 'slots' must have batch ",
                    x.size(0), " (B, h, w, d), got ", slots.sizes());
  PackGeometry g{
      x.size(0), x.size(1), patches.size(0), slots.size(1), slots.size(2), slots.size(3), 0, 0, 0};
  TORCH_CHECK_VALUE(g.h > 0 && g.w > 0 && g.d > 0 && x.size(2) % g.h == 0 && x.size(3) % g.w == 0 &&
                        x.size(4) % g.d == 0,
                    op, ": the grid of 'slots' ", slots.sizes(),
                    " must divide the spatial shape of 'x' ", x.sizes());
  g.ph = x.size(2) / g.h;
  g.pw = x.size(3) / g.w;
  g.pd = x.size(4) / g.d;
  return g;
}

// `packed` (N, C, ph, pw, pd) with its `patches` (N,) and `slots` (B, h, w, d).
inline PackGeometry packed_geometry(const at::Tensor& packed, const at::Tensor& patches,
                                    const at::Tensor& slots, const char* op) {
  check_float(packed, op, "packed");
  TORCH_CHECK_VALUE(packed.dim() == 5, op,
                    ": argument 'packed' must be 5-D (N, C, ph, pw, pd), got ", packed.sizes());
  check_index(patches, "patches", 1, op);
  check_index(slots, "slots", 4, op);
  check_device(patches, packed, op, "patches", "packed");
  check_device(slots, packed, op, "slots", "packed");
  TORCH_CHECK_VALUE(patches.size(0) == packed.size(0), op, ": argument 'patches' must have ",
                    packed.size(0), " entries (one per packed patch), got ", patches.size(0));
  return PackGeometry{slots.size(0), packed.size(1), packed.size(0), slots.size(1), slots.size(2),
                      slots.size(3), packed.size(2), packed.size(3), packed.size(4)};
}

// The layout contract of `patches` (N,) and `slots` (B, h, w, d), contiguous int64 on
// the CPU: slots[patches[n]] = n for every n, -1 at every other cell (the pair
// MaskLayout builds). Then every backend reads the same cells, whichever of the two
// it indexes by. One pass over each, cheap next to the copy.
inline void check_layout_values(const at::Tensor& patches, const at::Tensor& slots,
                                const char* op) {
  const int64_t N = patches.numel(), cells = slots.numel();
  std::ostringstream grid;
  grid << "the " << cells << " cells of the " << slots.sizes() << " grid of 'slots'";
  check_index_values(patches, 0, cells, op, "patches", grid.str());
  check_index_values(slots, -1, N, op, "slots",
                     "the " + std::to_string(N) + " packed patches (or -1 where hidden)");
  const int64_t* p = patches.const_data_ptr<int64_t>();
  const int64_t* s = slots.const_data_ptr<int64_t>();
  int64_t with_slot = 0;
  for (int64_t c = 0; c < cells; ++c) with_slot += s[c] >= 0;
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK_VALUE(s[p[n]] == n, op,
                      ": arguments 'patches' and 'slots' disagree: "
                      "slots must hold n at cell patches[n], got slots[",
                      p[n], "] = ", s[p[n]], " for patches[", n, "] = ", p[n]);
  }
  TORCH_CHECK_VALUE(with_slot == N, op,
                    ": arguments 'patches' and 'slots' disagree: slots "
                    "must be -1 at every cell not in patches (",
                    N, " cells with a slot), got ", with_slot, " cells with a slot");
}

// Checks the neighbour table against `packed` (N, C, ...) and the halo widths
// against the patch side (a halo reads at most the adjacent patch).
inline void check_halo(const at::Tensor& packed, const at::Tensor& neighbours, int64_t lo,
                       int64_t hi, int64_t min_side, const char* name, const char* op) {
  check_index(neighbours, "neighbours", 2, op);
  check_device(neighbours, packed, op, "neighbours", name);
  TORCH_CHECK_VALUE(neighbours.size(0) == packed.size(0) && neighbours.size(1) == 27, op,
                    ": argument 'neighbours' must have shape (", packed.size(0), ", 27), got ",
                    neighbours.sizes());
  TORCH_CHECK_VALUE(lo >= 0 && hi >= 0 && lo <= min_side && hi <= min_side, op,
                    ": halo widths 'lo'=", lo, ", 'hi'=", hi, " must lie in [0, ", min_side,
                    "] (at most the patch side)");
}

// Neighbour-table values of a contiguous int64 CPU table (N, 27): each in [-1, N),
// and symmetric as in a grid (the adjoint gathers through the table backwards, so
// pad_halo_backward is pad_halo's adjoint only then): neighbours[n, o] = m >= 0
// implies neighbours[m, -o] = n, column 26 - o.
inline void check_neighbour_values(const at::Tensor& neighbours, const char* op) {
  const int64_t N = neighbours.size(0);
  check_index_values(neighbours, -1, N, op, "neighbours",
                     "the " + std::to_string(N) + " packed patches (or -1 for zeros)");
  const int64_t* t = neighbours.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t o = 0; o < 27; ++o) {
      const int64_t m = t[n * 27 + o];
      TORCH_CHECK_VALUE(m < 0 || t[m * 27 + 26 - o] == n, op,
                        ": argument 'neighbours' must "
                        "be symmetric (neighbours[n, o] = m implies neighbours[m, 26 - o] = n), "
                        "got neighbours[",
                        n, ", ", o, "] = ", m, " but neighbours[", m, ", ", 26 - o,
                        "] = ", t[m * 27 + 26 - o]);
    }
  }
}

// Validates pad_halo's arguments; returns the halo'd sizes.
inline std::vector<int64_t> pad_halo_sizes(const at::Tensor& packed, const at::Tensor& neighbours,
                                           int64_t lo, int64_t hi) {
  check_float(packed, "pad_halo", "packed");
  TORCH_CHECK_VALUE(packed.dim() == 5,
                    "pad_halo: argument 'packed' must be 5-D "
                    "(N, C, ph, pw, pd), got ",
                    packed.sizes());
  check_halo(packed, neighbours, lo, hi, std::min({packed.size(2), packed.size(3), packed.size(4)}),
             "packed", "pad_halo");
  return {packed.size(0), packed.size(1), packed.size(2) + lo + hi, packed.size(3) + lo + hi,
          packed.size(4) + lo + hi};
}

// Validates pad_halo_backward's arguments; returns the interior (patch) sizes.
inline std::vector<int64_t> pad_halo_backward_sizes(const at::Tensor& grad,
                                                    const at::Tensor& neighbours, int64_t lo,
                                                    int64_t hi) {
  const char* op = "pad_halo_backward";
  check_float(grad, op, "grad");
  TORCH_CHECK_VALUE(grad.dim() == 5, op,
                    ": argument 'grad' must be 5-D "
                    "(N, C, ph+lo+hi, pw+lo+hi, pd+lo+hi), got ",
                    grad.sizes());
  TORCH_CHECK_VALUE(lo >= 0 && hi >= 0, op, ": halo widths 'lo'=", lo, ", 'hi'=", hi,
                    " must be >= 0");
  const int64_t ph = grad.size(2) - lo - hi, pw = grad.size(3) - lo - hi,
                pd = grad.size(4) - lo - hi;
  TORCH_CHECK_VALUE(ph > 0 && pw > 0 && pd > 0, op, ": argument 'grad' ", grad.sizes(),
                    " is smaller than its halo lo=", lo, ", hi=", hi);
  check_halo(grad, neighbours, lo, hi, std::min({ph, pw, pd}), "grad", op);
  return {grad.size(0), grad.size(1), ph, pw, pd};
}

// Column of the neighbour table for offset (oi, oj, ok) in {-1, 0, 1}^3.
constexpr int64_t neighbour_column(int64_t oi, int64_t oj, int64_t ok) {
  return (oi + 1) * 9 + (oj + 1) * 3 + ok + 1;
}

}  // namespace anatomask_fast
