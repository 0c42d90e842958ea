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
