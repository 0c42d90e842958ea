// CUDA kernels of the segmentation loss family. Logits (B, K, S): for every class,
// consecutive threads read consecutive voxels (coalesced). The softmax of a voxel
// lives in registers (online max/sum over the classes, then a second sweep that hits
// L1/L2); no softmax or one-hot tensor is written.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../outputs.h"
#include "../seg_loss.h"

namespace anatomask_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kVoxelsPerThread = 4;  // per tile; amortizes the per-class warp sums
constexpr int kTile = kThreads * kVoxelsPerThread;

__device__ __forceinline__ float exp_acc(float x) {
  return expf(x);
}
__device__ __forceinline__ double exp_acc(double x) {
  return exp(x);
}
__device__ __forceinline__ float log_acc(float x) {
  return logf(x);
}
__device__ __forceinline__ double log_acc(double x) {
  return log(x);
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc value) {
  for (int offset = 16; offset > 0; offset >>= 1)
    value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

// Label of voxel v: its class, or -1 when ignored or outside [0, K) (then *bad).
template <typename L>
__device__ __forceinline__ int64_t read_label(const L* labels, int64_t v, int64_t K,
                                              bool has_ignore, int64_t ignore, bool* bad) {
  const int64_t label = static_cast<int64_t>(labels[v]);
  const bool ignored = has_ignore && label == ignore;
  const bool in_range = label >= 0 && label < K;
  *bad = *bad || (!in_range && !ignored);
  return in_range && !ignored ? label : -1;
}

// Online softmax statistics of voxel v over the K classes: max m, sum of exp(x - m),
// and the logit at class y.
template <typename T, typename Acc>
__device__ __forceinline__ void softmax_stats(const T* x, int64_t S, int64_t K, int64_t y, Acc* m,
                                              Acc* s, Acc* x_label) {
  Acc mx = static_cast<Acc>(x[0]), sum = 1, xl = y == 0 ? mx : Acc(0);
  for (int64_t k = 1; k < K; ++k) {
    const Acc value = static_cast<Acc>(x[k * S]);
    xl = k == y ? value : xl;
    if (value > mx) {
      sum = sum * exp_acc(mx - value) + Acc(1);
      mx = value;
    } else {
      sum += exp_acc(value - mx);
    }
  }
  *m = mx;
  *s = sum;
  *x_label = xl;
}

// Grid (blocks per sample, B); each block sweeps tiles of kTile voxels of sample b and
// writes one row of partial sums: [intersect K, sum_pred K, sum_gt K] and the CE sum.
template <typename T, typename L, typename Acc>
__global__ void dice_ce_forward_kernel(const T* __restrict logits, const L* __restrict labels,
                                       Acc* __restrict class_part, Acc* __restrict ce_part,
                                       int64_t S, int64_t K, bool has_ignore, int64_t ignore) {
  extern __shared__ unsigned char shared_raw[];
  Acc* shared = reinterpret_cast<Acc*>(shared_raw);  // 3K class sums, then the CE sum
  const int64_t b = blockIdx.y;
  for (int64_t i = threadIdx.x; i < 3 * K + 1; i += blockDim.x) shared[i] = 0;
  __syncthreads();
  const T* x = logits + b * K * S;
  const L* lab = labels + b * S;
  Acc ce = 0;
  bool bad = false;
  const int64_t tiles = (S + kTile - 1) / kTile;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    Acc m[kVoxelsPerThread], inv[kVoxelsPerThread];
    int64_t y[kVoxelsPerThread], v[kVoxelsPerThread];
#pragma unroll
    for (int j = 0; j < kVoxelsPerThread; ++j) {
      v[j] = tile * kTile + j * kThreads + threadIdx.x;
      y[j] = -1;
      m[j] = 0;
      inv[j] = 0;  // voxels outside the volume or not counted contribute nothing
      if (v[j] >= S) continue;
      y[j] = read_label(lab, v[j], K, has_ignore, ignore, &bad);
      if (y[j] < 0) continue;
      Acc s, x_label;
      softmax_stats(x + v[j], S, K, y[j], &m[j], &s, &x_label);
      inv[j] = Acc(1) / s;
      ce += m[j] + log_acc(s) - x_label;
    }
    // Per class: each thread's voxels, then the warp (shuffles; labels by ballot), then
    // the block (shared atomics, one per warp and class: no same-address storms).
    for (int64_t k = 0; k < K; ++k) {
      Acc pred = 0, inter = 0;
      int count = 0;
#pragma unroll
      for (int j = 0; j < kVoxelsPerThread; ++j) {
        const Acc p =
            y[j] >= 0 ? exp_acc(static_cast<Acc>(x[k * S + v[j]]) - m[j]) * inv[j] : Acc(0);
        pred += p;
        inter += y[j] == k ? p : Acc(0);
        count += __popc(__ballot_sync(0xffffffffu, y[j] == k));
      }
      pred = warp_sum(pred);
      inter = warp_sum(inter);
      if ((threadIdx.x & 31) == 0) {
        atomicAdd(&shared[k], inter);
        atomicAdd(&shared[K + k], pred);
        atomicAdd(&shared[2 * K + k], static_cast<Acc>(count));
      }
    }
  }
  ce = warp_sum(ce);
  if ((threadIdx.x & 31) == 0) atomicAdd(&shared[3 * K], ce);
  // Invalid labels cannot raise on the device: they turn the sample's CE into NaN.
  const bool any_bad = __syncthreads_or(bad);
  Acc* row = class_part + (b * gridDim.x + blockIdx.x) * 3 * K;
  for (int64_t i = threadIdx.x; i < 3 * K; i += blockDim.x) row[i] = shared[i];
  if (threadIdx.x == 0) {
    ce_part[b * gridDim.x + blockIdx.x] = any_bad ? Acc(NAN) : shared[3 * K];
  }
}

