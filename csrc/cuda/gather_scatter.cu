// CUDA kernels of the gather/scatter family.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>

#include "../gather_scatter.h"
#include "../mask_geometry.h"
#include "../outputs.h"

namespace anatomask_fast {
namespace {

constexpr int kThreads = 256;

// One thread per word of V bytes. The word width is chosen so that a word never
// straddles two mask cells (pd * element_size is a multiple of sizeof(V)), so
// each word is one masked 16/8/4/2/1-byte copy: dtype-agnostic and coalesced.
// Hidden words are not read at all.
template <typename V>
__global__ void apply_mask_kernel(const V* __restrict__ x, const bool* __restrict__ mask,
                                  V* __restrict__ y, int64_t n_words, int64_t words_per_cell,
                                  int64_t d, int64_t W, int64_t H, int64_t C, int64_t h, int64_t w,
                                  int64_t ph, int64_t pw) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < n_words;
       v += stride) {
    const int64_t cell = v / words_per_cell;  // index over (B, C, H, W, d)
    const int64_t k = cell % d;
    const int64_t row = cell / d;  // index over (B, C, H, W)
    const int64_t j = row % W;
    const int64_t i = (row / W) % H;
    const int64_t b = row / (W * H * C);
    if (mask[((b * h + i / ph) * w + j / pw) * d + k]) {
      y[v] = x[v];
    } else {
      y[v] = V{};
    }
  }
}

template <typename V>
void launch_apply_mask(const at::Tensor& x, const at::Tensor& mask, at::Tensor& y,
                       const MaskGeometry& g) {
  const int64_t cell_bytes = g.pd * x.element_size();
  const int64_t n_words = x.numel() * x.element_size() / static_cast<int64_t>(sizeof(V));
  const int64_t blocks64 = (n_words + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(blocks64, 1 << 20));
  apply_mask_kernel<V><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const V*>(x.const_data_ptr()), mask.const_data_ptr<bool>(),
      static_cast<V*>(y.data_ptr()), n_words, cell_bytes / static_cast<int64_t>(sizeof(V)), g.d,
      g.W, g.H, g.C, g.h, g.w, g.ph, g.pw);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool fits_word(const at::Tensor& x, const at::Tensor& y, int64_t cell_bytes, size_t width) {
  const auto aligned = [width](const void* p) {
    return reinterpret_cast<std::uintptr_t>(p) % width == 0;
  };
  return cell_bytes % static_cast<int64_t>(width) == 0 && aligned(x.const_data_ptr()) &&
         aligned(y.const_data_ptr());
}

at::Tensor apply_mask_cuda(const at::Tensor& x, const at::Tensor& active) {
  const MaskGeometry g = mask_geometry(x, active, "apply_mask");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor mc = active.contiguous();
  at::Tensor y = new_output(xc.sizes(), xc.options());
  if (xc.numel() == 0) return y;
  const int64_t cell_bytes = g.pd * xc.element_size();
  if (fits_word(xc, y, cell_bytes, 16)) {
    launch_apply_mask<uint4>(xc, mc, y, g);
  } else if (fits_word(xc, y, cell_bytes, 8)) {
    launch_apply_mask<uint2>(xc, mc, y, g);
  } else if (fits_word(xc, y, cell_bytes, 4)) {
    launch_apply_mask<uint32_t>(xc, mc, y, g);
  } else if (fits_word(xc, y, cell_bytes, 2)) {
    launch_apply_mask<uint16_t>(xc, mc, y, g);
  } else {
    launch_apply_mask<uint8_t>(xc, mc, y, g);
  }
  return y;
}

}  // namespace

