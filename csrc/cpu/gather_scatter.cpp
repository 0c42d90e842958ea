// CPU kernels of the gather/scatter family (OpenMP through at::parallel_for).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../gather_scatter.h"
#include "../mask_geometry.h"
#include "../outputs.h"
#include "simd.h"

namespace anatomask_fast {
namespace {

// Rows [begin, end) of the (B*C*H*W, D) view. The op only selects or zeroes, so it
// works on unsigned words of the element's width (one loop for every dtype): each row
// is `dst = src & keep`, with `keep` the row's mask expanded to all-ones/all-zero
// words, rebuilt only when the row crosses into another mask cell. The loop
// vectorizes.
template <typename Word>
void apply_mask_rows(const Word* src, Word* dst, const bool* mask, const MaskGeometry& g,
                     int64_t begin, int64_t end) {
  std::vector<Word> keep(g.D);
  const bool* built_for = nullptr;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t j = r % g.W;
    const int64_t i = (r / g.W) % g.H;
    const int64_t b = r / (g.W * g.H * g.C);
    const bool* cells = mask + ((b * g.h + i / g.ph) * g.w + j / g.pw) * g.d;
    if (cells != built_for) {
      for (int64_t c = 0; c < g.d; ++c) {
        std::fill_n(keep.begin() + c * g.pd, g.pd,
                    cells[c] ? static_cast<Word>(~Word{0}) : Word{0});
      }
      built_for = cells;
    }
    const Word* s = src + r * g.D;
    Word* t = dst + r * g.D;
    for (int64_t k = 0; k < g.D; ++k) t[k] = s[k] & keep[k];
  }
}

at::Tensor apply_mask_cpu(const at::Tensor& x, const at::Tensor& active) {
  const MaskGeometry g = mask_geometry(x, active, "apply_mask");
  const at::Tensor xc = x.contiguous();
  const at::Tensor mc = active.contiguous();
  at::Tensor y = new_output(xc.sizes(), xc.options());
  if (xc.numel() == 0) return y;

  const void* src = xc.const_data_ptr();
  void* dst = y.data_ptr();
  const bool* mask = mc.const_data_ptr<bool>();
  const int64_t rows = g.B * g.C * g.H * g.W;
  const int64_t grain = std::max<int64_t>(1, 32768 / g.D);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    switch (xc.element_size()) {
      case 1:
        return apply_mask_rows(static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), mask,
                               g, begin, end);
      case 2:
        return apply_mask_rows(static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), mask,
                               g, begin, end);
      case 4:
        return apply_mask_rows(static_cast<const uint32_t*>(src), static_cast<uint32_t*>(dst), mask,
                               g, begin, end);
      case 8:
        return apply_mask_rows(static_cast<const uint64_t*>(src), static_cast<uint64_t*>(dst), mask,
                               g, begin, end);
      default:
        TORCH_CHECK(false, "apply_mask: unsupported element size ", xc.element_size());
    }
  });
  return y;
}

}  // namespace

namespace {

template <typename T>
using acc_t = at::opmath_type<T>;

// AT_DISPATCH as a function, so that the kernels' `#pragma omp simd` lines are not
// inside a macro argument.
template <typename Fn>
void dispatch_float(at::ScalarType type, const char* op, Fn&& fn) {
  switch (type) {
    case at::kFloat:
      return fn(float{});
    case at::kDouble:
      return fn(double{});
    case at::kHalf:
      return fn(c10::Half{});
    case at::kBFloat16:
      return fn(c10::BFloat16{});
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", type);
  }
}

// The visible mask of one line (b, :, i, j, :) expanded to its D voxels, rebuilt only
// when the line crosses into another row of mask cells, so the per-voxel loops are
// branch-free selects that vectorize.
class LineMask {
 public:
  LineMask(const bool* mask, const MaskGeometry& g) : mask_(mask), g_(g), keep_(g.D) {}

  // Sets the line; returns the number of visible voxels on it.
  int64_t set(int64_t b, int64_t i, int64_t j) {
    const bool* cells = mask_ + ((b * g_.h + i / g_.ph) * g_.w + j / g_.pw) * g_.d;
    if (cells != built_for_) {
      visible_ = 0;
      for (int64_t c = 0; c < g_.d; ++c) {
        std::fill_n(keep_.begin() + c * g_.pd, g_.pd, static_cast<uint8_t>(cells[c]));
        visible_ += cells[c] ? g_.pd : 0;
      }
      built_for_ = cells;
    }
    return visible_;
  }
  const uint8_t* keep() const { return keep_.data(); }

