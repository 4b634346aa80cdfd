// edm_loss — per-sample weighted denoising loss with the EDM skip/out scalings folded in.
//
//     r[b, i] = c_skip[b]·x_noisy[b, i] + c_out[b]·out[b, i] − target[b, i]
//     L[b]    = weight[b] · (1/D) Σ_i r[b, i]²                          (D = C·H·W)
//     ∂L[b]/∂out[b, i] = weight[b] · (2/D) · c_out[b] · r[b, i]
//
// Source: Karras et al. 2022 (EDM), eq. 2 and Table 1; spec/MUCS.md "Per-sample diffusion loss";
// the plain-PyTorch reference is mucs_fast/reference/edm_loss.py (same operand order:
// c_out·out, then + c_skip·x_noisy, then − target). A missing c_out is 1 (×1 is exact); a missing
// c_skip drops the skip term (and x_noisy with it).
//
// Reduction order: Σ_i r² is lane_tree_sum<kEdmLanes> (csrc/core/common.h): 256 interleaved lanes,
// each ascending in i, folded by a fixed pairwise tree. The CUDA kernel runs the same lanes as the
// 256 threads of one block, so CPU and GPU give the same bits. No atomics.
//
// Precision: T (out) and U (x_noisy, target) are read and converted to Acc = float for
// half/bfloat16/float and Acc = double for double; all arithmetic and accumulation is in Acc;
// L is stored in Acc, the gradient in T.
#pragma once

#include <cstdint>

#include "common.h"

namespace mucs_fast::core {

// Threads per row on the GPU, lanes per row on the CPU: one constant keeps them bit-identical.
constexpr int kEdmLanes = 256;

// r = c_out·out (+ c_skip·x_noisy) − target, rounded op by op as in the reference.
template <bool kSkip, typename Acc>
MUCS_HD inline Acc edm_residual(Acc out, Acc x_noisy, Acc target, Acc c_skip, Acc c_out) {
  Acc r = mul_rn(c_out, out);
  if (kSkip) r = add_rn(r, mul_rn(c_skip, x_noisy));
  return sub_rn(r, target);
}

// L = weight · (Σ r² / D).
template <typename Acc>
MUCS_HD inline Acc edm_loss_finish(Acc sum_sq, int64_t D, Acc weight) {
  return mul_rn(weight, div_rn(sum_sq, static_cast<Acc>(D)));
}

// The per-row gradient factor grad·weight·(2/D)·c_out (2/D rounded once, like a Python scalar).
template <typename Acc>
MUCS_HD inline Acc edm_loss_grad_scale(Acc grad, Acc weight, Acc c_out, int64_t D) {
  const Acc two_over_d = static_cast<Acc>(2.0 / static_cast<double>(D));
  return mul_rn(mul_rn(mul_rn(grad, weight), two_over_d), c_out);
}

// One row on one host thread: L[b] from out/x_noisy/target rows of D contiguous elements.
// x_noisy is read only when kSkip.
template <bool kSkip, typename Acc, typename T, typename U>
inline Acc edm_loss_row(const T* out, const U* x_noisy, const U* target, int64_t D, Acc c_skip,
                        Acc c_out, Acc weight) {
  const Acc sum_sq = lane_tree_sum<kEdmLanes, Acc>(D, [&](int64_t i) {
    const Acc r = edm_residual<kSkip>(
        static_cast<Acc>(out[i]), kSkip ? static_cast<Acc>(x_noisy[i]) : Acc(0),
        static_cast<Acc>(target[i]), c_skip, c_out);
    return mul_rn(r, r);
  });
  return edm_loss_finish(sum_sq, D, weight);
}

// One row of the backward: grad_out[i] = scale · r[i], stored as T.
template <bool kSkip, typename Acc, typename T, typename U>
inline void edm_loss_backward_row(T* grad_out, const T* out, const U* x_noisy, const U* target,
                                  int64_t D, Acc c_skip, Acc c_out, Acc scale) {
  for (int64_t i = 0; i < D; ++i) {
    const Acc r = edm_residual<kSkip>(
        static_cast<Acc>(out[i]), kSkip ? static_cast<Acc>(x_noisy[i]) : Acc(0),
        static_cast<Acc>(target[i]), c_skip, c_out);
    grad_out[i] = static_cast<T>(mul_rn(scale, r));
  }
}

}  // namespace mucs_fast::core
