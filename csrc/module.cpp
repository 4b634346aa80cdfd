// The Python module mucs_fast._C. It holds no functions: importing it loads this shared library,
// whose TORCH_LIBRARY_IMPL blocks register the C++ CPU kernels of the mucs_fast ops and, when
// built, the CUDA kernels as mucs_fast_cuda::<op> with the dispatcher. The schemas, fakes, autograd
// and vmap rules are in Python (mucs_fast/ops), which imports this module lazily and picks the
// kernel of each op's CUDA key (mucs_fast/ops/_backend.py).
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "Compiled kernels of the mucs_fast ops (registered on import).",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
