"""The one build of mucs_fast: the compiled extension mucs_fast._C and the package layout.

mucs_fast._C: the ATen CPU kernels (csrc/cpu, always, with OpenMP) and, when the installed torch
was built with CUDA and nvcc is found (CUDA_HOME), the CUDA kernels (csrc/cuda). The gate is the
toolchain, never a visible GPU, so a GPU-less build machine still builds the CUDA kernels.
The top-level kernels/ folder (Triton) is installed as the subpackage mucs_fast.kernels.

Build against the local torch: pip install --no-build-isolation [-e] .
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    # Relative paths: setuptools refuses absolute ones in an extension's sources.
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _with_cuda():
    return (
        bool(torch.version.cuda)
        and CUDA_HOME is not None
        and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )


def _extension():
    # The C++ standard is left to torch.utils.cpp_extension: the one the installed torch's headers
    # need (C++17 for older torch, C++20 for recent ones). -ffp-contract=off: no FMA contraction,
    # so the CPU kernels round exactly like the CUDA ones (csrc/core/common.h). -fno-math-errno:
    # std::sqrt is the IEEE instruction without an errno branch, so loops using it vectorize.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
    sources = _sources("csrc/module.cpp") + _sources("csrc/cpu/*.cpp")
    kwargs = dict(include_dirs=[os.path.join(HERE, "csrc")], extra_link_args=["-fopenmp"])
    if _with_cuda():
        nvcc = ["-O3", "--fmad=false", "-lineinfo"]
        return CUDAExtension(
            "mucs_fast._C",
            sources + _sources("csrc/cuda/*.cu"),
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **kwargs,
        )
    return CppExtension("mucs_fast._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    packages=find_packages(include=["mucs_fast", "mucs_fast.*"]) + ["mucs_fast.kernels"],
    package_dir={"mucs_fast.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
