// Attention of packed bfloat16 queries against the K/V cache, one token at a time, for the CPU.
//
// Why this exists: PyTorch's attention gives a token a result that depends on the shape of the forward it
// sits in. A token verified as a node of a draft tree attends in a [B, T] grid with a mask; the same
// token decoded plainly attends alone. The matrix products inside scaled_dot_product_attention block
// their sums by shape, so in bf16 the two round differently, and greedy speculative output parted from
// plain greedy output wherever two tokens were nearly tied (806 or 694 tokens against 781 on the
// code-editing benchmark). Everything else in a decoder layer on these CPUs is already row-local (the
// linear kernel and the elementwise kernels), so an attention whose result for a token depends only on
// that token's query and the keys it may see makes the whole forward shape-invariant: bf16 speculative
// greedy output then equals plain greedy output token for token, as float32 output always did.
//
// How: for each (token, head), the keys the token may see are visited in cache-position order (its
// prefix, then its draft-tree ancestors, which sit after the prefix in depth order: the same sequence of
// keys as in plain decoding). Scores are fp32 dot products summed in a fixed lane order, softmax is two
// passes in fp32 (max, then exp and sum in order), the value sum is fp32 in the same order, and only the
// output is rounded to bf16. This is the "batch-invariant kernels" idea (Thinking Machines, "Defeating
// Nondeterminism in LLM Inference", 2025) applied to the tree/plain shapes of speculative decoding.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <vector>
#include <immintrin.h>

#include "bf16.h"
#include "bf16_simd.h"

namespace {

using onspec::exp8;
using onspec::load8;
using onspec::store8;

// the 8 lanes summed in one fixed order, whatever the call site
inline float hsum8(__m256 v) {
  const __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  const __m128 s4 = _mm_add_ps(lo, hi);                        // (0+4, 1+5, 2+6, 3+7)
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));     // (0+4+2+6, 1+5+3+7)
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

}  // namespace

