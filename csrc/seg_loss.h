// Shape checks shared by the CPU and CUDA kernels of the segmentation loss family.
// Header-light on purpose: it is included by every kernel file of the family.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <optional>

namespace anatomask_fast {

struct SegLossGeometry {
  int64_t B, K, S;  // batch, classes, voxels per sample
  int64_t ignore;   // the ignored label, or a value no label of any dtype can hold
  bool has_ignore;
};

// Validates logits (B, K, *spatial) and labels (B, S) for op `op`.
inline SegLossGeometry seg_loss_geometry(const at::Tensor& logits, const at::Tensor& labels,
                                         std::optional<int64_t> ignore_index, const char* op) {
  TORCH_CHECK_VALUE(logits.dim() >= 3, op, ": argument 'logits' must be (B, K, H, W, D), got ",
                    logits.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), op,
                   ": argument 'logits' must be a float tensor, got ", logits.scalar_type());
  const auto l = labels.scalar_type();
  TORCH_CHECK_TYPE(l == at::kLong || l == at::kInt || l == at::kShort || l == at::kByte, op,
                   ": argument 'labels' must be int64/int32/int16/uint8, got ", l);
  const int64_t B = logits.size(0), K = logits.size(1);
  const int64_t S = logits.numel() / std::max<int64_t>(1, B * K);
  TORCH_CHECK_VALUE(K > 0, op, ": argument 'logits' must have at least one class");
  TORCH_CHECK_VALUE(labels.dim() == 2 && labels.size(0) == B && labels.size(1) == S, op,
                    ": argument 'labels' must have shape (B=", B, ", S=", S,
                    ") (the flattened label map), got ", labels.sizes());
  TORCH_CHECK_VALUE(labels.device() == logits.device(), op, ": argument 'labels' is on ",
                    labels.device(), " but 'logits' is on ", logits.device());
  return {B, K, S, ignore_index.value_or(std::numeric_limits<int64_t>::min()),
          ignore_index.has_value()};
}

// The sums (and their gradients) are fp32, fp64 for fp64 logits.
inline at::ScalarType sums_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Runs body(labels_ptr) with the label map's element type (the logits' dtype comes
// from AT_DISPATCH around it).
template <typename F>
void with_labels(const at::Tensor& labels, F&& body) {
  switch (labels.scalar_type()) {
    case at::kLong:
      return body(labels.const_data_ptr<int64_t>());
    case at::kInt:
      return body(labels.const_data_ptr<int32_t>());
    case at::kShort:
      return body(labels.const_data_ptr<int16_t>());
    default:
      return body(labels.const_data_ptr<uint8_t>());
  }
}

// The backward's inputs, checked and made contiguous; the incoming gradients of the
// forward's two outputs in the sums' dtype (autograd may hand in expanded ones).
struct SegLossBackwardInputs {
  SegLossGeometry g;
  at::Tensor grad_class_sums, grad_ce_sums, logits, labels;
};

inline SegLossBackwardInputs seg_loss_backward_inputs(const at::Tensor& grad_class_sums,
                                                      const at::Tensor& grad_ce_sums,
                                                      const at::Tensor& logits,
                                                      const at::Tensor& labels,
                                                      std::optional<int64_t> ignore_index) {
  const char* op = "dice_ce_loss_backward";
  const SegLossGeometry g = seg_loss_geometry(logits, labels, ignore_index, op);
  TORCH_CHECK_VALUE(grad_class_sums.dim() == 3 && grad_class_sums.size(0) == g.B &&
                        grad_class_sums.size(1) == 3 && grad_class_sums.size(2) == g.K,
                    op, ": argument 'grad_class_sums' must have shape (", g.B, ", 3, ", g.K,
                    "), got ", grad_class_sums.sizes());
  TORCH_CHECK_VALUE(grad_ce_sums.dim() == 1 && grad_ce_sums.size(0) == g.B, op,
                    ": argument 'grad_ce_sums' must have shape (", g.B, "), got ",
                    grad_ce_sums.sizes());
  TORCH_CHECK_VALUE(
      grad_class_sums.device() == logits.device() && grad_ce_sums.device() == logits.device(), op,
      ": the gradients must be on ", logits.device(), " like 'logits'");
  const auto dtype = sums_dtype(logits);
  return {g, grad_class_sums.to(dtype).contiguous(), grad_ce_sums.to(dtype).contiguous(),
          logits.contiguous(), labels.contiguous()};
}

}  // namespace anatomask_fast
