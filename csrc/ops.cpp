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

  // ---- segmentation loss family (csrc/*/seg_loss.*) ----
  // nnU-Net Dice + CE statistics of logits (B, K, *spatial) and labels (B, S), in one
  // pass: class_sums (B, 3, K) = (intersection, sum of softmax, label count) per
  // sample and class, ce_sums (B,) = sum of -log softmax[label]; fp32 (fp64 for fp64).
  // Voxels labelled ignore_index count nowhere.
  m.def("dice_ce_loss(Tensor logits, Tensor labels, int? ignore_index) -> (Tensor, Tensor)");
  // Gradient of the logits given the gradients of both outputs, softmax recomputed.
  m.def("dice_ce_loss_backward(Tensor grad_class_sums, Tensor grad_ce_sums, Tensor logits, "
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

PyMethodDef methods[] = {
    {"cuda_kernels_built", cuda_kernels_built, METH_NOARGS,
     "Whether this build contains the CUDA kernels."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                      "anatomask_fast compiled kernels (registered as torch.ops.anatomask_fast)",
                      -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
