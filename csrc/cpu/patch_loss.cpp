// CPU kernels of the patch-loss family (OpenMP through at::parallel_for).
//
// One task is a column of patches: sample b, patch row i, patch column j, and the
// d patches along the last axis. Its C*ph*pw rows of D contiguous values are read
// in memory order; per-patch sums are kept per lane (an accumulator per position of
// the D-long row), folded per patch at the end. Each patch's mean, scale and
// gradient coefficient are spread over its lanes too, so that a row's loop runs over
// whole segments of consecutive patches (all of the row when every patch counts)
// without a branch: it vectorizes with long trip counts, and the column functions are
// cloned for AVX2 and AVX-512 (simd.h). The forward copies the column's target once
// into a scratch buffer (it fits in L2), so the variance and the error passes re-read
// it from cache, not from memory.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "../mask_geometry.h"
#include "../outputs.h"
#include "simd.h"

namespace anatomask_fast {
namespace {

struct Column {
  const MaskGeometry& g;
  int64_t rows;  // C*ph*pw rows of D values
  int64_t n;     // values per patch, N = C*ph*pw*pd
  // Offset of row r of column `col` (b, i, j) in the (B, C, H, W, D) volume.
  ANATOMASK_INLINE int64_t row_offset(int64_t col, int64_t r) const {
    const int64_t j = col % g.w, i = (col / g.w) % g.h, b = col / (g.w * g.h);
    const int64_t z = r % g.pw, y = (r / g.pw) % g.ph, c = r / (g.pw * g.ph);
    return (((b * g.C + c) * g.H + i * g.ph + y) * g.W + j * g.pw + z) * g.D;
  }
};

// A task's buffers, allocated once per task (outside the cloned functions: those must
// not throw). Segments: maximal runs of patches along the column that are all needed
// or all skipped, as [first, last) lane ranges.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> target, lanes, mu, scale, coef;
  std::vector<int64_t> first, last;
  std::vector<char> needed;
  Scratch(int64_t rows, int64_t D, int64_t d)
      : target(rows * D), lanes(D), mu(D), scale(D), coef(D), first(d), last(d), needed(d) {}
};

// Splits the column into segments; returns their count. needed[k]: patch k counts
// (hidden, or every patch unless hidden_only).
ANATOMASK_INLINE int64_t segments(const bool* cell, int64_t d, int64_t pd, bool hidden_only,
                                  char* needed, int64_t* first, int64_t* last) {
  int64_t count = 0;
  for (int64_t k = 0; k < d; ++k) {
    needed[k] = !(hidden_only && cell[k]);
    if (k == 0 || needed[k] != needed[k - 1]) first[count++] = k * pd;
    last[count - 1] = (k + 1) * pd;
  }
  return count;
}

// Sum of the pd lanes of patch k.
template <typename acc_t>
ANATOMASK_INLINE acc_t fold(const acc_t* lanes, int64_t k, int64_t pd) {
  acc_t total = 0;
  for (int64_t e = 0; e < pd; ++e) total += lanes[k * pd + e];
  return total;
}

// Patch k's value on each of its lanes.
template <typename acc_t>
ANATOMASK_INLINE void spread(acc_t* lanes, int64_t k, int64_t pd, acc_t value) {
  for (int64_t e = k * pd; e < (k + 1) * pd; ++e) lanes[e] = value;
}

template <typename scalar_t, typename acc_t>
ANATOMASK_SIMD_CLONES void forward_column(const scalar_t* rec, const scalar_t* x, const bool* cell,
                                          acc_t* per_patch, acc_t* mean, acc_t* rstd,
                                          const Column& geo, int64_t col, bool norm_pix, acc_t eps,
                                          bool hidden_only, Scratch<acc_t>& s) {
  const int64_t D = geo.g.D, d = geo.g.d, pd = geo.g.pd, rows = geo.rows;
  char* needed = s.needed.data();
  const int64_t* first = s.first.data();
  const int64_t* last = s.last.data();
  const int64_t count = segments(cell, d, pd, hidden_only, needed, s.first.data(), s.last.data());
  acc_t* __restrict lanes = s.lanes.data();
  acc_t* __restrict mu = s.mu.data();
  acc_t* __restrict scale = s.scale.data();
  const acc_t n = static_cast<acc_t>(geo.n);
  bool any = false;
  for (int64_t k = 0; k < d; ++k) any |= needed[k] != 0;
  if (any) {
    // Pass 1: copy the target, sum it.
    std::fill(lanes, lanes + D, acc_t(0));
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* __restrict src = x + geo.row_offset(col, r);
      acc_t* __restrict dst = s.target.data() + r * D;
      for (int64_t q = 0; q < count; ++q) {
        if (!needed[first[q] / pd]) continue;
#pragma omp simd
        for (int64_t e = first[q]; e < last[q]; ++e) {
          const acc_t v = static_cast<acc_t>(src[e]);
          dst[e] = v;
          lanes[e] += v;
        }
      }
    }
    for (int64_t k = 0; k < d; ++k) {
      spread(mu, k, pd, norm_pix ? fold(lanes, k, pd) / n : acc_t(0));
      spread(scale, k, pd, acc_t(1));
    }
    // Pass 2: unbiased variance around the mean (two-pass: no cancellation).
    if (norm_pix) {
      std::fill(lanes, lanes + D, acc_t(0));
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t* __restrict t = s.target.data() + r * D;
        for (int64_t q = 0; q < count; ++q) {
          if (!needed[first[q] / pd]) continue;
#pragma omp simd
          for (int64_t e = first[q]; e < last[q]; ++e) {
            const acc_t centered = t[e] - mu[e];
            lanes[e] += centered * centered;
          }
        }
      }
      for (int64_t k = 0; k < d; ++k) {
        spread(scale, k, pd, acc_t(1) / std::sqrt(fold(lanes, k, pd) / (n - acc_t(1)) + eps));
      }
    }
    // Pass 3: squared error against the (normalized) target.
    std::fill(lanes, lanes + D, acc_t(0));
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* __restrict pred = rec + geo.row_offset(col, r);
      const acc_t* __restrict t = s.target.data() + r * D;
      for (int64_t q = 0; q < count; ++q) {
        if (!needed[first[q] / pd]) continue;
#pragma omp simd
        for (int64_t e = first[q]; e < last[q]; ++e) {
          const acc_t diff = static_cast<acc_t>(pred[e]) - (t[e] - mu[e]) * scale[e];
          lanes[e] += diff * diff;
        }
      }
    }
  }
  for (int64_t k = 0; k < d; ++k) {
    const int64_t l = col * d + k;
    if (!needed[k]) {
      per_patch[l] = mean[l] = rstd[l] = acc_t(0);
      continue;
    }
    // `e * hidden` as a product, like the reference: NaN in a visible patch shows.
    per_patch[l] = fold(lanes, k, pd) / n * acc_t(cell[k] ? 0 : 1);
    mean[l] = mu[k * pd];
    rstd[l] = scale[k * pd];
  }
}

