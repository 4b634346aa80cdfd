// noisy_inputs — the noisy batch of a scoring chunk: n images under M shared noise samples.
//
//     out[m·n + j, i] = c[m] · (a[m]·x[j, i] + b[m]·ε[m(, j), i])          (noise-major rows)
//
// Source: Karras et al. 2022 (EDM), eq. 2 and Table 1 (a = 1, b = σ, c = c_in or none);
// Ho et al. 2020 (DDPM), eq. 4 (a = √ᾱ_t, b = √(1 − ᾱ_t)); spec/MUCS.md "Noise banks". The
// plain-PyTorch reference is mucs_fast/reference/noisy_inputs.py (same operations, same order:
// t1 = a·x, t2 = b·ε, s = t1 + t2, out = c·s).
//
// Reduction order: none (elementwise).
//
// Precision: x (T) and ε (E) are converted to Acc = float for half/bfloat16/float and Acc = double
// for double; the two products, the sum and the scaling by c are each rounded in Acc (no FMA); the
// result is rounded once to T.
#pragma once

#include <cstdint>

#include "common.h"

namespace mucs_fast::core {

// c·(a·x + b·e), or a·x + b·e without c.
template <bool kHasC, typename Acc>
MUCS_HD inline Acc noisy_value(Acc x, Acc e, Acc a, Acc b, Acc c) {
  const Acc s = add_rn(mul_rn(a, x), mul_rn(b, e));
  return kHasC ? mul_rn(c, s) : s;
}

// One output row of D contiguous elements on one host thread.
template <bool kHasC, typename Acc, typename T, typename E>
inline void noisy_inputs_row(T* __restrict__ out, const T* __restrict__ x, const E* __restrict__ eps,
                             int64_t D, Acc a, Acc b, Acc c) {
  for (int64_t i = 0; i < D; ++i)
    out[i] = static_cast<T>(
        noisy_value<kHasC>(static_cast<Acc>(x[i]), static_cast<Acc>(eps[i]), a, b, c));
}

}  // namespace mucs_fast::core
