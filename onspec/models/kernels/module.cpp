// Python bindings of onspec's CPU kernels (one extension, built on first use by onspec/models/bf16_linear.py).
#include <torch/extension.h>

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor packed, int64_t n);
torch::Tensor linear_bf16_dp(torch::Tensor x, torch::Tensor packed, int64_t n);
torch::Tensor rms_norm_bf16(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor silu_mul_bf16(torch::Tensor gate_up);
torch::Tensor rope_cache_bf16(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos,
                              torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor slot, torch::Tensor pos);
torch::Tensor attend_bf16(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slot,
                          torch::Tensor allowed, int64_t L, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &linear_bf16, "y = x @ w.T for bf16 x [M, K] and w packed by pack_weight (fp32 sums, bf16 output)");
  m.def("linear_bf16_dp", &linear_bf16_dp, "y = x @ w.T with AVX-512 BF16 dot products, w packed by pack_weight_pairs (avx512_bf16 CPUs only)");
  m.def("rms_norm_bf16", &rms_norm_bf16, "RMSNorm over the last dim of bf16 x [R, H] with weight [H]");
  m.def("silu_mul_bf16", &silu_mul_bf16, "silu(gate) * up for bf16 gate_up [R, 2 I]");
  m.def("attend_bf16", &attend_bf16, "attention of packed bf16 queries against the K/V cache, each token over its allowed keys in a fixed order (shape-invariant)");
  m.def("rope_cache_bf16", &rope_cache_bf16, "rotary embedding of q and k, k and v written to the caches; returns q");
}
