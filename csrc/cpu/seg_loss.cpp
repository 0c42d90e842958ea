// CPU kernels of the segmentation loss family (OpenMP through at::parallel_for).
//
// Work unit: a chunk of kChunk voxels of one sample. Its K x kChunk logits are
// converted to the accumulation type in a small buffer (L1/L2-resident), the softmax
// is done there class by class (inner loops over voxels vectorize: exp and log are
// branch-free polynomials, and each chunk function is compiled per ISA level, see
// simd.h), and the chunk's sums go to one row of a partials table, reduced in double
// afterwards: the result does not depend on the thread count. Neither a softmax nor a
// one-hot tensor exists.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../outputs.h"
#include "../seg_loss.h"
#include "simd.h"

namespace anatomask_fast {
namespace {

constexpr int64_t kChunk = 256;

// exp for x <= 0 (softmax arguments), branch-free so that loops calling it vectorize;
// Cephes' polynomial, relative error ~2e-7. Below -87 it returns ~1.6e-38, not 0.
ANATOMASK_INLINE float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

inline double exp_nonpositive(double x) {
  return std::exp(x);
}

// log for x >= 1 (a softmax denominator), branch-free: x = 2^e * m with m in
// [sqrt(1/2), sqrt(2)), then Cephes' logf polynomial in m - 1; relative error ~1e-7.
ANATOMASK_INLINE float log_at_least_one(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  // Exponent and mantissa of x / sqrt(2)'s binade, so that m lands around 1.
  const int32_t shifted = bits - 0x3f3504f3;  // bits of sqrt(1/2)
  const int32_t e = shifted >> 23;
  const int32_t mbits = (shifted & 0x007fffff) + 0x3f3504f3;
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const float r = m - 1.0f;
  float p = 7.0376836292e-2f;
  p = p * r - 1.1514610310e-1f;
  p = p * r + 1.1676998740e-1f;
  p = p * r - 1.2420140846e-1f;
  p = p * r + 1.4249322787e-1f;
  p = p * r - 1.6668057665e-1f;
  p = p * r + 2.0000714765e-1f;
  p = p * r - 2.4999993993e-1f;
  p = p * r + 3.3333331174e-1f;
  const float r2 = r * r;
  const float fe = static_cast<float>(e);
  return (r + r2 * (r * p - 0.5f)) + fe * 0.693147180559945f;
}

inline double log_at_least_one(double x) {
  return std::log(x);
}

// One chunk's labels: y[v] = class or -1 (ignored or invalid), w[v] = 1 where counted.
// Returns the number of labels outside [0, K) that are not the ignored label.
template <typename L, typename Acc>
ANATOMASK_INLINE int64_t load_labels(const L* labels, int64_t n, const SegLossGeometry& g,
                                     int32_t* y, Acc* w) {
  int64_t bad = 0;
  for (int64_t v = 0; v < n; ++v) {
    const int64_t label = static_cast<int64_t>(labels[v]);
    const bool ignored = g.has_ignore && label == g.ignore;
    const bool in_range = label >= 0 && label < g.K;
    y[v] = in_range && !ignored ? static_cast<int32_t>(label) : -1;
    w[v] = in_range && !ignored ? Acc(1) : Acc(0);
    bad += !in_range && !ignored;
  }
  return bad;
}

// Per-thread scratch of one chunk: e holds exp(x - max) per class, then probabilities.
template <typename Acc>
struct Chunk {
  std::vector<Acc> e, m, s, w, xy;
  std::vector<int32_t> y;
  explicit Chunk(int64_t K)
      : e(K * kChunk), m(kChunk), s(kChunk), w(kChunk), xy(kChunk), y(kChunk) {}

