// CPU kernels of the gather/scatter family (OpenMP through at::parallel_for).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../mask_geometry.h"
#include "../outputs.h"

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
        std::fill_n(keep.begin() + c * g.pd, g.pd, cells[c] ? static_cast<Word>(~Word{0}) : Word{0});
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
      case 1: return apply_mask_rows(static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), mask, g, begin, end);
      case 2: return apply_mask_rows(static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), mask, g, begin, end);
      case 4: return apply_mask_rows(static_cast<const uint32_t*>(src), static_cast<uint32_t*>(dst), mask, g, begin, end);
      case 8: return apply_mask_rows(static_cast<const uint64_t*>(src), static_cast<uint64_t*>(dst), mask, g, begin, end);
      default: TORCH_CHECK(false, "apply_mask: unsupported element size ", xc.element_size());
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(anatomask_fast, CPU, m) {
  m.impl("apply_mask", &apply_mask_cpu);
}

}  // namespace anatomask_fast
