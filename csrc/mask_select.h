// Shared by the CPU and CUDA kernels of the mask_select family: the argument checks,
// the sort keys (one unsigned 32-bit key per patch, the selection takes the smallest,
// ties by lower index) and the Philox4x32-10 stream, laid out as Triton's
// tl.randint4x: key (seed_lo, seed_hi), counter (c_lo, c_hi, 0, 0), so that the CPU,
// CUDA and Triton kernels draw the same bits from the same (seed, offset).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

#include "outputs.h"

#ifdef __CUDACC__
#define MASK_SELECT_HD __host__ __device__ __forceinline__
#else
#define MASK_SELECT_HD inline
#endif

namespace anatomask_fast {
namespace mask_select {

struct Philox4 {
  uint32_t word[4];
};

// Philox4x32-10 of `counter` under key `seed`. Patch l of sample b (global element
// g = b * L + l) uses word g % 4 of the block at counter offset + g / 4.
MASK_SELECT_HD Philox4 philox(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p2 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p2 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p2);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// Monotone map of a finite float to uint32 (-0 and +0 equal).
MASK_SELECT_HD uint32_t float_order(float value) {
  uint32_t bits;
#ifdef __CUDA_ARCH__
  bits = __float_as_uint(value);
#else
  std::memcpy(&bits, &value, sizeof(bits));
#endif
  if (value == 0.0f) bits = 0;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Hard patches are the smallest keys of the errors: largest error first.
MASK_SELECT_HD uint32_t error_key(float error) {
  return ~float_order(error);
}

// Patch classes, as the kernels record them.
constexpr uint8_t kKept = 0, kHard = 1, kRandom = 2;

struct Sizes {
  int64_t B, L, len_keep, n_hard, n_random;
};

inline Sizes check_args(const at::Tensor& errors, const std::optional<at::Tensor>& noise,
                        int64_t len_keep, int64_t n_hard, int64_t seed, int64_t offset) {
  TORCH_CHECK_VALUE(errors.dim() == 2, "anatomical_mask: argument 'errors' must be (B, L), got ",
                    errors.sizes());
  TORCH_CHECK_TYPE(errors.scalar_type() == at::kFloat || errors.scalar_type() == at::kHalf ||
                       errors.scalar_type() == at::kBFloat16,
                   "anatomical_mask: argument 'errors' must be float32, float16 or bfloat16, got ",
                   errors.scalar_type());
  const int64_t B = errors.size(0), L = errors.size(1);
  TORCH_CHECK_VALUE(len_keep >= 1 && len_keep < L,
                    "anatomical_mask: argument 'len_keep' must be "
                    "in [1, L=",
                    L, "), got ", len_keep);
  TORCH_CHECK_VALUE(n_hard >= 0 && n_hard <= L - len_keep,
                    "anatomical_mask: argument 'n_hard' "
                    "must be in [0, L - len_keep=",
                    L - len_keep, "], got ", n_hard);
  TORCH_CHECK_VALUE(seed >= 0 && offset >= 0,
                    "anatomical_mask: 'seed' and 'offset' must be "
                    ">= 0, got ",
                    seed, " and ", offset);
  if (noise.has_value()) {
    TORCH_CHECK_VALUE(noise->sizes() == errors.sizes(),
                      "anatomical_mask: argument 'noise' must "
                      "have the shape of 'errors' ",
                      errors.sizes(), ", got ", noise->sizes());
    TORCH_CHECK_TYPE(noise->scalar_type() == at::kFloat,
                     "anatomical_mask: argument 'noise' "
                     "must be float32, got ",
                     noise->scalar_type());
    TORCH_CHECK_VALUE(noise->device() == errors.device(),
                      "anatomical_mask: argument 'noise' "
                      "is on ",
                      noise->device(), " but 'errors' is on ", errors.device());
  }
  return {B, L, len_keep, n_hard, L - len_keep - n_hard};
}

// Contiguous inputs and fresh (B, L) outputs, shared by the CPU and CUDA entry points.
struct Buffers {
  at::Tensor errors, noise;  // noise undefined when not given
  at::Tensor active, hard, shuffle, restore;

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {active, hard, shuffle, restore};
  }
};

inline Buffers prepare(const at::Tensor& errors, const std::optional<at::Tensor>& noise,
                       const Sizes& z) {
  const auto flags = errors.options().dtype(at::kBool);
  const auto ids = errors.options().dtype(at::kLong);
  // Errors are not read without hard patches (random_mask passes an expanded zero).
  return {z.n_hard > 0 ? errors.contiguous() : errors,
          noise.has_value() ? noise->contiguous() : at::Tensor(),
          new_output({z.B, z.L}, flags),
          new_output({z.B, z.L}, flags),
          new_output({z.B, z.L}, ids),
          new_output({z.B, z.L}, ids)};
}

}  // namespace mask_select
}  // namespace anatomask_fast
