// ATen CUDA kernel of mucs_fast::noisy_inputs (schema: Python, mucs_fast/ops/noisy_inputs.py),
// registered as mucs_fast_cuda::noisy_inputs: Python picks it or the Triton kernel for the CUDA key
// (mucs_fast/ops/_backend.py). Launches cuda::noisy_inputs_kernel (csrc/cuda/kernels.cuh):
// elementwise, the operations and rounding of csrc/core/noisy_inputs.h, bit-identical to the CPU.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../checks.h"
#include "../registry.h"
#include "kernels.cuh"

namespace mucs_fast {
namespace {

at::Tensor noisy_inputs_cuda(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& a,
                             const at::Tensor& b, const std::optional<at::Tensor>& c) {
  const c10::cuda::CUDAGuard guard(x.device());
  const NoisyArgs args = noisy_args("noisy_inputs", x, eps, a, b, c, at::kCUDA);
  std::vector<int64_t> shape{args.M * args.n};
  for (int64_t d = 1; d < x.dim(); ++d) shape.push_back(x.size(d));
  at::Tensor out = at::empty(shape, x.options());
  const int64_t rows = args.M * args.n;
  const int64_t chunk = cuda::kNoisyThreads * cuda::kNoisyIlp;
  const int64_t chunks = (args.D + chunk - 1) / chunk;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max() && chunks <= 65535,
              "noisy_inputs: M·n = ", rows, " rows of D = ", args.D,
              " elements exceed the CUDA grid limit");
  if (rows == 0 || args.D == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
  dispatch_noisy(args, [&](auto has_c, auto t, auto e) {
    using T = typename decltype(t)::type;
    using E = typename decltype(e)::type;
    using Acc = at::opmath_type<T>;
    cuda::noisy_inputs_kernel<decltype(has_c)::value, T, E, Acc>
        <<<grid, cuda::kNoisyThreads, 0, stream>>>(
            out.mutable_data_ptr<T>(), args.x.const_data_ptr<T>(), args.x.stride(0),
            args.eps.const_data_ptr<E>(), args.eps_ms, args.eps_ns, args.a.const_data_ptr<Acc>(),
            args.b.const_data_ptr<Acc>(), args.has_c ? args.c.const_data_ptr<Acc>() : nullptr,
            args.n, args.D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void register_noisy_inputs(torch::Library& m) { m.impl("noisy_inputs", &noisy_inputs_cuda); }
const AddCudaRegistrar add_noisy_inputs("noisy_inputs", &register_noisy_inputs);

}  // namespace

TORCH_LIBRARY_IMPL(mucs_fast_cuda, CUDA, m) { register_noisy_inputs(m); }

}  // namespace mucs_fast