// One thread per voxel: d loss / d p_k = g_pred[k] + [k = y] g_inter[k], through the
// softmax Jacobian, plus g_ce (p - onehot).
template <typename T, typename L, typename Acc>
__global__ void dice_ce_backward_kernel(const Acc* __restrict grad_sums,
                                        const Acc* __restrict grad_ce, const T* __restrict logits,
                                        const L* __restrict labels, T* __restrict grad, int64_t S,
                                        int64_t K, bool has_ignore, int64_t ignore) {
  extern __shared__ unsigned char shared_raw[];
  Acc* g_inter = reinterpret_cast<Acc*>(shared_raw);  // then g_pred
  const int64_t b = blockIdx.y;
  for (int64_t i = threadIdx.x; i < 2 * K; i += blockDim.x) g_inter[i] = grad_sums[b * 3 * K + i];
  __syncthreads();
  const Acc* g_pred = g_inter + K;
  const Acc g_ce = grad_ce[b];
  const int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= S) return;
  bool bad = false;
  const int64_t y = read_label(labels + b * S, v, K, has_ignore, ignore, &bad);
  const T* x = logits + b * K * S + v;
  T* out = grad + b * K * S + v;
  if (y < 0) {
    for (int64_t k = 0; k < K; ++k) out[k * S] = static_cast<T>(Acc(0));
    return;
  }
  Acc m, s, x_label;
  softmax_stats(x, S, K, y, &m, &s, &x_label);
  const Acc inv = Acc(1) / s;
  Acc dot = exp_acc(x_label - m) * inv * g_inter[y];
  for (int64_t k = 0; k < K; ++k) dot += exp_acc(static_cast<Acc>(x[k * S]) - m) * inv * g_pred[k];
  for (int64_t k = 0; k < K; ++k) {
    const Acc p = exp_acc(static_cast<Acc>(x[k * S]) - m) * inv;
    Acc value = p * (g_pred[k] + g_ce - dot);
    if (k == y) value += p * g_inter[k] - g_ce;
    out[k * S] = static_cast<T>(value);
  }
}

