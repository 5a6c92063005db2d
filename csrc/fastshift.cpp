// Every fastshift operator schema, declared once.
//
// Device bodies register themselves with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and
// csrc/cuda/*.cu, so the dispatcher picks the body from the input's device. Autograd and
// fake (meta) kernels are registered from Python (fastshift/ops/_registry.py).
#include <torch/library.h>

#include <Python.h>

// Importing fastshift._C as a Python module only needs a module object: the operators live
// in the dispatcher, reached as torch.ops.fastshift.<name>.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastshift, m) {
  // ShuffleNetV2 channel shuffle of the released code: x [B, C, H, W] with C even ->
  // (x[:, 0::2], x[:, 1::2]), each [B, C/2, H, W] and contiguous.
  m.def("channel_split(Tensor x) -> (Tensor, Tensor)");
  // Inverse of channel_split (and its backward): (even, odd) [B, C/2, H, W] -> [B, C, H, W]
  // with out[:, 0::2] = even and out[:, 1::2] = odd.
  m.def("channel_interleave(Tensor even, Tensor odd) -> Tensor");
  // The CUDA toolkit version the extension was compiled with, or 0 for a CPU-only build.
  m.def("cuda_version() -> int");
}
