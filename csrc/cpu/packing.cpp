// CPU kernels of the packing family (OpenMP through at::parallel_for). Each output
// row (the last axis) is built from contiguous runs of one source row, copied as
// bytes (dtype-agnostic) or, for the halo adjoint, summed in opmath precision.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../outputs.h"
#include "../packing.h"

namespace anatomask_fast {
namespace {

// Copies `count` elements of `bytes` each, or zeroes them when `src` is null.
inline void copy_or_zero(char* dst, const char* src, int64_t count, int64_t bytes) {
  if (src != nullptr) {
    std::memcpy(dst, src, count * bytes);
  } else {
    std::memset(dst, 0, count * bytes);
  }
}

int64_t grain_rows(int64_t row_length) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_length, 1));
}

at::Tensor pack_patches_cpu(const at::Tensor& x, const at::Tensor& patches,
                            const at::Tensor& slots) {
  const PackGeometry g = dense_geometry(x, patches, slots, "pack_patches");
  const at::Tensor xc = x.contiguous();
  const at::Tensor pc = patches.contiguous();
  check_layout_values(pc, slots.contiguous(), "pack_patches");
  at::Tensor out = new_output({g.N, g.C, g.ph, g.pw, g.pd}, xc.options());
  if (out.numel() == 0) return out;
  const char* src = static_cast<const char*>(xc.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* cell_of = pc.const_data_ptr<int64_t>();
  const int64_t bytes = xc.element_size();
  const int64_t H = g.h * g.ph, W = g.w * g.pw, D = g.d * g.pd;
  at::parallel_for(0, g.N * g.C * g.ph * g.pw, grain_rows(g.pd), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t j = r % g.pw;
      const int64_t i = (r / g.pw) % g.ph;
      const int64_t c = (r / (g.pw * g.ph)) % g.C;
      const int64_t cell = cell_of[r / (g.pw * g.ph * g.C)];
      const int64_t k0 = cell % g.d, j0 = (cell / g.d) % g.w, i0 = (cell / (g.d * g.w)) % g.h;
      const int64_t b = cell / (g.d * g.w * g.h);
      const int64_t s = (((b * g.C + c) * H + i0 * g.ph + i) * W + j0 * g.pw + j) * D + k0 * g.pd;
      copy_or_zero(dst + r * g.pd * bytes, src + s * bytes, g.pd, bytes);
    }
  });
  return out;
}

at::Tensor unpack_patches_cpu(const at::Tensor& packed, const at::Tensor& patches,
                              const at::Tensor& slots) {
  const PackGeometry g = packed_geometry(packed, patches, slots, "unpack_patches");
  const at::Tensor pk = packed.contiguous();
  const at::Tensor sc = slots.contiguous();
  check_layout_values(patches.contiguous(), sc, "unpack_patches");
  const int64_t H = g.h * g.ph, W = g.w * g.pw, D = g.d * g.pd;
  at::Tensor out = new_output({g.B, g.C, H, W, D}, pk.options());
  if (out.numel() == 0) return out;
  const char* src = static_cast<const char*>(pk.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* slot_of = sc.const_data_ptr<int64_t>();
  const int64_t bytes = pk.element_size();
  at::parallel_for(0, g.B * g.C * H * W, grain_rows(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t J = r % W, I = (r / W) % H, c = (r / (W * H)) % g.C, b = r / (W * H * g.C);
      const int64_t* row_slots = slot_of + ((b * g.h + I / g.ph) * g.w + J / g.pw) * g.d;
      for (int64_t k0 = 0; k0 < g.d; ++k0) {
        const int64_t slot = row_slots[k0];
        const int64_t s = (((slot * g.C + c) * g.ph + I % g.ph) * g.pw + J % g.pw) * g.pd;
        copy_or_zero(dst + (r * D + k0 * g.pd) * bytes, slot < 0 ? nullptr : src + s * bytes, g.pd,
                     bytes);
      }
    }
  });
  return out;
}

// Along one axis of halo'd side `lo + p + hi`, position t reads the neighbour at
// offset o and its local index l.
inline void halo_source(int64_t t, int64_t lo, int64_t p, int64_t& o, int64_t& l) {
  const int64_t u = t - lo;
  o = u < 0 ? -1 : (u >= p ? 1 : 0);
  l = u - o * p;
}

