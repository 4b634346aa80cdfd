// ATen CPU kernel of mucs_fast::skew_accumulate (schema: Python, mucs_fast/ops/skew_accumulate.py).
// Math, source and reduction order: csrc/core/skew_accumulate.h. The K·n rows are split across
// threads with at::parallel_for (OpenMP); each row is summed by one thread in ascending m, 16
// rows side by side so that the loop vectorizes across rows.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../core/skew_accumulate.h"

namespace mucs_fast {
namespace {

constexpr int kBlockRows = 16;  // rows summed side by side (core::skew_rows)

// Rows [r0, r1) of the flattened [K·n] output: blocks of kBlockRows consecutive n of one k, then
// single rows at the ends; every row in ascending m either way. (No MUCS_CPU_CLONES here: the
// AVX-512/AVX2 clones measured no faster than the baseline for this loop.)
template <bool kRatio, typename T, typename U, typename Acc>
void skew_range(const SkewArgs& a, const T* u, const U* t, Acc eps, Acc* S, int64_t r0,
                                int64_t r1) {
  const int64_t u_ks = a.loss_u.stride(0), u_ns = a.loss_u.stride(1), t_ns = a.loss_t.stride(0);
  for (int64_t r = r0; r < r1;) {
    const int64_t k = r / a.N, n = r % a.N;
    const T* ur = u + k * u_ks + n * u_ns;
    const U* tr = t + n * t_ns;
    if (std::min(a.N - n, r1 - r) >= kBlockRows) {
      core::skew_rows<kRatio, kBlockRows>(S + r, ur, u_ns, tr, t_ns, a.M, eps);
      r += kBlockRows;
    } else {
      S[r] = core::skew_row<kRatio>(ur, 1, tr, 1, a.M, eps);
      r += 1;
    }
  }
}

template <bool kRatio, typename T, typename U, typename Acc>
void skew_accumulate_rows(const SkewArgs& a, Acc eps, Acc* S) {
  const T* u = a.loss_u.const_data_ptr<T>();
  const U* t = a.loss_t.const_data_ptr<U>();
  const int64_t grain = std::max<int64_t>(kBlockRows, at::internal::GRAIN_SIZE / std::max<int64_t>(a.M, 1));
  at::parallel_for(0, a.K * a.N, grain, [&](int64_t r0, int64_t r1) {
    skew_range<kRatio, T, U, Acc>(a, u, t, eps, S, r0, r1);
  });
}

at::Tensor skew_accumulate_cpu(const at::Tensor& loss_u, const at::Tensor& loss_t, double eps,
                               bool use_ratio) {
  const SkewArgs a = skew_args("skew_accumulate", loss_u, loss_t, at::kCPU);
  at::Tensor S = at::empty({a.K, a.N}, loss_u.options().dtype(a.acc));
  dispatch_skew(a, use_ratio, [&](auto ratio, auto t, auto u) {
    using T = typename decltype(t)::type;
    using Acc = at::opmath_type<T>;
    skew_accumulate_rows<decltype(ratio)::value, T, typename decltype(u)::type, Acc>(
        a, static_cast<Acc>(eps), S.mutable_data_ptr<Acc>());
  });
  return S;
}

}  // namespace

TORCH_LIBRARY_IMPL(mucs_fast, CPU, m) { m.impl("skew_accumulate", &skew_accumulate_cpu); }

}  // namespace mucs_fast
