// CUDA kernels of the packing family: one thread per output element (grid-stride),
// consecutive threads along the innermost axis, so reads and writes coalesce along
// patch rows. Copies move elements of the dtype's width (dtype-agnostic); the halo
// adjoint gathers in opmath precision in a fixed order (no atomics).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../outputs.h"
#include "../packing.h"

namespace anatomask_fast {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 20));
}

// Device-side form of check_layout_values / check_neighbour_values (a host-side check
// would synchronize): a bad index traps the kernel, and the error surfaces as a CUDA
// error at the next synchronization, before any copy reads through it.
__global__ void check_layout_kernel(const int64_t* __restrict__ patches,
                                    const int64_t* __restrict__ slots, int64_t N, int64_t cells) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < N) {
    const int64_t cell = patches[e];
    CUDA_KERNEL_ASSERT(cell >= 0 && cell < cells && slots[cell] == e);
  }
  if (e < cells) {
    const int64_t slot = slots[e];
    CUDA_KERNEL_ASSERT(slot >= -1 && slot < N && (slot < 0 || patches[slot] == e));
  }
}

__global__ void check_neighbours_kernel(const int64_t* __restrict__ table, int64_t N) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= N * 27) return;
  const int64_t m = table[e];
  CUDA_KERNEL_ASSERT(m >= -1 && m < N);
  CUDA_KERNEL_ASSERT(m < 0 || table[m * 27 + 26 - e % 27] == e / 27);
}

void check_layout_on_device(const at::Tensor& patches, const at::Tensor& slots) {
  const int64_t N = patches.numel(), cells = slots.numel(), n = std::max(N, cells);
  if (n == 0) return;
  check_layout_kernel<<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0,
                        c10::cuda::getCurrentCUDAStream()>>>(
      patches.const_data_ptr<int64_t>(), slots.const_data_ptr<int64_t>(), N, cells);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_neighbours_on_device(const at::Tensor& table) {
  const int64_t n = table.numel();
  if (n == 0) return;
  check_neighbours_kernel<<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0,
                            c10::cuda::getCurrentCUDAStream()>>>(
      table.const_data_ptr<int64_t>(), table.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename V>
__global__ void pack_kernel(const V* __restrict__ x, const int64_t* __restrict__ patches,
                            V* __restrict__ out, int64_t n, int64_t C, int64_t h, int64_t w,
                            int64_t d, int64_t ph, int64_t pw, int64_t pd) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    const int64_t k = e % pd, j = (e / pd) % pw, i = (e / (pd * pw)) % ph;
    const int64_t c = (e / (pd * pw * ph)) % C, p = e / (pd * pw * ph * C);
    const int64_t cell = patches[p];
    const int64_t k0 = cell % d, j0 = (cell / d) % w, i0 = (cell / (d * w)) % h;
    const int64_t b = cell / (d * w * h);
    out[e] = x[(((b * C + c) * (h * ph) + i0 * ph + i) * (w * pw) + j0 * pw + j) * (d * pd) +
               k0 * pd + k];
  }
}

template <typename V>
__global__ void unpack_kernel(const V* __restrict__ packed, const int64_t* __restrict__ slots,
                              V* __restrict__ out, int64_t n, int64_t C, int64_t h, int64_t w,
                              int64_t d, int64_t ph, int64_t pw, int64_t pd) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t D = d * pd, W = w * pw, H = h * ph;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    const int64_t K = e % D, J = (e / D) % W, I = (e / (D * W)) % H;
    const int64_t c = (e / (D * W * H)) % C, b = e / (D * W * H * C);
    const int64_t slot = slots[((b * h + I / ph) * w + J / pw) * d + K / pd];
    out[e] = slot < 0 ? V{}
                      : packed[(((slot * C + c) * ph + I % ph) * pw + J % pw) * pd + K % pd];
  }
}

