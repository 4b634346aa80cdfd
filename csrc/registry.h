// CUDA kernels that Python registers at run time for the CUDA key of the public mucs_fast ops.
// Every CUDA kernel is always registered as mucs_fast_cuda::<op> (reachable for tests and benches);
// for mucs_fast::<op>, mucs_fast/ops/_backend.py picks Triton or CUDA C++ per op, and for CUDA C++
// calls mucs_fast._C.register_cuda_kernel("<op>") (csrc/module.cpp), which runs the registrar
// below: the dispatcher then calls the C++ kernel directly, no Python in between.
#pragma once

#include <torch/library.h>

#include <map>
#include <string>

namespace mucs_fast {

using Registrar = void (*)(torch::Library&);

inline std::map<std::string, Registrar>& cuda_registrars() {
  static std::map<std::string, Registrar> registrars;
  return registrars;
}

// At static initialization: `const AddCudaRegistrar add("op", [](torch::Library& m) {...});`
struct AddCudaRegistrar {
  AddCudaRegistrar(const char* op, Registrar registrar) { cuda_registrars()[op] = registrar; }
};

}  // namespace mucs_fast
