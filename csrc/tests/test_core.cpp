// Unit tests of the torch-free core (csrc/core): closed-form values, the documented reduction
// order and operation order, and the gradient against central differences. No framework: CHECK counts failures.
#include <cmath>
#include <cstdio>
#include <vector>

#include "core/masked_adamw_step.h"
#include "core/edm_loss.h"
#include "core/noisy_inputs.h"
#include "core/skew_accumulate.h"

namespace core = mucs_fast::core;

static int failures = 0;
#define CHECK(cond)                                                  \
  do {                                                               \
    if (!(cond)) {                                                   \
      std::fprintf(stderr, "%s:%d: CHECK(%s)\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                    \
    }                                                                \
  } while (0)

static void test_edm_zero_residual() {
  std::vector<float> x(1000, 0.25f), out(1000);
  for (int i = 0; i < 1000; ++i) out[i] = 0.001f * static_cast<float>(i) - 0.3f;
  // D-form: out == target gives 0 for any weight.
  CHECK((core::edm_loss_row<false, float>(out.data(), static_cast<const float*>(nullptr), out.data(), 1000, 0.f,
                                          1.f, 7.f)) == 0.f);
  // F-form: c_out·out + c_skip·x == target, with values exact in binary.
  std::vector<float> target(1000);
  for (int i = 0; i < 1000; ++i) target[i] = 0.5f * out[i] + 0.25f * x[i];
  CHECK((core::edm_loss_row<true, float>(out.data(), x.data(), target.data(), 1000, 0.25f, 0.5f, 3.f)) == 0.f);
}

static void test_edm_hand_computed_row() {
  // r = 0.5·[1, 2, 3, 4] + 0.25·4 − 0 = [1.5, 2, 2.5, 3];  Σ r² = 21.5;  L = 2 · 21.5 / 4 = 10.75.
  const double out[4] = {1, 2, 3, 4}, x[4] = {4, 4, 4, 4}, target[4] = {0, 0, 0, 0};
  CHECK((core::edm_loss_row<true, double>(out, x, target, 4, 0.25, 0.5, 2.0)) == 10.75);
  const float outf[4] = {1, 2, 3, 4}, xf[4] = {4, 4, 4, 4}, tf[4] = {0, 0, 0, 0};
  CHECK((core::edm_loss_row<true, float>(outf, xf, tf, 4, 0.25f, 0.5f, 2.0f)) == 10.75f);
  // ∂L/∂out = grad·weight·(2/D)·c_out·r = 1·2·0.5·0.5·r = 0.5·r.
  const double scale = core::edm_loss_grad_scale(1.0, 2.0, 0.5, 4);
  CHECK(scale == 0.5);
  double g[4];
  core::edm_loss_backward_row<true, double>(g, out, x, target, 4, 0.25, 0.5, scale);
  CHECK(g[0] == 0.75 && g[1] == 1.0 && g[2] == 1.25 && g[3] == 1.5);
}

static void test_edm_lane_order() {
  // Σ of n ones is n exactly for every n (full lane rounds, tails, n < lanes).
  for (int64_t n : {0, 1, 7, 255, 256, 257, 1000, 12289}) {
    std::vector<float> ones(static_cast<size_t>(n) + 1, 1.f), zeros(static_cast<size_t>(n) + 1, 0.f);
    // r = 1 − 0 per element, r² = 1, L = weight·n/n = weight (NaN for n = 0: 0/0, as mean() of nothing).
    const float L = core::edm_loss_row<false, float>(ones.data(), static_cast<const float*>(nullptr),
                                                     zeros.data(), n, 0.f, 1.f, 3.f);
    CHECK(n == 0 ? std::isnan(L) : L == 3.f);
  }
  // The documented order: lane l adds terms l, l + 256, ... ascending; lanes fold by the fixed tree.
  const int64_t n = 3 * core::kEdmLanes + 17;
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = std::sin(0.37f * static_cast<float>(i)) * 1e3f;
  float lane[core::kEdmLanes] = {};
  for (int64_t i = 0; i < n; ++i) lane[i % core::kEdmLanes] += v[i];
  for (int s = core::kEdmLanes / 2; s > 0; s /= 2)
    for (int l = 0; l < s; ++l) lane[l] += lane[l + s];
  CHECK((core::lane_tree_sum<core::kEdmLanes, float>(n, [&](int64_t i) { return v[i]; })) == lane[0]);
}

static void test_edm_gradient_matches_differences() {
  const int D = 37;
  std::vector<double> out(D), x(D), target(D), g(D);
  for (int i = 0; i < D; ++i) {
    out[i] = std::cos(1.3 * i);
    x[i] = std::sin(0.7 * i);
    target[i] = 0.1 * i - 1.0;
  }
  const double cs = 0.3, co = 0.8, w = 1.7, h = 1e-6;
  core::edm_loss_backward_row<true, double>(g.data(), out.data(), x.data(), target.data(), D, cs, co,
                                            core::edm_loss_grad_scale(1.0, w, co, D));
  for (int i = 0; i < D; ++i) {
    std::vector<double> hi = out, lo = out;
    hi[i] += h;
    lo[i] -= h;
    const double fd = (core::edm_loss_row<true, double>(hi.data(), x.data(), target.data(), D, cs, co, w) -
                       core::edm_loss_row<true, double>(lo.data(), x.data(), target.data(), D, cs, co, w)) /
                      (2 * h);
    CHECK(std::fabs(fd - g[i]) < 1e-7);
  }
}

static void test_skew_closed_forms() {
  const int M = 100;
  std::vector<float> t(M), u3(M, 3.f), ones(M, 1.f), u(2 * M);
  for (int m = 0; m < M; ++m) t[m] = 0.01f * static_cast<float>(m) + 0.1f;
  // Equal losses: exactly 0, with or without the ratio.
  CHECK((core::skew_row<true, float>(t.data(), 1, t.data(), 1, M, 1e-3f)) == 0.f);
  CHECK((core::skew_row<false, float>(t.data(), 1, t.data(), 1, M, 1e-3f)) == 0.f);
  // (3 − 1)/(3 + 1 + 0) = 1/2 per noise.
  CHECK((core::skew_row<true, float>(u3.data(), 1, ones.data(), 1, M, 0.f)) == 0.5f * M);
  CHECK((core::skew_row<false, float>(u3.data(), 1, ones.data(), 1, M, 0.f)) == 2.f * M);
  // Strided rows read every other element.
  for (int m = 0; m < 2 * M; ++m) u[m] = m % 2 ? -1.f : 3.f;
  CHECK((core::skew_row<true, float>(u.data(), 2, ones.data(), 1, M, 0.f)) == 0.5f * M);
  // eps joins the denominator after u + t: (2 − 1)/(2 + 1 + 1) = 1/4.
  const double two = 2.0, one = 1.0;
  CHECK((core::skew_row<true, double>(&two, 1, &one, 1, 1, 1.0)) == 0.25);
}

static void test_skew_ascending_order() {
  // In float, (1e8 + 1) − 1e8 = 0 (ascending), whereas 1e8 − 1e8 + 1 would be 1.
  const float u[3] = {1e8f, 1.f, -1e8f}, zero[3] = {0.f, 0.f, 0.f};
  CHECK((core::skew_row<false, float>(u, 1, zero, 1, 3, 0.f)) == 0.f);
  const float v[3] = {1e8f, -1e8f, 1.f};
  CHECK((core::skew_row<false, float>(v, 1, zero, 1, 3, 0.f)) == 1.f);
}

static void test_skew_rows_match_single_rows() {
  // 16 rows side by side give each row's ascending sum, bit for bit, for strided rows too.
  const int R = 16, M = 37, stride = 41;
  std::vector<float> u(R * stride), t(R * stride), S(R);
  for (int i = 0; i < R * stride; ++i) {
    u[i] = 1.f + 0.5f * std::sin(0.3f * static_cast<float>(i));
    t[i] = 1.f + 0.5f * std::cos(0.7f * static_cast<float>(i));
  }
  core::skew_rows<true, R>(S.data(), u.data(), stride, t.data(), stride, M, 1e-3f);
  for (int r = 0; r < R; ++r)
    CHECK(S[r] == (core::skew_row<true, float>(&u[r * stride], 1, &t[r * stride], 1, M, 1e-3f)));
}

static void test_noisy_closed_forms() {
  // EDM: 1·x + σ·ε; with c_in: c·(x + σε); values exact in binary.
  const float x[3] = {0.5f, -1.f, 2.f}, e[3] = {1.f, 0.25f, -4.f};
  float out[3];
  core::noisy_inputs_row<false, float>(out, x, e, 3, 1.f, 2.f, 0.f);
  CHECK(out[0] == 2.5f && out[1] == -0.5f && out[2] == -6.f);
  core::noisy_inputs_row<true, float>(out, x, e, 3, 1.f, 2.f, 0.5f);
  CHECK(out[0] == 1.25f && out[1] == -0.25f && out[2] == -3.f);
  // The order: (a·x) + (b·e) rounded separately, no FMA. 1 + 2^-23·(1 + 2^-23)·... chosen so that
  // a fused a·x + b·e would round differently: a·x = 1 + 2^-12 squared exactly needs 48 bits.
  const float a = 1.f + 0x1p-12f, xv = 1.f + 0x1p-12f, bv = -1.f, ev = 1.f;
  const float fused = static_cast<float>(static_cast<double>(a) * xv + static_cast<double>(bv) * ev);
  CHECK(core::noisy_value<false>(xv, ev, a, bv, 0.f) == (a * xv) + (bv * ev));
  CHECK(core::noisy_value<false>(xv, ev, a, bv, 0.f) != fused);
}

static void test_pow_int() {
  CHECK(core::pow_int(0.9, 0) == 1.0);
  CHECK(core::pow_int(0.9, 1) == 0.9);
  CHECK(core::pow_int(0.5, 10) == 0x1p-10);
  // Relative error ≲ t·2^-53 of pow (each squaring doubles the relative error of the power).
  for (int64_t t : {2, 3, 17, 100, 1000, 12345, 200000})
    for (double b : {0.9, 0.999}) {
      const double exact = std::pow(b, static_cast<double>(t));
      CHECK(std::fabs(core::pow_int(b, t) - exact) <= 2.0 * static_cast<double>(t) * 0x1p-53 * exact);
    }
}

static void test_adamw_first_step() {
  // Step 1 from zero moments, no decay: m = 0.1·g, v = 0.001·g², bias-corrected m/√v = sign(g),
  // so p moves by lr·g/(|g| + eps·…) ≈ lr per element (the classic sign step of Adam).
  double ss, bc2;
  core::adamw_bias_corrections(1, 1e-3, 0.9, 0.999, &ss, &bc2);
  CHECK(std::fabs(ss - 1e-2) < 1e-15 && std::fabs(bc2 - std::sqrt(1e-3)) < 1e-15);
  const auto s = core::adamw_scalars<double>(1e-3, 0.9, 0.999, 0.0, 0.0);
  double p[2] = {1.0, -2.0}, g[2] = {3.0, -0.5}, m[2] = {0, 0}, v[2] = {0, 0};
  core::adamw_row(p, g, m, v, 2, ss, bc2, s);
  CHECK(std::fabs(p[0] - (1.0 - 1e-3)) < 1e-15 && std::fabs(p[1] - (-2.0 + 1e-3)) < 1e-15);
  CHECK(std::fabs(m[0] - 0.3) < 1e-15 && std::fabs(v[1] - 0.00025) < 1e-18);
  // Decoupled weight decay scales p first: p·(1 − lr·wd) with a zero gradient step.
  const auto sd = core::adamw_scalars<float>(0.5, 0.9, 0.999, 1e-8, 0.5);
  float pf = 2.f, gf = 0.f, mf = 0.f, vf = 0.f;
  core::adamw_update(pf, gf, mf, vf, 1.f, 1.f, sd);
  CHECK(pf == 1.5f && mf == 0.f && vf == 0.f);
}

int main() {
  test_edm_zero_residual();
  test_edm_hand_computed_row();
  test_edm_lane_order();
  test_edm_gradient_matches_differences();
  test_skew_closed_forms();
  test_skew_ascending_order();
  test_skew_rows_match_single_rows();
  test_noisy_closed_forms();
  test_pow_int();
  test_adamw_first_step();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("test_core: all checks passed\n");
  return 0;
}
