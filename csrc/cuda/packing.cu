// CUDA kernels of the packing family: a block per slab (a patch tile of one channel),
// consecutive threads along the slab's plane, so reads and writes coalesce along patch
// rows. Copies move elements of the dtype's width (dtype-agnostic); the halo
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
                            c10::cuda::getCurrentCUDAStream()>>>(table.const_data_ptr<int64_t>(),
                                                                 table.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Each block walks slabs (grid-stride): a slab is one (patch, channel) tile, or for
// unpack one (sample, channel, patch row) band of the dense map. A thread takes positions
// q of the slab's plane (the two inner axes), splits q once with 32-bit arithmetic and
// walks the slab's planes along the outer axis: per element only an add and a compare.
// Consecutive threads touch consecutive elements of the plane, so writes coalesce.
// (One thread per element with 64-bit divisions and modulos ran at about a tenth of
// the copy bandwidth on an H200.)
template <typename V>
__global__ void pack_kernel(const V* __restrict__ x, const int64_t* __restrict__ patches,
                            V* __restrict__ out, int64_t slabs, int64_t C, int64_t h, int64_t w,
                            int64_t d, int ph, int pw, int pd) {
  const int plane = pw * pd;
  const int64_t D = d * pd, WD = w * pw * D;
  for (int64_t s = blockIdx.x; s < slabs; s += gridDim.x) {
    const int64_t p = s / C, c = s % C, cell = patches[p];
    const int64_t k0 = cell % d, j0 = (cell / d) % w, i0 = (cell / (d * w)) % h;
    const int64_t b = cell / (d * w * h);
    const V* corner = x + ((b * C + c) * h * ph + i0 * ph) * WD + j0 * pw * D + k0 * pd;
    V* tile = out + s * ph * plane;
    for (int q = threadIdx.x; q < plane; q += blockDim.x) {
      const int j = q / pd, k = q - j * pd;
      const V* from = corner + j * D + k;
      for (int i = 0; i < ph; ++i) tile[i * plane + q] = from[i * WD];
    }
  }
}

template <typename V>
__global__ void unpack_kernel(const V* __restrict__ packed, const int64_t* __restrict__ slots,
                              V* __restrict__ out, int64_t slabs, int64_t C, int64_t h, int64_t w,
                              int64_t d, int ph, int pw, int pd) {
  const int W = static_cast<int>(w) * pw, D = static_cast<int>(d) * pd, plane = W * D;
  const int patch = ph * pw * pd;
  for (int64_t s = blockIdx.x; s < slabs; s += gridDim.x) {
    // s = (b * C + c) * h + i0: rows i0 * ph .. i0 * ph + ph - 1 of map (b, c).
    const int64_t i0 = s % h, c = (s / h) % C, b = s / (h * C);
    const int64_t* row_slots = slots + (b * h + i0) * w * d;
    V* band = out + s * ph * plane;
    for (int q = threadIdx.x; q < plane; q += blockDim.x) {
      const int J = q / D, K = q - J * D;
      const int64_t slot = row_slots[(J / pw) * d + K / pd];
      const V* from = slot < 0 ? nullptr : packed + (slot * C + c) * patch + (J % pw) * pd + K % pd;
      for (int i = 0; i < ph; ++i) band[i * plane + q] = from ? from[i * pw * pd] : V{};
    }
  }
}

__device__ __forceinline__ void halo_source(int t, int lo, int p, int& o, int& l) {
  const int u = t - lo;
  o = u < 0 ? -1 : (u >= p ? 1 : 0);
  l = u - o * p;
}

// The 27 neighbours of patch m, read once per slab into shared memory.
__device__ __forceinline__ void load_neighbours(int64_t* shared, const int64_t* table, int64_t m) {
  __syncthreads();  // the previous slab's readers are done
  if (threadIdx.x < 27) shared[threadIdx.x] = table[m * 27 + threadIdx.x];
  __syncthreads();
}

template <typename V>
__global__ void pad_halo_kernel(const V* __restrict__ packed, const int64_t* __restrict__ table,
                                V* __restrict__ out, int64_t slabs, int64_t C, int ph, int pw,
                                int pd, int lo, int hi) {
  __shared__ int64_t neighbours[27];
  const int th = ph + lo + hi, tw = pw + lo + hi, td = pd + lo + hi, plane = tw * td;
  const int patch = ph * pw * pd;
  for (int64_t s = blockIdx.x; s < slabs; s += gridDim.x) {
    const int64_t m = s / C, c = s % C;
    load_neighbours(neighbours, table, m);
    V* tile = out + s * th * plane;
    for (int q = threadIdx.x; q < plane; q += blockDim.x) {
      const int tj = q / td, tk = q - tj * td;
      int oj, lj, ok, lk;
      halo_source(tj, lo, pw, oj, lj);
      halo_source(tk, lo, pd, ok, lk);
      for (int ti = 0; ti < th; ++ti) {
        int oi, li;
        halo_source(ti, lo, ph, oi, li);
        const int64_t source = neighbours[neighbour_column(oi, oj, ok)];
        tile[ti * plane + q] =
            source < 0 ? V{} : packed[(source * C + c) * patch + (li * pw + lj) * pd + lk];
      }
    }
  }
}

template <typename scalar_t>
__global__ void pad_halo_backward_kernel(const scalar_t* __restrict__ grad,
                                         const int64_t* __restrict__ table,
                                         scalar_t* __restrict__ out, int64_t slabs, int64_t C,
                                         int ph, int pw, int pd, int lo, int hi) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ int64_t neighbours[27];
  const int th = ph + lo + hi, tw = pw + lo + hi, td = pd + lo + hi, plane = pw * pd;
  const int halo_tile = th * tw * td;
  for (int64_t s = blockIdx.x; s < slabs; s += gridDim.x) {
    const int64_t m = s / C, c = s % C;
    load_neighbours(neighbours, table, m);
    scalar_t* tile = out + s * ph * plane;
    for (int q = threadIdx.x; q < plane; q += blockDim.x) {
      const int j = q / pd, k = q - j * pd;
      for (int i = 0; i < ph; ++i) {
        acc_t acc = 0;
        // Patch n = neighbour of m at -o reads m's voxel at halo'd position o*p + local + lo.
        for (int oi = -1; oi <= 1; ++oi) {
          const int ti = oi * ph + i + lo;
          if (ti < 0 || ti >= th) continue;
          for (int oj = -1; oj <= 1; ++oj) {
            const int tj = oj * pw + j + lo;
            if (tj < 0 || tj >= tw) continue;
            for (int ok = -1; ok <= 1; ++ok) {
              const int tk = ok * pd + k + lo;
              if (tk < 0 || tk >= td) continue;
              const int64_t src = neighbours[neighbour_column(-oi, -oj, -ok)];
              if (src >= 0)
                acc +=
                    static_cast<acc_t>(grad[(src * C + c) * halo_tile + (ti * tw + tj) * td + tk]);
            }
          }
        }
        tile[i * plane + q] = static_cast<scalar_t>(acc);
      }
    }
  }
}

