// y = x @ w.T for bfloat16 x [M, K] and w [N, K] with AVX-512 BF16 dot products (vdpbf16ps), for CPUs that
// have avx512_bf16 (AMD Zen 4 and later, Intel Cooper Lake, Sapphire Rapids and later).
//
// Why a second variant of bf16_linear.cpp: that kernel widens bf16 weights to fp32 and runs 8-lane FMAs, so
// beyond a few rows it is compute-bound, and a 16-64 row forward (a verified draft tree, a batch of rows)
// costs several times a 1-row one. vdpbf16ps multiplies 32 bf16 pairs and adds them into 16 fp32 lanes in
// one instruction, with no widening, so the same forward does 2-4x the multiply-adds per instruction.
// PyTorch's own product on these CPUs uses the same instruction but is not batch-invariant, so it cannot
// serve exact speculation (onspec/models/compute_path.py); this one is.
//
// Numerics: each output element is, for k = 0, 2, 4, ... in order, acc = acc + x[k+1] w[k+1] + x[k] w[k]
// (the instruction's fixed order; bf16 products are exact in fp32), the output rounded to nearest-even bf16.
// That order depends only on K, never on M, the blocking or the threads, so a row's result is the same
// whatever else is in the batch. It differs from bf16_linear.cpp's order (k one by one), so a process uses
// one variant for every forward (the compute path is chosen once per process and reported).
// The instruction treats bf16 denormals as zero (DAZ/FTZ), the same way for every row.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include "bf16.h"
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#define ONSPEC_DP_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace {

using onspec::float_to_bf16;

// A group is 64 output features = four zmm of fp32 accumulators per row; the weights are packed
// (onspec/models/bf16_linear.py, ``pack_weight_pairs``) as [G, K/2, 64, 2]: for each pair of k, the 64
// features' (w[k], w[k+1]) pairs, 256 contiguous bytes that four loads bring in.
constexpr int kNG = 64;
constexpr int kMR = 6;        // rows per tile: 6 x 4 = 24 accumulators + 4 weights + 1 broadcast of 32 zmm
constexpr int64_t kKP = 64;   // k pairs per block: 16 KiB of weights stay in L1 while every row tile passes
constexpr int kPrefetchBytes = 2048;

#define ONSPEC_DP_ROW(i)                                                                              \
  if constexpr (MR > i) {                                                                             \
    const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[i * ldx + j]));               \
    a##i = _mm512_dpbf16_ps(a##i, xv, w0); b##i = _mm512_dpbf16_ps(b##i, xv, w1);                     \
    c##i = _mm512_dpbf16_ps(c##i, xv, w2); d##i = _mm512_dpbf16_ps(d##i, xv, w3);                     \
  }
#define ONSPEC_DP_LOAD(i)                                                                             \
  if constexpr (MR > i) {                                                                             \
    a##i = _mm512_loadu_ps(acc + i * kNG); b##i = _mm512_loadu_ps(acc + i * kNG + 16);                \
    c##i = _mm512_loadu_ps(acc + i * kNG + 32); d##i = _mm512_loadu_ps(acc + i * kNG + 48);           \
  }
#define ONSPEC_DP_SAVE(i)                                                                             \
  if constexpr (MR > i) {                                                                             \
    _mm512_storeu_ps(acc + i * kNG, a##i); _mm512_storeu_ps(acc + i * kNG + 16, b##i);                \
    _mm512_storeu_ps(acc + i * kNG + 32, c##i); _mm512_storeu_ps(acc + i * kNG + 48, d##i);           \
  }

// acc [MR, 64] += x[:MR] (k pairs [0, kp) of this block, row stride ldx pairs) . group block (already offset)
template <int MR>
ONSPEC_DP_TARGET void micro_dp(const uint32_t* x, int64_t ldx, int64_t kp, const uint16_t* group, float* acc) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
  __m512 b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0;
  __m512 c0 = a0, c1 = a0, c2 = a0, c3 = a0, c4 = a0, c5 = a0;
  __m512 d0 = a0, d1 = a0, d2 = a0, d3 = a0, d4 = a0, d5 = a0;
  ONSPEC_DP_LOAD(0) ONSPEC_DP_LOAD(1) ONSPEC_DP_LOAD(2) ONSPEC_DP_LOAD(3) ONSPEC_DP_LOAD(4) ONSPEC_DP_LOAD(5)
  for (int64_t j = 0; j < kp; ++j) {
    const uint16_t* w = group + j * 2 * kNG;
    _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + 64, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + 128, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + 192, _MM_HINT_T0);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 32);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 64);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(w + 96);
    ONSPEC_DP_ROW(0) ONSPEC_DP_ROW(1) ONSPEC_DP_ROW(2) ONSPEC_DP_ROW(3) ONSPEC_DP_ROW(4) ONSPEC_DP_ROW(5)
  }
  ONSPEC_DP_SAVE(0) ONSPEC_DP_SAVE(1) ONSPEC_DP_SAVE(2) ONSPEC_DP_SAVE(3) ONSPEC_DP_SAVE(4) ONSPEC_DP_SAVE(5)
}
#undef ONSPEC_DP_ROW
#undef ONSPEC_DP_LOAD
#undef ONSPEC_DP_SAVE

