// CUDA kernels of the gather/scatter family.
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

// One thread per word of V bytes. The word width is chosen so that a word never
// straddles two mask cells (pd * element_size is a multiple of sizeof(V)), so
// each word is one masked 16/8/4/2/1-byte copy: dtype-agnostic and coalesced.
// Hidden words are not read at all.
template <typename V>
__global__ void apply_mask_kernel(const V* __restrict__ x, const bool* __restrict__ mask,
                                  V* __restrict__ y, int64_t n_words,
                                  int64_t words_per_cell, int64_t d, int64_t W,
                                  int64_t H, int64_t C, int64_t h, int64_t w,
                                  int64_t ph, int64_t pw) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       v < n_words; v += stride) {
    const int64_t cell = v / words_per_cell;  // index over (B, C, H, W, d)
    const int64_t k = cell % d;
    const int64_t row = cell / d;             // index over (B, C, H, W)
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
      static_cast<V*>(y.data_ptr()), n_words, cell_bytes / static_cast<int64_t>(sizeof(V)),
      g.d, g.W, g.H, g.C, g.h, g.w, g.ph, g.pw);
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

TORCH_LIBRARY_IMPL(anatomask_fast, CUDA, m) {
  m.impl("apply_mask", &apply_mask_cuda);
}

}  // namespace anatomask_fast
