// The one place where every anatomask_fast operator schema is declared.
// Backends register implementations in csrc/cpu/<family>.cpp and
// csrc/cuda/<family>.cu with TORCH_LIBRARY_IMPL; autograd and fake (meta)
// kernels are registered from Python (anatomask_fast/ops/<family>.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(anatomask_fast, m) {
  // ---- gather/scatter family (csrc/*/gather_scatter.*) ----
  // y = x * upsample(active): hidden patches of a (B, C, H, W, D) volume set to
  // exactly zero, reading the (B, 1, h, w, d) bool mask directly.
  m.def("apply_mask(Tensor x, Tensor active) -> Tensor");

  // ---- patch-loss family (csrc/*/patch_loss.*) ----
  // Per-patch reconstruction error of `rec` against the patches of `x` (normalized
  // per patch when norm_pix), times hidden = !active: (per_patch, mean, rstd), each
  // (B, L) fp32 (float64 for float64 inputs); mean/rstd are the target's statistics
  // (0 and 1 for raw targets; 0 where hidden_only skipped a visible patch).
  m.def(
      "patch_recon_loss(Tensor rec, Tensor x, Tensor active, bool norm_pix, float eps, "
      "bool hidden_only) -> (Tensor, Tensor, Tensor)");
  // grad_rec = grad_per_patch * hidden * 2/N * (rec - (x - mean) * rstd), per patch.
  m.def(
      "patch_recon_loss_backward(Tensor grad_per_patch, Tensor rec, Tensor x, "
      "Tensor active, Tensor mean, Tensor rstd, bool hidden_only) -> Tensor");
  // ---- mask_select family (csrc/*/mask_select.*) ----
  // AnatoMask selection for errors (B, L): hide the n_hard largest errors (ties by
  // lower index) and the L - len_keep - n_hard remaining patches with the smallest
  // noise (given, or Philox from (seed, offset)). Returns (active, hard, ids_shuffle,
  // ids_restore): bool (B, L) visible and loss-chosen flags, int64 (B, L) ids with
  // the kept patches first, each part in index order. Not differentiable.
  m.def(
      "anatomical_mask(Tensor errors, Tensor? noise, int len_keep, int n_hard, int seed, "
      "int offset) -> (Tensor, Tensor, Tensor, Tensor)");
  // Mask token (C,) at hidden voxels, x at visible ones; backward: (grad_x, grad_token
  // (C,) in the accumulation dtype).
  m.def("densify(Tensor x, Tensor active, Tensor mask_token) -> Tensor");
  m.def("densify_backward(Tensor grad, Tensor active) -> (Tensor, Tensor)");
  // Norm over visible voxels, per (sample, channel) or pooled over the batch; returns
  // (y, mean, rstd) with statistics (B or 1, C) in the accumulation dtype.
  // activation: "none" | "leaky_relu" | "relu6".
  m.def(
      "sparse_norm(Tensor x, Tensor active, Tensor? weight, Tensor? bias, bool per_sample, "
      "float eps, str activation) -> (Tensor, Tensor, Tensor)");
  m.def(
      "sparse_norm_backward(Tensor grad, Tensor x, Tensor active, Tensor? weight, "
      "Tensor? bias, Tensor mean, Tensor rstd, str activation) -> (Tensor, Tensor, Tensor)");
  // Token layout (B, L, C): rows of x by ids_keep (B, K); backward scatters them into
  // zeros (B, L, C).
  m.def("gather_tokens(Tensor x, Tensor ids_keep) -> Tensor");
  m.def("gather_tokens_backward(Tensor grad, Tensor ids_keep, SymInt length) -> Tensor");
  // out[b, l] = (r < K ? x_visible[b, r] : mask_token) (+ pos_embed[l]), r = ids_restore[b, l];
  // backward: (grad_x_visible, grad_mask_token (C,), grad_pos_embed (L, C) or empty),
  // tokens in the accumulation dtype.
  m.def(
      "scatter_tokens(Tensor x_visible, Tensor ids_restore, Tensor mask_token, "
      "Tensor? pos_embed) -> Tensor");
  m.def(
      "scatter_tokens_backward(Tensor grad, Tensor ids_restore, SymInt len_keep, "
      "bool with_pos) -> (Tensor, Tensor, Tensor)");
  // ---- packing family (csrc/*/packing.*) ----
  // The visible patches of a (B, C, H, W, D) map as (N, C, ph, pw, pd), and back
  // (zero-filled where hidden); `patches` (N,) flat cell indices, `slots` (B, h, w, d)
  // packed index per cell or -1. pad_halo extends each patch by lo/hi voxels per
  // axis read from its neighbours (`neighbours` (N, 27), -1 = zero); its backward is
  // the deterministic gather-add adjoint.
  m.def("pack_patches(Tensor x, Tensor patches, Tensor slots) -> Tensor");
  m.def("unpack_patches(Tensor packed, Tensor patches, Tensor slots) -> Tensor");
  m.def("pad_halo(Tensor packed, Tensor neighbours, int lo, int hi) -> Tensor");
  m.def("pad_halo_backward(Tensor grad, Tensor neighbours, int lo, int hi) -> Tensor");
  // ---- segmentation loss family (csrc/*/seg_loss.*) ----
  // nnU-Net Dice + CE statistics of logits (B, K, *spatial) and labels (B, S), in one
  // pass: class_sums (B, 3, K) = (intersection, sum of softmax, label count) per
  // sample and class, ce_sums (B,) = sum of -log softmax[label]; fp32 (fp64 for fp64).
  // Voxels labelled ignore_index count nowhere.
  m.def("dice_ce_loss(Tensor logits, Tensor labels, int? ignore_index) -> (Tensor, Tensor)");
  // Gradient of the logits given the gradients of both outputs, softmax recomputed.
  m.def(
      "dice_ce_loss_backward(Tensor grad_class_sums, Tensor grad_ce_sums, Tensor logits, "
      "Tensor labels, int? ignore_index) -> Tensor");
}

namespace {

PyObject* cuda_kernels_built(PyObject*, PyObject*) {
#ifdef ANATOMASK_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {{"cuda_kernels_built", cuda_kernels_built, METH_NOARGS,
                          "Whether this build contains the CUDA kernels."},
                         {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                      "anatomask_fast compiled kernels (registered as torch.ops.anatomask_fast)",
                      -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&module);
}
