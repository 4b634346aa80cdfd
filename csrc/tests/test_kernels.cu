// Compile check of the torch-free CUDA kernels (csrc/cuda/kernels.cuh) for every storage type the
// extension uses (float, double, bfloat16, half), and — when a GPU is present — a run against the
// host core: the kernels must reproduce csrc/core's results bit for bit (same lanes, same order,
// no FMA; AdamW with the host's pow_int bias corrections). Exit code 77 (ctest: skipped) when no GPU is visible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "cuda/kernels.cuh"

namespace core = mucs_fast::core;
namespace kern = mucs_fast::cuda;

#define CUDA_OK(expr)                                                                 \
  do {                                                                                \
    cudaError_t err_ = (expr);                                                        \
    if (err_ != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

// Every instantiation the ATen bindings can make, compiled here without torch.
#define INSTANTIATE(T, U, Acc)                                                                  \
  template __global__ void kern::edm_loss_kernel<true, T, U, Acc>(Acc*, const T*, int64_t, const U*, \
      int64_t, const U*, int64_t, const Acc*, const Acc*, const Acc*, int64_t);                  \
  template __global__ void kern::edm_loss_kernel<false, T, U, Acc>(Acc*, const T*, int64_t, const U*, \
      int64_t, const U*, int64_t, const Acc*, const Acc*, const Acc*, int64_t);                  \
  template __global__ void kern::edm_loss_backward_kernel<true, T, U, Acc>(T*, const Acc*, const T*, \
      int64_t, const U*, int64_t, const U*, int64_t, const Acc*, const Acc*, const Acc*, int64_t); \
  template __global__ void kern::skew_accumulate_kernel<true, T, U, Acc>(Acc*, const T*, int64_t, \
      int64_t, const U*, int64_t, int64_t, int64_t, int64_t, Acc);                               \
  template __global__ void kern::skew_accumulate_kernel<false, T, U, Acc>(Acc*, const T*, int64_t, \
      int64_t, const U*, int64_t, int64_t, int64_t, int64_t, Acc);
INSTANTIATE(float, float, float)
INSTANTIATE(double, double, double)
INSTANTIATE(__nv_bfloat16, __nv_bfloat16, float)
INSTANTIATE(__nv_bfloat16, float, float)
INSTANTIATE(__half, __half, float)
INSTANTIATE(__half, float, float)
#define INSTANTIATE_NOISY(T, E, Acc)                                                             \
  template __global__ void kern::noisy_inputs_kernel<true, T, E, Acc>(T*, const T*, int64_t, const E*, \
      int64_t, int64_t, const Acc*, const Acc*, const Acc*, int64_t, int64_t);                   \
  template __global__ void kern::noisy_inputs_kernel<false, T, E, Acc>(T*, const T*, int64_t, const E*, \
      int64_t, int64_t, const Acc*, const Acc*, const Acc*, int64_t, int64_t);
INSTANTIATE_NOISY(float, float, float)
INSTANTIATE_NOISY(double, double, double)
INSTANTIATE_NOISY(__nv_bfloat16, __nv_bfloat16, float)
INSTANTIATE_NOISY(__nv_bfloat16, float, float)
INSTANTIATE_NOISY(__half, __half, float)
INSTANTIATE_NOISY(__half, float, float)
#define INSTANTIATE_ADAMW(T, kVec)                                                               \
  template __global__ void kern::masked_adamw_step_kernel<T, kVec>(T*, const T*, T*, T*,        \
      const int64_t*, const bool*, int64_t, double, double, double, mucs_fast::core::AdamwScalars<T>);
INSTANTIATE_ADAMW(float, 1)
INSTANTIATE_ADAMW(float, 4)
INSTANTIATE_ADAMW(double, 1)
INSTANTIATE_ADAMW(double, 2)

static int failures = 0;

template <typename T>
static T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  CUDA_OK(cudaMalloc(&d, h.size() * sizeof(T) + 1));
  CUDA_OK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

template <typename T>
static std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> h(n);
  CUDA_OK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

template <typename T>
static bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <typename T, typename Acc>
static void run_edm(int64_t B, int64_t D) {
  std::vector<T> out(B * D), x(B * D), target(B * D);
  std::vector<Acc> cs(B), co(B), w(B), grad(B);
  for (int64_t i = 0; i < B * D; ++i) {
    out[i] = static_cast<T>(std::sin(0.1 * i));
    x[i] = static_cast<T>(std::cos(0.3 * i));
    target[i] = static_cast<T>(std::sin(0.7 * i + 1.0));
  }
  for (int64_t b = 0; b < B; ++b) {
    cs[b] = static_cast<Acc>(0.2 + 0.01 * b);
    co[b] = static_cast<Acc>(0.9 - 0.02 * b);
    w[b] = static_cast<Acc>(1.0 + 0.5 * b);
    grad[b] = static_cast<Acc>(0.3 * b - 0.4);
  }
  std::vector<Acc> L_host(B);
  std::vector<T> G_host(B * D);
  for (int64_t b = 0; b < B; ++b) {
    L_host[b] = core::edm_loss_row<true, Acc>(&out[b * D], &x[b * D], &target[b * D], D, cs[b], co[b], w[b]);
    core::edm_loss_backward_row<true, Acc>(&G_host[b * D], &out[b * D], &x[b * D], &target[b * D], D, cs[b],
                                           co[b], core::edm_loss_grad_scale(grad[b], w[b], co[b], D));
  }
  T *d_out = to_device(out), *d_x = to_device(x), *d_t = to_device(target), *d_g = nullptr;
  Acc *d_cs = to_device(cs), *d_co = to_device(co), *d_w = to_device(w), *d_grad = to_device(grad), *d_L = nullptr;
  CUDA_OK(cudaMalloc(&d_L, B * sizeof(Acc)));
  CUDA_OK(cudaMalloc(&d_g, B * D * sizeof(T)));
  kern::edm_loss_kernel<true, T, T, Acc><<<B, kern::kEdmLanes>>>(d_L, d_out, D, d_x, D, d_t, D, d_cs, d_co, d_w, D);
  kern::edm_loss_backward_kernel<true, T, T, Acc>
      <<<B, kern::kEdmLanes>>>(d_g, d_grad, d_out, D, d_x, D, d_t, D, d_cs, d_co, d_w, D);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());
  if (!same_bits(to_host(d_L, B), L_host)) {
    std::fprintf(stderr, "edm_loss: device and host differ (B=%lld, D=%lld)\n", (long long)B, (long long)D);
    ++failures;
  }
  if (!same_bits(to_host(d_g, B * D), G_host)) {
    std::fprintf(stderr, "edm_loss_backward: device and host differ (B=%lld, D=%lld)\n", (long long)B, (long long)D);
    ++failures;
  }
  for (void* p : {(void*)d_out, (void*)d_x, (void*)d_t, (void*)d_g, (void*)d_cs, (void*)d_co, (void*)d_w,
                  (void*)d_grad, (void*)d_L})
    CUDA_OK(cudaFree(p));
}

template <typename T, typename Acc>
static void run_skew(int64_t K, int64_t N, int64_t M) {
  std::vector<T> u(K * N * M), t(N * M);
  for (int64_t i = 0; i < N * M; ++i) t[i] = static_cast<T>(1.0 + 0.5 * std::sin(0.37 * i));
  for (int64_t i = 0; i < K * N * M; ++i) u[i] = static_cast<T>(1.0 + 0.5 * std::cos(0.11 * i));
  std::vector<Acc> S_host(K * N);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n)
      S_host[k * N + n] = core::skew_row<true, Acc>(&u[(k * N + n) * M], 1, &t[n * M], 1, M, Acc(1e-3));
  T *d_u = to_device(u), *d_t = to_device(t);
  Acc* d_S = nullptr;
  CUDA_OK(cudaMalloc(&d_S, K * N * sizeof(Acc)));
  const int64_t blocks = (K * N + kern::kSkewRows - 1) / kern::kSkewRows;
  kern::skew_accumulate_kernel<true, T, T, Acc>
      <<<blocks, kern::kSkewRows>>>(d_S, d_u, N * M, M, d_t, M, K, N, M, Acc(1e-3));
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());
  if (!same_bits(to_host(d_S, K * N), S_host)) {
    std::fprintf(stderr, "skew_accumulate: device and host differ (K=%lld, N=%lld, M=%lld)\n", (long long)K,
                 (long long)N, (long long)M);
    ++failures;
  }
  CUDA_OK(cudaFree(d_u));
  CUDA_OK(cudaFree(d_t));
  CUDA_OK(cudaFree(d_S));
}

