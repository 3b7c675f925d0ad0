// A dense layer's product for a few rows (a decoded token's batch), read straight from the plain weight:
//
//   linear_rows(x, weight, bias) -> x weight^T + bias     x (..., d_in), weight (d_out, d_in), bias (d_out) or None:
//                                                         contiguous CPU tensors of one dtype, fp32 or bf16
//   linear_rows_dtypes() -> ["float32", "bfloat16"]       the dtypes it runs fast here (fp32: AVX2 or AVX-512;
//                                                         bf16: AVX512-BF16)
//
// For a handful of rows a matmul library spends much of a call rearranging the weight, not multiplying it: oneDNN
// copies each weight into its blocked layout on every call (bf16: 114 us a call on average over SmolLM2's 210
// projections at 8 rows, 2 threads, against 63 us on weights packed in advance), and a decoded token reads every
// weight once. Here each output is the dot product of a row with a weight row, both read as they are stored, in
// tiles of 4 rows x 4 outputs (16 fp32 accumulators: each weight row is read from memory once, the rows' inputs
// from L1), the weight rows requested into L2 two tiles ahead. bf16 takes 32 pairs a step with AVX512-BF16's
// dot-product instruction, adds the bias in fp32 and rounds each output to bf16 once; fp32 takes fused
// multiply-adds. The output columns are split over the threads. 8 rows, same average: bf16 53 us against oneDNN's
// 114, fp32 118 against 151 (docs/performance.md, optimisation 39). The sums run in another order than the
// libraries': equal to fp32 rounding (bf16: before the one rounding to bf16; tests/unit/test_linear_rows.py).
// Built into lorakit_cpu.cpp; used through lorakit/ops/matmul.py (linear, which decides when it runs).
#include "cpu_capability.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>
#include <algorithm>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace lorakit_linear_rows {

using at::Tensor;
constexpr int64_t kTileRows = 4;
constexpr int64_t kPrefetchTiles = 2;  // tiles of weight rows requested ahead of the one being multiplied

// fp32: 16 (AVX-512) or 8 (AVX2) values a step, fused multiply-adds
struct FloatStep {
  using T = float;
  using Vec = at::vec::Vectorized<float>;
  using Acc = Vec;
  static constexpr int64_t kK = Vec::size();
  static constexpr int64_t kTileCols = kK == 16 ? 4 : 2;  // 16 accumulators fit AVX-512's 32 registers
  static Acc zero() { return Vec(0.0f); }
  static Vec load(const float* p) { return Vec::loadu(p); }
  static Vec load(const float* p, int64_t n) { return Vec::loadu(p, n); }  // the lanes past n load as zero
  static Acc dot(const Acc& acc, const Vec& x, const Vec& w) { return at::vec::fmadd(x, w, acc); }
  static float sum(const Acc& acc) {
    return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  }
  static float to_float(float v) { return v; }
  static float from_float(float v) { return v; }
};

#if defined(__AVX512BF16__)
// bf16: 32 values a step, AVX512-BF16's dot product of pairs into fp32 sums
struct Bf16Step {
  using T = at::BFloat16;
  using Vec = __m512bh;
  using Acc = __m512;
  static constexpr int64_t kK = 32;
  static constexpr int64_t kTileCols = 4;
  static Acc zero() { return _mm512_setzero_ps(); }
  static Vec load(const T* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static Vec load(const T* p, int64_t n) {
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p);
  }
  static Acc dot(const Acc& acc, const Vec& x, const Vec& w) { return _mm512_dpbf16_ps(acc, x, w); }
  static float sum(const Acc& acc) { return _mm512_reduce_add_ps(acc); }
  static float to_float(T v) { return static_cast<float>(v); }
  static T from_float(float v) { return T(v); }  // round to nearest even
};
constexpr bool kBf16Built = true;
#else
constexpr bool kBf16Built = false;
#endif

