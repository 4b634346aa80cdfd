// ATen CPU kernels of mucs_fast::edm_loss and mucs_fast::edm_loss_backward (schemas: Python,
// mucs_fast/ops/edm_loss.py). Math, source and reduction order: csrc/core/edm_loss.h.
// Rows are split across threads with at::parallel_for (OpenMP); each row is reduced by one thread
// in the fixed lane order of the core, so the result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../core/edm_loss.h"

namespace mucs_fast {
namespace {

int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(cols, 1));
}

// The row pointers of an EdmArgs, typed.
template <typename T, typename U, typename Acc>
struct EdmRows {
  explicit EdmRows(const EdmArgs& a)
      : out(a.out.const_data_ptr<T>()), x(a.skip ? a.x_noisy.const_data_ptr<U>() : nullptr),
        target(a.target.const_data_ptr<U>()),
        c_skip(a.skip ? a.c_skip.const_data_ptr<Acc>() : nullptr),
        c_out(a.c_out.defined() ? a.c_out.const_data_ptr<Acc>() : nullptr),
        weight(a.weight.const_data_ptr<Acc>()), out_rs(a.out.stride(0)),
        x_rs(a.skip ? a.x_noisy.stride(0) : 0), target_rs(a.target.stride(0)) {}
  const T* out;
  const U* x;
  const U* target;
  const Acc *c_skip, *c_out, *weight;
  int64_t out_rs, x_rs, target_rs;
  Acc cs(int64_t b) const { return c_skip ? c_skip[b] : Acc(0); }
  Acc co(int64_t b) const { return c_out ? c_out[b] : Acc(1); }
};

template <bool kSkip, typename T, typename U, typename Acc>
MUCS_CPU_CLONES void edm_loss_range(const EdmRows<T, U, Acc>& p, int64_t D, Acc* loss, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b)
    loss[b] = core::edm_loss_row<kSkip, Acc>(p.out + b * p.out_rs, p.x + b * p.x_rs, p.target + b * p.target_rs,
                                             D, p.cs(b), p.co(b), p.weight[b]);
}

template <bool kSkip, typename T, typename U, typename Acc>
MUCS_CPU_CLONES void edm_loss_backward_range(const EdmRows<T, U, Acc>& p, int64_t D, const Acc* grad,
                                             T* grad_out, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b)
    core::edm_loss_backward_row<kSkip, Acc>(
        grad_out + b * D, p.out + b * p.out_rs, p.x + b * p.x_rs, p.target + b * p.target_rs, D, p.cs(b),
        p.co(b), core::edm_loss_grad_scale(grad[b], p.weight[b], p.co(b), D));
}

template <bool kSkip, typename T, typename U, typename Acc>
void edm_loss_rows(const EdmArgs& a, Acc* loss) {
  const EdmRows<T, U, Acc> p(a);
  at::parallel_for(0, a.B, row_grain(a.D), [&](int64_t b0, int64_t b1) {
    edm_loss_range<kSkip>(p, a.D, loss, b0, b1);
  });
}

template <bool kSkip, typename T, typename U, typename Acc>
void edm_loss_backward_rows(const EdmArgs& a, const Acc* grad, T* grad_out) {
  const EdmRows<T, U, Acc> p(a);
  at::parallel_for(0, a.B, row_grain(a.D), [&](int64_t b0, int64_t b1) {
    edm_loss_backward_range<kSkip>(p, a.D, grad, grad_out, b0, b1);
  });
}

at::Tensor edm_loss_cpu(const at::Tensor& out, const std::optional<at::Tensor>& x_noisy,
                        const at::Tensor& target, const std::optional<at::Tensor>& c_skip,
                        const std::optional<at::Tensor>& c_out, const at::Tensor& weight) {
  const EdmArgs a = edm_args("edm_loss", out, x_noisy, target, c_skip, c_out, weight, at::kCPU);
  at::Tensor loss = at::empty({a.B}, out.options().dtype(a.acc));
  dispatch_edm(a, [&](auto skip, auto t, auto u) {
    using T = typename decltype(t)::type;
    using Acc = at::opmath_type<T>;
    edm_loss_rows<decltype(skip)::value, T, typename decltype(u)::type, Acc>(
        a, loss.mutable_data_ptr<Acc>());
  });
  return loss;
}

at::Tensor edm_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& out,
                                 const std::optional<at::Tensor>& x_noisy, const at::Tensor& target,
                                 const std::optional<at::Tensor>& c_skip,
                                 const std::optional<at::Tensor>& c_out, const at::Tensor& weight) {
  const EdmArgs a =
      edm_args("edm_loss_backward", out, x_noisy, target, c_skip, c_out, weight, at::kCPU);
  const at::Tensor g = per_sample("edm_loss_backward", "grad", grad, a.B, a.acc, at::kCPU, out.device());
  at::Tensor grad_out = at::empty(out.sizes(), out.options());
  dispatch_edm(a, [&](auto skip, auto t, auto u) {
    using T = typename decltype(t)::type;
    using Acc = at::opmath_type<T>;
    edm_loss_backward_rows<decltype(skip)::value, T, typename decltype(u)::type, Acc>(
        a, g.const_data_ptr<Acc>(), grad_out.mutable_data_ptr<T>());
  });
  return grad_out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mucs_fast, CPU, m) {
  m.impl("edm_loss", &edm_loss_cpu);
  m.impl("edm_loss_backward", &edm_loss_backward_cpu);
}

}  // namespace mucs_fast