// q [N, H, D] bf16; k_cache, v_cache [S, KVH, P, D] bf16 contiguous; slot [N] long (the cache row of each
// token); allowed [N, L] bool (which of the first L cache positions each token sees; empty: all of them).
// Returns [N, H * D] bf16. Query head h reads K/V head h / (H / KVH), as HF's repeat_kv.
torch::Tensor attend_bf16(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slot,
                          torch::Tensor allowed, int64_t L, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
              v_cache.scalar_type() == at::kBFloat16, "attend_bf16: bf16 tensors only");
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "attend_bf16: q must be contiguous [N, H, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              v_cache.sizes() == k_cache.sizes(), "attend_bf16: caches must be contiguous [S, KVH, P, D]");
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k_cache.size(1), P = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && D % 8 == 0, "attend_bf16: head_dim must match and be a multiple of 8");
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "attend_bf16: heads must be a multiple of K/V heads");
  TORCH_CHECK(L >= 0 && L <= P, "attend_bf16: L beyond the cache");
  TORCH_CHECK(slot.scalar_type() == at::kLong && slot.numel() == N && slot.is_contiguous(), "attend_bf16: slot [N] long");
  const bool all_keys = allowed.numel() == 0;
  TORCH_CHECK(all_keys || (allowed.scalar_type() == at::kBool && allowed.is_contiguous() &&
                           allowed.size(0) == N && allowed.size(1) == L), "attend_bf16: allowed [N, L] bool");
  const int64_t S = k_cache.size(0), n_rep = H / KVH;
  auto out = torch::empty({N, H * D}, q.options());
  const auto* qb = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const auto* kb = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const auto* vb = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  auto* ob = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t* sl = slot.data_ptr<int64_t>();
  const bool* al = all_keys ? nullptr : allowed.data_ptr<bool>();
  for (int64_t i = 0; i < N; ++i) TORCH_CHECK(sl[i] >= 0 && sl[i] < S, "attend_bf16: slot out of range");
  const float fscale = static_cast<float>(scale);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, L * D * (H / KVH)));

  // One work item per (token, K/V head): the n_rep query heads that share the K/V head go together, their
  // keys and values stay in L1 between heads. Dot products run four keys at a time and value sums 32 lanes
  // at a time, so four independent FMA chains are in flight instead of one (a single chain per key was
  // bound by FMA latency). Each key's dot product and each output lane's sum still add in one fixed order.
  at::parallel_for(0, N * KVH, grain, [&](int64_t w0, int64_t w1) {
    auto padded = [](int64_t n) { return (n + 7) / 8 * 8; };
    const int64_t PL = padded(L);
    std::vector<float> score(PL), qf(D);
    std::vector<int64_t> keys(L);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t i = w / KVH, g = w % KVH;
      const int64_t base = (sl[i] * KVH + g) * P * D;
      const bool* row = all_keys ? nullptr : al + i * L;
      int64_t n = 0;
      for (int64_t j = 0; j < L; ++j)             // the keys this token sees, in position order
        if (!row || row[j]) keys[n++] = j;
      for (int64_t r = 0; r < n_rep; ++r) {
        const int64_t h = g * n_rep + r;
        uint16_t* orow = ob + (i * H + h) * D;
        if (n == 0) {                              // sees nothing (never for a real token): zeros, not NaN
          for (int64_t d = 0; d < D; ++d) orow[d] = 0;
          continue;
        }
        const uint16_t* qrow = qb + (i * H + h) * D;
        for (int64_t d = 0; d < D; ++d) qf[d] = onspec::bf16_to_float(qrow[d]);
        int64_t t = 0;
        for (; t + 4 <= n; t += 4) {
          const uint16_t *k0 = kb + base + keys[t] * D, *k1 = kb + base + keys[t + 1] * D,
                         *k2 = kb + base + keys[t + 2] * D, *k3 = kb + base + keys[t + 3] * D;
          __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          for (int64_t d = 0; d < D; d += 8) {
            const __m256 q8 = _mm256_loadu_ps(&qf[d]);
            a0 = _mm256_fmadd_ps(q8, load8(k0 + d), a0);
            a1 = _mm256_fmadd_ps(q8, load8(k1 + d), a1);
            a2 = _mm256_fmadd_ps(q8, load8(k2 + d), a2);
            a3 = _mm256_fmadd_ps(q8, load8(k3 + d), a3);
          }
          score[t] = hsum8(a0) * fscale;
          score[t + 1] = hsum8(a1) * fscale;
          score[t + 2] = hsum8(a2) * fscale;
          score[t + 3] = hsum8(a3) * fscale;
        }
        for (; t < n; ++t) {                       // the same chain per key, one key at a time
          const uint16_t* k0 = kb + base + keys[t] * D;
          __m256 a0 = _mm256_setzero_ps();
          for (int64_t d = 0; d < D; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(&qf[d]), load8(k0 + d), a0);
          score[t] = hsum8(a0) * fscale;
        }
        float m = -INFINITY;
        for (int64_t u = 0; u < n; ++u) m = std::max(m, score[u]);
        for (int64_t u = n; u < padded(n); ++u) score[u] = m;   // lanes past the last key (unused)
        const __m256 mv = _mm256_set1_ps(m);
        for (int64_t u = 0; u < n; u += 8)         // softmax numerators, 8 keys at a time
          _mm256_storeu_ps(&score[u], exp8(_mm256_sub_ps(_mm256_loadu_ps(&score[u]), mv)));
        float total = 0.f;                         // and their sum, in order
        for (int64_t u = 0; u < n; ++u) total += score[u];
        const __m256 inv = _mm256_set1_ps(1.f / total);
        int64_t d = 0;
        for (; d + 32 <= D; d += 32) {             // value sums over the keys in order, 32 lanes at a time
          __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
          for (int64_t u = 0; u < n; ++u) {
            const __m256 p = _mm256_set1_ps(score[u]);
            const uint16_t* vr = vb + base + keys[u] * D + d;
            s0 = _mm256_fmadd_ps(p, load8(vr), s0);
            s1 = _mm256_fmadd_ps(p, load8(vr + 8), s1);
            s2 = _mm256_fmadd_ps(p, load8(vr + 16), s2);
            s3 = _mm256_fmadd_ps(p, load8(vr + 24), s3);
          }
          store8(orow + d, _mm256_mul_ps(s0, inv));
          store8(orow + d + 8, _mm256_mul_ps(s1, inv));
          store8(orow + d + 16, _mm256_mul_ps(s2, inv));
          store8(orow + d + 24, _mm256_mul_ps(s3, inv));
        }
        for (; d < D; d += 8) {
          __m256 s0 = _mm256_setzero_ps();
          for (int64_t u = 0; u < n; ++u)
            s0 = _mm256_fmadd_ps(_mm256_set1_ps(score[u]), load8(vb + base + keys[u] * D + d), s0);
          store8(orow + d, _mm256_mul_ps(s0, inv));
        }
      }
    }
  });
  return out;
}