// out[i0 + p, j0 + q] = sum_d x[i0 + p, d] w[j0 + q, d] (+ bias) for p < NI, q < NJ
template <typename S, int NI, int NJ>
void tile(const typename S::T* x, const typename S::T* w, const typename S::T* bias, typename S::T* out, int64_t i0,
          int64_t j0, int64_t d_in, int64_t d_out) {
  typename S::Acc acc[NI][NJ];
  for (int p = 0; p < NI; ++p)
    for (int q = 0; q < NJ; ++q) acc[p][q] = S::zero();
  const typename S::T* xr[NI];
  const typename S::T* wr[NJ];
  for (int p = 0; p < NI; ++p) xr[p] = x + (i0 + p) * d_in;
  for (int q = 0; q < NJ; ++q) wr[q] = w + (j0 + q) * d_in;
  int64_t d = 0;
  for (; d + S::kK <= d_in; d += S::kK) {
    typename S::Vec wv[NJ];
    for (int q = 0; q < NJ; ++q) wv[q] = S::load(wr[q] + d);
    for (int p = 0; p < NI; ++p) {
      const typename S::Vec xv = S::load(xr[p] + d);
      for (int q = 0; q < NJ; ++q) acc[p][q] = S::dot(acc[p][q], xv, wv[q]);
    }
  }
  if (d < d_in) {
    const int64_t n = d_in - d;
    typename S::Vec wv[NJ];
    for (int q = 0; q < NJ; ++q) wv[q] = S::load(wr[q] + d, n);
    for (int p = 0; p < NI; ++p) {
      const typename S::Vec xv = S::load(xr[p] + d, n);
      for (int q = 0; q < NJ; ++q) acc[p][q] = S::dot(acc[p][q], xv, wv[q]);
    }
  }
  for (int p = 0; p < NI; ++p) {
    for (int q = 0; q < NJ; ++q) {
      const float sum = S::sum(acc[p][q]);
      out[(i0 + p) * d_out + j0 + q] = S::from_float(bias ? sum + S::to_float(bias[j0 + q]) : sum);
    }
  }
}

// the rows' outputs in columns [j, j + NJ): every block of rows from the same NJ weight rows, read from memory once
template <typename S, int NJ>
void column_tile(const typename S::T* x, const typename S::T* w, const typename S::T* bias, typename S::T* out,
                 int64_t rows, int64_t j, int64_t d_in, int64_t d_out) {
  int64_t i = 0;
  for (; i + kTileRows <= rows; i += kTileRows) tile<S, kTileRows, NJ>(x, w, bias, out, i, j, d_in, d_out);
  switch (rows - i) {
    case 3: tile<S, 3, NJ>(x, w, bias, out, i, j, d_in, d_out); break;
    case 2: tile<S, 2, NJ>(x, w, bias, out, i, j, d_in, d_out); break;
    case 1: tile<S, 1, NJ>(x, w, bias, out, i, j, d_in, d_out); break;
    default: break;
  }
}