template <typename T, typename Acc>
static void run_noisy(int64_t M, int64_t n, int64_t D, bool per_image) {
  std::vector<T> x(n * D), eps((per_image ? M * n : M) * D);
  std::vector<Acc> a(M), b(M), c(M);
  for (int64_t i = 0; i < n * D; ++i) x[i] = static_cast<T>(std::sin(0.3 * i));
  for (size_t i = 0; i < eps.size(); ++i) eps[i] = static_cast<T>(std::cos(0.7 * i + 0.5));
  for (int64_t m = 0; m < M; ++m) {
    a[m] = static_cast<Acc>(1.0 / (1.0 + 0.1 * m));
    b[m] = static_cast<Acc>(0.3 + 0.7 * m);
    c[m] = static_cast<Acc>(0.5 / (0.2 + m));
  }
  const int64_t e_ms = per_image ? n * D : D, e_ns = per_image ? D : 0;
  std::vector<T> host(M * n * D);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < n; ++j)
      core::noisy_inputs_row<true, Acc>(&host[(m * n + j) * D], &x[j * D], &eps[m * e_ms + j * e_ns], D,
                                        a[m], b[m], c[m]);
  T *d_x = to_device(x), *d_e = to_device(eps), *d_out = nullptr;
  Acc *d_a = to_device(a), *d_b = to_device(b), *d_c = to_device(c);
  CUDA_OK(cudaMalloc(&d_out, M * n * D * sizeof(T)));
  const int64_t chunk = kern::kNoisyThreads * kern::kNoisyIlp;
  const dim3 grid(static_cast<unsigned>(M * n), static_cast<unsigned>((D + chunk - 1) / chunk));
  kern::noisy_inputs_kernel<true, T, T, Acc>
      <<<grid, kern::kNoisyThreads>>>(d_out, d_x, D, d_e, e_ms, e_ns, d_a, d_b, d_c, n, D);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());
  if (!same_bits(to_host(d_out, M * n * D), host)) {
    std::fprintf(stderr, "noisy_inputs: device and host differ (M=%lld, n=%lld, D=%lld)\n", (long long)M,
                 (long long)n, (long long)D);
    ++failures;
  }
  for (void* p : {(void*)d_x, (void*)d_e, (void*)d_out, (void*)d_a, (void*)d_b, (void*)d_c}) CUDA_OK(cudaFree(p));
}

