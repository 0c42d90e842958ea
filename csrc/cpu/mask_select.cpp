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

namespace anatomask_fast {
namespace {

using namespace mask_select;

struct Scratch {
  std::vector<uint32_t> key;
  std::vector<uint8_t> cls;
  std::vector<uint32_t> hist;
  std::vector<uint64_t> bucket;
  std::vector<uint32_t> words;
};

constexpr size_t kSmallBucket = 32;

// About L/8 bins per digit: histograms much larger than the sample cost more to
// clear and scan than the sample itself.
int digit_bits(int64_t L) {
  int width = 0;
  while ((int64_t{1} << width) <= L) ++width;
  return std::clamp(width - 3, 4, 11);
}

// Index of the bucket holding the `need`-th smallest (1-based) in `hist`; `need` becomes
// the rank inside that bucket.
uint32_t find_bucket(const std::vector<uint32_t>& hist, int64_t& need) {
  uint32_t digit = 0;
  while (need > hist[digit]) need -= hist[digit++];
  return digit;
}

// Marks with `mark` the k smallest keys among the patches still kKept, ties by lower
// index; `key_of(l)` gives patch l's key (stored on the way). A radix select: the
// first digit (the key's top bits) is histogrammed over the sample while the keys are
// made, later digits only over the (key, index) pairs of the threshold's bucket,
// until the bucket is small enough for nth_element. Patches in lower buckets are
// taken at once.
template <typename KeyOf>
void select_smallest(Scratch& s, int64_t L, int64_t k, uint8_t mark, KeyOf key_of) {
  const int digit_width = digit_bits(L);
  int shift = 32 - digit_width;
  const uint32_t ignored = uint32_t{1} << digit_width;  // an extra bin for taken patches
  // Branch-free loops: which patch is eligible or below the threshold is random, so
  // branches on it would mispredict half the time.
  // Raw pointers in locals: stores through uint8_t* may alias anything, which would
  // make the compiler reload every vector's data pointer in every iteration.
  s.hist.assign(ignored + 1, 0);
  s.bucket.resize(static_cast<size_t>(L));
  uint32_t* const hist = s.hist.data();
  uint32_t* const keys = s.key.data();
  uint8_t* const cls = s.cls.data();
  uint64_t* const bucket = s.bucket.data();
  for (int64_t l = 0; l < L; ++l) {
    const uint32_t key = key_of(l);
    keys[l] = key;
    ++hist[cls[l] == kKept ? key >> shift : ignored];
  }
  int64_t need = k;
  uint32_t digit = find_bucket(s.hist, need);
  size_t size = 0;
  for (int64_t l = 0; l < L; ++l) {
    const bool eligible = cls[l] == kKept;
    const uint32_t top = keys[l] >> shift;
    cls[l] = eligible && top < digit ? mark : cls[l];
    bucket[size] = (static_cast<uint64_t>(keys[l]) << 32) | static_cast<uint64_t>(l);
    size += eligible && top == digit;
  }
  s.bucket.resize(size);
  while (s.bucket.size() > kSmallBucket && static_cast<size_t>(need) < s.bucket.size() &&
         shift > 0) {
    const int bits = std::min(digit_width, shift);
    shift -= bits;
    const uint64_t digit_mask = (uint64_t{1} << bits) - 1;
    s.hist.assign(size_t{1} << bits, 0);
    for (const uint64_t pair : s.bucket) ++s.hist[(pair >> (32 + shift)) & digit_mask];
    digit = find_bucket(s.hist, need);
    size_t kept = 0;
    for (const uint64_t pair : s.bucket) {
      const uint64_t d = (pair >> (32 + shift)) & digit_mask;
      uint8_t& cls = s.cls[pair & 0xFFFFFFFFu];
      cls = d < digit ? mark : cls;
      s.bucket[kept] = pair;
      kept += d == digit;
    }
    s.bucket.resize(kept);
  }
  if (static_cast<int64_t>(s.bucket.size()) > need) {
    std::nth_element(s.bucket.begin(), s.bucket.begin() + need, s.bucket.end());
  }
  for (int64_t i = 0; i < need; ++i) s.cls[s.bucket[i] & 0xFFFFFFFFu] = mark;
}

template <typename scalar_t>
void select_hard(const scalar_t* errors, int64_t b, int64_t L, int64_t k, Scratch& s) {
  bool finite = true;
  select_smallest(s, L, k, kHard, [&](int64_t l) {
    const float e = static_cast<float>(errors[l]);
    finite &= std::isfinite(e);
    return error_key(e);
  });
  if (!finite) {
    const int64_t bad =
        std::find_if(errors, errors + L,
                     [](scalar_t e) { return !std::isfinite(static_cast<float>(e)); }) -
        errors;
    TORCH_CHECK_VALUE(false, "anatomical_mask: argument 'errors' must be finite, got ",
                      static_cast<float>(errors[bad]), " at (", b, ", ", bad, ")");
  }
}

void select_random(const float* noise, uint64_t seed, uint64_t offset, int64_t b, int64_t L,
                   int64_t k, Scratch& s) {
  if (noise != nullptr) {
    select_smallest(s, L, k, kRandom, [&](int64_t l) { return float_order(noise[l]); });
    return;
  }
  // Whole Philox blocks first (an independent loop the compiler can vectorize); the
  // sample's words need not start at a block boundary.
  const uint64_t first = static_cast<uint64_t>(b) * static_cast<uint64_t>(L);
  const uint64_t block0 = first / 4, blocks = (first + L + 3) / 4 - block0;
  s.words.resize(blocks * 4);
  for (uint64_t i = 0; i < blocks; ++i) {
    const Philox4 block = philox(seed, offset + block0 + i);
    for (int w = 0; w < 4; ++w) s.words[i * 4 + w] = block.word[w];
  }
  const uint32_t* words = s.words.data() + (first - block0 * 4);
  select_smallest(s, L, k, kRandom, [words](int64_t l) { return words[l]; });
}

template <typename scalar_t>
void select_samples(const Sizes& z, const scalar_t* errors, const float* noise, int64_t seed,
                    int64_t offset, bool* active, bool* hard, int64_t* shuffle, int64_t* restore) {
  const int64_t L = z.L;
  // A sample costs about 10 ns per patch; waking the thread pool costs tens of
  // microseconds on an idle machine and up to a scheduler time slice on a busy one,
  // so only batches of a few milliseconds of work (256K patches) are split.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / L);
  at::parallel_for(0, z.B, grain, [&](int64_t begin, int64_t end) {
    Scratch s;
    s.key.resize(L);
    for (int64_t b = begin; b < end; ++b) {
      s.cls.assign(L, kKept);
      if (z.n_hard > 0) select_hard(errors + b * L, b, L, z.n_hard, s);
      if (z.n_random > 0) {
        select_random(noise == nullptr ? nullptr : noise + b * L, static_cast<uint64_t>(seed),
                      static_cast<uint64_t>(offset), b, L, z.n_random, s);
      }
      // Kept patches first, then hidden ones, each in index order (branch-free).
      const uint8_t* const cls = s.cls.data();
      bool* const active_row = active + b * L;
      bool* const hard_row = hard + b * L;
      int64_t* const restore_row = restore + b * L;
      int64_t* const shuffle_row = shuffle + b * L;
      const int64_t len_keep = z.len_keep;
      int64_t kept_before = 0;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t kept = cls[l] == kKept;
        const int64_t hidden_position = len_keep + l - kept_before;
        const int64_t position = hidden_position + kept * (kept_before - hidden_position);
        active_row[l] = kept;
        hard_row[l] = cls[l] == kHard;
        restore_row[l] = position;
        shuffle_row[position] = l;
        kept_before += kept;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> anatomical_mask_cpu(
    const at::Tensor& errors, const std::optional<at::Tensor>& noise, int64_t len_keep,
    int64_t n_hard, int64_t seed, int64_t offset) {
  const Sizes z = check_args(errors, noise, len_keep, n_hard, seed, offset);
  Buffers t = prepare(errors, noise, z);
  const float* noise_ptr = t.noise.defined() ? t.noise.const_data_ptr<float>() : nullptr;
  const auto run = [&](auto* errors_ptr) {
    select_samples(z, errors_ptr, noise_ptr, seed, offset, t.active.data_ptr<bool>(),
                   t.hard.data_ptr<bool>(), t.shuffle.data_ptr<int64_t>(),
                   t.restore.data_ptr<int64_t>());
  };
  switch (t.errors.scalar_type()) {
    case at::kHalf:
      run(static_cast<const c10::Half*>(t.errors.const_data_ptr()));
      break;
    case at::kBFloat16:
      run(static_cast<const c10::BFloat16*>(t.errors.const_data_ptr()));
      break;
    default:
      run(static_cast<const float*>(t.errors.const_data_ptr()));
      break;
  }
  return t.outputs();
}

}  // namespace

TORCH_LIBRARY_IMPL(anatomask_fast, CPU, m) {
  m.impl("anatomical_mask", &anatomical_mask_cpu);
}

}  // namespace anatomask_fast
