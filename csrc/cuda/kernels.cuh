// Torch-free CUDA kernels of the mucs_fast ops. The math lives in csrc/core/*.h (equations,
// sources, precision policy there); this file only maps it onto threads:
//
//   edm_loss, edm_loss_backward: one block of kEdmLanes (256) threads per row b. Thread l adds
//     r[b, i]² for i = l, l + 256, ... in ascending order, then a fixed pairwise tree in shared
//     memory folds the 256 partial sums — the very order of core::lane_tree_sum on the CPU.
//   skew_accumulate: one thread per (k, n) row, ascending m, as core::skew_row on the CPU; a block
//     of kSkewRows rows first stages a [kSkewRows, kSkewTile] tile of both loss matrices in shared
//     memory with coalesced loads.
//   noisy_inputs: elementwise; grid (M·n rows, chunks of a row), kNoisyThreads threads, each thread
//     kNoisyIlp elements of its chunk, strided by the block width (coalesced).
//   masked_adamw_step: elementwise; grid (chunks, K rows), kAdamwThreads threads; a block of an
//     inactive row returns at once; each thread computes its row's bias corrections once and then
//     updates packs of 16 bytes (float4 / double2) when the row is 16-byte aligned.
//
// All accumulation in Acc (float for half/bfloat16/float, double for double), no atomics.
// Rows are addressed through a row stride (elements); within a row elements are contiguous,
// which the ATen bindings guarantee.
#pragma once

#include <cstdint>

#include "../core/masked_adamw_step.h"
#include "../core/edm_loss.h"
#include "../core/noisy_inputs.h"
#include "../core/skew_accumulate.h"

namespace mucs_fast::cuda {

using core::kEdmLanes;
constexpr int kSkewRows = 64;   // threads (rows) per block
constexpr int kSkewTile = 32;   // noises staged per round
constexpr int kNoisyThreads = 256;
constexpr int kNoisyIlp = 4;     // elements per thread and block: a chunk is 1024 elements
constexpr int kAdamwThreads = 256;

// Fold kThreads values in shared memory by the fixed tree of core::lane_tree_sum; result in lane[0].
template <int kThreads, typename Acc>
__device__ inline void block_tree_fold(Acc* lane) {
#pragma unroll
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.x) < s)
      lane[threadIdx.x] = core::add_rn(lane[threadIdx.x], lane[threadIdx.x + s]);
    __syncthreads();
  }
}

// grid: (B), block: (kEdmLanes). loss[b] = weight[b] · mean_i r[b, i]².
template <bool kSkip, typename T, typename U, typename Acc>
__global__ void __launch_bounds__(kEdmLanes)
edm_loss_kernel(Acc* __restrict__ loss, const T* __restrict__ out, int64_t out_rs,
                const U* __restrict__ x_noisy, int64_t x_rs, const U* __restrict__ target,
                int64_t target_rs, const Acc* __restrict__ c_skip, const Acc* __restrict__ c_out,
                const Acc* __restrict__ weight, int64_t D) {
  __shared__ Acc lane[kEdmLanes];
  const int64_t b = blockIdx.x;
  const T* o = out + b * out_rs;
  const U* x = kSkip ? x_noisy + b * x_rs : nullptr;
  const U* t = target + b * target_rs;
  const Acc cs = kSkip ? c_skip[b] : Acc(0);
  const Acc co = c_out ? c_out[b] : Acc(1);
  Acc acc = Acc(0);
  for (int64_t i = threadIdx.x; i < D; i += kEdmLanes) {
    const Acc r = core::edm_residual<kSkip>(static_cast<Acc>(o[i]),
                                            kSkip ? static_cast<Acc>(x[i]) : Acc(0),
                                            static_cast<Acc>(t[i]), cs, co);
    acc = core::add_rn(acc, core::mul_rn(r, r));
  }
  lane[threadIdx.x] = acc;
  __syncthreads();
  block_tree_fold<kEdmLanes>(lane);
  if (threadIdx.x == 0) loss[b] = core::edm_loss_finish(lane[0], D, weight[b]);
}

// grid: (B), block: (kEdmLanes). grad_out[b, i] = grad[b]·weight[b]·(2/D)·c_out[b]·r[b, i];
// grad_out is contiguous [B, D].
template <bool kSkip, typename T, typename U, typename Acc>
__global__ void __launch_bounds__(kEdmLanes)
edm_loss_backward_kernel(T* __restrict__ grad_out, const Acc* __restrict__ grad,
                         const T* __restrict__ out, int64_t out_rs, const U* __restrict__ x_noisy,
                         int64_t x_rs, const U* __restrict__ target, int64_t target_rs,
                         const Acc* __restrict__ c_skip, const Acc* __restrict__ c_out,
                         const Acc* __restrict__ weight, int64_t D) {
  const int64_t b = blockIdx.x;
  const T* o = out + b * out_rs;
  const U* x = kSkip ? x_noisy + b * x_rs : nullptr;
  const U* t = target + b * target_rs;
  T* g = grad_out + b * D;
  const Acc cs = kSkip ? c_skip[b] : Acc(0);
  const Acc co = c_out ? c_out[b] : Acc(1);
  const Acc scale = core::edm_loss_grad_scale(grad[b], weight[b], co, D);
  for (int64_t i = threadIdx.x; i < D; i += kEdmLanes) {
    const Acc r = core::edm_residual<kSkip>(static_cast<Acc>(o[i]),
                                            kSkip ? static_cast<Acc>(x[i]) : Acc(0),
                                            static_cast<Acc>(t[i]), cs, co);
    g[i] = static_cast<T>(core::mul_rn(scale, r));
  }
}