 private:
  const bool* mask_;
  const MaskGeometry& g_;
  std::vector<uint8_t> keep_;
  const bool* built_for_ = nullptr;
  int64_t visible_ = 0;
};

// Calls fn(line_offset, keep, visible) for every line of the (b, c) row of a
// (B, C, H, W, D) volume; line_offset is the line's first element.
// Force-inlined (and so are the per-line lambdas given to it) so that the voxel loops
// are compiled for the ISA of the kernel function calling it (simd.h).
template <typename Fn>
ANATOMASK_INLINE void for_each_line(LineMask& lines, const MaskGeometry& g, int64_t row, Fn&& fn) {
  const int64_t b = row / g.C;
  for (int64_t i = 0; i < g.H; ++i) {
    for (int64_t j = 0; j < g.W; ++j) {
      const int64_t visible = lines.set(b, i, j);
      fn(((row * g.H + i) * g.W + j) * g.D, lines.keep(), visible);
    }
  }
}

// ---- densify ----

// Rows [begin, end) of the (B*C, H*W*D) view: the token at hidden voxels.
template <typename scalar_t>
ANATOMASK_SIMD_CLONES void densify_rows(const scalar_t* src, const bool* mask, const scalar_t* tok,
                                        const MaskGeometry& g, scalar_t* dst, int64_t begin,
                                        int64_t end) {
  LineMask lines(mask, g);
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t fill = tok[row % g.C];
    for_each_line(lines, g, row,
                  [&](int64_t off, const uint8_t* keep, int64_t) ANATOMASK_INLINE_LAMBDA {
                    const scalar_t* s = src + off;
                    scalar_t* t = dst + off;
#pragma omp simd
                    for (int64_t k = 0; k < g.D; ++k) t[k] = keep[k] ? s[k] : fill;
                  });
  }
}

// Rows [begin, end): the gradient at visible voxels to grad_x, zeros at hidden ones;
// row_sums[row] = the sum of the gradient at hidden voxels (the token's share).
template <typename scalar_t>
ANATOMASK_SIMD_CLONES void densify_backward_rows(const scalar_t* src, const bool* mask,
                                                 const MaskGeometry& g, scalar_t* dst,
                                                 double* row_sums, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  LineMask lines(mask, g);
  for (int64_t row = begin; row < end; ++row) {
    double total = 0;
    for_each_line(lines, g, row,
                  [&](int64_t off, const uint8_t* keep, int64_t) ANATOMASK_INLINE_LAMBDA {
                    const scalar_t* s = src + off;
                    scalar_t* t = dst + off;
                    acc hidden = 0;
#pragma omp simd reduction(+ : hidden)
                    for (int64_t k = 0; k < g.D; ++k) {
                      const acc v = static_cast<acc>(s[k]);
                      t[k] = keep[k] ? s[k] : scalar_t(0);
                      hidden += keep[k] ? acc(0) : v;
                    }
                    total += hidden;
                  });
    row_sums[row] = total;
  }
}