__device__ __forceinline__ void halo_source(int64_t t, int64_t lo, int64_t p, int64_t& o,
                                            int64_t& l) {
  const int64_t u = t - lo;
  o = u < 0 ? -1 : (u >= p ? 1 : 0);
  l = u - o * p;
}

template <typename V>
__global__ void pad_halo_kernel(const V* __restrict__ packed, const int64_t* __restrict__ table,
                                V* __restrict__ out, int64_t n, int64_t C, int64_t ph,
                                int64_t pw, int64_t pd, int64_t lo, int64_t hi) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t th = ph + lo + hi, tw = pw + lo + hi, td = pd + lo + hi;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    const int64_t tk = e % td, tj = (e / td) % tw, ti = (e / (td * tw)) % th;
    const int64_t c = (e / (td * tw * th)) % C, m = e / (td * tw * th * C);
    int64_t oi, li, oj, lj, ok, lk;
    halo_source(ti, lo, ph, oi, li);
    halo_source(tj, lo, pw, oj, lj);
    halo_source(tk, lo, pd, ok, lk);
    const int64_t source = table[m * 27 + neighbour_column(oi, oj, ok)];
    out[e] = source < 0 ? V{} : packed[(((source * C + c) * ph + li) * pw + lj) * pd + lk];
  }
}

template <typename scalar_t>
__global__ void pad_halo_backward_kernel(const scalar_t* __restrict__ grad,
                                         const int64_t* __restrict__ table,
                                         scalar_t* __restrict__ out, int64_t n, int64_t C,
                                         int64_t ph, int64_t pw, int64_t pd, int64_t lo,
                                         int64_t hi) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t th = ph + lo + hi, tw = pw + lo + hi, td = pd + lo + hi;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    const int64_t k = e % pd, j = (e / pd) % pw, i = (e / (pd * pw)) % ph;
    const int64_t c = (e / (pd * pw * ph)) % C, m = e / (pd * pw * ph * C);
    acc_t acc = 0;
    // Patch n = neighbour of m at -o reads m's voxel at halo'd position o*p + local + lo.
    for (int64_t oi = -1; oi <= 1; ++oi) {
      const int64_t ti = oi * ph + i + lo;
      if (ti < 0 || ti >= th) continue;
      for (int64_t oj = -1; oj <= 1; ++oj) {
        const int64_t tj = oj * pw + j + lo;
        if (tj < 0 || tj >= tw) continue;
        for (int64_t ok = -1; ok <= 1; ++ok) {
          const int64_t tk = ok * pd + k + lo;
          if (tk < 0 || tk >= td) continue;
          const int64_t src = table[m * 27 + neighbour_column(-oi, -oj, -ok)];
          if (src >= 0) acc += static_cast<acc_t>(grad[(((src * C + c) * th + ti) * tw + tj) * td + tk]);
        }
      }
    }
    out[e] = static_cast<scalar_t>(acc);
  }
}

// Copies are dtype-agnostic: dispatch on the element width only.
template <template <typename> class Launch, typename... Args>
void by_width(int64_t bytes, Args&&... args) {
  switch (bytes) {
    case 1: return Launch<uint8_t>::run(args...);
    case 2: return Launch<uint16_t>::run(args...);
    case 4: return Launch<uint32_t>::run(args...);
    case 8: return Launch<uint64_t>::run(args...);
    default: TORCH_CHECK(false, "packing: unsupported element size ", bytes);
  }
}

