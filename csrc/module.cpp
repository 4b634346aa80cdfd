// The Python module mucs_fast._C. Importing it loads this shared library, whose
// TORCH_LIBRARY_IMPL blocks register the C++ CPU kernels of the mucs_fast ops and, when built, the
// CUDA kernels as mucs_fast_cuda::<op> with the dispatcher. The schemas, fakes, autograd and vmap
// rules are in Python (mucs_fast/ops), which imports this module lazily and picks the kernel of
// each op's CUDA key (mucs_fast/ops/_backend.py): Triton, or CUDA C++ through
// register_cuda_kernel below (csrc/registry.h).
#include <Python.h>
#include <torch/library.h>

#include <exception>

#include "registry.h"

namespace {

// register_cuda_kernel(op: str) -> bool: registers the CUDA C++ kernel of mucs_fast::<op> for the
// CUDA dispatch key, for the rest of the process; False when this build has no CUDA kernel for op.
PyObject* register_cuda_kernel(PyObject*, PyObject* args) {
  const char* op = nullptr;
  if (!PyArg_ParseTuple(args, "s", &op)) return nullptr;
  const auto& registrars = mucs_fast::cuda_registrars();
  const auto it = registrars.find(op);
  if (it == registrars.end()) Py_RETURN_FALSE;
  try {
    // Never destroyed: destroying a Library removes its registrations.
    auto* lib = new torch::Library(torch::Library::IMPL, "mucs_fast", c10::DispatchKey::CUDA,
                                   __FILE__, __LINE__);
    it->second(*lib);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_TRUE;
}

PyMethodDef methods[] = {
    {"register_cuda_kernel", register_cuda_kernel, METH_VARARGS,
     "Register the CUDA C++ kernel of mucs_fast::<op> for the CUDA key; False if not built."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "Compiled kernels of the mucs_fast ops (registered on import).",
      -1, methods};
  return PyModule_Create(&module_def);
}