template <typename scalar_t, typename acc_t>
ANATOMASK_SIMD_CLONES void backward_column(const acc_t* grad_per_patch, const scalar_t* rec,
                                           const scalar_t* x, const bool* cell, const acc_t* mean,
                                           const acc_t* rstd, scalar_t* grad_rec, const Column& geo,
                                           int64_t col, bool hidden_only, Scratch<acc_t>& s) {
  const int64_t d = geo.g.d, pd = geo.g.pd;
  char* needed = s.needed.data();
  const int64_t* first = s.first.data();
  const int64_t* last = s.last.data();
  const int64_t count = segments(cell, d, pd, hidden_only, needed, s.first.data(), s.last.data());
  acc_t* __restrict coef = s.coef.data();
  acc_t* __restrict mu = s.mu.data();
  acc_t* __restrict scale = s.scale.data();
  for (int64_t k = 0; k < d; ++k) {
    const int64_t l = col * d + k;
    // d(e * hidden)/dr = hidden * 2/N * (r - t').
    spread(coef, k, pd, grad_per_patch[l] * acc_t(cell[k] ? 0 : 1) * acc_t(2) / acc_t(geo.n));
    spread(mu, k, pd, mean[l]);
    spread(scale, k, pd, rstd[l]);
  }
  for (int64_t r = 0; r < geo.rows; ++r) {
    const int64_t offset = geo.row_offset(col, r);
    const scalar_t* __restrict pred = rec + offset;
    const scalar_t* __restrict t = x + offset;
    scalar_t* __restrict out = grad_rec + offset;
    for (int64_t q = 0; q < count; ++q) {
      if (!needed[first[q] / pd]) {
        std::fill(out + first[q], out + last[q], scalar_t(0));
        continue;
      }
#pragma omp simd
      for (int64_t e = first[q]; e < last[q]; ++e) {
        const acc_t target = (static_cast<acc_t>(t[e]) - mu[e]) * scale[e];
        out[e] = static_cast<scalar_t>(coef[e] * (static_cast<acc_t>(pred[e]) - target));
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void forward_columns(const scalar_t* rec, const scalar_t* x, const bool* active, acc_t* per_patch,
                     acc_t* mean, acc_t* rstd, const Column& geo, bool norm_pix, acc_t eps,
                     bool hidden_only, int64_t begin, int64_t end) {
  Scratch<acc_t> scratch(geo.rows, geo.g.D, geo.g.d);
  for (int64_t col = begin; col < end; ++col) {
    forward_column(rec, x, active + col * geo.g.d, per_patch, mean, rstd, geo, col, norm_pix, eps,
                   hidden_only, scratch);
  }
}

template <typename scalar_t, typename acc_t>
void backward_columns(const acc_t* grad_per_patch, const scalar_t* rec, const scalar_t* x,
                      const bool* active, const acc_t* mean, const acc_t* rstd, scalar_t* grad_rec,
                      const Column& geo, bool hidden_only, int64_t begin, int64_t end) {
  Scratch<acc_t> scratch(0, geo.g.D, geo.g.d);
  for (int64_t col = begin; col < end; ++col) {
    backward_column(grad_per_patch, rec, x, active + col * geo.g.d, mean, rstd, grad_rec, geo, col,
                    hidden_only, scratch);
  }
}

Column column_geometry(const MaskGeometry& g) {
  return Column{g, g.C * g.ph * g.pw, g.C * g.ph * g.pw * g.pd};
}

// One column is a few hundred KiB of work: parallelize over columns, one at a time.
constexpr int64_t kGrain = 1;

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_recon_loss_cpu(const at::Tensor& rec,
                                                                    const at::Tensor& x,
                                                                    const at::Tensor& active,
                                                                    bool norm_pix, double eps,
                                                                    bool hidden_only) {
  const MaskGeometry g = patch_loss_geometry(rec, x, active, "patch_recon_loss");
  check_eps(eps, "patch_recon_loss");
  const at::Tensor rc = rec.contiguous(), xc = x.contiguous(), mc = active.contiguous();
  const auto stats_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto stats_options = x.options().dtype(stats_type);
  const int64_t L = g.h * g.w * g.d;
  at::Tensor per_patch = new_output({g.B, L}, stats_options);
  at::Tensor mean = new_output({g.B, L}, stats_options);
  at::Tensor rstd = new_output({g.B, L}, stats_options);
  if (per_patch.numel() == 0) return {per_patch, mean, rstd};
  const Column col_geo = column_geometry(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, xc.scalar_type(), "patch_recon_loss_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::parallel_for(0, g.B * g.h * g.w, kGrain, [&](int64_t begin, int64_t end) {
          forward_columns<scalar_t, acc_t>(rc.const_data_ptr<scalar_t>(),
                                           xc.const_data_ptr<scalar_t>(), mc.const_data_ptr<bool>(),
                                           per_patch.data_ptr<acc_t>(), mean.data_ptr<acc_t>(),
                                           rstd.data_ptr<acc_t>(), col_geo, norm_pix,
                                           static_cast<acc_t>(eps), hidden_only, begin, end);
        });
      });
  return {per_patch, mean, rstd};
}

at::Tensor patch_recon_loss_backward_cpu(const at::Tensor& grad_per_patch, const at::Tensor& rec,
                                         const at::Tensor& x, const at::Tensor& active,
                                         const at::Tensor& mean, const at::Tensor& rstd,
                                         bool hidden_only) {
  const MaskGeometry g = patch_loss_geometry(rec, x, active, "patch_recon_loss_backward");
  check_patch_tables(g, x, grad_per_patch, mean, rstd, "patch_recon_loss_backward");
  const at::Tensor rc = rec.contiguous(), xc = x.contiguous(), mc = active.contiguous();
  const at::Tensor gc = grad_per_patch.contiguous(), mu = mean.contiguous(), rs = rstd.contiguous();
  at::Tensor grad_rec = new_output(rc.sizes(), rc.options());
  if (grad_rec.numel() == 0) return grad_rec;
  const Column col_geo = column_geometry(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, xc.scalar_type(), "patch_recon_loss_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::parallel_for(0, g.B * g.h * g.w, kGrain, [&](int64_t begin, int64_t end) {
          backward_columns<scalar_t, acc_t>(
              gc.const_data_ptr<acc_t>(), rc.const_data_ptr<scalar_t>(),
              xc.const_data_ptr<scalar_t>(), mc.const_data_ptr<bool>(), mu.const_data_ptr<acc_t>(),
              rs.const_data_ptr<acc_t>(), grad_rec.data_ptr<scalar_t>(), col_geo, hidden_only,
              begin, end);
        });
      });
  return grad_rec;
}

}  // namespace

TORCH_LIBRARY_IMPL(anatomask_fast, CPU, m) {
  m.impl("patch_recon_loss", &patch_recon_loss_cpu);
  m.impl("patch_recon_loss_backward", &patch_recon_loss_backward_cpu);
}

}  // namespace anatomask_fast
