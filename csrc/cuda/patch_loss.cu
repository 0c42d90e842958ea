// CUDA kernels of the patch-loss family: one thread block per (sample, patch),
// reading the patch straight from the dense (B, C, H, W, D) volumes in packs of V
// values (16 bytes where the patch rows allow it). The forward makes one pass over
// the target for its moments (Welford, merged across the block) and one over target
// and prediction for the error; the second read of the target comes from cache.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../mask_geometry.h"
#include "../outputs.h"

namespace anatomask_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

struct PatchGeometry {
  int64_t L, C, H, W, D, w, d;
  int32_t ph, pw, pd;
  int32_t units;  // packs per patch, N / V
  int32_t n;      // values per patch, N
};

// Offset of pack u (channel-major within the patch) of patch `patch` = b*L + l.
template <int V>
__device__ __forceinline__ int64_t pack_offset(const PatchGeometry& g, int64_t patch, int32_t u) {
  const int64_t b = patch / g.L, l = patch % g.L;
  const int64_t k = l % g.d, j = (l / g.d) % g.w, i = l / (g.d * g.w);
  const int32_t per_row = g.pd / V;
  const int32_t row = u / per_row, e = (u - row * per_row) * V;
  const int32_t z = row % g.pw, rest = row / g.pw;
  const int32_t y = rest % g.ph, c = rest / g.ph;
  return (((b * g.C + c) * g.H + i * g.ph + y) * g.W + j * g.pw + z) * g.D + k * g.pd + e;
}

template <typename acc_t>
struct Moments {
  acc_t n, mean, m2;
};

