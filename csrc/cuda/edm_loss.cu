// ATen CUDA kernels of mucs_fast::edm_loss and mucs_fast::edm_loss_backward (schemas: Python,
// mucs_fast/ops/edm_loss.py), registered as mucs_fast_cuda::edm_loss(_backward): Python picks them
// or the Triton kernels for the CUDA key (mucs_fast/ops/_backend.py). Launches the torch-free kernels of csrc/cuda/kernels.cuh: one block
// of 256 threads per row, fixed-order tree in shared memory, Acc accumulation; bit-identical to
// the CPU kernel (csrc/core/edm_loss.h).
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

void check_grid(const char* op, int64_t B) {
  TORCH_CHECK(B <= std::numeric_limits<int32_t>::max(), op, ": B = ", B,
              " rows exceed the CUDA grid limit");
}

template <typename Acc>
const Acc* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<Acc>() : nullptr;
}

at::Tensor edm_loss_cuda(const at::Tensor& out, const std::optional<at::Tensor>& x_noisy,
                         const at::Tensor& target, const std::optional<at::Tensor>& c_skip,
                         const std::optional<at::Tensor>& c_out, const at::Tensor& weight) {
  const c10::cuda::CUDAGuard guard(out.device());
  const EdmArgs a = edm_args("edm_loss", out, x_noisy, target, c_skip, c_out, weight, at::kCUDA);
  check_grid("edm_loss", a.B);
  at::Tensor loss = at::empty({a.B}, out.options().dtype(a.acc));
  if (a.B == 0) return loss;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_edm(a, [&](auto skip, auto t, auto u) {
    using T = typename decltype(t)::type;
    using U = typename decltype(u)::type;
    using Acc = at::opmath_type<T>;
    cuda::edm_loss_kernel<decltype(skip)::value, T, U, Acc>
        <<<static_cast<unsigned>(a.B), cuda::kEdmLanes, 0, stream>>>(
            loss.mutable_data_ptr<Acc>(), a.out.const_data_ptr<T>(), a.out.stride(0),
            a.skip ? a.x_noisy.const_data_ptr<U>() : nullptr, a.skip ? a.x_noisy.stride(0) : 0,
            a.target.const_data_ptr<U>(), a.target.stride(0), ptr_or_null<Acc>(a.c_skip),
            ptr_or_null<Acc>(a.c_out), a.weight.const_data_ptr<Acc>(), a.D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return loss;
}

at::Tensor edm_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& out,
                                  const std::optional<at::Tensor>& x_noisy,
                                  const at::Tensor& target, const std::optional<at::Tensor>& c_skip,
                                  const std::optional<at::Tensor>& c_out,
                                  const at::Tensor& weight) {
  const c10::cuda::CUDAGuard guard(out.device());
  const EdmArgs a =
      edm_args("edm_loss_backward", out, x_noisy, target, c_skip, c_out, weight, at::kCUDA);
  const at::Tensor g =
      per_sample("edm_loss_backward", "grad", grad, a.B, a.acc, at::kCUDA, out.device());
  check_grid("edm_loss_backward", a.B);
  at::Tensor grad_out = at::empty(out.sizes(), out.options());
  if (a.B == 0) return grad_out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_edm(a, [&](auto skip, auto t, auto u) {
    using T = typename decltype(t)::type;
    using U = typename decltype(u)::type;
    using Acc = at::opmath_type<T>;
    cuda::edm_loss_backward_kernel<decltype(skip)::value, T, U, Acc>
        <<<static_cast<unsigned>(a.B), cuda::kEdmLanes, 0, stream>>>(
            grad_out.mutable_data_ptr<T>(), g.const_data_ptr<Acc>(), a.out.const_data_ptr<T>(),
            a.out.stride(0), a.skip ? a.x_noisy.const_data_ptr<U>() : nullptr,
            a.skip ? a.x_noisy.stride(0) : 0, a.target.const_data_ptr<U>(), a.target.stride(0),
            ptr_or_null<Acc>(a.c_skip), ptr_or_null<Acc>(a.c_out), a.weight.const_data_ptr<Acc>(),
            a.D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_out;
}

void register_edm_loss(torch::Library& m) { m.impl("edm_loss", &edm_loss_cuda); }
void register_edm_loss_backward(torch::Library& m) {
  m.impl("edm_loss_backward", &edm_loss_backward_cuda);
}
const AddCudaRegistrar add_edm_loss("edm_loss", &register_edm_loss);
const AddCudaRegistrar add_edm_loss_backward("edm_loss_backward", &register_edm_loss_backward);

}  // namespace

TORCH_LIBRARY_IMPL(mucs_fast_cuda, CUDA, m) {
  register_edm_loss(m);
  register_edm_loss_backward(m);
}

}  // namespace mucs_fast
