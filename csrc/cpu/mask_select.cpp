// CPU kernel of the mask_select family: one pass per sample (samples in parallel),
// each selection a radix prefilter on the key's top bits plus nth_element on the one
// bucket that holds the threshold, so O(L) per sample and no full sort.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../mask_select.h"
#include "../outputs.h"

namespace anatomask_fast {
namespace {

using namespace mask_select;

struct Scratch {
  std::vector<uint32_t> key;
  std::vector<uint8_t> cls;
  std::vector<uint32_t> hist;
  std::vector<uint64_t> bucket;
};

// Marks with `mark` the k smallest keys among the patches still kKept, ties by lower
// index: patches whose top bits fall below the threshold's bucket are taken at once,
// the bucket itself is resolved by nth_element on (key, index) pairs.
void select_smallest(Scratch& s, int64_t L, int64_t k, uint8_t mark) {
  if (k == 0) return;
  const int bits = std::clamp(static_cast<int>(std::ceil(std::log2(static_cast<double>(L)))), 4, 12);
  const int shift = 32 - bits;
  s.hist.assign(size_t{1} << bits, 0);
  for (int64_t l = 0; l < L; ++l) {
    if (s.cls[l] == kKept) ++s.hist[s.key[l] >> shift];
  }
  uint32_t digit = 0;
  int64_t below = 0;
  while (below + s.hist[digit] < k) below += s.hist[digit++];
  const int64_t need = k - below;
  s.bucket.clear();
  for (int64_t l = 0; l < L; ++l) {
    if (s.cls[l] != kKept) continue;
    const uint32_t top = s.key[l] >> shift;
    if (top < digit) {
      s.cls[l] = mark;
    } else if (top == digit) {
      s.bucket.push_back((static_cast<uint64_t>(s.key[l]) << 32) | static_cast<uint64_t>(l));
    }
  }
  if (static_cast<int64_t>(s.bucket.size()) > need) {
    std::nth_element(s.bucket.begin(), s.bucket.begin() + need, s.bucket.end());
  }
  for (int64_t i = 0; i < need; ++i) s.cls[s.bucket[i] & 0xFFFFFFFFu] = mark;
}

template <typename scalar_t>
void error_keys(const scalar_t* errors, int64_t b, int64_t L, Scratch& s) {
  bool finite = true;
  for (int64_t l = 0; l < L; ++l) {
    const float e = static_cast<float>(errors[l]);
    finite &= std::isfinite(e);
    s.key[l] = error_key(e);
  }
  if (!finite) {
    const int64_t bad = std::find_if(errors, errors + L, [](scalar_t e) {
      return !std::isfinite(static_cast<float>(e));
    }) - errors;
    TORCH_CHECK_VALUE(false, "anatomical_mask: argument 'errors' must be finite, got ",
                      static_cast<float>(errors[bad]), " at (", b, ", ", bad, ")");
  }
}

void random_keys(const float* noise, uint64_t seed, uint64_t offset, int64_t b, int64_t L,
                 Scratch& s) {
  if (noise != nullptr) {
    for (int64_t l = 0; l < L; ++l) s.key[l] = float_order(noise[l]);
    return;
  }
  const uint64_t first = static_cast<uint64_t>(b) * static_cast<uint64_t>(L);
  for (uint64_t g = first; g < first + static_cast<uint64_t>(L);) {
    const Philox4 block = philox(seed, offset + g / 4);
    for (uint32_t w = g % 4; w < 4 && g < first + static_cast<uint64_t>(L); ++w, ++g) {
      s.key[g - first] = block.word[w];
    }
  }
}

template <typename scalar_t>
void select_samples(const Sizes& z, const scalar_t* errors, const float* noise, int64_t seed,
                    int64_t offset, bool* active, bool* hard, int64_t* shuffle,
                    int64_t* restore) {
  const int64_t L = z.L;
  // Tiny batches run on one thread: waking the pool costs more than the work.
  const int64_t grain = std::max<int64_t>(1, 16384 / L);
  at::parallel_for(0, z.B, grain, [&](int64_t begin, int64_t end) {
    Scratch s;
    s.key.resize(L);
    for (int64_t b = begin; b < end; ++b) {
      s.cls.assign(L, kKept);
      if (z.n_hard > 0) {
        error_keys(errors + b * L, b, L, s);
        select_smallest(s, L, z.n_hard, kHard);
      }
      if (z.n_random > 0) {
        random_keys(noise == nullptr ? nullptr : noise + b * L, static_cast<uint64_t>(seed),
                    static_cast<uint64_t>(offset), b, L, s);
        select_smallest(s, L, z.n_random, kRandom);
      }
      // Kept patches first, then hidden ones, each in index order.
      int64_t kept_before = 0;
      for (int64_t l = 0; l < L; ++l) {
        const bool kept = s.cls[l] == kKept;
        const int64_t position = kept ? kept_before : z.len_keep + l - kept_before;
        active[b * L + l] = kept;
        hard[b * L + l] = s.cls[l] == kHard;
        restore[b * L + l] = position;
        shuffle[b * L + position] = l;
        kept_before += kept;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> anatomical_mask_cpu(
    const at::Tensor& errors, const std::optional<at::Tensor>& noise, int64_t len_keep,
    int64_t n_hard, int64_t seed, int64_t offset) {
  const Sizes z = check_args(errors, noise, len_keep, n_hard, seed, offset);
  // Errors are not read without hard patches (random_mask passes an expanded zero).
  const at::Tensor ec = z.n_hard > 0 ? errors.contiguous() : errors;
  const at::Tensor nc = noise.has_value() ? noise->contiguous() : at::Tensor();
  const auto flags = errors.options().dtype(at::kBool);
  const auto ids = errors.options().dtype(at::kLong);
  at::Tensor active = new_output({z.B, z.L}, flags);
  at::Tensor hard = new_output({z.B, z.L}, flags);
  at::Tensor shuffle = new_output({z.B, z.L}, ids);
  at::Tensor restore = new_output({z.B, z.L}, ids);
  const float* noise_ptr = nc.defined() ? nc.const_data_ptr<float>() : nullptr;
  const auto run = [&](auto* errors_ptr) {
    select_samples(z, errors_ptr, noise_ptr, seed, offset, active.data_ptr<bool>(),
                   hard.data_ptr<bool>(), shuffle.data_ptr<int64_t>(), restore.data_ptr<int64_t>());
  };
  switch (ec.scalar_type()) {
    case at::kHalf: run(static_cast<const c10::Half*>(ec.const_data_ptr())); break;
    case at::kBFloat16: run(static_cast<const c10::BFloat16*>(ec.const_data_ptr())); break;
    default: run(static_cast<const float*>(ec.const_data_ptr())); break;
  }
  return {active, hard, shuffle, restore};
}

}  // namespace

TORCH_LIBRARY_IMPL(anatomask_fast, CPU, m) {
  m.impl("anatomical_mask", &anatomical_mask_cpu);
}

}  // namespace anatomask_fast