template <typename V>
struct LaunchPack {
  static void run(const at::Tensor& x, const at::Tensor& patches, at::Tensor& out,
                  const PackGeometry& g) {
    pack_kernel<V><<<blocks_for(out.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<const V*>(x.const_data_ptr()), patches.const_data_ptr<int64_t>(),
        static_cast<V*>(out.data_ptr()), out.numel(), g.C, g.h, g.w, g.d, g.ph, g.pw, g.pd);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <typename V>
struct LaunchUnpack {
  static void run(const at::Tensor& packed, const at::Tensor& slots, at::Tensor& out,
                  const PackGeometry& g) {
    unpack_kernel<V><<<blocks_for(out.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<const V*>(packed.const_data_ptr()), slots.const_data_ptr<int64_t>(),
        static_cast<V*>(out.data_ptr()), out.numel(), g.C, g.h, g.w, g.d, g.ph, g.pw, g.pd);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <typename V>
struct LaunchPadHalo {
  static void run(const at::Tensor& packed, const at::Tensor& table, at::Tensor& out,
                  int64_t lo, int64_t hi) {
    pad_halo_kernel<V><<<blocks_for(out.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<const V*>(packed.const_data_ptr()), table.const_data_ptr<int64_t>(),
        static_cast<V*>(out.data_ptr()), out.numel(), packed.size(1), packed.size(2),
        packed.size(3), packed.size(4), lo, hi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor pack_patches_cuda(const at::Tensor& x, const at::Tensor& patches,
                             const at::Tensor& slots) {
  const PackGeometry g = dense_geometry(x, patches, slots, "pack_patches");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor pc = patches.contiguous();
  check_layout_on_device(pc, slots.contiguous());
  at::Tensor out = new_output({g.N, g.C, g.ph, g.pw, g.pd}, xc.options());
  if (out.numel() > 0) by_width<LaunchPack>(xc.element_size(), xc, pc, out, g);
  return out;
}

at::Tensor unpack_patches_cuda(const at::Tensor& packed, const at::Tensor& patches,
                               const at::Tensor& slots) {
  const PackGeometry g = packed_geometry(packed, patches, slots, "unpack_patches");
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor pk = packed.contiguous();
  const at::Tensor sc = slots.contiguous();
  check_layout_on_device(patches.contiguous(), sc);
  at::Tensor out = new_output({g.B, g.C, g.h * g.ph, g.w * g.pw, g.d * g.pd}, pk.options());
  if (out.numel() > 0) by_width<LaunchUnpack>(pk.element_size(), pk, sc, out, g);
  return out;
}

at::Tensor pad_halo_cuda(const at::Tensor& packed, const at::Tensor& neighbours, int64_t lo,
                         int64_t hi) {
  const std::vector<int64_t> sizes = pad_halo_sizes(packed, neighbours, lo, hi);
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor pk = packed.contiguous();
  const at::Tensor nb = neighbours.contiguous();
  check_neighbours_on_device(nb);
  at::Tensor out = new_output(sizes, pk.options());
  if (out.numel() > 0) by_width<LaunchPadHalo>(pk.element_size(), pk, nb, out, lo, hi);
  return out;
}

at::Tensor pad_halo_backward_cuda(const at::Tensor& grad, const at::Tensor& neighbours,
                                  int64_t lo, int64_t hi) {
  const std::vector<int64_t> sizes = pad_halo_backward_sizes(grad, neighbours, lo, hi);
  const int64_t ph = sizes[2], pw = sizes[3], pd = sizes[4];
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor gc = grad.contiguous();
  const at::Tensor nb = neighbours.contiguous();
  check_neighbours_on_device(nb);
  at::Tensor out = new_output(sizes, gc.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "pad_halo_backward", [&] {
    pad_halo_backward_kernel<scalar_t>
        <<<blocks_for(out.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            gc.const_data_ptr<scalar_t>(), nb.const_data_ptr<int64_t>(),
            out.data_ptr<scalar_t>(), out.numel(), gc.size(1), ph, pw, pd, lo, hi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(anatomask_fast, CUDA, m) {
  m.impl("pack_patches", &pack_patches_cuda);
  m.impl("unpack_patches", &unpack_patches_cuda);
  m.impl("pad_halo", &pad_halo_cuda);
  m.impl("pad_halo_backward", &pad_halo_backward_cuda);
}

}  // namespace anatomask_fast
