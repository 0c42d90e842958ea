// CUDA kernel of the mask_select family: one launch for the batch, one thread block
// per sample, the sample's keys and classes in shared memory. Each selection is a
// radix select on 8-bit digits (a shared-memory histogram per digit, usually two or
// three digits before the threshold's bucket holds exactly what is missing), ties at
// the threshold resolved by a block-wide scan in index order. No host
// synchronization; the random keys are the Philox stream of csrc/mask_select.h.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../mask_select.h"

namespace anatomask_fast {
namespace {

using namespace mask_select;

constexpr int kThreads = 512;
constexpr int kBins = 256;

struct Shared {
  uint32_t hist[kBins];
  int sums[32];
  int digit, below, count;
};

// Inclusive scan of one int per thread over the block; `total` gets the block's sum.
__device__ int block_scan(int value, Shared& sh, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, value, o);
    if (lane >= o) value += n;
  }
  __syncthreads();  // the previous scan's readers of sh.sums are done
  if (lane == 31) sh.sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    int s = lane < warps ? sh.sums[lane] : 0;
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += n;
    }
    sh.sums[lane] = s;
  }
  __syncthreads();
  if (warp > 0) value += sh.sums[warp - 1];
  total = sh.sums[warps - 1];
  return value;
}

// Marks with `mark` the k smallest keys among patches still kKept, ties by lower
// index. Thread t owns patches t, t + blockDim, ...: only it reads or writes their
// key and class, so the marking needs no barrier.
__device__ void select_smallest(const uint32_t* key, uint8_t* cls, int L, int k, uint8_t mark,
                                Shared& sh) {
  if (k == 0) return;
  uint32_t prefix = 0;
  int need = k, shift = 24;
  for (; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) sh.hist[i] = 0;
    __syncthreads();
    const uint32_t high = shift == 24 ? 0u : (0xFFFFFFFFu << (shift + 8));
    for (int l = threadIdx.x; l < L; l += blockDim.x) {
      if (cls[l] == kKept && (key[l] & high) == prefix) {
        atomicAdd(&sh.hist[(key[l] >> shift) & 0xFFu], 1u);
      }
    }
    __syncthreads();
    const int count = threadIdx.x < kBins ? static_cast<int>(sh.hist[threadIdx.x]) : 0;
    int total;
    const int inclusive = block_scan(count, sh, total);
    if (threadIdx.x < kBins && inclusive - count < need && need <= inclusive) {
      sh.digit = threadIdx.x;
      sh.below = inclusive - count;
      sh.count = count;
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(sh.digit) << shift;
    need -= sh.below;
    if (sh.count == need) break;  // the whole bucket is taken
  }
  if (shift >= 0) {
    for (int l = threadIdx.x; l < L; l += blockDim.x) {
      if (cls[l] == kKept && (key[l] >> shift) <= (prefix >> shift)) cls[l] = mark;
    }
    return;
  }
  // `prefix` is the k-th smallest key and `need` of its copies are taken: the first
  // ones in index order.
  int taken_before = 0;
  for (int base = 0; base < L; base += blockDim.x) {
    const int l = base + threadIdx.x;
    const bool eligible = l < L && cls[l] == kKept;
    const bool equal = eligible && key[l] == prefix;
    int total;
    const int rank = taken_before + block_scan(equal, sh, total);
    if (eligible && (key[l] < prefix || (equal && rank <= need))) cls[l] = mark;
    taken_before += total;
  }
}