// Threads per block: the slab's plane rounded up to whole warps, at most 256.
unsigned slab_threads(int64_t plane) {
  return static_cast<unsigned>(std::clamp<int64_t>((plane + 31) / 32 * 32, 32, 256));
}

unsigned slab_blocks(int64_t slabs) {
  return static_cast<unsigned>(std::min<int64_t>(slabs, 1 << 20));
}

// The kernels index within one tile or band in 32-bit arithmetic.
void check_tile_fits(int64_t elements, const char* op) {
  TORCH_CHECK_VALUE(elements < (int64_t{1} << 31), op,
                    ": a patch tile (or a band of patch rows) "
                    "of ",
                    elements, " elements exceeds the CUDA kernels' 32-bit tile indexing");
}

// Copies are dtype-agnostic: dispatch on the element width only.
template <template <typename> class Launch, typename... Args>
void by_width(int64_t bytes, Args&&... args) {
  switch (bytes) {
    case 1:
      return Launch<uint8_t>::run(args...);
    case 2:
      return Launch<uint16_t>::run(args...);
    case 4:
      return Launch<uint32_t>::run(args...);
    case 8:
      return Launch<uint64_t>::run(args...);
    default:
      TORCH_CHECK(false, "packing: unsupported element size ", bytes);
  }
}