// the weight rows [j0, j1) into L2 ahead of their tile (the hardware's prefetchers do not follow a tile's weight
// rows far enough ahead: 76 -> 55 us a call on average over SmolLM2's bf16 projections at 8 rows, measured)
template <typename T>
void prefetch_rows(const T* w, int64_t j0, int64_t j1, int64_t d_in) {
  const char* c = reinterpret_cast<const char*>(w + j0 * d_in);
  const int64_t bytes = (j1 - j0) * d_in * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

// the outputs in columns [j0, j1): one thread's share
template <typename S>
void columns(const typename S::T* x, const typename S::T* w, const typename S::T* bias, typename S::T* out,
             int64_t rows, int64_t j0, int64_t j1, int64_t d_in, int64_t d_out) {
  constexpr int64_t cols = S::kTileCols, ahead = kPrefetchTiles * S::kTileCols;
  prefetch_rows(w, j0, std::min(j0 + ahead, j1), d_in);
  int64_t j = j0;
  for (; j + cols <= j1; j += cols) {
    if (j + ahead < j1) prefetch_rows(w, j + ahead, std::min(j + ahead + cols, j1), d_in);
    column_tile<S, cols>(x, w, bias, out, rows, j, d_in, d_out);
  }
  for (; j < j1; ++j) column_tile<S, 1>(x, w, bias, out, rows, j, d_in, d_out);
}

// the output columns over the threads; each thread then runs after_columns(j0, j1) on its columns [j0, j1) while
// they are in its cache (lora_linear_rows.cpp adds the adapter's update there)
struct NothingAfter {
  void operator()(int64_t, int64_t) const {}
};

template <typename S, typename After = NothingAfter>
void run(const Tensor& x, const Tensor& weight, const Tensor* bias, Tensor& out, int64_t rows, int64_t d_in,
         int64_t d_out, const After& after_columns = After()) {
  using T = typename S::T;
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  const T* bp = bias ? bias->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  const int64_t tiles = (d_out + S::kTileCols - 1) / S::kTileCols;
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    const int64_t j0 = begin * S::kTileCols, j1 = std::min(end * S::kTileCols, d_out);
    columns<S>(xp, wp, bp, op, rows, j0, j1, d_in, d_out);
    after_columns(j0, j1);
  });
}

// which dtypes the kernel multiplies fast here: "float32" where at::vec has x86 vector code (AVX2 or AVX-512;
// elsewhere its loops are scalar, and linear_rows computes fp32 correctly but slowly), "bfloat16" where the CPU
// has AVX512-BF16
std::vector<std::string> linear_rows_dtypes() {
  std::vector<std::string> dtypes;
#if defined(CPU_CAPABILITY)
  dtypes.push_back("float32");
#endif
  if (kBf16Built) dtypes.push_back("bfloat16");
  return dtypes;
}

Tensor linear_rows(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && weight.scalar_type() == dtype &&
              (dtype == at::kFloat || (dtype == at::kBFloat16 && kBf16Built)) && x.is_contiguous() &&
              weight.is_contiguous() && weight.dim() == 2 && x.dim() >= 1, "linear_rows: x and weight must be ",
              "contiguous CPU tensors of one dtype, fp32", kBf16Built ? " or bf16" : " (bf16 needs AVX512-BF16)",
              ", weight a matrix; got ", dtype, " ", x.sizes(), " and ", weight.scalar_type(), " ", weight.sizes());
  const int64_t d_in = x.size(-1), d_out = weight.size(0), rows = d_in ? x.numel() / d_in : 0;
  TORCH_CHECK(weight.size(1) == d_in && d_in > 0, "linear_rows: x ", x.sizes(), " does not match weight ",
              weight.sizes());
  const Tensor* b = bias.has_value() && bias->defined() ? &*bias : nullptr;
  if (b) {
    TORCH_CHECK(b->device().is_cpu() && b->scalar_type() == dtype && b->is_contiguous() && b->numel() == d_out,
                "linear_rows: bias must be a contiguous CPU tensor of ", d_out, " values in x's dtype");
  }
  auto shape = x.sizes().vec();
  shape.back() = d_out;
  Tensor out = at::empty(shape, x.options());
  if (dtype == at::kFloat) {
    run<FloatStep>(x, weight, b, out, rows, d_in, d_out);
  } else {
#if defined(__AVX512BF16__)
    run<Bf16Step>(x, weight, b, out, rows, d_in, d_out);
#endif
  }
  return out;
}

}  // namespace lorakit_linear_rows

TORCH_LIBRARY_FRAGMENT(lorakit, m) {
  m.def("linear_rows(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_rows_dtypes() -> str[]", &lorakit_linear_rows::linear_rows_dtypes);
}

TORCH_LIBRARY_IMPL(lorakit, CPU, m) { m.impl("linear_rows", lorakit_linear_rows::linear_rows); }