template <typename acc_t>
__device__ __forceinline__ Moments<acc_t> combine(const Moments<acc_t>& a,
                                                  const Moments<acc_t>& b) {
  const acc_t n = a.n + b.n;
  if (n == acc_t(0)) return a;
  const acc_t delta = b.mean - a.mean, wb = b.n / n;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

template <typename acc_t>
__device__ __forceinline__ acc_t combine(acc_t a, acc_t b) {
  return a + b;
}

template <typename acc_t>
__device__ __forceinline__ acc_t shuffle_down(acc_t v, int offset) {
  return __shfl_down_sync(0xffffffffu, v, offset);
}

template <typename acc_t>
__device__ __forceinline__ Moments<acc_t> shuffle_down(const Moments<acc_t>& v, int offset) {
  return {shuffle_down(v.n, offset), shuffle_down(v.mean, offset), shuffle_down(v.m2, offset)};
}

// The block's combined value, returned to every thread.
template <typename T>
__device__ T block_reduce(T value) {
  __shared__ T partial[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2)
    value = combine(value, shuffle_down(value, offset));
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = partial[lane < kWarps ? lane : 0];
    for (int offset = kWarps / 2; offset > 0; offset /= 2) {
      const T other = shuffle_down(value, offset);
      if (lane + offset < kWarps) value = combine(value, other);
    }
    if (lane == 0) partial[0] = value;
  }
  __syncthreads();
  const T result = partial[0];
  __syncthreads();  // partial is reused by the next reduction
  return result;
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
    patch_loss_forward_kernel(const scalar_t* __restrict__ rec, const scalar_t* __restrict__ x,
                              const bool* __restrict__ active, acc_t* __restrict__ per_patch,
                              acc_t* __restrict__ mean_out, acc_t* __restrict__ rstd_out,
                              PatchGeometry g, bool norm_pix, acc_t eps, bool hidden_only) {
  using P = Pack<scalar_t, V>;
  const int64_t patch = blockIdx.x;
  const bool visible = active[patch];
  if (hidden_only && visible) {  // uniform per block: the patch is not read
    if (threadIdx.x == 0) per_patch[patch] = mean_out[patch] = rstd_out[patch] = acc_t(0);
    return;
  }
  acc_t mean = 0, scale = 1;
  if (norm_pix) {
    Moments<acc_t> m{0, 0, 0};
    for (int32_t u = threadIdx.x; u < g.units; u += kThreads) {
      const P t = *reinterpret_cast<const P*>(x + pack_offset<V>(g, patch, u));
#pragma unroll
      for (int q = 0; q < V; ++q) {
        const acc_t v = static_cast<acc_t>(t.v[q]);
        m.n += acc_t(1);
        const acc_t delta = v - m.mean;
        m.mean += delta / m.n;
        m.m2 += delta * (v - m.mean);
      }
    }
    m = block_reduce(m);
    mean = m.mean;
    scale = acc_t(1) / sqrt(m.m2 / acc_t(g.n - 1) + eps);
  }
  acc_t err = 0;
  for (int32_t u = threadIdx.x; u < g.units; u += kThreads) {
    const int64_t offset = pack_offset<V>(g, patch, u);
    const P t = *reinterpret_cast<const P*>(x + offset);
    const P r = *reinterpret_cast<const P*>(rec + offset);
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const acc_t diff = static_cast<acc_t>(r.v[q]) - (static_cast<acc_t>(t.v[q]) - mean) * scale;
      err += diff * diff;
    }
  }
  err = block_reduce(err);
  if (threadIdx.x == 0) {
    // `e * hidden` as a product, like the reference: NaN in a visible patch shows.
    per_patch[patch] = err / acc_t(g.n) * acc_t(visible ? 0 : 1);
    mean_out[patch] = mean;
    rstd_out[patch] = scale;
  }
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
    patch_loss_backward_kernel(const acc_t* __restrict__ grad_per_patch,
                               const scalar_t* __restrict__ rec, const scalar_t* __restrict__ x,
                               const bool* __restrict__ active, const acc_t* __restrict__ mean_in,
                               const acc_t* __restrict__ rstd_in, scalar_t* __restrict__ grad_rec,
                               PatchGeometry g, bool hidden_only) {
  using P = Pack<scalar_t, V>;
  const int64_t patch = blockIdx.x;
  const bool visible = active[patch];
  if (hidden_only && visible) {
    P zero;
#pragma unroll
    for (int q = 0; q < V; ++q) zero.v[q] = scalar_t(0);
    for (int32_t u = threadIdx.x; u < g.units; u += kThreads) {
      *reinterpret_cast<P*>(grad_rec + pack_offset<V>(g, patch, u)) = zero;
    }
    return;
  }
  // d(e * hidden)/dr = hidden * 2/N * (r - t').
  const acc_t coef = grad_per_patch[patch] * acc_t(visible ? 0 : 1) * acc_t(2) / acc_t(g.n);
  const acc_t mean = mean_in[patch], scale = rstd_in[patch];
  for (int32_t u = threadIdx.x; u < g.units; u += kThreads) {
    const int64_t offset = pack_offset<V>(g, patch, u);
    const P t = *reinterpret_cast<const P*>(x + offset);
    const P r = *reinterpret_cast<const P*>(rec + offset);
    P out;
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const acc_t target = (static_cast<acc_t>(t.v[q]) - mean) * scale;
      out.v[q] = static_cast<scalar_t>(coef * (static_cast<acc_t>(r.v[q]) - target));
    }
    *reinterpret_cast<P*>(grad_rec + offset) = out;
  }
}

// The widest pack (at most 16 bytes) that divides the patch rows and fits the
// pointers' alignment.
template <typename scalar_t>
int pack_width(const MaskGeometry& g, std::initializer_list<const void*> pointers) {
  for (int v = 16 / static_cast<int>(sizeof(scalar_t)); v > 1; v /= 2) {
    bool fits = g.pd % v == 0;
    for (const void* p : pointers) {
      fits = fits && reinterpret_cast<std::uintptr_t>(p) % (v * sizeof(scalar_t)) == 0;
    }
    if (fits) return v;
  }
  return 1;
}

PatchGeometry patch_geometry(const MaskGeometry& g, int v) {
  const int64_t n = g.C * g.ph * g.pw * g.pd;
  TORCH_CHECK(n < (int64_t{1} << 31), "patch_recon_loss: a patch of ", n,
              " values exceeds the CUDA kernel's 2^31 limit");
  return PatchGeometry{g.h * g.w * g.d,
                       g.C,
                       g.H,
                       g.W,
                       g.D,
                       g.w,
                       g.d,
                       static_cast<int32_t>(g.ph),
                       static_cast<int32_t>(g.pw),
                       static_cast<int32_t>(g.pd),
                       static_cast<int32_t>(n / v),
                       static_cast<int32_t>(n)};
}

