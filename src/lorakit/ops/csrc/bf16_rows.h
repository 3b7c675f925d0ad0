// What lorakit's row-wise bf16 kernels share (rms_norm.cpp, dora_scale.cpp, causal_attention.cpp): vector types,
// partial loads and stores at a row's tail, bf16 <-> fp32 conversion, the input check and the split of (rows, D)
// over the threads.
// Include after cpu_capability.h.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>  // before the conversions below are instantiated
#include <algorithm>
#include <tuple>

namespace lorakit_bf16_rows {

using at::BFloat16;
using at::Tensor;
using Vec = at::vec::Vectorized<float>;
using BVec = at::vec::Vectorized<BFloat16>;
constexpr int64_t kB = BVec::size();  // bf16 lanes per vector: two float vectors
constexpr int64_t kF = Vec::size();

inline void check_bf16(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.is_contiguous(), name,
              " must be a contiguous bf16 CPU tensor");
}

// m <= kB values at p (a row's tail when m < kB)
inline BVec load(const BFloat16* p, int64_t m) { return m == kB ? BVec::loadu(p) : BVec::loadu(p, m); }
inline void store(const BVec& v, BFloat16* p, int64_t m) { if (m == kB) v.store(p); else v.store(p, m); }

inline std::tuple<Vec, Vec> to_float(const BVec& v) { return at::vec::convert_to_float<BFloat16>(v); }
inline BVec to_bf16(const Vec& a, const Vec& b) { return at::vec::convert_from_float<BFloat16>(a, b); }

// the rows of a (rows, D) problem over the threads, about `grain` elements per task (small tensors stay on one)
template <typename F>
void for_rows(int64_t rows, int64_t D, int64_t grain, const F& body) {
  at::parallel_for(0, rows, std::max<int64_t>(1, grain / std::max<int64_t>(D, 1)), body);
}

}  // namespace lorakit_bf16_rows
