// ATen CPU kernel of mucs_fast::noisy_inputs (schema: Python, mucs_fast/ops/noisy_inputs.py).
// Math, source and precision: csrc/core/noisy_inputs.h. The M·n output rows are split across
// threads with at::parallel_for (OpenMP); elementwise, so the bits do not depend on the split.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../core/noisy_inputs.h"

namespace mucs_fast {
namespace {

template <bool kHasC, typename T, typename E, typename Acc>
MUCS_CPU_CLONES void noisy_range(const NoisyArgs& a, T* out, int64_t r0, int64_t r1) {
  const T* x = a.x.const_data_ptr<T>();
  const E* eps = a.eps.const_data_ptr<E>();
  const Acc* pa = a.a.const_data_ptr<Acc>();
  const Acc* pb = a.b.const_data_ptr<Acc>();
  const Acc* pc = kHasC ? a.c.const_data_ptr<Acc>() : nullptr;
  const int64_t x_rs = a.x.stride(0);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t m = r / a.n, j = r % a.n;
    core::noisy_inputs_row<kHasC, Acc>(out + r * a.D, x + j * x_rs, eps + m * a.eps_ms + j * a.eps_ns,
                                       a.D, pa[m], pb[m], kHasC ? pc[m] : Acc(1));
  }
}

at::Tensor noisy_inputs_cpu(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& a,
                            const at::Tensor& b, const std::optional<at::Tensor>& c) {
  const NoisyArgs args = noisy_args("noisy_inputs", x, eps, a, b, c, at::kCPU);
  std::vector<int64_t> shape{args.M * args.n};
  for (int64_t d = 1; d < x.dim(); ++d) shape.push_back(x.size(d));
  at::Tensor out = at::empty(shape, x.options());
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(args.D, 1));
  dispatch_noisy(args, [&](auto has_c, auto t, auto e) {
    using T = typename decltype(t)::type;
    using E = typename decltype(e)::type;
    using Acc = at::opmath_type<T>;
    T* o = out.mutable_data_ptr<T>();
    at::parallel_for(0, args.M * args.n, grain, [&](int64_t r0, int64_t r1) {
      noisy_range<decltype(has_c)::value, T, E, Acc>(args, o, r0, r1);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mucs_fast, CPU, m) { m.impl("noisy_inputs", &noisy_inputs_cpu); }

}  // namespace mucs_fast
