// skew_accumulate — the noise-consistent skew of MUCS, summed over the shared noise samples.
//
//     S[k, n] = Σ_m f(L_u[k, n, m], L_t[n, m])
//     f(u, t) = (u − t) / (u + t + eps)      (use_ratio, the MUCS score)
//             = u − t                          (!use_ratio, the "difference" ablation)
//
// Source: Serrà et al. 2026 (arXiv 2605.17938), spec/MUCS.md "Score": score[k, n] = S[k, n] / M;
// the plain-PyTorch reference is mucs_fast/reference/skew_accumulate.py (same operand order:
// (u + t) + eps). The sum, not the mean, so callers can accumulate over chunks of noises.
//
// Reduction order: one thread per (k, n) row adds f over m = 0, 1, ..., M−1 in ascending order,
// on the CPU and on the GPU alike (same bits on both). No atomics.
//
// Precision: T (loss_u) and U (loss_t) are converted to Acc = float for half/bfloat16/float and
// Acc = double for double; f and the sum are computed in Acc; S is stored in Acc.
#pragma once

#include <cstdint>

#include "common.h"

namespace mucs_fast::core {

template <bool kRatio, typename Acc>
MUCS_HD inline Acc skew_term(Acc u, Acc t, Acc eps) {
  if (kRatio) return div_rn(sub_rn(u, t), add_rn(add_rn(u, t), eps));
  return sub_rn(u, t);
}

// S for one row: loss_u[m] and loss_t[m] with element strides su, st.
template <bool kRatio, typename Acc, typename T, typename U>
MUCS_HD inline Acc skew_row(const T* loss_u, int64_t su, const U* loss_t, int64_t st, int64_t M,
                            Acc eps) {
  Acc s = Acc(0);
  for (int64_t m = 0; m < M; ++m)
    s = add_rn(s, skew_term<kRatio>(static_cast<Acc>(loss_u[m * su]),
                                    static_cast<Acc>(loss_t[m * st]), eps));
  return s;
}

// kRows rows at once on one host thread (rows r at loss_u + r·u_rs, loss_t + r·t_rs, m contiguous),
// each still summed in ascending m exactly as skew_row. Per chunk of noises the terms f are first
// computed along m (contiguous, vectorized: the divisions are the expensive part), then added
// into kRows independent running sums, which hides the latency of the additions.
template <bool kRatio, int kRows, typename Acc, typename T, typename U>
inline void skew_rows(Acc* S, const T* loss_u, int64_t u_rs, const U* loss_t, int64_t t_rs, int64_t M,
                      Acc eps) {
  constexpr int kChunk = 64;
  Acc s[kRows], f[kChunk][kRows];
  for (int r = 0; r < kRows; ++r) s[r] = Acc(0);
  for (int64_t m0 = 0; m0 < M; m0 += kChunk) {
    const int mc = static_cast<int>(M - m0 < kChunk ? M - m0 : kChunk);
    for (int r = 0; r < kRows; ++r) {
      const T* u = loss_u + r * u_rs + m0;
      const U* t = loss_t + r * t_rs + m0;
      for (int j = 0; j < mc; ++j)
        f[j][r] = skew_term<kRatio>(static_cast<Acc>(u[j]), static_cast<Acc>(t[j]), eps);
    }
    for (int j = 0; j < mc; ++j)
      for (int r = 0; r < kRows; ++r) s[r] = add_rn(s[r], f[j][r]);
  }
  for (int r = 0; r < kRows; ++r) S[r] = s[r];
}

}  // namespace mucs_fast::core