namespace {

template <typename T>
using acc_t = at::opmath_type<T>;

constexpr int64_t kChunk = 4096;  // voxels of one (b, c) row per block in the reductions

// Volume geometry with S = H * W * D voxels per (b, c) row.
struct Geo {
  int64_t C, S, H, W, D, h, w, d, ph, pw, pd;
};

Geo make_geo(const MaskGeometry& g) {
  const int64_t S = g.H * g.W * g.D;
  TORCH_CHECK_VALUE(S < (int64_t{1} << 31),
                    "the CUDA kernels index one (b, c) map of at most "
                    "2^31 voxels in 32-bit arithmetic, got ",
                    g.H, " x ", g.W, " x ", g.D);
  TORCH_CHECK_VALUE(g.B * g.C <= 65535,
                    "the CUDA kernels take one grid row per (b, c) map: "
                    "at most 65535 maps, got B * C = ",
                    g.B * g.C);
  return {g.C, S, g.H, g.W, g.D, g.h, g.w, g.d, g.ph, g.pw, g.pd};
}

// The voxel `within` a (b, c) row in 32-bit arithmetic (make_geo checks S < 2^31): per
// element, 64-bit divisions cost more than the copy they guard.
__device__ __forceinline__ bool visible(const bool* mask, const Geo& g, int64_t b, int64_t within) {
  const uint32_t v = static_cast<uint32_t>(within);
  const uint32_t D = static_cast<uint32_t>(g.D), W = static_cast<uint32_t>(g.W);
  const uint32_t k = v % D, j = (v / D) % W, i = v / (D * W);
  const int64_t cell_i = i / static_cast<uint32_t>(g.ph), cell_j = j / static_cast<uint32_t>(g.pw);
  return mask[((b * g.h + cell_i) * g.w + cell_j) * g.d + k / static_cast<uint32_t>(g.pd)];
}

unsigned elementwise_blocks(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 20));
}

// Blocks (chunk, row) cover kChunk voxels of one (b, c) row each: the row's b and c
// are per block, not divisions per element.
dim3 row_chunk_blocks(const Geo& g, int64_t rows) {
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, (g.S + kChunk - 1) / kChunk)),
              static_cast<unsigned>(rows));
}

// Sum of `v` over the block (kThreads threads); every thread gets the total.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T warp_sums[kThreads / 32];
  __shared__ T total;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : T(0);
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (threadIdx.x == 0) total = v;
  }
  __syncthreads();
  const T result = total;
  __syncthreads();  // the shared slots are reused by the next call
  return result;
}

// ---- densify ----

template <typename T>
__global__ void densify_kernel(const T* __restrict__ x, const bool* __restrict__ mask,
                               const T* __restrict__ token, T* __restrict__ y, Geo g) {
  const int64_t row = blockIdx.y, b = row / g.C;
  const T fill = token[row % g.C];
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t stop = std::min<int64_t>(start + kChunk, g.S);
  for (int64_t v = start + threadIdx.x; v < stop; v += kThreads) {
    const int64_t e = row * g.S + v;
    y[e] = visible(mask, g, b, v) ? x[e] : fill;
  }
}

at::Tensor densify_cuda(const at::Tensor& x, const at::Tensor& active, const at::Tensor& token) {
  const MaskGeometry mg = mask_geometry(x, active, "densify");
  check_param(token, mg.C, x, "densify", "mask_token", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), mc = active.contiguous();
  const at::Tensor tc = token.to(x.scalar_type()).contiguous();
  at::Tensor y = new_output(xc.sizes(), xc.options());
  const int64_t n = xc.numel();
  if (n == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "densify", [&] {
    const Geo g = make_geo(mg);
    densify_kernel<scalar_t>
        <<<row_chunk_blocks(g, mg.B * mg.C), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            xc.const_data_ptr<scalar_t>(), mc.const_data_ptr<bool>(), tc.const_data_ptr<scalar_t>(),
            y.data_ptr<scalar_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// Block (chunk, row): grad_x of kChunk voxels of a (b, c) row and their hidden sum.
template <typename T>
__global__ void densify_backward_kernel(const T* __restrict__ grad, const bool* __restrict__ mask,
                                        T* __restrict__ grad_x, acc_t<T>* __restrict__ part,
                                        Geo g) {
  const int64_t row = blockIdx.y;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t stop = std::min<int64_t>(start + kChunk, g.S);
  acc_t<T> hidden = 0;
  for (int64_t v = start + threadIdx.x; v < stop; v += kThreads) {
    const int64_t e = row * g.S + v;
    const T value = grad[e];
    const bool keep = visible(mask, g, row / g.C, v);
    grad_x[e] = keep ? value : T(0);
    hidden += keep ? acc_t<T>(0) : static_cast<acc_t<T>>(value);
  }
  hidden = block_sum(hidden);
  if (threadIdx.x == 0) part[row * gridDim.x + blockIdx.x] = hidden;
}

// out[c] = sum over b and chunks of part[(b, c), chunk].
template <typename A>
__global__ void sum_rows_kernel(const A* __restrict__ part, A* __restrict__ out, int64_t B,
                                int64_t C, int64_t chunks) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  A total = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < chunks; ++k) total += part[(b * C + c) * chunks + k];
  }
  out[c] = total;
}