int multiprocessors(const at::Tensor& x) {
  int count = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, x.device().index()));
  return count;
}

std::tuple<at::Tensor, at::Tensor> dice_ce_loss_cuda(const at::Tensor& logits,
                                                     const at::Tensor& labels,
                                                     std::optional<int64_t> ignore_index) {
  const SegLossGeometry g = seg_loss_geometry(logits, labels, ignore_index, "dice_ce_loss");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const at::Tensor y = labels.contiguous();
  const int64_t tiles = std::max<int64_t>(1, (g.S + kTile - 1) / kTile);
  const int64_t per_sample = std::min<int64_t>(
      tiles, std::max<int64_t>(1, 4 * multiprocessors(x) / std::max<int64_t>(1, g.B)));
  const auto options = x.options().dtype(sums_dtype(x));
  at::Tensor class_part = new_output({g.B, per_sample, 3, g.K}, options);
  at::Tensor ce_part = new_output({g.B, per_sample}, options);
  if (g.B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dice_ce_loss", [&] {
      using Acc = at::opmath_type<scalar_t>;
      with_labels(y, [&](const auto* label_ptr) {
        using L = std::remove_cv_t<std::remove_pointer_t<decltype(label_ptr)>>;
        const dim3 grid(static_cast<unsigned>(per_sample), static_cast<unsigned>(g.B));
        dice_ce_forward_kernel<scalar_t, L, Acc>
            <<<grid, kThreads, (3 * g.K + 1) * sizeof(Acc), c10::cuda::getCurrentCUDAStream()>>>(
                x.const_data_ptr<scalar_t>(), label_ptr, class_part.data_ptr<Acc>(),
                ce_part.data_ptr<Acc>(), g.S, g.K, g.has_ignore, g.ignore);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  // Deterministic: fixed partials reduced by torch, no float atomics across blocks.
  return {at::sum(class_part, {1}), at::sum(ce_part, {1})};
}

at::Tensor dice_ce_loss_backward_cuda(const at::Tensor& grad_class_sums,
                                      const at::Tensor& grad_ce_sums, const at::Tensor& logits,
                                      const at::Tensor& labels,
                                      std::optional<int64_t> ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const SegLossBackwardInputs in =
      seg_loss_backward_inputs(grad_class_sums, grad_ce_sums, logits, labels, ignore_index);
  const SegLossGeometry& g = in.g;
  const at::Tensor &x = in.logits, &y = in.labels, &gs = in.grad_class_sums, &gc = in.grad_ce_sums;
  at::Tensor grad = new_output(x.sizes(), x.options());
  if (x.numel() == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "dice_ce_loss_backward", [&] {
        using Acc = at::opmath_type<scalar_t>;
        with_labels(y, [&](const auto* label_ptr) {
          using L = std::remove_cv_t<std::remove_pointer_t<decltype(label_ptr)>>;
          const dim3 grid(static_cast<unsigned>((g.S + kThreads - 1) / kThreads),
                          static_cast<unsigned>(g.B));
          dice_ce_backward_kernel<scalar_t, L, Acc>
              <<<grid, kThreads, 2 * g.K * sizeof(Acc), c10::cuda::getCurrentCUDAStream()>>>(
                  gs.const_data_ptr<Acc>(), gc.const_data_ptr<Acc>(), x.const_data_ptr<scalar_t>(),
                  label_ptr, grad.data_ptr<scalar_t>(), g.S, g.K, g.has_ignore, g.ignore);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(anatomask_fast, CUDA, m) {
  m.impl("dice_ce_loss", &dice_ce_loss_cuda);
  m.impl("dice_ce_loss_backward", &dice_ce_loss_backward_cuda);
}

}  // namespace anatomask_fast