template <typename T, int kVec>
static void run_adamw(int64_t K, int64_t P) {
  std::vector<T> p(K * P), g(K * P), m(K * P), v(K * P);
  for (int64_t i = 0; i < K * P; ++i) {
    p[i] = static_cast<T>(std::sin(0.37 * i));
    g[i] = static_cast<T>(std::cos(0.11 * i + 1.0));
    m[i] = static_cast<T>(0.1 * std::sin(0.05 * i));
    v[i] = static_cast<T>(0.01 * (1.0 + std::cos(0.13 * i)));
  }
  std::vector<int64_t> step(K);
  bool active[64];
  for (int64_t k = 0; k < K; ++k) {
    step[k] = 1 + 37 * k;
    active[k] = k % 3 != 1;
  }
  const double lr = 1e-3, b1 = 0.9, b2 = 0.999;
  const auto s = core::adamw_scalars<T>(lr, b1, b2, 1e-8, 0.01);
  std::vector<T> hp = p, hm = m, hv = v;
  for (int64_t k = 0; k < K; ++k) {
    if (!active[k]) continue;
    double ss, bc2;
    core::adamw_bias_corrections(step[k], lr, b1, b2, &ss, &bc2);
    core::adamw_row(&hp[k * P], &g[k * P], &hm[k * P], &hv[k * P], P, static_cast<T>(ss),
                    static_cast<T>(bc2), s);
  }
  T *d_p = to_device(p), *d_g = to_device(g), *d_m = to_device(m), *d_v = to_device(v);
  int64_t* d_step = to_device(step);
  bool* d_act = nullptr;
  CUDA_OK(cudaMalloc(&d_act, K));
  CUDA_OK(cudaMemcpy(d_act, active, K, cudaMemcpyHostToDevice));
  const dim3 grid(3, static_cast<unsigned>(K));  // few blocks: threads loop over their row
  kern::masked_adamw_step_kernel<T, kVec>
      <<<grid, kern::kAdamwThreads>>>(d_p, d_g, d_m, d_v, d_step, d_act, P, lr, b1, b2, s);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());
  if (!same_bits(to_host(d_p, K * P), hp) || !same_bits(to_host(d_m, K * P), hm) ||
      !same_bits(to_host(d_v, K * P), hv)) {
    std::fprintf(stderr, "masked_adamw_step: device and host differ (K=%lld, P=%lld)\n", (long long)K,
                 (long long)P);
    ++failures;
  }
  for (void* q : {(void*)d_p, (void*)d_g, (void*)d_m, (void*)d_v, (void*)d_step, (void*)d_act})
    CUDA_OK(cudaFree(q));
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("test_kernels_cuda: no CUDA device; compile check only (skipped)\n");
    return 77;
  }
  for (auto [B, D] : {std::pair<int64_t, int64_t>{1, 1}, {3, 255}, {5, 12261}, {64, 3072}}) {
    run_edm<float, float>(B, D);
    run_edm<double, double>(B, D);
    run_edm<__nv_bfloat16, float>(B, D);
  }
  for (int64_t M : {1, 31, 100, 257}) {
    run_skew<float, float>(3, 77, M);
    run_skew<double, double>(2, 33, M);
    run_skew<__nv_bfloat16, float>(2, 65, M);
  }
  for (bool per_image : {false, true}) {
    run_noisy<float, float>(3, 5, 1025, per_image);
    run_noisy<double, double>(2, 3, 77, per_image);
    run_noisy<__nv_bfloat16, float>(4, 2, 3072, per_image);
  }
  run_adamw<float, 1>(5, 1001);
  run_adamw<float, 4>(4, 4096);
  run_adamw<double, 2>(3, 1000);
  if (failures) {
    std::fprintf(stderr, "%d comparison(s) failed\n", failures);
    return 1;
  }
  std::printf("test_kernels_cuda: device kernels match the host core bit for bit\n");
  return 0;
}