at::Tensor pad_halo_cpu(const at::Tensor& packed, const at::Tensor& neighbours, int64_t lo,
                        int64_t hi) {
  at::Tensor out = new_output(pad_halo_sizes(packed, neighbours, lo, hi), packed.options());
  const int64_t N = packed.size(0), C = packed.size(1);
  const int64_t ph = packed.size(2), pw = packed.size(3), pd = packed.size(4);
  const int64_t th = out.size(2), tw = out.size(3), td = out.size(4);
  const at::Tensor pk = packed.contiguous();
  const at::Tensor nb = neighbours.contiguous();
  check_neighbour_values(nb, "pad_halo");
  if (out.numel() == 0) return out;
  const char* src = static_cast<const char*>(pk.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* table = nb.const_data_ptr<int64_t>();
  const int64_t bytes = pk.element_size();
  at::parallel_for(0, N * C * th * tw, grain_rows(td), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t tj = r % tw, ti = (r / tw) % th, c = (r / (tw * th)) % C, n = r / (tw * th * C);
      int64_t oi, li, oj, lj;
      halo_source(ti, lo, ph, oi, li);
      halo_source(tj, lo, pw, oj, lj);
      char* row = dst + r * td * bytes;
      // Three runs along the last axis: low halo, interior, high halo.
      const int64_t runs[3][3] = {{-1, pd - lo, lo}, {0, 0, pd}, {1, 0, hi}};
      int64_t at_k = 0;
      for (const auto& run : runs) {
        const int64_t source = table[n * 27 + neighbour_column(oi, oj, run[0])];
        const int64_t s = (((source * C + c) * ph + li) * pw + lj) * pd + run[1];
        copy_or_zero(row + at_k * bytes, source < 0 ? nullptr : src + s * bytes, run[2], bytes);
        at_k += run[2];
      }
    }
  });
  return out;
}

// The adjoint of pad_halo: each interior voxel of patch m gathers the gradient of
// every halo'd patch that read it (itself, and the neighbours whose halo covers it),
// in a fixed order: deterministic, no atomics. Patch n reads m at offset o exactly
// when m is n's neighbour at o, i.e. n is m's neighbour at -o.
template <typename scalar_t>
void pad_halo_backward_rows(const scalar_t* grad, scalar_t* out, const int64_t* table, int64_t C,
                            int64_t ph, int64_t pw, int64_t pd, int64_t lo, int64_t hi,
                            int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t th = ph + lo + hi, tw = pw + lo + hi, td = pd + lo + hi;
  std::vector<acc_t> acc(pd);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t j = r % pw, i = (r / pw) % ph, c = (r / (pw * ph)) % C, m = r / (pw * ph * C);
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int64_t oi = -1; oi <= 1; ++oi) {
      const int64_t ti = oi * ph + i + lo;
      if (ti < 0 || ti >= th) continue;
      for (int64_t oj = -1; oj <= 1; ++oj) {
        const int64_t tj = oj * pw + j + lo;
        if (tj < 0 || tj >= tw) continue;
        for (int64_t ok = -1; ok <= 1; ++ok) {
          const int64_t n = table[m * 27 + neighbour_column(-oi, -oj, -ok)];
          if (n < 0) continue;
          // Local k whose halo'd position ok*pd + k + lo lies in [0, td).
          const int64_t k_begin = std::max<int64_t>(0, -ok * pd - lo);
          const int64_t k_end = std::min<int64_t>(pd, td - ok * pd - lo);
          const scalar_t* g = grad + (((n * C + c) * th + ti) * tw + tj) * td + ok * pd + lo;
          for (int64_t k = k_begin; k < k_end; ++k) acc[k] += static_cast<acc_t>(g[k]);
        }
      }
    }
    scalar_t* o = out + r * pd;
    for (int64_t k = 0; k < pd; ++k) o[k] = static_cast<scalar_t>(acc[k]);
  }
}

at::Tensor pad_halo_backward_cpu(const at::Tensor& grad, const at::Tensor& neighbours, int64_t lo,
                                 int64_t hi) {
  at::Tensor out = new_output(pad_halo_backward_sizes(grad, neighbours, lo, hi), grad.options());
  const int64_t N = out.size(0), C = out.size(1), ph = out.size(2), pw = out.size(3),
                pd = out.size(4);
  const at::Tensor gc = grad.contiguous();
  const at::Tensor nb = neighbours.contiguous();
  check_neighbour_values(nb, "pad_halo_backward");
  if (out.numel() == 0) return out;
  const int64_t* table = nb.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, gc.scalar_type(), "pad_halo_backward", [&] {
        const scalar_t* g = gc.const_data_ptr<scalar_t>();
        scalar_t* o = out.data_ptr<scalar_t>();
        at::parallel_for(0, N * C * ph * pw, grain_rows(pd), [&](int64_t begin, int64_t end) {
          pad_halo_backward_rows<scalar_t>(g, o, table, C, ph, pw, pd, lo, hi, begin, end);
        });
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(anatomask_fast, CPU, m) {
  m.impl("pack_patches", &pack_patches_cpu);
  m.impl("unpack_patches", &unpack_patches_cpu);
  m.impl("pad_halo", &pad_halo_cpu);
  m.impl("pad_halo_backward", &pad_halo_backward_cpu);
}

}  // namespace anatomask_fast
