// Shared by the torch-free cores (csrc/core/*.h): host/device qualifiers, explicitly rounded
// arithmetic, and the fixed-order lane reduction that every row sum uses.
//
// Reduction order. A row of n terms is summed in kLanes interleaved lanes: lane l adds terms
// l, l + kLanes, l + 2·kLanes, ... in ascending order, then the lanes are folded by a fixed
// pairwise tree (lane[l] += lane[l + s] for s = kLanes/2, ..., 1). On the CPU one thread runs all
// lanes; on the GPU lane l is thread l of the block and the tree runs in shared memory. Same kLanes,
// same order, same bits: the CPU and CUDA kernels agree exactly, and both agree with themselves run
// after run (no atomics anywhere).
//
// Precision. Every +, −, ×, ÷, √ goes through add_rn/sub_rn/mul_rn/div_rn/sqrt_rn: IEEE
// round-to-nearest with no fused multiply-add. nvcc contracts a·b + c into an FMA by default and host compilers may too
// (-ffp-contract=fast), which would make host and device results differ in the last bit; the
// builds also pass -ffp-contract=off / explicit intrinsics so that nothing is contracted behind
// our back.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MUCS_HD __host__ __device__
#else
#define MUCS_HD
#endif

// Host loops marked MUCS_CPU_CLONES are compiled three times, for x86-64-v4 (AVX-512), x86-64-v3
// (AVX2) and the baseline, and the loader picks one per machine (GCC function multiversioning).
// Every clone does the same IEEE operations in the same order, so the bits do not depend on it.
// flatten inlines the core functions into each clone, so that they are compiled for its target.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && \
    !defined(MUCS_NO_CPU_CLONES)
#define MUCS_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define MUCS_CPU_CLONES
#endif

namespace mucs_fast::core {

MUCS_HD inline float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
MUCS_HD inline double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
MUCS_HD inline float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
MUCS_HD inline double sub_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
MUCS_HD inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MUCS_HD inline double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
MUCS_HD inline float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
MUCS_HD inline double div_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

MUCS_HD inline float sqrt_rn(float a) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
MUCS_HD inline double sqrt_rn(double a) {
#ifdef __CUDA_ARCH__
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// Σ_{i<n} term(i) in the order described above, on one host thread. The inner loop runs across
// lanes (independent accumulators), so it vectorizes without reassociating any lane's sum.
template <int kLanes, typename Acc, typename Term>
inline Acc lane_tree_sum(int64_t n, Term&& term) {
  static_assert(kLanes > 0 && (kLanes & (kLanes - 1)) == 0, "kLanes must be a power of two");
  Acc lane[kLanes];
  for (int l = 0; l < kLanes; ++l) lane[l] = Acc(0);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] = add_rn(lane[l], term(i + l));
  for (int l = 0; i + l < n; ++l) lane[l] = add_rn(lane[l], term(i + l));
  for (int s = kLanes / 2; s > 0; s /= 2)
    for (int l = 0; l < s; ++l) lane[l] = add_rn(lane[l], lane[l + s]);
  return lane[0];
}

}  // namespace mucs_fast::core
