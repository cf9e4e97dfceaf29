// bfloat16 <-> float32 conversions shared by onspec's CPU kernels (a bf16 is the top half of an fp32).
#pragma once
#include <cstdint>
#include <cstring>

namespace onspec {

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// what PyTorch stores after a bf16 op computed in fp32
inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

}  // namespace onspec
