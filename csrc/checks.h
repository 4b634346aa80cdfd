// Argument checks and layout preparation shared by the ATen bindings (csrc/cpu, csrc/cuda).
// Every message names the op and the argument. The Python default kernel and the fakes
// (mucs_fast/ops/*.py) raise for the same inputs, so a bad call fails on every backend.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/accumulate.h>

#include <optional>
#include <type_traits>

namespace mucs_fast {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// float for half/bfloat16/float, double for double.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_tensor(const char* op, const char* name, const at::Tensor& t,
                         c10::DeviceType device_type, const at::Device& device) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.device().type() == device_type && t.device() == device, op, ": ", name,
              " must be on ", device, " like the first input, got ", t.device());
}

// A [B] per-sample vector, as a contiguous Acc tensor.
inline at::Tensor per_sample(const char* op, const char* name, const at::Tensor& t, int64_t B,
                             at::ScalarType acc, c10::DeviceType dt, const at::Device& device) {
  check_tensor(op, name, t, dt, device);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, op, ": ", name, " must have shape [B] = [", B,
              "], got ", t.sizes());
  return t.to(acc).contiguous();
}

// t viewed as [rows, cols] with unit stride along cols (copied only when no such view exists).
inline at::Tensor as_rows(const at::Tensor& t, int64_t rows, int64_t cols) {
  at::Tensor r = t.reshape({rows, cols});
  if (cols > 1 && r.stride(1) != 1) r = r.contiguous();
  return r;
}

// edm_loss / edm_loss_backward inputs, checked and laid out as rows.
struct EdmArgs {
  int64_t B = 0, D = 0;
  bool skip = false;          // c_skip given: the skip term c_skip·x_noisy is on
  bool same_dtype = true;     // x_noisy/target share out's dtype, else both hold Acc
  at::ScalarType acc = at::kFloat;
  at::Tensor out, x_noisy, target;            // [B, D], unit inner stride
  at::Tensor c_skip, c_out, weight;           // [B] Acc, contiguous (c_skip/c_out may be undefined)
};

inline EdmArgs edm_args(const char* op, const at::Tensor& out,
                        const std::optional<at::Tensor>& x_noisy, const at::Tensor& target,
                        const std::optional<at::Tensor>& c_skip,
                        const std::optional<at::Tensor>& c_out, const at::Tensor& weight,
                        c10::DeviceType dt) {
  const at::Device device = out.device();
  check_tensor(op, "out", out, dt, device);
  TORCH_CHECK(out.dim() >= 1, op, ": out must be [B, ...], got a 0-d tensor");
  EdmArgs a;
  a.B = out.size(0);
  a.D = c10::multiply_integers(out.sizes().slice(1));
  a.acc = acc_type(out.scalar_type());
  check_tensor(op, "target", target, dt, device);
  TORCH_CHECK(target.sizes() == out.sizes(), op, ": target must have the shape of out ",
              out.sizes(), ", got ", target.sizes());
  const bool has_x = x_noisy.has_value() && x_noisy->defined();
  if (has_x) {
    check_tensor(op, "x_noisy", *x_noisy, dt, device);
    TORCH_CHECK(x_noisy->sizes() == out.sizes(), op, ": x_noisy must have the shape of out ",
                out.sizes(), ", got ", x_noisy->sizes());
  }
  a.skip = c_skip.has_value() && c_skip->defined();
  TORCH_CHECK(!a.skip || has_x, op, ": c_skip is given but x_noisy is None");
  if (a.skip) a.c_skip = per_sample(op, "c_skip", *c_skip, a.B, a.acc, dt, device);
  if (c_out.has_value() && c_out->defined())
    a.c_out = per_sample(op, "c_out", *c_out, a.B, a.acc, dt, device);
  a.weight = per_sample(op, "weight", weight, a.B, a.acc, dt, device);

  // x_noisy/target are read in out's dtype when they share it; otherwise both are converted to
  // Acc first, exactly as the reference converts every input to Acc.
  a.same_dtype = target.scalar_type() == out.scalar_type() &&
                 (!a.skip || x_noisy->scalar_type() == out.scalar_type());
  const auto in_type = a.same_dtype ? out.scalar_type() : a.acc;
  a.out = as_rows(out, a.B, a.D);
  a.target = as_rows(target.to(in_type), a.B, a.D);
  if (a.skip) a.x_noisy = as_rows(x_noisy->to(in_type), a.B, a.D);
  return a;
}