// y[:, :ncols] (row stride N) = x [M, KP pairs] . group, through acc [M, 64] (scratch).
ONSPEC_DP_TARGET void group_rows(const uint32_t* x, int64_t M, int64_t KP, const uint16_t* group, uint16_t* y,
                                 int64_t N, int64_t ncols, float* acc) {
  std::fill(acc, acc + M * kNG, 0.0f);
  for (int64_t j0 = 0; j0 < KP; j0 += kKP) {
    const int64_t kp = std::min(kKP, KP - j0);
    const uint16_t* gk = group + j0 * 2 * kNG;
    // row tiles of near-equal size (7 rows: 4 + 3, not 6 + 1), as in bf16_linear.cpp
    const int64_t tiles = (M + kMR - 1) / kMR;
    for (int64_t t = 0, m = 0; t < tiles; ++t) {
      const int64_t rows = (M - m + (tiles - t) - 1) / (tiles - t);
      const uint32_t* xm = x + m * KP + j0;
      float* am = acc + m * kNG;
      switch (rows) {
        case 6: micro_dp<6>(xm, KP, kp, gk, am); break;
        case 5: micro_dp<5>(xm, KP, kp, gk, am); break;
        case 4: micro_dp<4>(xm, KP, kp, gk, am); break;
        case 3: micro_dp<3>(xm, KP, kp, gk, am); break;
        case 2: micro_dp<2>(xm, KP, kp, gk, am); break;
        default: micro_dp<1>(xm, KP, kp, gk, am); break;
      }
      m += rows;
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < ncols; ++j) y[m * N + j] = float_to_bf16(acc[m * kNG + j]);
}

}  // namespace

// x [M, K] bf16; packed [G, ceil(K / 2), 64, 2] bf16 from pack_weight_pairs; n: the real output features.
torch::Tensor linear_bf16_dp(torch::Tensor x, torch::Tensor packed, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 4 && packed.size(2) == kNG && packed.size(3) == 2,
              "linear_bf16_dp: x [M, K], packed [G, K/2, 64, 2]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16, "linear_bf16_dp: bf16 only");
  TORCH_CHECK((x.size(1) + 1) / 2 == packed.size(1), "linear_bf16_dp: K mismatch");
  TORCH_CHECK(n > kNG * (packed.size(0) - 1) && n <= kNG * packed.size(0), "linear_bf16_dp: n does not fit the groups");
  TORCH_CHECK(packed.is_contiguous(), "linear_bf16_dp: packed must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), KP = packed.size(1), G = packed.size(0);
  auto y = torch::empty({M, n}, x.options());
  if (M == 0 || n == 0) return y;
  // the input rows as k pairs (an odd K gets a zero at the end, against the zero weight packed there)
  auto xc = x.contiguous();
  const uint16_t* XB = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  std::vector<uint32_t> xp(M * KP, 0u);
  for (int64_t m = 0; m < M; ++m)
    std::memcpy(reinterpret_cast<uint16_t*>(xp.data() + m * KP), XB + m * K, K * sizeof(uint16_t));
  const uint16_t* W = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  uint16_t* Y = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int64_t group_elems = KP * 2 * kNG;
  // grain: groups per task, about 64 KiB of weights, so small layers are not split into tiny tasks
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, group_elems * 2));
  at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
    std::vector<float> acc(M * kNG);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t col = g * kNG;
      group_rows(xp.data(), M, KP, W + g * group_elems, Y + col, n, std::min<int64_t>(kNG, n - col), acc.data());
    }
  });
  return y;
}
