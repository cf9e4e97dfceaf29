// y = x @ w.T for bfloat16 x [M, K] and w [N, K] on x86 CPUs with AVX2 + FMA but no native bf16 GEMM.
//
// Why this exists (see onspec/models/bf16_linear.py for the measurements): on such CPUs (no avx512_bf16,
// no AMX) PyTorch's bf16 matrix product costs time proportional to the number of rows, so verifying a draft
// tree of 8 tokens cost 8 decode steps and speculation could not pay. Here each panel of weights is read
// from memory once, widened to fp32 in registers (a bf16 is the top half of an fp32) and multiplied with
// every input row while it sits in cache, so extra rows cost arithmetic, not memory traffic.
//
// Numerics: bf16 products summed in fp32, the output rounded to nearest-even bf16: what a bf16 GEMM with
// fp32 accumulation computes. Each output element is summed over k in order, whatever M is and however
// rows are blocked or threaded, so a row's result is the same whatever else is in the batch.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include "bf16.h"
#include <cstdint>
#include <algorithm>
#include <vector>

namespace {

using onspec::float_to_bf16;

// A panel row of 16 bf16 weights is stored as 8 dwords, dword i = (column i low, column i + 8 high), so one
// 32-byte load and two cheap ops widen it: the low halves shifted up are columns 0..7, the high halves
// masked are columns 8..15 (widening 16 contiguous bf16 took two loads, two shuffles and two shifts).
#define ONSPEC_WIDEN(p, lo, hi)                                                                  \
  const __m256i raw_##lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));              \
  const __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(raw_##lo, 16));                         \
  const __m256 hi = _mm256_castsi256_ps(_mm256_and_si256(raw_##lo, _mm256_set1_epi32(-65536)));

// Software prefetch distance into the weight stream. Each thread reads its panels front to back, but the
// hardware prefetcher alone left the FMA loop waiting on DRAM: prefetching 2 KiB ahead made forwards of
// 3-8 rows 1.2-1.3x faster (bench/verify_cost.py; 1 KiB and 3 KiB were close, 4 KiB worse).
constexpr int kPrefetchBytes = 2048;


// The weights are packed once (onspec/models/bf16_linear.py, ``pack_weight``) into panels of 16 output
// features, each k's 16 weights interleaved for ONSPEC_WIDEN: packed[p, k, 2 i] = w[16 p + i, k] and
// packed[p, k, 2 i + 1] = w[16 p + 8 + i, k] for i < 8 (zero rows pad N to a multiple of 16).
// A micro-kernel computes an MR x 16 tile of y: for each k it widens the panel's 16 weights to two fp32
// vectors and adds x[m, k] * w for each of its MR rows (broadcast), so 1 load and 2 ops feed 2 MR FMAs, and the
// 2 MR accumulators stay in registers (MR = 6: 12 accumulators + 2 weights + 1 broadcast of 16 ymm).
// K is cut into blocks of kKC so that a block of the panel (kKC x 16 bf16, 8 KiB) and of MR input rows
// (6 x kKC fp32, 6 KiB) stay in L1 while every row block passes over them; between K blocks the
// accumulators go through a float32 buffer, exactly (whole K rows did not fit in L1: at K = 1536 the
// kernel ran at 27 GMAC/s, against 40 at K = 576).
// Each output element is one lane summed over k in order: nothing depends on M or on the blocking.
constexpr int kNR = 16;
constexpr int kMR = 6;
constexpr int64_t kKC = 256;

// The accumulators are named variables, not an array: GCC kept an array in registers but also stored it to
// the stack on every k (12 stores per k, which made the loop store-bound at a sixth of its FMA rate).
#define ONSPEC_ROW(i)                                                    \
  if constexpr (MR > i) {                                                \
    const __m256 xv = _mm256_broadcast_ss(x + i * ldx + k);              \
    a##i = _mm256_fmadd_ps(xv, w0, a##i);                                \
    b##i = _mm256_fmadd_ps(xv, w1, b##i);                                \
  }
#define ONSPEC_LOAD(i)                                                   \
  if constexpr (MR > i) {                                                \
    a##i = _mm256_loadu_ps(acc + i * kNR);                               \
    b##i = _mm256_loadu_ps(acc + i * kNR + 8);                           \
  }
#define ONSPEC_SAVE(i)                                                   \
  if constexpr (MR > i) {                                                \
    _mm256_storeu_ps(acc + i * kNR, a##i);                               \
    _mm256_storeu_ps(acc + i * kNR + 8, b##i);                           \
  }

// acc [MR, 16] float32 += x[:MR, :kb] @ panel[:kb].T (panel already offset to this K block).
template <int MR>
void micro(const float* x, int64_t ldx, int64_t kb, const uint16_t* panel, float* acc) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
  __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0;
  ONSPEC_LOAD(0) ONSPEC_LOAD(1) ONSPEC_LOAD(2) ONSPEC_LOAD(3) ONSPEC_LOAD(4) ONSPEC_LOAD(5)
  for (int64_t k = 0; k < kb; ++k) {
    if ((k & 1) == 0)  // one 64-byte line holds two k
      _mm_prefetch(reinterpret_cast<const char*>(panel + k * kNR) + kPrefetchBytes, _MM_HINT_T0);
    ONSPEC_WIDEN(panel + k * kNR, w0, w1)
    ONSPEC_ROW(0) ONSPEC_ROW(1) ONSPEC_ROW(2) ONSPEC_ROW(3) ONSPEC_ROW(4) ONSPEC_ROW(5)
  }
  ONSPEC_SAVE(0) ONSPEC_SAVE(1) ONSPEC_SAVE(2) ONSPEC_SAVE(3) ONSPEC_SAVE(4) ONSPEC_SAVE(5)
}
#undef ONSPEC_ROW
#undef ONSPEC_LOAD
#undef ONSPEC_SAVE

// One or two input rows (decoding): two panels at once, so 4 MR independent FMA chains hide the FMA latency
// (with one panel, 2 chains left the loop latency-bound on weights that sit in L3, 30% slower than
// PyTorch's GEMV). Same order of sums per element as ``micro``: only more columns run side by side.
template <int MR>
void micro_pair(const float* x, int64_t K, const uint16_t* pa, const uint16_t* pb, uint16_t* y, int64_t ldy,
                int64_t ncols) {
  static_assert(MR <= 2, "micro_pair: 1 or 2 rows");
  __m256 a0 = _mm256_setzero_ps(), b0 = a0, c0 = a0, d0 = a0, a1 = a0, b1 = a0, c1 = a0, d1 = a0;
  for (int64_t k = 0; k < K; ++k) {
    if ((k & 1) == 0) {
      _mm_prefetch(reinterpret_cast<const char*>(pa + k * kNR) + kPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(pb + k * kNR) + kPrefetchBytes, _MM_HINT_T0);
    }
    ONSPEC_WIDEN(pa + k * kNR, w0, w1)
    ONSPEC_WIDEN(pb + k * kNR, w2, w3)
    const __m256 x0 = _mm256_broadcast_ss(x + k);
    a0 = _mm256_fmadd_ps(x0, w0, a0); b0 = _mm256_fmadd_ps(x0, w1, b0);
    c0 = _mm256_fmadd_ps(x0, w2, c0); d0 = _mm256_fmadd_ps(x0, w3, d0);
    if constexpr (MR > 1) {
      const __m256 x1 = _mm256_broadcast_ss(x + K + k);
      a1 = _mm256_fmadd_ps(x1, w0, a1); b1 = _mm256_fmadd_ps(x1, w1, b1);
      c1 = _mm256_fmadd_ps(x1, w2, c1); d1 = _mm256_fmadd_ps(x1, w3, d1);
    }
  }
  alignas(32) float out[4 * kNR];
  const __m256 rows[2][4] = {{a0, b0, c0, d0}, {a1, b1, c1, d1}};
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < 4; ++v) _mm256_store_ps(out + 8 * v, rows[i][v]);
    for (int64_t j = 0; j < ncols; ++j) y[i * ldy + j] = float_to_bf16(out[j]);
  }
}

// y[:, :ncols] (row stride N) = x [M, K] @ panel.T, through acc [M, 16] (zeroed by the caller's buffer).
void panel_rows(const float* x, int64_t M, int64_t K, const uint16_t* panel, uint16_t* y, int64_t N,
                int64_t ncols, float* acc) {
  std::fill(acc, acc + M * kNR, 0.0f);
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kb = std::min(kKC, K - k0);
    const uint16_t* pk = panel + k0 * kNR;
    // Row tiles of near-equal size (8 rows: 4 + 4, not 6 + 2). A tile of r rows keeps 2 r independent FMA
    // chains in flight; the FMA pipes need about 8 to cover their latency, which a 2-row tile does not.
    const int64_t tiles = (M + kMR - 1) / kMR;
    for (int64_t t = 0, m = 0; t < tiles; ++t) {
      const int64_t rows = (M - m + (tiles - t) - 1) / (tiles - t);
      const float* xm = x + m * K + k0;
      float* am = acc + m * kNR;
      switch (rows) {
        case 6: micro<6>(xm, K, kb, pk, am); break;
        case 5: micro<5>(xm, K, kb, pk, am); break;
        case 4: micro<4>(xm, K, kb, pk, am); break;
        case 3: micro<3>(xm, K, kb, pk, am); break;
        case 2: micro<2>(xm, K, kb, pk, am); break;
        default: micro<1>(xm, K, kb, pk, am); break;
      }
      m += rows;
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < ncols; ++j) y[m * N + j] = float_to_bf16(acc[m * kNR + j]);
}

}  // namespace

// x [M, K] bf16; packed [P, K, 16] bf16 from pack_weight; n: the real output features (<= 16 P).
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor packed, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(2) == kNR, "linear_bf16: x [M, K], packed [P, K, 16]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16, "linear_bf16: bf16 only");
  TORCH_CHECK(x.size(1) == packed.size(1), "linear_bf16: K mismatch");
  TORCH_CHECK(n > kNR * (packed.size(0) - 1) && n <= kNR * packed.size(0), "linear_bf16: n does not fit the panels");
  TORCH_CHECK(packed.is_contiguous(), "linear_bf16: packed must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), P = packed.size(0);
  auto y = torch::empty({M, n}, x.options());
  if (M == 0 || n == 0) return y;
  // the input rows widened to float32 once (M x K: small next to the weights)
  auto xc = x.contiguous();
  const uint16_t* XB = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  std::vector<float> xf(M * K);
  for (int64_t i = 0; i < M * K; ++i) xf[i] = onspec::bf16_to_float(XB[i]);
  const float* X = xf.data();
  const uint16_t* W = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  uint16_t* Y = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  // grain: panels per task, about 64 KiB of weights, so small layers are not split into tiny tasks
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, K * kNR * 2));
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    std::vector<float> acc(M * kNR);
    int64_t p = p0;
    if (M <= 2) {
      for (; p + 2 <= p1; p += 2) {
        const int64_t col = p * kNR;
        const int64_t ncols = std::min<int64_t>(2 * kNR, n - col);
        if (M == 1) micro_pair<1>(X, K, W + p * K * kNR, W + (p + 1) * K * kNR, Y + col, n, ncols);
        else micro_pair<2>(X, K, W + p * K * kNR, W + (p + 1) * K * kNR, Y + col, n, ncols);
      }
    }
    for (; p < p1; ++p) {
      const int64_t col = p * kNR;
      panel_rows(X, M, K, W + p * K * kNR, Y + col, n, std::min<int64_t>(kNR, n - col), acc.data());
    }
  });
  return y;
}
