// The op schemas of the `dmup` namespace, defined once; kernels register per device elsewhere
// (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cpp for CUDA), fake and autograd rules in dmup_kernels/ops.
#include <Python.h>
#include <torch/library.h>

#include <stdexcept>

#include "cpu/cpu_isa.h"

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(dmup::cpu_isa_name(dmup::active_cpu_isa())); }

PyObject* runnable_cpu_isas(PyObject*, PyObject*) {
  const auto isas = dmup::runnable_cpu_isas();
  PyObject* names = PyTuple_New(static_cast<Py_ssize_t>(isas.size()));
  for (size_t i = 0; i < isas.size(); ++i) {
    PyTuple_SET_ITEM(names, static_cast<Py_ssize_t>(i), PyUnicode_FromString(dmup::cpu_isa_name(isas[i])));
  }
  return names;
}

PyObject* pin_cpu_isa(PyObject*, PyObject* name) {
  const char* text = PyUnicode_AsUTF8(name);
  if (text == nullptr) return nullptr;
  try {
    dmup::pin_cpu_isa(text);
  } catch (const std::invalid_argument& error) {
    PyErr_SetString(PyExc_ValueError, error.what());
    return nullptr;
  } catch (const std::runtime_error& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set the float32 CPU kernels run on."},
    {"runnable_cpu_isas", runnable_cpu_isas, METH_NOARGS, "The instruction sets this CPU runs, best first."},
    {"pin_cpu_isa", pin_cpu_isa, METH_O, "Runs the float32 CPU kernels on the named instruction set."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// `import dmup_kernels._C` loads this library, which runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dmup, m) {
  // out = x + scale * MS(phi(branch_out)); MS is mean subtraction over the last dim when enabled.
  m.def("scaled_residual(Tensor x, Tensor branch_out, float scale, str activation, bool mean_subtract) -> Tensor");
  // d out / d branch_out applied to grad_out: phi'(branch_out) * MS(scale * grad_out).
  m.def(
      "scaled_residual_backward(Tensor grad_out, Tensor branch_out, float scale, str activation, "
      "bool mean_subtract) -> Tensor");
  // L blocks in one call (depth-fused, docs/design.md §3); x is (B, n). Returns the output and the state the backward
  // needs (§4): with checkpoint_every = 0, saved (L, n, B) holds every layer's input and mask the sign bits of h for
  // relu/abs; with checkpoint_every = k >= 1, saved (ceil(L/k), n, B) holds x_0, x_k, x_2k, ... and mask has 0
  // layers (the backward recomputes the rest). Both have 0 layers when save_for_backward is false (inference).
  m.def(
      "residual_stack(Tensor x, Tensor weight, Tensor? bias, float scale, str activation, str block, "
      "bool mean_subtract, bool save_for_backward, int checkpoint_every=0) -> (Tensor out, Tensor saved, Tensor mask)");
  // Gradients of residual_stack wrt x, weight and bias (grad_bias has 0 rows when bias is None).
  m.def(
      "residual_stack_backward(Tensor grad_out, Tensor saved, Tensor mask, Tensor weight, Tensor? bias, "
      "float scale, str activation, str block, bool mean_subtract, int checkpoint_every=0) -> (Tensor grad_x, "
      "Tensor grad_weight, Tensor grad_bias)");
  // L MLP blocks in one call, x <- x + s * MS(phi(x W1_l^T + b1_l) W2_l^T + b2_l) (docs/design.md §2.5, §3.8); x is
  // (B, n), weight1 (L, m, n), weight2 (L, n, m). The state is residual_stack's, with the sign bits of the hidden
  // pre-activation x W1_l^T + b1_l: mask (L, planes, m, ceil(B/16)) for relu/abs.
  m.def(
      "residual_mlp_stack(Tensor x, Tensor weight1, Tensor weight2, Tensor? bias1, Tensor? bias2, float scale, "
      "str activation, bool mean_subtract, bool save_for_backward, int checkpoint_every=0) -> (Tensor out, "
      "Tensor saved, Tensor mask)");
  // Gradients of residual_mlp_stack wrt x, weight1, weight2, bias1 and bias2 (a bias's has 0 rows when it is None).
  m.def(
      "residual_mlp_stack_backward(Tensor grad_out, Tensor saved, Tensor mask, Tensor weight1, Tensor weight2, "
      "Tensor? bias1, Tensor? bias2, float scale, str activation, bool mean_subtract, int checkpoint_every=0) -> "
      "(Tensor grad_x, Tensor grad_weight1, Tensor grad_weight2, Tensor grad_bias1, Tensor grad_bias2)");
}
