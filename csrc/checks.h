// Argument checks and layout preparation shared by the ATen bindings (csrc/cpu, csrc/cuda).
// Every message names the op and the argument. The Python default kernel and the fakes
// (mucs_fast/ops/*.py) raise for the same inputs, so a bad call fails on every backend.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/accumulate.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

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

// noisy_inputs inputs, checked and laid out as rows with unit inner stride.
struct NoisyArgs {
  int64_t M = 0, n = 0, D = 0;
  bool has_c = false;
  bool same_dtype = true;      // eps shares x's dtype, else it holds Acc
  at::ScalarType acc = at::kFloat;
  at::Tensor x;                // [n, D]
  at::Tensor eps;              // [M, D] (eps_ns = 0: shared by the n images) or [M, n, D]
  int64_t eps_ms = 0, eps_ns = 0;
  at::Tensor a, b, c;          // [M] Acc, contiguous (c undefined without c)
};

inline NoisyArgs noisy_args(const char* op, const at::Tensor& x, const at::Tensor& eps,
                            const at::Tensor& a, const at::Tensor& b,
                            const std::optional<at::Tensor>& c, c10::DeviceType dt) {
  const at::Device device = x.device();
  check_tensor(op, "x", x, dt, device);
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [n, *S], got a 0-d tensor");
  check_tensor(op, "a", a, dt, device);
  TORCH_CHECK(a.dim() == 1, op, ": a must have shape [M], got ", a.sizes());
  NoisyArgs r;
  r.M = a.size(0);
  r.n = x.size(0);
  r.D = c10::multiply_integers(x.sizes().slice(1));
  r.acc = acc_type(x.scalar_type());
  check_tensor(op, "eps", eps, dt, device);
  const auto S = x.sizes().slice(1);
  const bool shared = eps.dim() == x.dim() && eps.size(0) == r.M && eps.sizes().slice(1) == S;
  const bool per_image = eps.dim() == x.dim() + 1 && eps.size(0) == r.M && eps.size(1) == r.n &&
                         eps.sizes().slice(2) == S;
  TORCH_CHECK(shared || per_image, op, ": eps must be [M, *S] or [M, n, *S] with M = ", r.M,
              ", n = ", r.n, ", S = ", S, ", got ", eps.sizes());
  r.a = per_sample(op, "a", a, r.M, r.acc, dt, device);
  r.b = per_sample(op, "b", b, r.M, r.acc, dt, device);
  r.has_c = c.has_value() && c->defined();
  if (r.has_c) r.c = per_sample(op, "c", *c, r.M, r.acc, dt, device);
  r.same_dtype = eps.scalar_type() == x.scalar_type();
  r.x = as_rows(x, r.n, r.D);
  const at::Tensor e = r.same_dtype ? eps : eps.to(r.acc);
  if (shared) {
    r.eps = as_rows(e, r.M, r.D);
    r.eps_ms = r.eps.stride(0);
  } else {
    r.eps = e.reshape({r.M, r.n, r.D});
    if (r.D > 1 && r.eps.stride(2) != 1) r.eps = r.eps.contiguous();
    r.eps_ms = r.eps.stride(0);
    r.eps_ns = r.eps.stride(1);
  }
  return r;
}

// Calls f(std::bool_constant<has_c>, type_tag<T>, type_tag<E>) for the dtypes of a: T is x's
// dtype; E, the dtype eps is read in, is T or Acc (NoisyArgs::same_dtype).
template <typename F>
void dispatch_noisy(const NoisyArgs& a, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "noisy_inputs", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    if (a.has_c && a.same_dtype) f(std::true_type{}, type_tag<T>{}, type_tag<T>{});
    else if (a.has_c) f(std::true_type{}, type_tag<T>{}, type_tag<Acc>{});
    else if (a.same_dtype) f(std::false_type{}, type_tag<T>{}, type_tag<T>{});
    else f(std::false_type{}, type_tag<T>{}, type_tag<Acc>{});
  });
}

// masked_adamw_step_ inputs, checked. param/grad/exp_avg/exp_avg_sq: [K, ...] of one float32 or
// float64 dtype; step: int64 [K]; active: bool [K]; all on one device.
struct AdamwArgs {
  int64_t K = 0, P = 0;  // rows, elements per row
};

inline AdamwArgs adamw_args(const char* op, const at::Tensor& param, const at::Tensor& grad,
                            const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                            const at::Tensor& step, const at::Tensor& active,
                            c10::DeviceType dt) {
  const at::Device device = param.device();
  TORCH_CHECK(param.device().type() == dt, op, ": param must be on a ", dt, " device, got ",
              param.device());
  TORCH_CHECK(param.scalar_type() == at::kFloat || param.scalar_type() == at::kDouble, op,
              ": param must be float32 or float64, got ", param.scalar_type());
  TORCH_CHECK(param.dim() >= 1, op, ": param must be [K, ...], got a 0-d tensor");
  const std::pair<const char*, const at::Tensor*> same[] = {
      {"grad", &grad}, {"exp_avg", &exp_avg}, {"exp_avg_sq", &exp_avg_sq}};
  for (const auto& [name, t] : same) {
    TORCH_CHECK(t->scalar_type() == param.scalar_type(), op, ": ", name,
                " must have param's dtype ", param.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == device, op, ": ", name, " must be on ", device,
                " like param, got ", t->device());
    TORCH_CHECK(t->sizes() == param.sizes(), op, ": ", name, " must have param's shape ",
                param.sizes(), ", got ", t->sizes());
  }
  AdamwArgs a;
  a.K = param.size(0);
  a.P = c10::multiply_integers(param.sizes().slice(1));
  const std::tuple<const char*, const at::Tensor*, at::ScalarType> per_row[] = {
      {"step", &step, at::kLong}, {"active", &active, at::kBool}};
  for (const auto& [name, t, type] : per_row) {
    TORCH_CHECK(t->scalar_type() == type, op, ": ", name, " must be ", type, ", got ",
                t->scalar_type());
    TORCH_CHECK(t->device() == device, op, ": ", name, " must be on ", device,
                " like param, got ", t->device());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == a.K, op, ": ", name, " must have shape [K] = [",
                a.K, "], got ", t->sizes());
  }
  return a;
}

// Runs f(p, m, v) on contiguous versions of the in-place arguments and writes the results back
// where a copy was needed (a non-contiguous param keeps its layout).
template <typename F>
void with_contiguous(at::Tensor& p, at::Tensor& m, at::Tensor& v, F&& f) {
  at::Tensor pc = p.contiguous(), mc = m.contiguous(), vc = v.contiguous();
  f(pc, mc, vc);
  if (!pc.is_same(p)) p.copy_(pc);
  if (!mc.is_same(m)) m.copy_(mc);
  if (!vc.is_same(v)) v.copy_(vc);
}

}  // namespace mucs_fast