template <typename Launch>
void with_pack_width(int v, const Launch& launch) {
  switch (v) {
    case 8:
      return launch(std::integral_constant<int, 8>{});
    case 4:
      return launch(std::integral_constant<int, 4>{});
    case 2:
      return launch(std::integral_constant<int, 2>{});
    default:
      return launch(std::integral_constant<int, 1>{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_recon_loss_cuda(const at::Tensor& rec,
                                                                     const at::Tensor& x,
                                                                     const at::Tensor& active,
                                                                     bool norm_pix, double eps,
                                                                     bool hidden_only) {
  const MaskGeometry g = patch_loss_geometry(rec, x, active, "patch_recon_loss");
  check_eps(eps, "patch_recon_loss");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rc = rec.contiguous(), xc = x.contiguous(), mc = active.contiguous();
  const auto stats_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t L = g.h * g.w * g.d;
  const auto options = x.options().dtype(stats_type);
  at::Tensor per_patch = new_output({g.B, L}, options);
  at::Tensor mean = new_output({g.B, L}, options);
  at::Tensor rstd = new_output({g.B, L}, options);
  if (per_patch.numel() == 0 || xc.numel() == 0) return {per_patch, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, xc.scalar_type(), "patch_recon_loss_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const int v = pack_width<scalar_t>(g, {rc.const_data_ptr(), xc.const_data_ptr()});
        const PatchGeometry pg = patch_geometry(g, v);
        with_pack_width(v, [&](auto width) {
          patch_loss_forward_kernel<scalar_t, acc_t, decltype(width)::value>
              <<<static_cast<unsigned>(g.B * L), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                  rc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
                  mc.const_data_ptr<bool>(), per_patch.data_ptr<acc_t>(), mean.data_ptr<acc_t>(),
                  rstd.data_ptr<acc_t>(), pg, norm_pix, static_cast<acc_t>(eps), hidden_only);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return {per_patch, mean, rstd};
}

at::Tensor patch_recon_loss_backward_cuda(const at::Tensor& grad_per_patch, const at::Tensor& rec,
                                          const at::Tensor& x, const at::Tensor& active,
                                          const at::Tensor& mean, const at::Tensor& rstd,
                                          bool hidden_only) {
  const MaskGeometry g = patch_loss_geometry(rec, x, active, "patch_recon_loss_backward");
  check_patch_tables(g, x, grad_per_patch, mean, rstd, "patch_recon_loss_backward");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rc = rec.contiguous(), xc = x.contiguous(), mc = active.contiguous();
  const at::Tensor gc = grad_per_patch.contiguous(), mu = mean.contiguous(), rs = rstd.contiguous();
  at::Tensor grad_rec = new_output(rc.sizes(), rc.options());
  if (grad_rec.numel() == 0) return grad_rec;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, xc.scalar_type(), "patch_recon_loss_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const int v = pack_width<scalar_t>(
            g, {rc.const_data_ptr(), xc.const_data_ptr(), grad_rec.const_data_ptr()});
        const PatchGeometry pg = patch_geometry(g, v);
        with_pack_width(v, [&](auto width) {
          patch_loss_backward_kernel<scalar_t, acc_t, decltype(width)::value>
              <<<static_cast<unsigned>(mc.numel()), kThreads, 0,
                 c10::cuda::getCurrentCUDAStream()>>>(
                  gc.const_data_ptr<acc_t>(), rc.const_data_ptr<scalar_t>(),
                  xc.const_data_ptr<scalar_t>(), mc.const_data_ptr<bool>(),
                  mu.const_data_ptr<acc_t>(), rs.const_data_ptr<acc_t>(),
                  grad_rec.data_ptr<scalar_t>(), pg, hidden_only);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return grad_rec;
}

}  // namespace

TORCH_LIBRARY_IMPL(anatomask_fast, CUDA, m) {
  m.impl("patch_recon_loss", &patch_recon_loss_cuda);
  m.impl("patch_recon_loss_backward", &patch_recon_loss_backward_cuda);
}

}  // namespace anatomask_fast
