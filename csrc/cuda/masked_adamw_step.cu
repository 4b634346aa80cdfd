// ATen CUDA kernel of mucs_fast::masked_adamw_step_ (schema: Python,
// mucs_fast/ops/masked_adamw_step.py), registered as mucs_fast_cuda::masked_adamw_step_: Python
// picks it or the Triton kernel for the CUDA key (mucs_fast/ops/_backend.py). Launches
// cuda::masked_adamw_step_kernel (csrc/cuda/kernels.cuh): one launch for all K rows, bias
// corrections per row on the device (core::adamw_bias_corrections), elementwise in the order and
// rounding of csrc/core/masked_adamw_step.h.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../checks.h"
#include "../registry.h"
#include "kernels.cuh"

namespace mucs_fast {
namespace {

constexpr int64_t kMaxChunks = 2048;  // blocks per row; threads loop over the rest

template <typename T, int kVec>
void launch(at::Tensor& p, const at::Tensor& g, at::Tensor& m, at::Tensor& v,
            const at::Tensor& step, const at::Tensor& active, int64_t K, int64_t P, double lr,
            double beta1, double beta2, const core::AdamwScalars<T>& s, cudaStream_t stream) {
  const int64_t packs = P / kVec;
  const int64_t chunks =
      std::min(kMaxChunks, std::max<int64_t>(1, (packs + cuda::kAdamwThreads - 1) / cuda::kAdamwThreads));
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(K));
  cuda::masked_adamw_step_kernel<T, kVec><<<grid, cuda::kAdamwThreads, 0, stream>>>(
      p.mutable_data_ptr<T>(), g.const_data_ptr<T>(), m.mutable_data_ptr<T>(),
      v.mutable_data_ptr<T>(), step.const_data_ptr<int64_t>(), active.const_data_ptr<bool>(), P,
      lr, beta1, beta2, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

void masked_adamw_step_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                             at::Tensor& exp_avg_sq, const at::Tensor& step,
                             const at::Tensor& active, double lr, double beta1, double beta2,
                             double eps, double weight_decay) {
  const c10::cuda::CUDAGuard guard(param.device());
  const char* op = "masked_adamw_step_";
  const AdamwArgs a = adamw_args(op, param, grad, exp_avg, exp_avg_sq, step, active, at::kCUDA);
  TORCH_CHECK(a.K <= 65535, op, ": K = ", a.K, " rows exceed the CUDA grid limit");
  if (a.K == 0 || a.P == 0) return;
  const at::Tensor g = grad.contiguous(), st = step.contiguous(), act = active.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_contiguous(param, exp_avg, exp_avg_sq, [&](at::Tensor& p, at::Tensor& m, at::Tensor& v) {
    AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "masked_adamw_step_", [&] {
      using T = scalar_t;
      constexpr int kVec = 16 / sizeof(T);
      const auto s = core::adamw_scalars<T>(lr, beta1, beta2, eps, weight_decay);
      const bool vec = a.P % kVec == 0 && aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v);
      if (vec) launch<T, kVec>(p, g, m, v, st, act, a.K, a.P, lr, beta1, beta2, s, stream);
      else launch<T, 1>(p, g, m, v, st, act, a.K, a.P, lr, beta1, beta2, s, stream);
    });
  });
}

void register_masked_adamw_step(torch::Library& m) {
  m.impl("masked_adamw_step_", &masked_adamw_step_cuda);
}
const AddCudaRegistrar add_masked_adamw_step("masked_adamw_step_", &register_masked_adamw_step);

}  // namespace

TORCH_LIBRARY_IMPL(mucs_fast_cuda, CUDA, m) { register_masked_adamw_step(m); }

}  // namespace mucs_fast
