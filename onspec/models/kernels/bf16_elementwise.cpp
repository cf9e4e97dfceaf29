// The decoder layer's elementwise steps for bfloat16 on the CPU, each in one call: RMSNorm, rotary
// embedding of q and k together with the K/V cache write, and SiLU(gate) * up.
//
// Why this exists: at decode, a layer's elementwise work is tiny but PyTorch runs it as ~40 separate ops
// (RMSNorm alone is 8: to float, pow, mean, add, rsqrt, mul, to bf16, mul), each paying a few microseconds
// of dispatch and TensorIterator set-up. Over 30 layers that was about 16 ms of a 32 ms decoding step of
// the default model on a 2-core AVX2 CPU, as much as all the matrix products (bench/verify_cost.py).
//
// Numerics follow PyTorch's bf16 ops step by step: every op that PyTorch rounds to bf16 is rounded to bf16
// here too (round to nearest even), with fp32 arithmetic in between. Sums over a row run in a fixed order,
// so a row's result never depends on the other rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "bf16.h"
#include "bf16_simd.h"

namespace {

using onspec::bf16_to_float;
using onspec::float_to_bf16;
using onspec::round_bf16;
using onspec::exp8;
using onspec::load8;
using onspec::round8;
using onspec::store8;

inline const uint16_t* bits(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}
inline uint16_t* bits_mut(torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

void check_bf16(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.device().is_cpu(), what, ": bf16 CPU tensors only");
  TORCH_CHECK(t.dim() == 0 || t.stride(-1) == 1, what, ": the last dimension must be contiguous");
}

// rows per parallel task: enough work (~64 K elements) that small decode steps stay on one thread
int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, width)); }

}  // namespace

// y = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))) over the last dimension of x [R, H] (any row stride).
torch::Tensor rms_norm_bf16(torch::Tensor x, torch::Tensor w, double eps) {
  check_bf16(x, "rms_norm_bf16(x)");
  check_bf16(w, "rms_norm_bf16(w)");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1), "rms_norm_bf16: x [R, H], w [H]");
  const int64_t R = x.size(0), H = x.size(1), ldx = x.stride(0);
  auto y = torch::empty({R, H}, x.options());
  const auto wc = w.contiguous();
  const uint16_t* X = bits(x);
  const uint16_t* W = bits(wc);
  uint16_t* Y = bits_mut(y);
  const float epsf = static_cast<float>(eps);
  at::parallel_for(0, R, grain_rows(H), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* xr = X + r * ldx;
      // 8 partial sums (vectorisable, and the same order for every row), then added in a fixed order
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t i = 0;
      for (; i + 8 <= H; i += 8)
        for (int j = 0; j < 8; ++j) {
          const float v = bf16_to_float(xr[i + j]);
          part[j] += v * v;
        }
      for (; i < H; ++i) {
        const float v = bf16_to_float(xr[i]);
        part[0] += v * v;
      }
      const float ss = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
      const float scale = 1.0f / std::sqrt(ss / static_cast<float>(H) + epsf);
      uint16_t* yr = Y + r * H;
      const __m256 sc = _mm256_set1_ps(scale);
      int64_t j = 0;
      for (; j + 8 <= H; j += 8)
        store8(yr + j, _mm256_mul_ps(load8(W + j), round8(_mm256_mul_ps(load8(xr + j), sc))));
      for (; j < H; ++j)
        yr[j] = float_to_bf16(bf16_to_float(W[j]) * round_bf16(bf16_to_float(xr[j]) * scale));
    }
  });
  return y;
}

// out [R, I] = bf16(bf16(silu(gate)) * up) for gate_up [R, 2 I] = [gate | up] (any row stride).
torch::Tensor silu_mul_bf16(torch::Tensor gate_up) {
  check_bf16(gate_up, "silu_mul_bf16");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "silu_mul_bf16: gate_up [R, 2 I]");
  const int64_t R = gate_up.size(0), I = gate_up.size(1) / 2, ld = gate_up.stride(0);
  auto out = torch::empty({R, I}, gate_up.options());
  const uint16_t* G = bits(gate_up);
  uint16_t* O = bits_mut(out);
  at::parallel_for(0, R, grain_rows(I), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* g = G + r * ld;
      const uint16_t* u = g + I;
      uint16_t* o = O + r * I;
      int64_t j = 0;
      for (; j + 8 <= I; j += 8) {
        const __m256 x = load8(g + j);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        const __m256 silu = round8(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
        store8(o + j, _mm256_mul_ps(silu, load8(u + j)));
      }
      for (; j < I; ++j) {
        const float x = bf16_to_float(g[j]);
        const float silu = round_bf16(x / (1.0f + std::exp(-x)));
        o[j] = float_to_bf16(silu * bf16_to_float(u[j]));
      }
    }
  });
  return out;
}