// skew_accumulate inputs, checked; m-stride 1 guaranteed.
struct SkewArgs {
  int64_t K = 0, N = 0, M = 0;
  bool same_dtype = true;     // loss_t shares loss_u's dtype, else it holds Acc
  at::ScalarType acc = at::kFloat;
  at::Tensor loss_u, loss_t;  // [K, N, M], [N, M]
};

inline at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.size(-1) > 1 && t.stride(-1) != 1 ? t.contiguous() : t;
}

inline SkewArgs skew_args(const char* op, const at::Tensor& loss_u, const at::Tensor& loss_t,
                          c10::DeviceType dt) {
  const at::Device device = loss_u.device();
  check_tensor(op, "loss_u", loss_u, dt, device);
  check_tensor(op, "loss_t", loss_t, dt, device);
  TORCH_CHECK(loss_u.dim() == 3, op, ": loss_u must be [K, n, M], got ", loss_u.sizes());
  TORCH_CHECK(loss_t.dim() == 2 && loss_t.size(0) == loss_u.size(1) &&
                  loss_t.size(1) == loss_u.size(2),
              op, ": loss_t must be [n, M] = [", loss_u.size(1), ", ", loss_u.size(2), "], got ",
              loss_t.sizes());
  SkewArgs a;
  a.K = loss_u.size(0);
  a.N = loss_u.size(1);
  a.M = loss_u.size(2);
  a.acc = acc_type(loss_u.scalar_type());
  a.same_dtype = loss_t.scalar_type() == loss_u.scalar_type();
  a.loss_u = unit_last_stride(loss_u);
  a.loss_t = unit_last_stride(a.same_dtype ? loss_t : loss_t.to(a.acc));
  return a;
}

template <typename T>
struct type_tag {
  using type = T;
};

// Calls f(std::bool_constant<skip>, type_tag<T>, type_tag<U>) for the dtypes of a: T is out's
// dtype; U, the dtype x_noisy and target are read in, is T or Acc (EdmArgs::same_dtype).
template <typename F>
void dispatch_edm(const EdmArgs& a, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.out.scalar_type(), "edm_loss", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    if (a.skip && a.same_dtype) f(std::true_type{}, type_tag<T>{}, type_tag<T>{});
    else if (a.skip) f(std::true_type{}, type_tag<T>{}, type_tag<Acc>{});
    else if (a.same_dtype) f(std::false_type{}, type_tag<T>{}, type_tag<T>{});
    else f(std::false_type{}, type_tag<T>{}, type_tag<Acc>{});
  });
}

// Calls f(std::bool_constant<use_ratio>, type_tag<T>, type_tag<U>) for the dtypes of a: T is
// loss_u's dtype; U, loss_t's, is T or Acc (SkewArgs::same_dtype).
template <typename F>
void dispatch_skew(const SkewArgs& a, bool use_ratio, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.loss_u.scalar_type(),
                                  "skew_accumulate", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    if (use_ratio && a.same_dtype) f(std::true_type{}, type_tag<T>{}, type_tag<T>{});
    else if (use_ratio) f(std::true_type{}, type_tag<T>{}, type_tag<Acc>{});
    else if (a.same_dtype) f(std::false_type{}, type_tag<T>{}, type_tag<T>{});
    else f(std::false_type{}, type_tag<T>{}, type_tag<Acc>{});
  });
}

}  // namespace mucs_fast