std::tuple<at::Tensor, at::Tensor> densify_backward_cuda(const at::Tensor& grad,
                                                         const at::Tensor& active) {
  const MaskGeometry mg = mask_geometry(grad, active, "densify_backward", "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor gc = grad.contiguous(), mc = active.contiguous();
  const Geo g = make_geo(mg);
  const int64_t chunks = std::max<int64_t>(1, (g.S + kChunk - 1) / kChunk);
  at::Tensor grad_x = new_output(gc.sizes(), gc.options());
  at::Tensor grad_token;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, gc.scalar_type(), "densify_backward", [&] {
        using A = acc_t<scalar_t>;
        const auto opts = gc.options().dtype(c10::CppTypeToScalarType<A>::value);
        at::Tensor part = at::empty({mg.B * mg.C * chunks}, opts);
        grad_token = new_output({mg.C}, opts);
        const auto stream = c10::cuda::getCurrentCUDAStream();
        if (gc.numel() > 0) {
          densify_backward_kernel<scalar_t><<<dim3(chunks, mg.B * mg.C), kThreads, 0, stream>>>(
              gc.const_data_ptr<scalar_t>(), mc.const_data_ptr<bool>(), grad_x.data_ptr<scalar_t>(),
              part.data_ptr<A>(), g);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          part.zero_();
        }
        sum_rows_kernel<A><<<(mg.C + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
            part.const_data_ptr<A>(), grad_token.data_ptr<A>(), mg.B, mg.C, chunks);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {grad_x, grad_token};
}

// ---- sparse_norm ----

int activation_code(const std::string& name, const char* op) {
  if (name == "none") return 0;
  if (name == "leaky_relu") return 1;
  if (name == "relu6") return 2;
  TORCH_CHECK_VALUE(false, op,
                    ": argument 'activation' must be one of none, leaky_relu, relu6, got ", name);
}

template <typename A>
__device__ __forceinline__ A activate(A v, int act) {
  if (act == 1) return v > A(0) ? v : v * A(0.01);
  if (act == 2) return v < A(0) ? A(0) : (v > A(6) ? A(6) : v);
  return v;
}

template <typename A>
__device__ __forceinline__ A activation_slope(A v, int act) {
  if (act == 1) return v > A(0) ? A(1) : A(0.01);
  if (act == 2) return (v > A(0) && v < A(6)) ? A(1) : A(0);
  return A(1);
}

// Per-(group, c) statistics and optional affine parameters, in the accumulation type.
template <typename A>
struct NormParams {
  const A* mean;
  const A* rstd;
  const A* weight;  // null: 1
  const A* bias;    // null: 0
  int64_t groups;
  int act;
};

// Block (chunk, row): count, mean and squared deviations of the visible voxels of
// kChunk voxels of a (b, c) row, two passes (the second from L2).
template <typename T>
__global__ void moments_kernel(const T* __restrict__ x, const bool* __restrict__ mask,
                               acc_t<T>* __restrict__ part, Geo g) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.y;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t stop = std::min<int64_t>(start + kChunk, g.S);
  A count = 0, sum = 0;
  for (int64_t v = start + threadIdx.x; v < stop; v += kThreads) {
    if (visible(mask, g, row / g.C, v)) {
      count += A(1);
      sum += static_cast<A>(x[row * g.S + v]);
    }
  }
  count = block_sum(count);
  const A mean = block_sum(sum) / (count > A(0) ? count : A(1));
  A m2 = 0;
  for (int64_t v = start + threadIdx.x; v < stop; v += kThreads) {
    if (visible(mask, g, row / g.C, v)) {
      const A t = static_cast<A>(x[row * g.S + v]) - mean;
      m2 += t * t;
    }
  }
  m2 = block_sum(m2);
  if (threadIdx.x == 0) {
    A* out = part + (row * gridDim.x + blockIdx.x) * 3;
    out[0] = count;
    out[1] = mean;
    out[2] = m2;
  }
}

// Thread (group, c): Chan's merge of the chunks of its rows (one row, or the batch's).
template <typename A>
__global__ void combine_moments_kernel(const A* __restrict__ part, A* __restrict__ mean,
                                       A* __restrict__ rstd, int64_t B, int64_t C, int64_t chunks,
                                       int64_t groups, double eps) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= groups * C) return;
  const int64_t grp = t / C, c = t % C;
  A n = 0, mu = 0, m2 = 0;
  for (int64_t b = groups > 1 ? grp : 0; b < (groups > 1 ? grp + 1 : B); ++b) {
    for (int64_t k = 0; k < chunks; ++k) {
      const A* p = part + ((b * C + c) * chunks + k) * 3;
      if (p[0] == A(0)) continue;
      const A total = n + p[0], delta = p[1] - mu;
      mu += delta * p[0] / total;
      m2 += p[2] + delta * delta * n * p[0] / total;
      n = total;
    }
  }
  mean[t] = mu;
  rstd[t] = A(1) / sqrt((n > A(0) ? m2 / n : A(0)) + static_cast<A>(eps));
}