// Rotary embedding (rotate-half convention, as HF llama) of q [N, Hq, D] and k [N, Hk, D], with k and
// v [N, Hk, D] written to k_cache / v_cache [S, Hk, L, D] at (slot[n], :, pos[n], :). Returns rotated q
// [N, Hq, D], contiguous. cos / sin: [N, D] (any row stride). Per element, as PyTorch's
// ``x * cos + rotate_half(x) * sin`` in bf16: bf16(bf16(x cos) + bf16(r sin)).
torch::Tensor rope_cache_bf16(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos,
                              torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor slot, torch::Tensor pos) {
  for (auto* t : {&q, &k, &v, &cos, &sin, &k_cache, &v_cache}) check_bf16(*t, "rope_cache_bf16");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(2) == k.size(2), "rope_cache_bf16: q [N, Hq, D], k and v [N, Hk, D]");
  const int64_t N = q.size(0), Hq = q.size(1), Hk = k.size(1), D = q.size(2), half = D / 2;
  TORCH_CHECK(D % 2 == 0, "rope_cache_bf16: odd head dim");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == N && cos.size(1) == D && sin.sizes() == cos.sizes(),
              "rope_cache_bf16: cos and sin [N, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && k_cache.size(1) == Hk && k_cache.size(3) == D,
              "rope_cache_bf16: caches [S, Hk, L, D], contiguous");
  TORCH_CHECK(slot.scalar_type() == at::kLong && pos.scalar_type() == at::kLong && slot.numel() == N &&
                  pos.numel() == N, "rope_cache_bf16: slot and pos [N] int64");
  const int64_t S = k_cache.size(0), L = k_cache.size(2);
  auto slot_c = slot.contiguous(), pos_c = pos.contiguous();
  const int64_t* SL = slot_c.data_ptr<int64_t>();
  const int64_t* PS = pos_c.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(SL[n] >= 0 && SL[n] < S && PS[n] >= 0 && PS[n] < L, "rope_cache_bf16: slot/pos out of range");
  auto q_out = torch::empty({N, Hq, D}, q.options());
  const uint16_t *Q = bits(q), *K = bits(k), *V = bits(v), *C = bits(cos), *SN = bits(sin);
  uint16_t *QO = bits_mut(q_out), *KC = bits_mut(k_cache), *VC = bits_mut(v_cache);
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), cs0 = cos.stride(0), ss0 = sin.stride(0);

  auto rotate = [&](const uint16_t* x, const uint16_t* c, const uint16_t* s, uint16_t* out) {
    if (half % 8 == 0) {
      for (int64_t d = 0; d < half; d += 8) {
        const __m256 x0 = load8(x + d), x1 = load8(x + d + half);
        const __m256 c0 = load8(c + d), c1 = load8(c + d + half), s0 = load8(s + d), s1 = load8(s + d + half);
        // first half: x0 cos - x1 sin; second half: x1 cos + x0 sin (each product rounded, then the sum)
        store8(out + d, _mm256_add_ps(round8(_mm256_mul_ps(x0, c0)),
                                      round8(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), x1), s0))));
        store8(out + d + half, _mm256_add_ps(round8(_mm256_mul_ps(x1, c1)), round8(_mm256_mul_ps(x0, s1))));
      }
      return;
    }
    for (int64_t d = 0; d < D; ++d) {
      const float xv = bf16_to_float(x[d]);
      const float rv = d < half ? -bf16_to_float(x[d + half]) : bf16_to_float(x[d - half]);
      out[d] = float_to_bf16(round_bf16(xv * bf16_to_float(c[d])) + round_bf16(rv * bf16_to_float(s[d])));
    }
  };
  at::parallel_for(0, N, grain_rows((Hq + 2 * Hk) * D), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint16_t* c = C + n * cs0;
      const uint16_t* s = SN + n * ss0;
      for (int64_t h = 0; h < Hq; ++h) rotate(Q + n * qs0 + h * qs1, c, s, QO + (n * Hq + h) * D);
      for (int64_t h = 0; h < Hk; ++h) {
        const int64_t at_cache = ((SL[n] * Hk + h) * L + PS[n]) * D;
        rotate(K + n * ks0 + h * ks1, c, s, KC + at_cache);
        std::memcpy(VC + at_cache, V + n * vs0 + h * vs1, D * sizeof(uint16_t));
      }
    }
  });
  return q_out;
}