// grid: (ceil(K·N / kSkewRows)), block: (kSkewRows). S[k, n] = Σ_m f(u[k, n, m], t[n, m]),
// ascending m, one thread per row. u rows at k·u_ks + n·u_ns, t rows at n·t_ns; m contiguous.
template <bool kRatio, typename T, typename U, typename Acc>
__global__ void __launch_bounds__(kSkewRows)
skew_accumulate_kernel(Acc* __restrict__ S, const T* __restrict__ loss_u, int64_t u_ks,
                       int64_t u_ns, const U* __restrict__ loss_t, int64_t t_ns, int64_t K,
                       int64_t N, int64_t M, Acc eps) {
  __shared__ Acc su[kSkewRows][kSkewTile + 1];  // +1: row-wise reads hit distinct banks
  __shared__ Acc st[kSkewRows][kSkewTile + 1];
  const int64_t rows = K * N;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kSkewRows;
  Acc s = Acc(0);
  for (int64_t m0 = 0; m0 < M; m0 += kSkewTile) {
    const int tile = static_cast<int>(M - m0 < kSkewTile ? M - m0 : kSkewTile);
    // Coalesced staging: consecutive threads read consecutive m of the same row.
    for (int e = threadIdx.x; e < kSkewRows * kSkewTile; e += kSkewRows) {
      const int r = e / kSkewTile, m = e % kSkewTile;
      const int64_t row = row0 + r;
      if (row < rows && m < tile) {
        const int64_t k = row / N, n = row % N;
        su[r][m] = static_cast<Acc>(loss_u[k * u_ks + n * u_ns + m0 + m]);
        st[r][m] = static_cast<Acc>(loss_t[n * t_ns + m0 + m]);
      }
    }
    __syncthreads();
    if (row0 + threadIdx.x < rows)
      for (int m = 0; m < tile; ++m)
        s = core::add_rn(s, core::skew_term<kRatio>(su[threadIdx.x][m], st[threadIdx.x][m], eps));
    __syncthreads();
  }
  if (row0 + threadIdx.x < rows) S[row0 + threadIdx.x] = s;
}

// grid: (M·n, ceil(D / (kNoisyThreads·kNoisyIlp))), block: (kNoisyThreads).
// out[r, i] = c[m]·(a[m]·x[j, i] + b[m]·eps[m(, j), i]) with r = m·n + j; out contiguous [M·n, D].
template <bool kHasC, typename T, typename E, typename Acc>
__global__ void __launch_bounds__(kNoisyThreads)
noisy_inputs_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t x_rs,
                    const E* __restrict__ eps, int64_t eps_ms, int64_t eps_ns,
                    const Acc* __restrict__ a, const Acc* __restrict__ b,
                    const Acc* __restrict__ c, int64_t n, int64_t D) {
  const int64_t r = blockIdx.x;
  const int64_t m = r / n, j = r % n;
  const T* xr = x + j * x_rs;
  const E* er = eps + m * eps_ms + j * eps_ns;
  T* o = out + r * D;
  const Acc am = a[m], bm = b[m], cm = kHasC ? c[m] : Acc(1);
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * (kNoisyThreads * kNoisyIlp) + threadIdx.x;
#pragma unroll
  for (int u = 0; u < kNoisyIlp; ++u) {
    const int64_t i = i0 + u * kNoisyThreads;
    if (i < D)
      o[i] = static_cast<T>(core::noisy_value<kHasC>(static_cast<Acc>(xr[i]),
                                                     static_cast<Acc>(er[i]), am, bm, cm));
  }
}

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// grid: (chunks, K), block: (kAdamwThreads). Row k of the contiguous [K, P] tensors, in place;
// kVec elements per pack (kVec > 1 needs P % kVec == 0 and 16-byte aligned tensors).
template <typename T, int kVec>
__global__ void __launch_bounds__(kAdamwThreads)
masked_adamw_step_kernel(T* __restrict__ param, const T* __restrict__ grad, T* __restrict__ exp_avg,
                          T* __restrict__ exp_avg_sq, const int64_t* __restrict__ step,
                          const bool* __restrict__ active, int64_t P, double lr, double beta1,
                          double beta2, core::AdamwScalars<T> s) {
  const int64_t k = blockIdx.y;
  if (!active[k]) return;
  double ss_d, bc2_d;
  core::adamw_bias_corrections(step[k], lr, beta1, beta2, &ss_d, &bc2_d);
  const T ss = static_cast<T>(ss_d), bc2 = static_cast<T>(bc2_d);
  using V = Pack<T, kVec>;
  V* p = reinterpret_cast<V*>(param + k * P);
  const V* g = reinterpret_cast<const V*>(grad + k * P);
  V* m = reinterpret_cast<V*>(exp_avg + k * P);
  V* v = reinterpret_cast<V*>(exp_avg_sq + k * P);
  const int64_t packs = P / kVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kAdamwThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kAdamwThreads + threadIdx.x; i < packs;
       i += stride) {
    V pi = p[i], mi = m[i], vi = v[i];
    const V gi = g[i];
#pragma unroll
    for (int u = 0; u < kVec; ++u) core::adamw_update(pi.v[u], gi.v[u], mi.v[u], vi.v[u], ss, bc2, s);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
  }
}

}  // namespace mucs_fast::cuda
