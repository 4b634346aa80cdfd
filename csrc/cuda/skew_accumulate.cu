// ATen CUDA kernel of mucs_fast::skew_accumulate (schema: Python, mucs_fast/ops/skew_accumulate.py),
// registered as mucs_fast_cuda::skew_accumulate: Python picks it or the Triton kernel for the CUDA
// key (mucs_fast/ops/_backend.py).
// Launches cuda::skew_accumulate_kernel (csrc/cuda/kernels.cuh): one thread per (k, n) row,
// ascending m, Acc accumulation; bit-identical to the CPU kernel (csrc/core/skew_accumulate.h).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"
#include "../registry.h"
#include "kernels.cuh"

namespace mucs_fast {
namespace {

at::Tensor skew_accumulate_cuda(const at::Tensor& loss_u, const at::Tensor& loss_t, double eps,
                                bool use_ratio) {
  const c10::cuda::CUDAGuard guard(loss_u.device());
  const SkewArgs a = skew_args("skew_accumulate", loss_u, loss_t, at::kCUDA);
  at::Tensor S = at::empty({a.K, a.N}, loss_u.options().dtype(a.acc));
  const int64_t blocks = (a.K * a.N + cuda::kSkewRows - 1) / cuda::kSkewRows;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "skew_accumulate: K·n = ", a.K * a.N, " rows exceed the CUDA grid limit");
  if (blocks == 0) return S;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_skew(a, use_ratio, [&](auto ratio, auto t, auto u) {
    using T = typename decltype(t)::type;
    using U = typename decltype(u)::type;
    using Acc = at::opmath_type<T>;
    cuda::skew_accumulate_kernel<decltype(ratio)::value, T, U, Acc>
        <<<static_cast<unsigned>(blocks), cuda::kSkewRows, 0, stream>>>(
            S.mutable_data_ptr<Acc>(), a.loss_u.const_data_ptr<T>(), a.loss_u.stride(0),
            a.loss_u.stride(1), a.loss_t.const_data_ptr<U>(), a.loss_t.stride(0), a.K, a.N, a.M,
            static_cast<Acc>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return S;
}

void register_skew_accumulate(torch::Library& m) { m.impl("skew_accumulate", &skew_accumulate_cuda); }
const AddCudaRegistrar add_skew_accumulate("skew_accumulate", &register_skew_accumulate);

}  // namespace

TORCH_LIBRARY_IMPL(mucs_fast_cuda, CUDA, m) { register_skew_accumulate(m); }

}  // namespace mucs_fast