at::Tensor densify_cpu(const at::Tensor& x, const at::Tensor& active, const at::Tensor& token) {
  const MaskGeometry g = mask_geometry(x, active, "densify");
  check_param(token, g.C, x, "densify", "mask_token", "x");
  const at::Tensor xc = x.contiguous();
  const at::Tensor mc = active.contiguous();
  const at::Tensor tc = token.to(x.scalar_type()).contiguous();
  at::Tensor y = new_output(xc.sizes(), xc.options());
  if (xc.numel() == 0) return y;
  dispatch_float(xc.scalar_type(), "densify", [&](auto tag) {
    using scalar_t = decltype(tag);
    at::parallel_for(0, g.B * g.C, 1, [&](int64_t begin, int64_t end) {
      densify_rows(xc.const_data_ptr<scalar_t>(), mc.const_data_ptr<bool>(),
                   tc.const_data_ptr<scalar_t>(), g, y.data_ptr<scalar_t>(), begin, end);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> densify_backward_cpu(const at::Tensor& grad,
                                                        const at::Tensor& active) {
  const MaskGeometry g = mask_geometry(grad, active, "densify_backward", "grad");
  const at::Tensor gc = grad.contiguous();
  const at::Tensor mc = active.contiguous();
  at::Tensor grad_x = new_output(gc.sizes(), gc.options());
  at::Tensor grad_token;
  dispatch_float(gc.scalar_type(), "densify_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_t<scalar_t>;
    grad_token = new_output({g.C}, gc.options().dtype(c10::CppTypeToScalarType<acc>::value));
    std::vector<double> row_sums(g.B * g.C, 0.0);
    at::parallel_for(0, g.B * g.C, 1, [&](int64_t begin, int64_t end) {
      densify_backward_rows(gc.const_data_ptr<scalar_t>(), mc.const_data_ptr<bool>(), g,
                            grad_x.data_ptr<scalar_t>(), row_sums.data(), begin, end);
    });
    acc* out = grad_token.data_ptr<acc>();
    for (int64_t c = 0; c < g.C; ++c) {
      double sum = 0;
      for (int64_t b = 0; b < g.B; ++b) sum += row_sums[b * g.C + c];
      out[c] = static_cast<acc>(sum);
    }
  });
  return {grad_x, grad_token};
}

// ---- sparse_norm ----

enum class Activation { kNone, kLeakyRelu, kRelu6 };

Activation parse_activation(const std::string& name, const char* op) {
  if (name == "none") return Activation::kNone;
  if (name == "leaky_relu") return Activation::kLeakyRelu;
  if (name == "relu6") return Activation::kRelu6;
  TORCH_CHECK_VALUE(false, op,
                    ": argument 'activation' must be one of none, leaky_relu, relu6, got ", name);
}

template <Activation A, typename T>
ANATOMASK_INLINE T activate(T v) {
  if constexpr (A == Activation::kLeakyRelu) return v > T(0) ? v : v * T(0.01);
  if constexpr (A == Activation::kRelu6) return std::min(std::max(v, T(0)), T(6));
  return v;
}

// Derivative at pre-activation v, as PyTorch's leaky_relu / hardtanh backward.
template <Activation A, typename T>
ANATOMASK_INLINE T activation_slope(T v) {
  if constexpr (A == Activation::kLeakyRelu) return v > T(0) ? T(1) : T(0.01);
  if constexpr (A == Activation::kRelu6) return (v > T(0) && v < T(6)) ? T(1) : T(0);
  return T(1);
}

template <typename Fn>
void dispatch_activation(Activation a, Fn&& fn) {
  switch (a) {
    case Activation::kLeakyRelu:
      return fn(std::integral_constant<Activation, Activation::kLeakyRelu>{});
    case Activation::kRelu6:
      return fn(std::integral_constant<Activation, Activation::kRelu6>{});
    default:
      return fn(std::integral_constant<Activation, Activation::kNone>{});
  }
}

// Count, mean and sum of squared deviations, merged with Chan's formula so that a
// large mean does not cancel the variance.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void merge(double n2, double mean2, double m22) {
    if (n2 == 0) return;
    const double total = n + n2;
    const double delta = mean2 - mean;
    mean += delta * n2 / total;
    m2 += m22 + delta * delta * n * n2 / total;
    n = total;
  }
};

// Per-channel affine of one row: weight and bias, or 1 and 0 without affine.
template <typename acc>
struct Affine {
  const at::Tensor weight, bias;
  acc w(int64_t c) const { return weight.defined() ? weight.const_data_ptr<acc>()[c] : acc(1); }
  acc b(int64_t c) const { return bias.defined() ? bias.const_data_ptr<acc>()[c] : acc(0); }
};

// The affine parameter in the accumulation dtype (checked by check_affine).
template <typename acc>
at::Tensor affine_param(const c10::optional<at::Tensor>& p) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  return p->to(c10::CppTypeToScalarType<acc>::value).contiguous();
}

// What normalizes one (b, c) row: its index in the (groups, C) statistics tables, its
// mean and rstd, and the channel's affine weight and bias.
template <typename acc>
struct RowCoefs {
  int64_t stat;
  acc mu, r, w, bs;
};

// The statistics tables (per group) and the affine, looked up per row.
template <typename acc>
struct RowStats {
  const acc* mean;
  const acc* rstd;
  const Affine<acc>& affine;
  bool per_sample;
  RowCoefs<acc> at(int64_t row, const MaskGeometry& g) const {
    const int64_t c = row % g.C, stat = (per_sample ? row / g.C : 0) * g.C + c;
    return {stat, mean[stat], rstd[stat], affine.w(c), affine.b(c)};
  }
};

// Rows [begin, end): count, mean and M2 of the visible voxels of each (b, c) row, from
// the sums of x - K and (x - K)^2 with K the mean of the row's first visible line
// (shifted data: K is near the mean, so a large mean does not cancel the variance, and
// every line is one pass with no per-line division).
template <typename scalar_t>
ANATOMASK_SIMD_CLONES void moments_rows(const scalar_t* src, const bool* mask,
                                        const MaskGeometry& g, Moments* rows, int64_t begin,
                                        int64_t end) {
  using acc = acc_t<scalar_t>;
  LineMask lines(mask, g);
  for (int64_t row = begin; row < end; ++row) {
    double n = 0, s1 = 0, s2 = 0;
    acc shift = 0;
    for_each_line(lines, g, row,
                  [&](int64_t off, const uint8_t* keep, int64_t visible) ANATOMASK_INLINE_LAMBDA {
                    if (visible == 0) return;
                    const scalar_t* s = src + off;
                    if (n == 0) {
                      acc sum = 0;
#pragma omp simd reduction(+ : sum)
                      for (int64_t k = 0; k < g.D; ++k)
                        sum += keep[k] ? static_cast<acc>(s[k]) : acc(0);
                      shift = sum / static_cast<acc>(visible);
                    }
                    acc line1 = 0, line2 = 0;
#pragma omp simd reduction(+ : line1, line2)
                    for (int64_t k = 0; k < g.D; ++k) {
                      const acc t = keep[k] ? static_cast<acc>(s[k]) - shift : acc(0);
                      line1 += t;
                      line2 += t * t;
                    }
                    n += static_cast<double>(visible);
                    s1 += line1;
                    s2 += line2;
                  });
    rows[row] = n > 0 ? Moments{n, shift + s1 / n, std::max(0.0, s2 - s1 * s1 / n)} : Moments{};
  }
}

// Rows [begin, end) of the output: normalized, affine, activated; zeros where hidden.
template <Activation A, typename scalar_t, typename acc>
ANATOMASK_SIMD_CLONES void normalize_rows(const scalar_t* src, const bool* mask,
                                          const MaskGeometry& g, const RowStats<acc>& stats,
                                          scalar_t* dst, int64_t begin, int64_t end) {
  LineMask lines(mask, g);
  for (int64_t row = begin; row < end; ++row) {
    const RowCoefs<acc> k = stats.at(row, g);
    for_each_line(
        lines, g, row, [&](int64_t off, const uint8_t* keep, int64_t) ANATOMASK_INLINE_LAMBDA {
          const scalar_t* s = src + off;
          scalar_t* t = dst + off;
#pragma omp simd
          for (int64_t v = 0; v < g.D; ++v) {
            const acc out = activate<A>((static_cast<acc>(s[v]) - k.mu) * k.r * k.w + k.bs);
            t[v] = keep[v] ? static_cast<scalar_t>(out) : scalar_t(0);
          }
        });
  }
}

// Rows [begin, end): count, sum of g' and of g' * xhat over visible voxels, where g' is
// the gradient before the activation (its slope recomputed from x).
template <Activation A, typename scalar_t, typename acc>
ANATOMASK_SIMD_CLONES void gradient_sums_rows(const scalar_t* gp, const scalar_t* xp,
                                              const bool* mask, const MaskGeometry& g,
                                              const RowStats<acc>& stats, double* count,
                                              double* sum_g, double* sum_gx, int64_t begin,
                                              int64_t end) {
  LineMask lines(mask, g);
  for (int64_t row = begin; row < end; ++row) {
    const RowCoefs<acc> k = stats.at(row, g);
    double n = 0, sg = 0, sgx = 0;
    for_each_line(lines, g, row,
                  [&](int64_t off, const uint8_t* keep, int64_t visible) ANATOMASK_INLINE_LAMBDA {
                    if (visible == 0) return;
                    acc line_g = 0, line_gx = 0;
#pragma omp simd reduction(+ : line_g, line_gx)
                    for (int64_t v = 0; v < g.D; ++v) {
                      const acc xhat = (static_cast<acc>(xp[off + v]) - k.mu) * k.r;
                      const acc gv =
                          static_cast<acc>(gp[off + v]) * activation_slope<A>(xhat * k.w + k.bs);
                      line_g += keep[v] ? gv : acc(0);
                      line_gx += keep[v] ? gv * xhat : acc(0);
                    }
                    n += static_cast<double>(visible);
                    sg += line_g;
                    sgx += line_gx;
                  });
    count[row] = n;
    sum_g[row] = sg;
    sum_gx[row] = sgx;
  }
}

// Rows [begin, end) of grad_x = rstd * w * (g' - mean(g') - xhat * mean(g' * xhat)) over
// visible voxels, zeros where hidden; coef_g / coef_gx hold the group means.
template <Activation A, typename scalar_t, typename acc>
ANATOMASK_SIMD_CLONES void input_gradient_rows(const scalar_t* gp, const scalar_t* xp,
                                               const bool* mask, const MaskGeometry& g,
                                               const RowStats<acc>& stats, const acc* coef_g,
                                               const acc* coef_gx, scalar_t* dst, int64_t begin,
                                               int64_t end) {
  LineMask lines(mask, g);
  for (int64_t row = begin; row < end; ++row) {
    const RowCoefs<acc> k = stats.at(row, g);
    const acc mg = coef_g[k.stat], mgx = coef_gx[k.stat], scale = k.r * k.w;
    for_each_line(
        lines, g, row, [&](int64_t off, const uint8_t* keep, int64_t) ANATOMASK_INLINE_LAMBDA {
#pragma omp simd
          for (int64_t v = 0; v < g.D; ++v) {
            const acc xhat = (static_cast<acc>(xp[off + v]) - k.mu) * k.r;
            const acc gv = static_cast<acc>(gp[off + v]) * activation_slope<A>(xhat * k.w + k.bs);
            const acc out = scale * (gv - mg - xhat * mgx);
            dst[off + v] = keep[v] ? static_cast<scalar_t>(out) : scalar_t(0);
          }
        });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_norm_cpu(
    const at::Tensor& x, const at::Tensor& active, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, bool per_sample, double eps,
    c10::string_view activation) {
  const MaskGeometry g = mask_geometry(x, active, "sparse_norm");
  const Activation act = parse_activation(std::string(activation), "sparse_norm");
  check_affine(weight, bias, g, x, "sparse_norm");
  check_eps(eps, "sparse_norm");
  const at::Tensor xc = x.contiguous();
  const at::Tensor mc = active.contiguous();
  const int64_t groups = per_sample ? g.B : 1;
  at::Tensor y = new_output(xc.sizes(), xc.options());
  at::Tensor mean, rstd;
  dispatch_float(xc.scalar_type(), "sparse_norm", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_t<scalar_t>;
    const auto stat_options = xc.options().dtype(c10::CppTypeToScalarType<acc>::value);
    mean = new_output({groups, g.C}, stat_options);
    rstd = new_output({groups, g.C}, stat_options);
    const Affine<acc> affine{affine_param<acc>(weight), affine_param<acc>(bias)};
    const scalar_t* src = xc.const_data_ptr<scalar_t>();
    const bool* mask = mc.const_data_ptr<bool>();
    // Pass 1: moments of every (b, c) row, then merged per group.
    std::vector<Moments> rows(g.B * g.C);
    at::parallel_for(0, g.B * g.C, 1, [&](int64_t begin, int64_t end) {
      moments_rows(src, mask, g, rows.data(), begin, end);
    });
    acc* mean_p = mean.data_ptr<acc>();
    acc* rstd_p = rstd.data_ptr<acc>();
    for (int64_t grp = 0; grp < groups; ++grp) {
      for (int64_t c = 0; c < g.C; ++c) {
        Moments m;
        for (int64_t b = per_sample ? grp : 0; b < (per_sample ? grp + 1 : g.B); ++b) {
          const Moments& r = rows[b * g.C + c];
          m.merge(r.n, r.mean, r.m2);
        }
        const double var = m.n > 0 ? m.m2 / m.n : 0.0;  // biased, as instance_norm
        mean_p[grp * g.C + c] = static_cast<acc>(m.mean);
        rstd_p[grp * g.C + c] = static_cast<acc>(1.0 / std::sqrt(var + eps));
      }
    }
    // Pass 2: normalize, affine, activation; exact zeros at hidden voxels.
    const RowStats<acc> stats{mean_p, rstd_p, affine, per_sample};
    dispatch_activation(act, [&](auto a) {
      at::parallel_for(0, g.B * g.C, 1, [&](int64_t begin, int64_t end) {
        normalize_rows<decltype(a)::value>(src, mask, g, stats, y.data_ptr<scalar_t>(), begin, end);
      });
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_norm_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& active,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& rstd, c10::string_view activation) {
  const MaskGeometry g = mask_geometry(x, active, "sparse_norm_backward");
  const Activation act = parse_activation(std::string(activation), "sparse_norm_backward");
  check_affine(weight, bias, g, x, "sparse_norm_backward");
  const int64_t groups = check_norm_backward(grad, x, mean, rstd, g, "sparse_norm_backward");
  const at::Tensor gc = grad.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor mc = active.contiguous();
  const bool per_sample = groups == g.B && groups > 1;
  at::Tensor grad_x = new_output(xc.sizes(), xc.options());
  at::Tensor grad_w, grad_b;
  dispatch_float(xc.scalar_type(), "sparse_norm_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_t<scalar_t>;
    const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
    const acc* mean_p = mean_c.const_data_ptr<acc>();
    const acc* rstd_p = rstd_c.const_data_ptr<acc>();
    const Affine<acc> affine{affine_param<acc>(weight), affine_param<acc>(bias)};
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const bool* mask = mc.const_data_ptr<bool>();
    scalar_t* dst = grad_x.data_ptr<scalar_t>();
    // Per row: count, sum of g' and of g' * xhat over visible voxels, where g' is the
    // gradient before the activation (its slope recomputed from x).
    std::vector<double> count(g.B * g.C), sum_g(g.B * g.C), sum_gx(g.B * g.C);
    const RowStats<acc> stats{mean_p, rstd_p, affine, per_sample};
    dispatch_activation(act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      at::parallel_for(0, g.B * g.C, 1, [&](int64_t begin, int64_t end) {
        gradient_sums_rows<A>(gp, xp, mask, g, stats, count.data(), sum_g.data(), sum_gx.data(),
                              begin, end);
      });
      // Group totals; grad bias / weight are the totals over the whole batch.
      const auto stat_options = xc.options().dtype(c10::CppTypeToScalarType<acc>::value);
      grad_w = new_output({g.C}, stat_options);
      grad_b = new_output({g.C}, stat_options);
      std::vector<acc> coef_g(groups * g.C), coef_gx(groups * g.C);
      for (int64_t c = 0; c < g.C; ++c) {
        double all_g = 0, all_gx = 0;
        for (int64_t grp = 0; grp < groups; ++grp) {
          double n = 0, sg = 0, sgx = 0;
          for (int64_t b = per_sample ? grp : 0; b < (per_sample ? grp + 1 : g.B); ++b) {
            n += count[b * g.C + c];
            sg += sum_g[b * g.C + c];
            sgx += sum_gx[b * g.C + c];
          }
          coef_g[grp * g.C + c] = n > 0 ? static_cast<acc>(sg / n) : acc(0);
          coef_gx[grp * g.C + c] = n > 0 ? static_cast<acc>(sgx / n) : acc(0);
          all_g += sg;
          all_gx += sgx;
        }
        grad_b.data_ptr<acc>()[c] = static_cast<acc>(all_g);
        grad_w.data_ptr<acc>()[c] = static_cast<acc>(all_gx);
      }
      at::parallel_for(0, g.B * g.C, 1, [&](int64_t begin, int64_t end) {
        input_gradient_rows<A>(gp, xp, mask, g, stats, coef_g.data(), coef_gx.data(), dst, begin,
                               end);
      });
    });
  });
  return {grad_x, grad_w, grad_b};
}

// ---- token layout ----

// Every id of the contiguous `ids` in [0, bound): a token of the L=bound sequence.
void check_ids_range(const at::Tensor& ids, int64_t bound, const char* op, const char* what) {
  check_index_values(ids, 0, bound, op, what,
                     "the L=" + std::to_string(bound) + " tokens of each sample");
}

// Copies row `src` (or zeros when null) of `bytes` bytes.
inline void copy_row(const char* src, char* dst, int64_t bytes) {
  if (src != nullptr) {
    std::memcpy(dst, src, bytes);
  } else {
    std::memset(dst, 0, bytes);
  }
}

at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& ids_keep) {
  check_token_ids(ids_keep, x, "gather_tokens", "ids_keep", "x");
  const at::Tensor xc = x.contiguous();
  const at::Tensor ic = ids_keep.contiguous();
  const int64_t B = xc.size(0), L = xc.size(1), C = xc.size(2), K = ic.size(1);
  check_ids_range(ic, L, "gather_tokens", "ids_keep");
  at::Tensor out = new_output({B, K, C}, xc.options());
  const int64_t bytes = C * xc.element_size();
  const char* src = static_cast<const char*>(xc.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* ids = ic.const_data_ptr<int64_t>();
  at::parallel_for(0, B * K, std::max<int64_t>(1, 65536 / std::max<int64_t>(bytes, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       copy_row(src + ((r / K) * L + ids[r]) * bytes, dst + r * bytes, bytes);
                     }
                   });
  return out;
}

at::Tensor gather_tokens_backward_cpu(const at::Tensor& grad, const at::Tensor& ids_keep,
                                      int64_t length) {
  check_token_ids(ids_keep, grad, "gather_tokens_backward", "ids_keep", "grad",
                  grad.dim() == 3 ? grad.size(1) : -1);
  const at::Tensor gc = grad.contiguous();
  const at::Tensor ic = ids_keep.contiguous();
  const int64_t B = gc.size(0), K = gc.size(1), C = gc.size(2), L = length;
  check_length(length, K, std::numeric_limits<int64_t>::max(), "gather_tokens_backward", "length");
  check_ids_range(ic, L, "gather_tokens_backward", "ids_keep");
  // Which kept row lands in each slot (-1: none), so every output row is written once.
  std::vector<int64_t> source(B * L, -1);
  const int64_t* ids = ic.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < B * K; ++r) {
    int64_t& slot = source[(r / K) * L + ids[r]];
    TORCH_CHECK_VALUE(slot < 0,
                      "gather_tokens_backward: argument 'ids_keep' must hold "
                      "distinct indices per sample, got ",
                      ids[r], " twice in sample ", r / K);
    slot = r;
  }
  at::Tensor out = new_output({B, L, C}, gc.options());
  const int64_t bytes = C * gc.element_size();
  const char* src = static_cast<const char*>(gc.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, B * L, std::max<int64_t>(1, 65536 / std::max<int64_t>(bytes, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       copy_row(source[r] >= 0 ? src + source[r] * bytes : nullptr, dst + r * bytes,
                                bytes);
                     }
                   });
  return out;
}

// ids_restore must be a permutation of [0, L) per sample (MAE's argsort of argsort):
// then the backward writes every visible token's gradient exactly once.
void check_permutation(const at::Tensor& ids, const char* op) {
  const int64_t B = ids.size(0), L = ids.size(1);
  check_ids_range(ids, L, op, "ids_restore");
  const int64_t* p = ids.const_data_ptr<int64_t>();
  std::vector<uint8_t> seen(L);
  for (int64_t b = 0; b < B; ++b) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t l = 0; l < L; ++l) {
      TORCH_CHECK_VALUE(!seen[p[b * L + l]], op,
                        ": argument 'ids_restore' must be a permutation of "
                        "[0, ",
                        L, ") per sample, got ", p[b * L + l], " twice in sample ", b);
      seen[p[b * L + l]] = 1;
    }
  }
}

at::Tensor scatter_tokens_cpu(const at::Tensor& x_visible, const at::Tensor& ids_restore,
                              const at::Tensor& mask_token,
                              const c10::optional<at::Tensor>& pos_embed) {
  const char* op = "scatter_tokens";
  check_token_ids(ids_restore, x_visible, op, "ids_restore", "x_visible");
  const at::Tensor xc = x_visible.contiguous();
  const at::Tensor ic = ids_restore.contiguous();
  const int64_t B = xc.size(0), K = xc.size(1), C = xc.size(2), L = ic.size(1);
  TORCH_CHECK_VALUE(K <= L, op, ": argument 'x_visible' has ", K, " tokens, more than the L=", L,
                    " slots of 'ids_restore'");
  check_param(mask_token, C, x_visible, op, "mask_token", "x_visible");
  const bool with_pos = pos_embed.has_value() && pos_embed->defined();
  if (with_pos) check_param(*pos_embed, L * C, x_visible, op, "pos_embed", "x_visible");
  check_permutation(ic, op);
  const at::Tensor tc = mask_token.to(xc.scalar_type()).contiguous();
  const at::Tensor pc = with_pos ? pos_embed->to(xc.scalar_type()).contiguous() : at::Tensor();
  at::Tensor out = new_output({B, L, C}, xc.options());
  const int64_t* ids = ic.const_data_ptr<int64_t>();
  dispatch_float(xc.scalar_type(), "scatter_tokens", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* src = xc.const_data_ptr<scalar_t>();
    const scalar_t* tok = tc.const_data_ptr<scalar_t>();
    const scalar_t* pos = with_pos ? pc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * L, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r) {
                         const int64_t id = ids[r];
                         const scalar_t* s = id < K ? src + ((r / L) * K + id) * C : tok;
                         scalar_t* t = dst + r * C;
                         if (pos == nullptr) {
                           std::memcpy(t, s, C * sizeof(scalar_t));
                           continue;
                         }
                         const scalar_t* pe = pos + (r % L) * C;
#pragma omp simd
                         for (int64_t c = 0; c < C; ++c) t[c] = s[c] + pe[c];
                       }
                     });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scatter_tokens_backward_cpu(
    const at::Tensor& grad, const at::Tensor& ids_restore, int64_t len_keep, bool with_pos) {
  const char* op = "scatter_tokens_backward";
  check_token_ids(ids_restore, grad, op, "ids_restore", "grad",
                  grad.dim() == 3 ? grad.size(1) : -1);
  const at::Tensor gc = grad.contiguous();
  const at::Tensor ic = ids_restore.contiguous();
  const int64_t B = gc.size(0), L = gc.size(1), C = gc.size(2), K = len_keep;
  check_length(len_keep, 0, L, op, "len_keep");
  check_permutation(ic, "scatter_tokens_backward");
  at::Tensor grad_x = new_output({B, K, C}, gc.options());
  at::Tensor grad_token, grad_pos;
  const int64_t* ids = ic.const_data_ptr<int64_t>();
  dispatch_float(gc.scalar_type(), "scatter_tokens_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = acc_t<scalar_t>;
    const auto acc_options = gc.options().dtype(c10::CppTypeToScalarType<acc>::value);
    grad_token = new_output({C}, acc_options);
    grad_pos = new_output({with_pos ? L : 0, C}, acc_options);
    const scalar_t* src = gc.const_data_ptr<scalar_t>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    acc* gt = grad_token.data_ptr<acc>();
    acc* gpos = with_pos ? grad_pos.data_ptr<acc>() : nullptr;
    // Each task owns a channel range, so the token and pos sums need no combine.
    at::parallel_for(0, C, 256, [&](int64_t c0, int64_t c1) {
      const int64_t n = c1 - c0;
      std::vector<acc> token(n, acc(0));
      for (int64_t l = 0; l < L; ++l) {
        acc* pe = gpos != nullptr ? gpos + l * C + c0 : nullptr;
        if (pe != nullptr) std::fill_n(pe, n, acc(0));
        for (int64_t b = 0; b < B; ++b) {
          const int64_t id = ids[b * L + l];
          const scalar_t* s = src + (b * L + l) * C + c0;
          if (id < K) {
            std::memcpy(gx + ((b * K) + id) * C + c0, s, n * sizeof(scalar_t));
          } else {
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) token[c] += static_cast<acc>(s[c]);
          }
          if (pe != nullptr) {
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) pe[c] += static_cast<acc>(s[c]);
          }
        }
      }
      std::copy(token.begin(), token.end(), gt + c0);
    });
  });
  return {grad_x, grad_token, grad_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(anatomask_fast, CPU, m) {
  m.impl("apply_mask", &apply_mask_cpu);
  m.impl("densify", &densify_cpu);
  m.impl("densify_backward", &densify_backward_cpu);
  m.impl("sparse_norm", &sparse_norm_cpu);
  m.impl("sparse_norm_backward", &sparse_norm_backward_cpu);
  m.impl("gather_tokens", &gather_tokens_cpu);
  m.impl("gather_tokens_backward", &gather_tokens_backward_cpu);
  m.impl("scatter_tokens", &scatter_tokens_cpu);
  m.impl("scatter_tokens_backward", &scatter_tokens_backward_cpu);
}

}  // namespace anatomask_fast
