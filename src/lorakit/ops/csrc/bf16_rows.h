// What lorakit's row-wise kernels share (rms_norm.cpp, dora_scale.cpp, causal_attention.cpp, swiglu.cpp): vector
// types, partial loads and stores at a row's tail, bf16 <-> fp32 conversion, 32 values of either dtype as two
// float vectors (load2 / store2, for the kernels that run in bf16 and fp32), the input check and the split of
// (rows, D) over the threads.
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

// kB (32) values of a bf16 or fp32 array as two float vectors; load2(p, m): the first m < kB (the rest zero)
inline std::tuple<Vec, Vec> load2(const BFloat16* p) { return to_float(BVec::loadu(p)); }
inline std::tuple<Vec, Vec> load2(const float* p) { return {Vec::loadu(p), Vec::loadu(p + kF)}; }
inline std::tuple<Vec, Vec> load2(const BFloat16* p, int64_t m) { return to_float(load(p, m)); }
inline std::tuple<Vec, Vec> load2(const float* p, int64_t m) {
  return {Vec::loadu(p, std::min(m, kF)), m > kF ? Vec::loadu(p + kF, m - kF) : Vec(0.f)};
}
inline void store2(const Vec& a, const Vec& b, BFloat16* p) { to_bf16(a, b).store(p); }
inline void store2(const Vec& a, const Vec& b, float* p) { a.store(p); b.store(p + kF); }
inline void store2(const Vec& a, const Vec& b, BFloat16* p, int64_t m) { store(to_bf16(a, b), p, m); }
inline void store2(const Vec& a, const Vec& b, float* p, int64_t m) {
  a.store(p, std::min(m, kF));
  if (m > kF) b.store(p + kF, m - kF);
}
// exp for a kernel computing in T: ATen's faster exp_u20 where the result is rounded to bf16 anyway, its exp
// (Sleef's 1-ulp one, PyTorch's own) for fp32, the exact training path
inline Vec exp_for(const Vec& v, const BFloat16*) { return v.exp_u20(); }
inline Vec exp_for(const Vec& v, const float*) { return v.exp(); }
// a float vector rounded to T and back: bf16's rounding of an intermediate PyTorch stores in bf16; fp32 unchanged
inline std::tuple<Vec, Vec> round_as(const Vec& a, const Vec& b, const BFloat16*) { return to_float(to_bf16(a, b)); }
inline std::tuple<Vec, Vec> round_as(const Vec& a, const Vec& b, const float*) { return {a, b}; }

// the rows of a (rows, D) problem over the threads, about `grain` elements per task (small tensors stay on one)
template <typename F>
void for_rows(int64_t rows, int64_t D, int64_t grain, const F& body) {
  at::parallel_for(0, rows, std::max<int64_t>(1, grain / std::max<int64_t>(D, 1)), body);
}

}  // namespace lorakit_bf16_rows
