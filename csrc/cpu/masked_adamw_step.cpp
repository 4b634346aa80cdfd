// ATen CPU kernel of mucs_fast::masked_adamw_step_ (schema: Python,
// mucs_fast/ops/masked_adamw_step.py). Math, source and precision:
// csrc/core/masked_adamw_step.h. The per-row bias corrections are computed with the very ATen
// operations of the reference (float64, then rounded to the tensors' dtype), so the result is the
// reference's bit for bit; the K·P elements are then split across threads with at::parallel_for
// (elementwise: the bits do not depend on the split).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../core/masked_adamw_step.h"

namespace mucs_fast {
namespace {

constexpr int64_t kGrain = 16384;  // elements per task

template <typename T>
MUCS_CPU_CLONES void adamw_range(T* p, const T* g, T* m, T* v, int64_t n, T ss, T bc2,
                                 const core::AdamwScalars<T>& s) {
  core::adamw_row(p, g, m, v, n, ss, bc2, s);
}

void masked_adamw_step_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                            at::Tensor& exp_avg_sq, const at::Tensor& step,
                            const at::Tensor& active, double lr, double beta1, double beta2,
                            double eps, double weight_decay) {
  const char* op = "masked_adamw_step_";
  const AdamwArgs a = adamw_args(op, param, grad, exp_avg, exp_avg_sq, step, active, at::kCPU);
  if (a.K == 0 || a.P == 0) return;
  // The reference: step_size = lr / (1 − β1^t) (Python: reciprocal, then × lr), √(1 − β2^t).
  const at::Tensor t = step.to(at::kDouble);
  const at::Tensor ss = (at::rsub(at::pow(beta1, t), 1).reciprocal() * lr).to(param.scalar_type());
  const at::Tensor bc2 = at::rsub(at::pow(beta2, t), 1).sqrt().to(param.scalar_type());
  const at::Tensor act = active.contiguous();
  const at::Tensor g = grad.contiguous();
  with_contiguous(param, exp_avg, exp_avg_sq, [&](at::Tensor& p, at::Tensor& m, at::Tensor& v) {
    AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "masked_adamw_step_", [&] {
      using T = scalar_t;
      const auto s = core::adamw_scalars<T>(lr, beta1, beta2, eps, weight_decay);
      const bool* on = act.const_data_ptr<bool>();
      const T* pss = ss.const_data_ptr<T>();
      const T* pbc2 = bc2.const_data_ptr<T>();
      T* pp = p.mutable_data_ptr<T>();
      T* pm = m.mutable_data_ptr<T>();
      T* pv = v.mutable_data_ptr<T>();
      const T* pg = g.const_data_ptr<T>();
      const int64_t P = a.P;
      at::parallel_for(0, a.K * P, kGrain, [&](int64_t i0, int64_t i1) {
        for (int64_t k = i0 / P; k < a.K && k * P < i1; ++k) {
          if (!on[k]) continue;
          const int64_t b = std::max(i0, k * P), e = std::min(i1, (k + 1) * P);
          adamw_range<T>(pp + b, pg + b, pm + b, pv + b, e - b, pss[k], pbc2[k], s);
        }
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mucs_fast, CPU, m) { m.impl("masked_adamw_step_", &masked_adamw_step_cpu); }

}  // namespace mucs_fast