template <typename V>
struct LaunchPack {
  static void run(const at::Tensor& x, const at::Tensor& patches, at::Tensor& out,
                  const PackGeometry& g) {
    const int64_t slabs = g.N * g.C;
    pack_kernel<V>
        <<<slab_blocks(slabs), slab_threads(g.pw * g.pd), 0, c10::cuda::getCurrentCUDAStream()>>>(
            static_cast<const V*>(x.const_data_ptr()), patches.const_data_ptr<int64_t>(),
            static_cast<V*>(out.data_ptr()), slabs, g.C, g.h, g.w, g.d, g.ph, g.pw, g.pd);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <typename V>
struct LaunchUnpack {
  static void run(const at::Tensor& packed, const at::Tensor& slots, at::Tensor& out,
                  const PackGeometry& g) {
    const int64_t slabs = g.B * g.C * g.h;
    unpack_kernel<V><<<slab_blocks(slabs), slab_threads(g.w * g.pw * g.d * g.pd), 0,
                       c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<const V*>(packed.const_data_ptr()), slots.const_data_ptr<int64_t>(),
        static_cast<V*>(out.data_ptr()), slabs, g.C, g.h, g.w, g.d, g.ph, g.pw, g.pd);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <typename V>
struct LaunchPadHalo {
  static void run(const at::Tensor& packed, const at::Tensor& table, at::Tensor& out, int64_t lo,
                  int64_t hi) {
    const int64_t slabs = packed.size(0) * packed.size(1);
    pad_halo_kernel<V><<<slab_blocks(slabs), slab_threads(out.size(3) * out.size(4)), 0,
                         c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<const V*>(packed.const_data_ptr()), table.const_data_ptr<int64_t>(),
        static_cast<V*>(out.data_ptr()), slabs, packed.size(1), packed.size(2), packed.size(3),
        packed.size(4), lo, hi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor pack_patches_cuda(const at::Tensor& x, const at::Tensor& patches,
                             const at::Tensor& slots) {
  const PackGeometry g = dense_geometry(x, patches, slots, "pack_patches");
  check_tile_fits(g.ph * g.pw * g.pd, "pack_patches");
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
  check_tile_fits(g.ph * g.w * g.pw * g.d * g.pd, "unpack_patches");
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
  check_tile_fits(sizes[2] * sizes[3] * sizes[4], "pad_halo");
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor pk = packed.contiguous();
  const at::Tensor nb = neighbours.contiguous();
  check_neighbours_on_device(nb);
  at::Tensor out = new_output(sizes, pk.options());
  if (out.numel() > 0) by_width<LaunchPadHalo>(pk.element_size(), pk, nb, out, lo, hi);
  return out;
}

at::Tensor pad_halo_backward_cuda(const at::Tensor& grad, const at::Tensor& neighbours, int64_t lo,
                                  int64_t hi) {
  const std::vector<int64_t> sizes = pad_halo_backward_sizes(grad, neighbours, lo, hi);
  const int64_t ph = sizes[2], pw = sizes[3], pd = sizes[4];
  check_tile_fits(grad.size(2) * grad.size(3) * grad.size(4), "pad_halo_backward");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor gc = grad.contiguous();
  const at::Tensor nb = neighbours.contiguous();
  check_neighbours_on_device(nb);
  at::Tensor out = new_output(sizes, gc.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, gc.scalar_type(), "pad_halo_backward", [&] {
        const int64_t slabs = out.size(0) * out.size(1);
        pad_halo_backward_kernel<scalar_t>
            <<<slab_blocks(slabs), slab_threads(pw * pd), 0, c10::cuda::getCurrentCUDAStream()>>>(
                gc.const_data_ptr<scalar_t>(), nb.const_data_ptr<int64_t>(),
                out.data_ptr<scalar_t>(), slabs, gc.size(1), ph, pw, pd, lo, hi);
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