template <typename T>
__global__ void normalize_kernel(const T* __restrict__ x, const bool* __restrict__ mask,
                                 NormParams<acc_t<T>> p, T* __restrict__ y, int64_t n, Geo g) {
  using A = acc_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    const int64_t row = e / g.S, b = row / g.C, c = row % g.C;
    if (!visible(mask, g, b, e % g.S)) {
      y[e] = T(0);
      continue;
    }
    const int64_t s = (b % p.groups) * g.C + c;
    const A xhat = (static_cast<A>(x[e]) - p.mean[s]) * p.rstd[s];
    const A pre = xhat * (p.weight ? p.weight[c] : A(1)) + (p.bias ? p.bias[c] : A(0));
    y[e] = static_cast<T>(activate(pre, p.act));
  }
}

// The affine parameter in the accumulation dtype (checked by check_affine).
template <typename A>
at::Tensor affine_param(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->to(c10::CppTypeToScalarType<A>::value).contiguous();
}

template <typename A>
const A* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<A>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_norm_cuda(
    const at::Tensor& x, const at::Tensor& active, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, bool per_sample, double eps,
    c10::string_view activation) {
  const MaskGeometry mg = mask_geometry(x, active, "sparse_norm");
  const int act = activation_code(std::string(activation), "sparse_norm");
  check_affine(weight, bias, mg, x, "sparse_norm");
  check_eps(eps, "sparse_norm");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), mc = active.contiguous();
  const Geo g = make_geo(mg);
  const int64_t groups = per_sample ? mg.B : 1;
  const int64_t chunks = std::max<int64_t>(1, (g.S + kChunk - 1) / kChunk);
  const int64_t n = xc.numel();
  at::Tensor y = new_output(xc.sizes(), xc.options());
  at::Tensor mean, rstd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "sparse_norm", [&] {
    using A = acc_t<scalar_t>;
    const auto opts = xc.options().dtype(c10::CppTypeToScalarType<A>::value);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    at::Tensor part = at::empty({mg.B * mg.C * chunks * 3}, opts);
    mean = new_output({groups, mg.C}, opts);
    rstd = new_output({groups, mg.C}, opts);
    if (n > 0) {
      moments_kernel<scalar_t><<<dim3(chunks, mg.B * mg.C), kThreads, 0, stream>>>(
          xc.const_data_ptr<scalar_t>(), mc.const_data_ptr<bool>(), part.data_ptr<A>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      part.zero_();
    }
    combine_moments_kernel<A><<<(groups * mg.C + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        part.const_data_ptr<A>(), mean.data_ptr<A>(), rstd.data_ptr<A>(), mg.B, mg.C, chunks,
        groups, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor w = affine_param<A>(weight);
    const at::Tensor b = affine_param<A>(bias);
    if (n > 0) {
      const NormParams<A> p{mean.const_data_ptr<A>(),
                            rstd.const_data_ptr<A>(),
                            data_or_null<A>(w),
                            data_or_null<A>(b),
                            groups,
                            act};
      normalize_kernel<scalar_t><<<elementwise_blocks(n), kThreads, 0, stream>>>(
          xc.const_data_ptr<scalar_t>(), mc.const_data_ptr<bool>(), p, y.data_ptr<scalar_t>(), n,
          g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {y, mean, rstd};
}

// (xhat, g') of voxel e of row (b, c): g' is the gradient before the activation.
template <typename T>
__device__ __forceinline__ void norm_grad_terms(const T* grad, const T* x,
                                                const NormParams<acc_t<T>>& p, int64_t e, int64_t s,
                                                int64_t c, acc_t<T>& xhat, acc_t<T>& gv) {
  using A = acc_t<T>;
  xhat = (static_cast<A>(x[e]) - p.mean[s]) * p.rstd[s];
  const A pre = xhat * (p.weight ? p.weight[c] : A(1)) + (p.bias ? p.bias[c] : A(0));
  gv = static_cast<A>(grad[e]) * activation_slope(pre, p.act);
}

// Block (chunk, row): count, sum of g' and of g' * xhat over visible voxels.
template <typename T>
__global__ void norm_grad_sums_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                      const bool* __restrict__ mask, NormParams<acc_t<T>> p,
                                      acc_t<T>* __restrict__ part, Geo g) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.y, b = row / g.C, c = row % g.C;
  const int64_t s = (b % p.groups) * g.C + c;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t stop = std::min<int64_t>(start + kChunk, g.S);
  A count = 0, sg = 0, sgx = 0;
  for (int64_t v = start + threadIdx.x; v < stop; v += kThreads) {
    if (!visible(mask, g, b, v)) continue;
    A xhat, gv;
    norm_grad_terms(grad, x, p, row * g.S + v, s, c, xhat, gv);
    count += A(1);
    sg += gv;
    sgx += gv * xhat;
  }
  count = block_sum(count);
  sg = block_sum(sg);
  sgx = block_sum(sgx);
  if (threadIdx.x == 0) {
    A* out = part + (row * gridDim.x + blockIdx.x) * 3;
    out[0] = count;
    out[1] = sg;
    out[2] = sgx;
  }
}

// Thread c: per group mean(g') and mean(g' * xhat) into coef (groups, C, 2), and the
// batch totals as grad bias and grad weight.
template <typename A>
__global__ void combine_grad_kernel(const A* __restrict__ part, A* __restrict__ coef,
                                    A* __restrict__ grad_w, A* __restrict__ grad_b, int64_t B,
                                    int64_t C, int64_t chunks, int64_t groups) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  A all_g = 0, all_gx = 0;
  for (int64_t grp = 0; grp < groups; ++grp) {
    A n = 0, sg = 0, sgx = 0;
    for (int64_t b = groups > 1 ? grp : 0; b < (groups > 1 ? grp + 1 : B); ++b) {
      for (int64_t k = 0; k < chunks; ++k) {
        const A* q = part + ((b * C + c) * chunks + k) * 3;
        n += q[0];
        sg += q[1];
        sgx += q[2];
      }
    }
    coef[(grp * C + c) * 2] = n > A(0) ? sg / n : A(0);
    coef[(grp * C + c) * 2 + 1] = n > A(0) ? sgx / n : A(0);
    all_g += sg;
    all_gx += sgx;
  }
  grad_b[c] = all_g;
  grad_w[c] = all_gx;
}

template <typename T>
__global__ void norm_grad_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                 const bool* __restrict__ mask, NormParams<acc_t<T>> p,
                                 const acc_t<T>* __restrict__ coef, T* __restrict__ grad_x,
                                 int64_t n, Geo g) {
  using A = acc_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    const int64_t row = e / g.S, b = row / g.C, c = row % g.C;
    if (!visible(mask, g, b, e % g.S)) {
      grad_x[e] = T(0);
      continue;
    }
    const int64_t s = (b % p.groups) * g.C + c;
    A xhat, gv;
    norm_grad_terms(grad, x, p, e, s, c, xhat, gv);
    const A scale = p.rstd[s] * (p.weight ? p.weight[c] : A(1));
    grad_x[e] = static_cast<T>(scale * (gv - coef[s * 2] - xhat * coef[s * 2 + 1]));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_norm_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& active,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& rstd, c10::string_view activation) {
  const MaskGeometry mg = mask_geometry(x, active, "sparse_norm_backward");
  const int act = activation_code(std::string(activation), "sparse_norm_backward");
  check_affine(weight, bias, mg, x, "sparse_norm_backward");
  const int64_t groups = check_norm_backward(grad, x, mean, rstd, mg, "sparse_norm_backward");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor gc = grad.contiguous(), xc = x.contiguous(), mc = active.contiguous();
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  const Geo g = make_geo(mg);
  const int64_t chunks = std::max<int64_t>(1, (g.S + kChunk - 1) / kChunk);
  const int64_t n = xc.numel();
  at::Tensor grad_x = new_output(xc.sizes(), xc.options());
  at::Tensor grad_w, grad_b;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, xc.scalar_type(), "sparse_norm_backward", [&] {
        using A = acc_t<scalar_t>;
        const auto opts = xc.options().dtype(c10::CppTypeToScalarType<A>::value);
        const auto stream = c10::cuda::getCurrentCUDAStream();
        const at::Tensor w = affine_param<A>(weight);
        const at::Tensor b = affine_param<A>(bias);
        const NormParams<A> p{mean_c.const_data_ptr<A>(),
                              rstd_c.const_data_ptr<A>(),
                              data_or_null<A>(w),
                              data_or_null<A>(b),
                              groups,
                              act};
        at::Tensor part = at::empty({mg.B * mg.C * chunks * 3}, opts);
        at::Tensor coef = at::empty({groups * mg.C * 2}, opts);
        grad_w = new_output({mg.C}, opts);
        grad_b = new_output({mg.C}, opts);
        if (n > 0) {
          norm_grad_sums_kernel<scalar_t><<<dim3(chunks, mg.B * mg.C), kThreads, 0, stream>>>(
              gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
              mc.const_data_ptr<bool>(), p, part.data_ptr<A>(), g);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          part.zero_();
        }
        combine_grad_kernel<A><<<(mg.C + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
            part.const_data_ptr<A>(), coef.data_ptr<A>(), grad_w.data_ptr<A>(),
            grad_b.data_ptr<A>(), mg.B, mg.C, chunks, groups);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (n > 0) {
          norm_grad_kernel<scalar_t><<<elementwise_blocks(n), kThreads, 0, stream>>>(
              gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
              mc.const_data_ptr<bool>(), p, coef.const_data_ptr<A>(), grad_x.data_ptr<scalar_t>(),
              n, g);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  return {grad_x, grad_w, grad_b};
}

// ---- token layout ----
// Ids are not checked on the host (that would synchronize): kernels assert on the
// device (CUDA_KERNEL_ASSERT) that each id is in range.

// Block (row r = b * n_idx + i, channel block): out[r] = src[b, idx[r]] if
// 0 <= idx < n_src, else fill (or zeros; only where `allow_missing`), plus pos[i].
template <typename T>
__global__ void gather_rows_kernel(const T* __restrict__ src, const int64_t* __restrict__ idx,
                                   const T* __restrict__ fill, const acc_t<T>* __restrict__ pos,
                                   T* __restrict__ out, int64_t n_src, int64_t n_idx, int64_t C,
                                   bool allow_missing) {
  const int64_t r = blockIdx.x;
  const int64_t id = idx[r];
  const bool valid = id >= 0 && id < n_src;
  CUDA_KERNEL_ASSERT(valid || allow_missing);
  const T* s = valid ? src + ((r / n_idx) * n_src + id) * C : fill;
  for (int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const T value = s != nullptr ? s[c] : T(0);
    out[r * C + c] = pos != nullptr
                         ? static_cast<T>(static_cast<acc_t<T>>(value) + pos[(r % n_idx) * C + c])
                         : value;
  }
}

at::Tensor gather_rows(const at::Tensor& src, const at::Tensor& idx, const at::Tensor& fill,
                       const at::Tensor& pos, bool allow_missing) {
  const int64_t B = src.size(0), n_src = src.size(1), C = src.size(2), n_idx = idx.size(1);
  at::Tensor out = new_output({B, n_idx, C}, src.options());
  if (out.numel() == 0) return out;
  const dim3 grid(static_cast<unsigned>(B * n_idx),
                  static_cast<unsigned>(std::min<int64_t>((C + kThreads - 1) / kThreads, 65535)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "gather_rows", [&] {
    gather_rows_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        src.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
        fill.defined() ? fill.const_data_ptr<scalar_t>() : nullptr,
        pos.defined() ? pos.const_data_ptr<acc_t<scalar_t>>() : nullptr, out.data_ptr<scalar_t>(),
        n_src, n_idx, C, allow_missing);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& ids_keep) {
  check_token_ids(ids_keep, x, "gather_tokens", "ids_keep", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return gather_rows(x.contiguous(), ids_keep.contiguous(), at::Tensor(), at::Tensor(), false);
}

// source[b, ids[b, k]] = k: which kept row lands in each of the L slots (-1: none).
__global__ void invert_ids_kernel(const int64_t* __restrict__ ids, int64_t* __restrict__ source,
                                  int64_t K, int64_t L, int64_t n) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n) return;
  const int64_t id = ids[r];
  CUDA_KERNEL_ASSERT(id >= 0 && id < L);
  source[(r / K) * L + id] = r % K;
}

at::Tensor gather_tokens_backward_cuda(const at::Tensor& grad, const at::Tensor& ids_keep,
                                       int64_t length) {
  check_token_ids(ids_keep, grad, "gather_tokens_backward", "ids_keep", "grad",
                  grad.dim() == 3 ? grad.size(1) : -1);
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor ic = ids_keep.contiguous();
  const int64_t B = ic.size(0), K = ic.size(1);
  check_length(length, K, std::numeric_limits<int64_t>::max(), "gather_tokens_backward", "length");
  at::Tensor source = at::full({B, length}, -1, ic.options());
  if (ic.numel() > 0) {
    invert_ids_kernel<<<(ic.numel() + kThreads - 1) / kThreads, kThreads, 0,
                        c10::cuda::getCurrentCUDAStream()>>>(
        ic.const_data_ptr<int64_t>(), source.data_ptr<int64_t>(), K, length, ic.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return gather_rows(grad.contiguous(), source, at::Tensor(), at::Tensor(), true);
}

at::Tensor scatter_tokens_cuda(const at::Tensor& x_visible, const at::Tensor& ids_restore,
                               const at::Tensor& mask_token,
                               const c10::optional<at::Tensor>& pos_embed) {
  const char* op = "scatter_tokens";
  check_token_ids(ids_restore, x_visible, op, "ids_restore", "x_visible");
  const int64_t K = x_visible.size(1), C = x_visible.size(2), L = ids_restore.size(1);
  TORCH_CHECK_VALUE(K <= L, op, ": argument 'x_visible' has ", K, " tokens, more than the L=", L,
                    " slots of 'ids_restore'");
  check_param(mask_token, C, x_visible, op, "mask_token", "x_visible");
  const bool with_pos = pos_embed.has_value() && pos_embed->defined();
  if (with_pos) check_param(*pos_embed, L * C, x_visible, op, "pos_embed", "x_visible");
  const c10::cuda::CUDAGuard guard(x_visible.device());
  const auto acc = x_visible.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Tokens past len_keep (ids >= K, < L) take the mask token; ids >= L assert.
  const at::Tensor ic = ids_restore.contiguous();
  return gather_rows(
      x_visible.contiguous(), ic, mask_token.to(x_visible.scalar_type()).contiguous(),
      with_pos ? pos_embed->to(x_visible.scalar_type()).to(acc).contiguous() : at::Tensor(), true);
}

// Block (slot l, channel block): sends grad[b, l] to grad_x[b, ids[b, l]] when visible,
// else into the mask token's partial for l; sums over b into grad_pos[l]. One pass.
template <typename T>
__global__ void scatter_tokens_backward_kernel(const T* __restrict__ grad,
                                               const int64_t* __restrict__ ids,
                                               T* __restrict__ grad_x,
                                               acc_t<T>* __restrict__ token_part,
                                               acc_t<T>* __restrict__ grad_pos, int64_t B,
                                               int64_t L, int64_t K, int64_t C) {
  using A = acc_t<T>;
  const int64_t l = blockIdx.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    A token = 0, pos = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t id = ids[b * L + l];
      CUDA_KERNEL_ASSERT(id >= 0 && id < L);
      const T g = grad[(b * L + l) * C + c];
      if (id < K) {
        grad_x[(b * K + id) * C + c] = g;
      } else {
        token += static_cast<A>(g);
      }
      pos += static_cast<A>(g);
    }
    token_part[l * C + c] = token;
    if (grad_pos != nullptr) grad_pos[l * C + c] = pos;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scatter_tokens_backward_cuda(
    const at::Tensor& grad, const at::Tensor& ids_restore, int64_t len_keep, bool with_pos) {
  const char* op = "scatter_tokens_backward";
  check_token_ids(ids_restore, grad, op, "ids_restore", "grad",
                  grad.dim() == 3 ? grad.size(1) : -1);
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor gc = grad.contiguous(), ic = ids_restore.contiguous();
  const int64_t B = gc.size(0), L = gc.size(1), C = gc.size(2), K = len_keep;
  check_length(len_keep, 0, L, op, "len_keep");
  at::Tensor grad_x = new_output({B, K, C}, gc.options());
  at::Tensor grad_token, grad_pos;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, gc.scalar_type(), "scatter_tokens_backward", [&] {
        using A = acc_t<scalar_t>;
        const auto opts = gc.options().dtype(c10::CppTypeToScalarType<A>::value);
        const auto stream = c10::cuda::getCurrentCUDAStream();
        at::Tensor token_part = at::empty({L * C}, opts);
        grad_token = new_output({C}, opts);
        grad_pos = new_output({with_pos ? L : 0, C}, opts);
        if (L * C > 0) {
          const dim3 grid(static_cast<unsigned>(L), static_cast<unsigned>(std::min<int64_t>(
                                                        (C + kThreads - 1) / kThreads, 65535)));
          scatter_tokens_backward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
              gc.const_data_ptr<scalar_t>(), ic.const_data_ptr<int64_t>(),
              grad_x.data_ptr<scalar_t>(), token_part.data_ptr<A>(),
              with_pos ? grad_pos.data_ptr<A>() : nullptr, B, L, K, C);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          token_part.zero_();
        }
        // The token's gradient: the (L, C) partials summed over L (as L rows of one chunk).
        sum_rows_kernel<A><<<(C + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
            token_part.const_data_ptr<A>(), grad_token.data_ptr<A>(), L, C, 1);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {grad_x, grad_token, grad_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(anatomask_fast, CUDA, m) {
  m.impl("apply_mask", &apply_mask_cuda);
  m.impl("densify", &densify_cuda);
  m.impl("densify_backward", &densify_backward_cuda);
  m.impl("sparse_norm", &sparse_norm_cuda);
  m.impl("sparse_norm_backward", &sparse_norm_backward_cuda);
  m.impl("gather_tokens", &gather_tokens_cuda);
  m.impl("gather_tokens_backward", &gather_tokens_backward_cuda);
  m.impl("scatter_tokens", &scatter_tokens_cuda);
  m.impl("scatter_tokens_backward", &scatter_tokens_backward_cuda);
}

}  // namespace anatomask_fast
