// CPU kernels of the patch-loss family (OpenMP through at::parallel_for).
//
// One task is a column of patches: sample b, patch row i, patch column j, and the
// d patches along the last axis. Its C*ph*pw rows of D contiguous values are read
// in memory order; per-patch sums are kept per lane (an accumulator per position of
// the D-long row), which vectorizes, and folded per patch at the end. The forward
// copies the column's target once into a scratch buffer (it fits in L2), so the
// variance and the error passes re-read it from cache, not from memory.
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

namespace anatomask_fast {
namespace {

struct Column {
  const MaskGeometry& g;
  int64_t rows;       // C*ph*pw rows of D values
  int64_t n;          // values per patch, N = C*ph*pw*pd
  // Offset of row r of column `col` (b, i, j) in the (B, C, H, W, D) volume.
  int64_t row_offset(int64_t col, int64_t r) const {
    const int64_t j = col % g.w, i = (col / g.w) % g.h, b = col / (g.w * g.h);
    const int64_t z = r % g.pw, y = (r / g.pw) % g.ph, c = r / (g.pw * g.ph);
    return (((b * g.C + c) * g.H + i * g.ph + y) * g.W + j * g.pw + z) * g.D;
  }
};

// Sum of the pd lanes of patch k.
template <typename acc_t>
acc_t fold(const std::vector<acc_t>& lanes, int64_t k, int64_t pd) {
  acc_t total = 0;
  for (int64_t e = 0; e < pd; ++e) total += lanes[k * pd + e];
  return total;
}

template <typename scalar_t, typename acc_t>
void forward_columns(const scalar_t* rec, const scalar_t* x, const bool* active,
                     acc_t* per_patch, acc_t* mean, acc_t* rstd, const Column& col_geo,
                     bool norm_pix, acc_t eps, bool hidden_only, int64_t begin, int64_t end) {
  const MaskGeometry& g = col_geo.g;
  const int64_t D = g.D, d = g.d, pd = g.pd, rows = col_geo.rows;
  std::vector<acc_t> target(rows * D), lanes(D), mu(d), scale(d);
  std::vector<char> needed(d);
  for (int64_t col = begin; col < end; ++col) {
    const bool* cell = active + col * d;
    bool any = false;
    for (int64_t k = 0; k < d; ++k) any |= (needed[k] = !(hidden_only && cell[k]));
    if (any) {
      // Pass 1: copy the target, sum it.
      std::fill(lanes.begin(), lanes.end(), acc_t(0));
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* src = x + col_geo.row_offset(col, r);
        acc_t* dst = target.data() + r * D;
        for (int64_t k = 0; k < d; ++k) {
          if (!needed[k]) continue;
          for (int64_t e = k * pd; e < (k + 1) * pd; ++e) {
            dst[e] = static_cast<acc_t>(src[e]);
            lanes[e] += dst[e];
          }
        }
      }
      for (int64_t k = 0; k < d; ++k) {
        mu[k] = norm_pix ? fold(lanes, k, pd) / acc_t(col_geo.n) : acc_t(0);
        scale[k] = acc_t(1);
      }
      // Pass 2: unbiased variance around the mean (two-pass: no cancellation).
      if (norm_pix) {
        std::fill(lanes.begin(), lanes.end(), acc_t(0));
        for (int64_t r = 0; r < rows; ++r) {
          const acc_t* t = target.data() + r * D;
          for (int64_t k = 0; k < d; ++k) {
            if (!needed[k]) continue;
            for (int64_t e = k * pd; e < (k + 1) * pd; ++e) {
              const acc_t centered = t[e] - mu[k];
              lanes[e] += centered * centered;
            }
          }
        }
        for (int64_t k = 0; k < d; ++k) {
          scale[k] = acc_t(1) / std::sqrt(fold(lanes, k, pd) / acc_t(col_geo.n - 1) + eps);
        }
      }
      // Pass 3: squared error against the (normalized) target.
      std::fill(lanes.begin(), lanes.end(), acc_t(0));
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* pred = rec + col_geo.row_offset(col, r);
        const acc_t* t = target.data() + r * D;
        for (int64_t k = 0; k < d; ++k) {
          if (!needed[k]) continue;
          for (int64_t e = k * pd; e < (k + 1) * pd; ++e) {
            const acc_t diff = static_cast<acc_t>(pred[e]) - (t[e] - mu[k]) * scale[k];
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
      per_patch[l] = fold(lanes, k, pd) / acc_t(col_geo.n) * acc_t(cell[k] ? 0 : 1);
      mean[l] = mu[k];
      rstd[l] = scale[k];
    }
  }
}

template <typename scalar_t, typename acc_t>
void backward_columns(const acc_t* grad_per_patch, const scalar_t* rec, const scalar_t* x,
                      const bool* active, const acc_t* mean, const acc_t* rstd,
                      scalar_t* grad_rec, const Column& col_geo, bool hidden_only,
                      int64_t begin, int64_t end) {
  const MaskGeometry& g = col_geo.g;
  const int64_t d = g.d, pd = g.pd;
  std::vector<acc_t> coef(d), mu(d), scale(d);
  std::vector<char> needed(d);
  for (int64_t col = begin; col < end; ++col) {
    for (int64_t k = 0; k < d; ++k) {
      const int64_t l = col * d + k;
      const bool visible = active[l];
      needed[k] = !(hidden_only && visible);
      // d(e * hidden)/dr = hidden * 2/N * (r - t').
      coef[k] = grad_per_patch[l] * acc_t(visible ? 0 : 1) * acc_t(2) / acc_t(col_geo.n);
      mu[k] = mean[l];
      scale[k] = rstd[l];
    }
    for (int64_t r = 0; r < col_geo.rows; ++r) {
      const int64_t offset = col_geo.row_offset(col, r);
      const scalar_t* pred = rec + offset;
      const scalar_t* t = x + offset;
      scalar_t* out = grad_rec + offset;
      for (int64_t k = 0; k < d; ++k) {
        const int64_t first = k * pd, last = (k + 1) * pd;
        if (!needed[k]) {
          std::fill(out + first, out + last, scalar_t(0));
          continue;
        }
        for (int64_t e = first; e < last; ++e) {
          const acc_t target = (static_cast<acc_t>(t[e]) - mu[k]) * scale[k];
          out[e] = static_cast<scalar_t>(coef[k] * (static_cast<acc_t>(pred[e]) - target));
        }
      }
    }
  }
}

Column column_geometry(const MaskGeometry& g) {
  return Column{g, g.C * g.ph * g.pw, g.C * g.ph * g.pw * g.pd};
}

// One column is a few hundred KiB of work: parallelize over columns, one at a time.
constexpr int64_t kGrain = 1;

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_recon_loss_cpu(
    const at::Tensor& rec, const at::Tensor& x, const at::Tensor& active, bool norm_pix,
    double eps, bool hidden_only) {
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(),
                                  "patch_recon_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, g.B * g.h * g.w, kGrain, [&](int64_t begin, int64_t end) {
      forward_columns<scalar_t, acc_t>(
          rc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
          mc.const_data_ptr<bool>(), per_patch.data_ptr<acc_t>(), mean.data_ptr<acc_t>(),
          rstd.data_ptr<acc_t>(), col_geo, norm_pix, static_cast<acc_t>(eps), hidden_only,
          begin, end);
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
  const at::Tensor gc = grad_per_patch.contiguous(), mu = mean.contiguous(),
                   rs = rstd.contiguous();
  at::Tensor grad_rec = new_output(rc.sizes(), rc.options());
  if (grad_rec.numel() == 0) return grad_rec;
  const Column col_geo = column_geometry(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(),
                                  "patch_recon_loss_backward_cpu", [&] {
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