template <typename scalar_t>
__global__ void anatomical_mask_kernel(const scalar_t* errors, const float* noise, bool* active,
                                       bool* hard, int64_t* shuffle, int64_t* restore, int L,
                                       int len_keep, int n_hard, uint64_t seed, uint64_t offset) {
  extern __shared__ uint32_t key[];
  uint8_t* cls = reinterpret_cast<uint8_t*>(key + L);
  __shared__ Shared sh;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * L;
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    cls[l] = kKept;
    if (n_hard > 0) {
      const float e = static_cast<float>(errors[row + l]);
      // Checked here rather than by a separate reduction: a device-side assertion, as
      // a host-side check would synchronize.
      CUDA_KERNEL_ASSERT_MSG(isfinite(e),
                             "anatomical_mask: argument 'errors' must be finite (no NaN or Inf)");
      key[l] = error_key(e);
    }
  }
  select_smallest(key, cls, L, n_hard, kHard, sh);
  __syncthreads();  // the random keys below are written across thread ownership
  if (noise != nullptr) {
    for (int l = threadIdx.x; l < L; l += blockDim.x) key[l] = float_order(noise[row + l]);
  } else {
    // Word g of the stream is word g % 4 of Philox block offset + g / 4: one block per
    // thread gives up to four consecutive keys of the row.
    const int64_t first = row / 4, last = (row + L - 1) / 4;
    for (int64_t j = first + threadIdx.x; j <= last; j += blockDim.x) {
      const Philox4 block = philox(seed, offset + static_cast<uint64_t>(j));
      for (int w = 0; w < 4; ++w) {
        const int64_t l = 4 * j + w - row;
        if (l >= 0 && l < L) key[l] = block.word[w];
      }
    }
  }
  __syncthreads();
  select_smallest(key, cls, L, L - len_keep - n_hard, kRandom, sh);
  // Kept patches first, then hidden ones, each in index order.
  int kept_before = 0;
  for (int base = 0; base < L; base += blockDim.x) {
    const int l = base + threadIdx.x;
    const bool kept = l < L && cls[l] == kKept;
    int total;
    const int before = kept_before + block_scan(kept, sh, total) - kept;
    if (l < L) {
      const int64_t position = kept ? before : len_keep + l - before;
      active[row + l] = kept;
      hard[row + l] = cls[l] == kHard;
      restore[row + l] = position;
      shuffle[row + position] = l;
    }
    kept_before += total;
  }
}

template <typename scalar_t>
void launch(Buffers& t, const Sizes& z, int64_t seed, int64_t offset) {
  const auto kernel = anatomical_mask_kernel<scalar_t>;
  const size_t smem = static_cast<size_t>(z.L) * (sizeof(uint32_t) + sizeof(uint8_t));
  if (smem + sizeof(Shared) > 48 * 1024) {  // the default limit counts static memory too
    const cudaError_t status = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    TORCH_CHECK_VALUE(status == cudaSuccess, "anatomical_mask: L=", z.L, " patches need ", smem,
                      " bytes of shared memory per sample, more than this GPU allows (",
                      cudaGetErrorString(status), ")");
  }
  kernel<<<static_cast<unsigned>(z.B), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      z.n_hard > 0 ? static_cast<const scalar_t*>(t.errors.const_data_ptr()) : nullptr,
      t.noise.defined() ? t.noise.const_data_ptr<float>() : nullptr, t.active.data_ptr<bool>(),
      t.hard.data_ptr<bool>(), t.shuffle.data_ptr<int64_t>(), t.restore.data_ptr<int64_t>(),
      static_cast<int>(z.L), static_cast<int>(z.len_keep), static_cast<int>(z.n_hard),
      static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> anatomical_mask_cuda(
    const at::Tensor& errors, const std::optional<at::Tensor>& noise, int64_t len_keep,
    int64_t n_hard, int64_t seed, int64_t offset) {
  const Sizes z = check_args(errors, noise, len_keep, n_hard, seed, offset);
  TORCH_CHECK_VALUE(z.L < (int64_t{1} << 31), "anatomical_mask: L must be below 2**31, got ", z.L);
  const c10::cuda::CUDAGuard guard(errors.device());
  Buffers t = prepare(errors, noise, z);
  switch (t.errors.scalar_type()) {
    case at::kHalf:
      launch<c10::Half>(t, z, seed, offset);
      break;
    case at::kBFloat16:
      launch<c10::BFloat16>(t, z, seed, offset);
      break;
    default:
      launch<float>(t, z, seed, offset);
      break;
  }
  return t.outputs();
}

}  // namespace

TORCH_LIBRARY_IMPL(anatomask_fast, CUDA, m) {
  m.impl("anatomical_mask", &anatomical_mask_cuda);
}

}  // namespace anatomask_fast
