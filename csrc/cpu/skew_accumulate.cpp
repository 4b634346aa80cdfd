// ATen CPU kernel of mucs_fast::skew_accumulate (schema: Python, mucs_fast/ops/skew_accumulate.py).
// Math, source and reduction order: csrc/core/skew_accumulate.h. The K·n rows are split across
// threads with at::parallel_for (OpenMP); each row is summed by one thread in ascending m.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../core/skew_accumulate.h"

namespace mucs_fast {
namespace {

template <bool kRatio, typename T, typename U, typename Acc>
void skew_rows(const SkewArgs& a, Acc eps, Acc* S) {
  const T* u = a.loss_u.const_data_ptr<T>();
  const U* t = a.loss_t.const_data_ptr<U>();
  const int64_t u_ks = a.loss_u.stride(0), u_ns = a.loss_u.stride(1), t_ns = a.loss_t.stride(0);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(a.M, 1));
  at::parallel_for(0, a.K * a.N, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t k = r / a.N, n = r % a.N;
      S[r] = core::skew_row<kRatio, Acc>(u + k * u_ks + n * u_ns, 1, t + n * t_ns, 1, a.M, eps);
    }
  });
}

at::Tensor skew_accumulate_cpu(const at::Tensor& loss_u, const at::Tensor& loss_t, double eps,
                               bool use_ratio) {
  const SkewArgs a = skew_args("skew_accumulate", loss_u, loss_t, at::kCPU);
  at::Tensor S = at::empty({a.K, a.N}, loss_u.options().dtype(a.acc));
  dispatch_skew(a, use_ratio, [&](auto ratio, auto t, auto u) {
    using T = typename decltype(t)::type;
    using Acc = at::opmath_type<T>;
    skew_rows<decltype(ratio)::value, T, typename decltype(u)::type, Acc>(
        a, static_cast<Acc>(eps), S.mutable_data_ptr<Acc>());
  });
  return S;
}

}  // namespace

TORCH_LIBRARY_IMPL(mucs_fast, CPU, m) { m.impl("skew_accumulate", &skew_accumulate_cpu); }

}  // namespace mucs_fast