  // Loads logits x[k * S + v], v < n, and leaves e = exp(x - max), s = sum_k e,
  // m = max and xy = the logit at the label (0 where not counted).
  template <typename T>
  ANATOMASK_INLINE void softmax(const T* x, int64_t S, int64_t K, int64_t n) {
    Acc* __restrict ep = e.data();
    Acc* __restrict mp = m.data();
    Acc* __restrict sp = s.data();
    Acc* __restrict xyp = xy.data();
    const int32_t* __restrict yp = y.data();
    for (int64_t k = 0; k < K; ++k) {
      const T* __restrict row = x + k * S;
      Acc* __restrict er = ep + k * kChunk;
      for (int64_t v = 0; v < n; ++v) er[v] = static_cast<Acc>(row[v]);
    }
    for (int64_t v = 0; v < n; ++v) {
      mp[v] = ep[v];
      sp[v] = Acc(0);
      xyp[v] = Acc(0);
    }
    for (int64_t k = 1; k < K; ++k) {
      const Acc* __restrict er = ep + k * kChunk;
      for (int64_t v = 0; v < n; ++v) mp[v] = er[v] > mp[v] ? er[v] : mp[v];
    }
    for (int64_t k = 0; k < K; ++k) {
      Acc* __restrict er = ep + k * kChunk;
      const int32_t kk = static_cast<int32_t>(k);
      for (int64_t v = 0; v < n; ++v) {
        const Acc xv = er[v];
        xyp[v] += yp[v] == kk ? xv : Acc(0);
        const Acc ev = exp_nonpositive(xv - mp[v]);
        er[v] = ev;
        sp[v] += ev;
      }
    }
  }
};

// One chunk's partial sums: out = intersect[K], sum_pred[K], sum_gt[K], ce (NaN when a
// label is out of range).
template <typename T, typename L, typename Acc>
ANATOMASK_SIMD_CLONES void forward_chunk(const T* logits, const L* labels, const SegLossGeometry& g,
                                         int64_t n, Chunk<Acc>& c, Acc* out) {
  const int64_t K = g.K;
  const int64_t bad = load_labels(labels, n, g, c.y.data(), c.w.data());
  c.softmax(logits, g.S, K, n);
  Acc* __restrict s = c.s.data();
  const Acc* __restrict m = c.m.data();
  const Acc* __restrict xy = c.xy.data();
  const Acc* __restrict w = c.w.data();
  const int32_t* __restrict y = c.y.data();
  Acc ce = 0;
#pragma omp simd reduction(+ : ce)
  for (int64_t v = 0; v < n; ++v) {
    ce += w[v] * (m[v] + log_at_least_one(s[v]) - xy[v]);
    s[v] = Acc(1) / s[v];  // from here on: 1 / sum
  }
  out[3 * K] = bad ? std::numeric_limits<Acc>::quiet_NaN() : ce;
  for (int64_t k = 0; k < K; ++k) {
    const Acc* __restrict er = c.e.data() + k * kChunk;
    const int32_t kk = static_cast<int32_t>(k);
    Acc inter = 0, pred = 0, gt = 0;
#pragma omp simd reduction(+ : inter, pred, gt)
    for (int64_t v = 0; v < n; ++v) {
      const Acc p = er[v] * s[v];
      const bool hit = y[v] == kk;
      inter += hit ? p : Acc(0);
      pred += w[v] * p;
      gt += hit ? Acc(1) : Acc(0);
    }
    out[k] = inter;
    out[K + k] = pred;
    out[2 * K + k] = gt;
  }
}

template <typename T, typename L, typename Acc = at::opmath_type<T>>
void forward_kernel(const T* logits, const L* labels, const SegLossGeometry& g, Acc* class_sums,
                    Acc* ce_sums) {
  const int64_t K = g.K, S = g.S, per_sample = (S + kChunk - 1) / kChunk;
  const int64_t row = 3 * K + 1;  // intersect[K], sum_pred[K], sum_gt[K], ce
  std::vector<Acc> partials(g.B * per_sample * row);
  at::parallel_for(0, g.B * per_sample, 1, [&](int64_t begin, int64_t end) {
    Chunk<Acc> c(K);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t b = chunk / per_sample, v0 = (chunk % per_sample) * kChunk;
      forward_chunk(logits + b * K * S + v0, labels + b * S + v0, g, std::min(kChunk, S - v0), c,
                    partials.data() + chunk * row);
    }
  });
  // Serial: a few adds per chunk, less than a second parallel region costs.
  std::vector<double> totals(row);
  for (int64_t b = 0; b < g.B; ++b) {
    std::fill(totals.begin(), totals.end(), 0.0);
    for (int64_t chunk = 0; chunk < per_sample; ++chunk) {
      const Acc* part = partials.data() + (b * per_sample + chunk) * row;
      for (int64_t j = 0; j < row; ++j) totals[j] += part[j];
    }
    for (int64_t j = 0; j < 3 * K; ++j) class_sums[b * 3 * K + j] = static_cast<Acc>(totals[j]);
    ce_sums[b] = static_cast<Acc>(totals[3 * K]);
  }
}

// One chunk's logit gradients, written to grad[k * S + v], v < n. g_inter, g_pred: the
// sample's incoming gradients of the Dice sums; g_ce: of the CE sum.
template <typename T, typename L, typename Acc>
ANATOMASK_SIMD_CLONES void backward_chunk(const Acc* g_inter, const Acc* g_pred, Acc g_ce,
                                          const T* logits, const L* labels,
                                          const SegLossGeometry& g, int64_t n, Chunk<Acc>& c,
                                          Acc* dot, T* grad) {
  const int64_t K = g.K, S = g.S;
  load_labels(labels, n, g, c.y.data(), c.w.data());
  c.softmax(logits, S, K, n);
  Acc* __restrict inv = c.s.data();
  Acc* __restrict dp = dot;
  const int32_t* __restrict y = c.y.data();
  const Acc* __restrict w = c.w.data();
  for (int64_t v = 0; v < n; ++v) {
    inv[v] = Acc(1) / inv[v];
    dp[v] = Acc(0);
  }
  // d loss / d p_k = g_pred[k] + [k = y] g_inter[k]; dot = sum_k p_k d loss / d p_k.
  for (int64_t k = 0; k < K; ++k) {
    Acc* __restrict er = c.e.data() + k * kChunk;
    const Acc gp = g_pred[k], gi = g_inter[k];
    const int32_t kk = static_cast<int32_t>(k);
    for (int64_t v = 0; v < n; ++v) {
      const Acc p = er[v] * inv[v];
      er[v] = p;
      dp[v] += p * (y[v] == kk ? gp + gi : gp);
    }
  }
  // Softmax Jacobian for the Dice part, p - onehot for the CE part.
  for (int64_t k = 0; k < K; ++k) {
    const Acc* __restrict er = c.e.data() + k * kChunk;
    const Acc gp = g_pred[k] + g_ce, gi = g_inter[k];
    const int32_t kk = static_cast<int32_t>(k);
    T* __restrict out = grad + k * S;
    for (int64_t v = 0; v < n; ++v) {
      const Acc p = er[v];
      const Acc hit = y[v] == kk ? p * gi - g_ce : Acc(0);
      out[v] = static_cast<T>(w[v] * (p * (gp - dp[v]) + hit));
    }
  }
}

template <typename T, typename L, typename Acc = at::opmath_type<T>>
void backward_kernel(const Acc* grad_sums, const Acc* grad_ce, const T* logits, const L* labels,
                     const SegLossGeometry& g, T* grad) {
  const int64_t K = g.K, S = g.S, per_sample = (S + kChunk - 1) / kChunk;
  at::parallel_for(0, g.B * per_sample, 1, [&](int64_t begin, int64_t end) {
    Chunk<Acc> c(K);
    std::vector<Acc> dot(kChunk);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t b = chunk / per_sample, v0 = (chunk % per_sample) * kChunk;
      const Acc* g_inter = grad_sums + b * 3 * K;
      backward_chunk(g_inter, g_inter + K, grad_ce[b], logits + b * K * S + v0, labels + b * S + v0,
                     g, std::min(kChunk, S - v0), c, dot.data(), grad + b * K * S + v0);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> dice_ce_loss_cpu(const at::Tensor& logits,
                                                    const at::Tensor& labels,
                                                    std::optional<int64_t> ignore_index) {
  const SegLossGeometry g = seg_loss_geometry(logits, labels, ignore_index, "dice_ce_loss");
  const at::Tensor x = logits.contiguous();
  const at::Tensor y = labels.contiguous();
  at::Tensor class_sums = new_output({g.B, 3, g.K}, x.options().dtype(sums_dtype(x)));
  at::Tensor ce_sums = new_output({g.B}, x.options().dtype(sums_dtype(x)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dice_ce_loss", [&] {
    using Acc = at::opmath_type<scalar_t>;
    with_labels(y, [&](const auto* label_ptr) {
      forward_kernel(x.const_data_ptr<scalar_t>(), label_ptr, g, class_sums.data_ptr<Acc>(),
                     ce_sums.data_ptr<Acc>());
    });
  });
  return {class_sums, ce_sums};
}

at::Tensor dice_ce_loss_backward_cpu(const at::Tensor& grad_class_sums,
                                     const at::Tensor& grad_ce_sums, const at::Tensor& logits,
                                     const at::Tensor& labels,
                                     std::optional<int64_t> ignore_index) {
  const SegLossBackwardInputs in =
      seg_loss_backward_inputs(grad_class_sums, grad_ce_sums, logits, labels, ignore_index);
  const SegLossGeometry& g = in.g;
  const at::Tensor &x = in.logits, &y = in.labels, &gs = in.grad_class_sums, &gc = in.grad_ce_sums;
  at::Tensor grad = new_output(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "dice_ce_loss_backward", [&] {
        using Acc = at::opmath_type<scalar_t>;
        with_labels(y, [&](const auto* label_ptr) {
          backward_kernel(gs.const_data_ptr<Acc>(), gc.const_data_ptr<Acc>(),
                          x.const_data_ptr<scalar_t>(), label_ptr, g, grad.data_ptr<scalar_t>());
        });
      });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(anatomask_fast, CPU, m) {
  m.impl("dice_ce_loss", &dice_ce_loss_cpu);
  m.impl("dice_ce_loss_backward", &dice_ce_loss_backward_cpu);
}

}  // namespace anatomask_fast
