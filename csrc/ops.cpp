// The op schemas of the `dmup` namespace, defined once; kernels register per device elsewhere
// (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cpp for CUDA), fake and autograd rules in dmup_kernels/ops.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import dmup_kernels._C` loads this library, which runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dmup, m) {
  // out = x + scale * MS(phi(branch_out)); MS is mean subtraction over the last dim when enabled.
  m.def("scaled_residual(Tensor x, Tensor branch_out, float scale, str activation, bool mean_subtract) -> Tensor");
  // d out / d branch_out applied to grad_out: phi'(branch_out) * MS(scale * grad_out).
  m.def("scaled_residual_backward(Tensor grad_out, Tensor branch_out, float scale, str activation, "
        "bool mean_subtract) -> Tensor");
  // L blocks in one call (SPEC 2.4); x is (B, n). Returns the output and the state the backward
  // needs: saved (L, n, B) holds every layer's input, mask the sign bits of h for relu/abs; both
  // have 0 layers when save_for_backward is false (inference).
  m.def("residual_stack(Tensor x, Tensor weight, Tensor? bias, float scale, str activation, str block, "
        "bool mean_subtract, bool save_for_backward) -> (Tensor out, Tensor saved, Tensor mask)");
  // Gradients of residual_stack wrt x, weight and bias (grad_bias has 0 rows when bias is None).
  m.def("residual_stack_backward(Tensor grad_out, Tensor saved, Tensor mask, Tensor weight, Tensor? bias, "
        "float scale, str activation, str block, bool mean_subtract) -> (Tensor grad_x, Tensor grad_weight, "
        "Tensor grad_bias)");
}
