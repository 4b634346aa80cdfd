// masked_adamw_step — one AdamW step over K stacked weight sets, each target on its own clock.
//
// For every element of row k with active[k] (t = step[k], the step number after this update):
//     p ← p · (1 − lr·wd)
//     m ← m + (1 − β1)·(g − m)
//     v ← β2·v + ((1 − β2)·g)·g
//     p ← p − ss_k · (m / (√v / bc2_k + eps)),   ss_k = lr / (1 − β1^t),  bc2_k = √(1 − β2^t)
// Inactive rows are not touched.
//
// Source: Loshchilov & Hutter 2019 (decoupled weight decay), Algorithm 2; the update of
// torch.optim.AdamW; spec/MUCS.md "Unlearning one target". The plain-PyTorch reference is
// mucs_fast/reference/masked_adamw_step.py (same operations, same order).
//
// Reduction order: none (elementwise).
//
// Precision: the scalars (1 − lr·wd, 1 − β1, β2, 1 − β2, eps) are computed in double and rounded
// once to T, as PyTorch rounds a Python scalar; the bias corrections ss_k, bc2_k are computed per
// row in double and rounded to T; every elementwise operation is rounded in T (float or double),
// no FMA. The CPU kernel takes ss_k, bc2_k from ATen's pow (exactly the reference's values); the
// device kernels compute β^t by binary exponentiation (pow_int below, relative error ≲ t·2^-53,
// which moves 1 − β^t by far less than a float ulp): rounded to float, ss_k and bc2_k equal the
// reference's for every t ≤ 200000 at β ∈ {0.9, 0.999} (checked), so float results match the
// reference bit for bit in practice, double results to ~1e-15.
#pragma once

#include <cstdint>

#include "common.h"

namespace mucs_fast::core {

// The per-call scalars, rounded once to T.
template <typename T>
struct AdamwScalars {
  T decay;       // 1 − lr·wd
  T one_m_b1;    // 1 − β1
  T beta2;       // β2
  T one_m_b2;    // 1 − β2
  T eps;
};

template <typename T>
inline AdamwScalars<T> adamw_scalars(double lr, double beta1, double beta2, double eps,
                                     double weight_decay) {
  return {static_cast<T>(1.0 - lr * weight_decay), static_cast<T>(1.0 - beta1),
          static_cast<T>(beta2), static_cast<T>(1.0 - beta2), static_cast<T>(eps)};
}

// base^t for t ≥ 0 by binary exponentiation (ascending bits), every product rounded in double.
MUCS_HD inline double pow_int(double base, int64_t t) {
  double r = 1.0;
  while (t > 0) {
    if (t & 1) r = mul_rn(r, base);
    base = mul_rn(base, base);
    t >>= 1;
  }
  return r;
}

// ss = (1 / (1 − β1^t))·lr and bc2 = √(1 − β2^t) in double (the reference writes lr / (1 − β1^t),
// which PyTorch evaluates as reciprocal, then × lr).
MUCS_HD inline void adamw_bias_corrections(int64_t t, double lr, double beta1, double beta2,
                                           double* ss, double* bc2) {
  *ss = mul_rn(div_rn(1.0, sub_rn(1.0, pow_int(beta1, t))), lr);
  *bc2 = sqrt_rn(sub_rn(1.0, pow_int(beta2, t)));
}

// One element, in place.
template <typename T>
MUCS_HD inline void adamw_update(T& p, T g, T& m, T& v, T ss, T bc2, const AdamwScalars<T>& s) {
  const T p1 = mul_rn(p, s.decay);
  const T m1 = add_rn(m, mul_rn(s.one_m_b1, sub_rn(g, m)));
  const T v1 = add_rn(mul_rn(v, s.beta2), mul_rn(mul_rn(s.one_m_b2, g), g));
  const T denom = add_rn(div_rn(sqrt_rn(v1), bc2), s.eps);
  p = sub_rn(p1, mul_rn(ss, div_rn(m1, denom)));
  m = m1;
  v = v1;
}

// n contiguous elements of one row on one host thread.
template <typename T>
inline void adamw_row(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m,
                      T* __restrict__ v, int64_t n, T ss, T bc2, const AdamwScalars<T>& s) {
  for (int64_t i = 0; i < n; ++i) adamw_update(p[i], g[i], m[i], v[i], ss, bc2, s);
}

}  // namespace mucs_fast::core
