// Causal grouped-query attention for training on the CPU, bf16 and fp32: forward and backward, built on at::mm
// (oneDNN for bf16, MKL or oneDNN for fp32 as ops/matmul.py chooses).
//
// Why: PyTorch's CPU flash attention runs its block matmuls through cpublas::brgemm, which without AMX (AVX512-BF16
// machines such as this project's EPYC) falls back to ~100 GFLOP/s, against 260-400 for oneDNN's at::mm on the same
// blocks (docs/performance.md, optimisation 13). Here every matmul is an at::mm on a block of up to 768 rows, and
// the softmax, its gradient and the causal mask are fused row loops on cache-resident blocks.
//
// In fp32 (the exact training path) PyTorch's flash kernel runs its block matmuls on MKL too, but multiplies
// every key block a query block touches in full and repeats the softmax's bookkeeping per block: here a layer's
// forward and backward at 4 x 256 take about half its time (docs/performance.md, optimisation 51).
//
// Math (per head; S and dP are matmul outputs in the inputs' dtype: bf16 as in transformers' eager attention, or
// fp32; the softmax is fp32):
//   forward   P = softmax(scale * Q K^T, causal), O = P V, lse = logsumexp of each row (saved); with
//             `key_ranges` (B, L, 2) query i of row b sees keys [lo, hi) within [0, i] instead: right padding,
//             packed sequences, as SDPA's boolean mask has them
//   backward  P = exp(scale * Q K^T - lse); dV = P^T dO; dP = dO V^T; delta = rowsum(dO * O);
//             dS = P * (dP - delta) * scale; dQ = dS K; dK = dS^T Q   (dK, dV summed over the heads of a group)
// Work is split over (batch, kv group, heads, row block): all heads of a group in one matmul when a head fits
// one block (L <= 256) and that leaves every thread several items (stacked rows in blocks of 128 positions), else
// one head per item, in row blocks of 256 (a block only multiplies the keys it can see). The items are dealt into
// one list per thread of about equal cost (deal); dK and dV are accumulated per list in fp32. The matmuls read q,
// k, v, dO and O where they are (strided views; a group's stacked heads are copied) and write into per-thread
// buffers.
//
// Inputs: q (B, H, L, D), k and v (B, KV, L, D), all bf16 or all fp32, unit stride in D (other strides free), H
// a multiple of KV. Outputs are (B, H, L, D)-shaped views of (B, L, H, D) memory (the layout transformers reshapes into).
// Built on first use by lorakit/ops/cpu_extension.py; used through lorakit/ops/attention.py.
#include "cpu_capability.h"
#include "bf16_rows.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>
#include <cmath>
#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>
#include <optional>
#include <vector>

namespace lorakit_attention {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;
using at::BFloat16;

constexpr int64_t kRowBlock = 256;  // positions per chunk when a head is split

struct Chunk { int64_t b, kv, g0, ng, r0, m; };  // heads g0..g0+ng of group kv, positions r0..r0+m

// Strided (B, heads, L, D) view with unit stride in D; T is BFloat16 or float throughout.
template <typename T>
struct View {
  const T* p; int64_t sb, sh, sl;
  explicit View(const Tensor& t) : p(t.data_ptr<T>()), sb(t.stride(0)), sh(t.stride(1)), sl(t.stride(2)) {}
  const T* row(int64_t b, int64_t h, int64_t i) const { return p + b * sb + h * sh + i * sl; }
};

// The chunk's rows of a (B, heads, L, D) view as a (ng*m, D) matrix: a strided view of the tensor's own memory
// for one head (rows at the tensor's position stride), else (a group's heads stacked) copied into `buf`.
template <typename T>
Tensor rows_of(const View<T>& v, const Chunk& c, int64_t G, int64_t D, T* buf, const Tensor& like) {
  if (c.ng == 1)
    return at::from_blob(const_cast<T*>(v.row(c.b, c.kv * G + c.g0, c.r0)), {c.m, D}, {v.sl, 1}, like.options());
  for (int64_t g = 0; g < c.ng; ++g)
    for (int64_t i = 0; i < c.m; ++i)
      std::memcpy(buf + (g * c.m + i) * D, v.row(c.b, c.kv * G + c.g0 + g, c.r0 + i), D * sizeof(T));
  return at::from_blob(buf, {c.ng * c.m, D}, like.options());
}
// Keys (or values) 0..n-1 of group kv: a strided view, no copy.
template <typename T>
Tensor keys_of(const View<T>& v, const Chunk& c, int64_t n, int64_t D, const Tensor& like) {
  return at::from_blob(const_cast<T*>(v.row(c.b, c.kv, 0)), {n, D}, {v.sl, 1}, like.options());
}
template <typename T>
void scatter(const T* src, const Chunk& c, int64_t G, int64_t D, Tensor& out) {  // out (B, L, H, D) memory
  T* p = out.data_ptr<T>();
  const int64_t sb = out.stride(0), sl = out.stride(1), sh = out.stride(2);
  for (int64_t g = 0; g < c.ng; ++g)
    for (int64_t i = 0; i < c.m; ++i)
      std::memcpy(p + c.b * sb + (c.r0 + i) * sl + (c.kv * G + c.g0 + g) * sh, src + (g * c.m + i) * D, D * sizeof(T));
}

std::vector<Chunk> chunks(int64_t B, int64_t KV, int64_t G, int64_t L) {
  std::vector<Chunk> out;
  const int64_t threads = at::get_num_threads();
  if (L <= kRowBlock) {
    // all G heads of a group stacked in one matmul unless that leaves threads idle; stacked rows in two blocks of
    // up to kRowBlock / 2 positions, the first multiplying only the keys it sees (a quarter fewer score products
    // than one block; a single head's 128-row blocks would be too thin for the matmuls to pay)
    const int64_t ng = (B * KV >= 4 * threads) ? G : 1;
    const int64_t block = ng > 1 ? kRowBlock / 2 : kRowBlock;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t kv = 0; kv < KV; ++kv)
        for (int64_t g0 = 0; g0 < G; g0 += ng)
          for (int64_t r0 = L; r0 > 0; r0 -= block) {
            const int64_t start = std::max<int64_t>(0, r0 - block);
            out.push_back({b, kv, g0, ng, start, r0 - start});
          }
  } else {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t kv = 0; kv < KV; ++kv)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t r0 = L; r0 > 0; r0 -= kRowBlock) {  // longest (latest) blocks first
            const int64_t start = std::max<int64_t>(0, r0 - kRowBlock);
            out.push_back({b, kv, g, 1, start, r0 - start});
          }
  }
  return out;
}

// The chunks dealt into `count` lists of about equal cost (rows x keys), largest first, each to the list with the
// least so far: one list per thread. Which list a chunk lands in depends only on the shapes and `count`, so the
// per-list dK / dV sums, and the results, are the same on every run with the same thread count.
std::vector<std::vector<Chunk>> deal(std::vector<Chunk> work, int64_t count) {
  std::stable_sort(work.begin(), work.end(),
                   [](const Chunk& a, const Chunk& b) { return a.ng * a.m * (a.r0 + a.m) > b.ng * b.m * (b.r0 + b.m); });
  std::vector<std::vector<Chunk>> lists(std::max<int64_t>(1, std::min<int64_t>(count, work.size())));
  std::vector<int64_t> cost(lists.size(), 0);
  for (const Chunk& c : work) {
    const auto t = std::min_element(cost.begin(), cost.end()) - cost.begin();
    lists[t].push_back(c);
    cost[t] += c.ng * c.m * (c.r0 + c.m);
  }
  return lists;
}

// Rows of the largest chunk (the size of the per-thread buffers).
int64_t max_chunk_rows(const std::vector<Chunk>& work) {
  int64_t rows = 1;
  for (const Chunk& c : work) rows = std::max(rows, c.ng * c.m);
  return rows;
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat,
              "causal_attention: expects bf16 or fp32 tensors");
  for (const Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == q.scalar_type() && t->dim() == 4 && t->stride(3) == 1,
                "causal_attention: expects CPU tensors of one dtype (batch, heads, length, head_dim) with unit stride "
                "in head_dim");
  }
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
              "causal_attention: q, k and v must share batch, length and head_dim (k and v one shape)");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "causal_attention: query heads must be a multiple of kv heads");
}

// The keys query i of batch row b sees: [0, i] without `ranges`; with them, [lo, hi) = ranges[b][i] (checked to
// lie within [0, i] and be non-empty): right padding (a padded query sees the real keys before it), packed
// sequences (a query sees its own sequence only), as SDPA's boolean mask has them.
struct KeyRanges {
  Tensor owner;
  const int64_t* p = nullptr;
  int64_t L = 0;
  KeyRanges(const std::optional<Tensor>& ranges, const Tensor& q) : L(q.size(2)) {
    if (!ranges.has_value()) return;
    owner = ranges->to(at::kLong).contiguous();
    TORCH_CHECK(owner.dim() == 3 && owner.size(0) == q.size(0) && owner.size(1) == L && owner.size(2) == 2,
                "causal_attention: key_ranges must be (batch, length, 2)");
    p = owner.data_ptr<int64_t>();
    for (int64_t x = 0; x < owner.numel() / 2; ++x) {
      const int64_t i = x % L;
      TORCH_CHECK(p[2 * x] >= 0 && p[2 * x] < p[2 * x + 1] && p[2 * x + 1] <= i + 1,
                  "causal_attention: each query's key range must be non-empty and within 0..its own position");
    }
  }
  std::pair<int64_t, int64_t> of(int64_t b, int64_t i) const {
    if (p == nullptr) return {0, i + 1};
    const int64_t* r = p + 2 * (b * L + i);
    return {r[0], r[1]};
  }
};

template <typename T>
inline Tensor mat(T* p, int64_t rows, int64_t cols, const Tensor& like) {
  return at::from_blob(p, {rows, cols}, like.options());
}

// The row loops read the matmul outputs and write the next matmuls' inputs directly, 32 values (two float vectors)
// at a time, in the inputs' dtype (load2 / store2 convert bf16; fp32 is read as it is). Their arithmetic is
// element for element the same fp32 math, in the same order of additions, as converting whole rows to fp32 first:
// exp on full 16-float vectors from the row's first visible key, std::exp on the last width % 16 (the sums and the
// results equal bit for bit). The vector exp is ATen's exp_u20 in bf16 and its 1-ulp exp in fp32 (exp_for).
using lorakit_bf16_rows::BVec;
using lorakit_bf16_rows::kB;
using lorakit_bf16_rows::kF;
using lorakit_bf16_rows::load;
using lorakit_bf16_rows::to_bf16;
using lorakit_bf16_rows::to_float;
using lorakit_bf16_rows::load2;
using lorakit_bf16_rows::store2;
using lorakit_bf16_rows::exp_for;

template <typename T>
inline void zero(T* p, int64_t count) { if (count > 0) std::memset(p, 0, count * sizeof(T)); }

// Forward of one row: out[lo..hi) = bf16(softmax(scale * s[lo..hi))), zeros elsewhere in out[0..n); `e` (fp32,
// >= hi - lo values) holds the exponentials. Returns the row's log-sum-exp.
template <typename T>
float softmax_row(const T* s, T* out, float* e, int64_t lo, int64_t hi, int64_t n, float scale) {
  const int64_t width = hi - lo;
  const T* x = s + lo;
  Vec vmax(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kB <= width; j += kB) {
    auto [a, b] = load2(x + j);
    vmax = at::vec::maximum(vmax, at::vec::maximum(a, b));
  }
  float mx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  for (; j < width; ++j) mx = std::max(mx, static_cast<float>(x[j]));
  mx *= scale;
  const Vec vs(scale), vm(mx);
  Vec acc(0.f);
  j = 0;
  for (; j + kB <= width; j += kB) {
    auto [a, b] = load2(x + j);
    Vec ea = exp_for(a * vs - vm, x), eb = exp_for(b * vs - vm, x);
    ea.store(e + j);
    eb.store(e + j + kF);
    acc = acc + ea;
    acc = acc + eb;
  }
  if (j + kF <= width) {
    Vec a = std::get<0>(load2(x + j, kF));
    Vec ea = exp_for(a * vs - vm, x);
    ea.store(e + j);
    acc = acc + ea;
    j += kF;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; j < width; ++j) { e[j] = std::exp(static_cast<float>(x[j]) * scale - mx); sum += e[j]; }
  const float inv = 1.f / sum;
  const Vec vinv(inv);
  zero(out, lo);
  T* o = out + lo;
  j = 0;
  for (; j + kB <= width; j += kB) store2(Vec::loadu(e + j) * vinv, Vec::loadu(e + j + kF) * vinv, o + j);
  for (; j < width; ++j) o[j] = static_cast<T>(e[j] * inv);
  zero(out + hi, n - hi);
  return mx + std::log(sum);
}

// Backward of one row: p = exp(scale * s - lse) and ds = (dp - delta) * p * scale over [lo, hi), written in T
// with zeros elsewhere in [0, n).
template <typename T>
void softmax_grad_row(const T* s, const T* dp, T* p_out, T* ds_out, int64_t lo, int64_t hi, int64_t n, float scale,
                      float lse, float delta) {
  const int64_t width = hi - lo;
  const T *x = s + lo, *g = dp + lo;
  T *po = p_out + lo, *dso = ds_out + lo;
  const Vec vs(scale), vl(lse), vd(delta);
  zero(p_out, lo);
  zero(ds_out, lo);
  int64_t j = 0;
  for (; j + kB <= width; j += kB) {
    auto [a, b] = load2(x + j);
    auto [ga, gb] = load2(g + j);
    Vec pa = exp_for(a * vs - vl, x), pb = exp_for(b * vs - vl, x);
    store2(pa, pb, po + j);
    store2((ga - vd) * pa * vs, (gb - vd) * pb * vs, dso + j);
  }
  if (j < width) {  // the last < 32 values: a 16-float vector if there are that many, std::exp for the rest
    const int64_t m = width - j;
    float pf[kB], df[kB];
    auto [a, b] = load2(x + j, m);
    auto [ga, gb] = load2(g + j, m);
    a.store(pf); b.store(pf + kF); ga.store(df); gb.store(df + kF);
    int64_t t = 0;
    if (m >= kF) {
      Vec pa = exp_for(a * vs - vl, x);
      pa.store(pf);
      ((ga - vd) * pa * vs).store(df);
      t = kF;
    }
    for (; t < m; ++t) { pf[t] = std::exp(pf[t] * scale - lse); df[t] = (df[t] - delta) * pf[t] * scale; }
    for (t = 0; t < m; ++t) { po[t + j] = static_cast<T>(pf[t]); dso[t + j] = static_cast<T>(df[t]); }
  }
  zero(p_out + hi, n - hi);
  zero(ds_out + hi, n - hi);
}

// acc[0..count) += float(x[0..count)), one pass
template <typename T>
void add_to_float(const T* x, float* acc, int64_t count) {
  int64_t j = 0;
  for (; j + kB <= count; j += kB) {
    auto [a, b] = load2(x + j);
    (Vec::loadu(acc + j) + a).store(acc + j);
    (Vec::loadu(acc + j + kF) + b).store(acc + j + kF);
  }
  for (; j < count; ++j) acc[j] += static_cast<float>(x[j]);
}

template <typename T>
std::tuple<Tensor, Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v, const KeyRanges& ranges,
                                   double scale_d) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), KV = k.size(1), G = H / KV;
  const float scale = static_cast<float>(scale_d);
  auto out = at::empty({B, L, H, D}, q.options());
  auto lse = at::empty({B, H, L}, q.options().dtype(at::kFloat));
  float* lse_p = lse.data_ptr<float>();
  const View<T> qv(q), kvw(k), vv(v);
  const auto work = chunks(B, KV, G, L);
  const int64_t max_rows = max_chunk_rows(work);
  const auto lists = deal(work, at::get_num_threads());
  at::parallel_for(0, static_cast<int64_t>(lists.size()), 1, [&](int64_t begin, int64_t end) {
    // per-thread buffers: stacked query rows, scores, probabilities, the output block, fp32 exponentials
    Tensor buf = at::empty({max_rows * (D + 2 * L + D)}, q.options());
    T *qbuf = buf.data_ptr<T>(), *sbuf = qbuf + max_rows * D, *pbuf = sbuf + max_rows * L, *obuf = pbuf + max_rows * L;
    std::vector<float> erow(L);
    for (int64_t t = begin; t < end; ++t) for (const Chunk& c : lists[t]) {
      const int64_t n = c.r0 + c.m, rows = c.ng * c.m;  // keys 0..n-1
      Tensor Qc = rows_of(qv, c, G, D, qbuf, q);
      Tensor Kt = keys_of(kvw, c, n, D, q), Vt = keys_of(vv, c, n, D, q);
      Tensor S = mat(sbuf, rows, n, q);
      at::mm_out(S, Qc, Kt.t());  // (rows, n) bf16
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t g = r / c.m, i = c.r0 + r % c.m;
        const auto [lo, hi] = ranges.of(c.b, i);
        lse_p[(c.b * H + c.kv * G + c.g0 + g) * L + i] =
            softmax_row(sbuf + r * n, pbuf + r * n, erow.data(), lo, hi, n, scale);
      }
      Tensor O = mat(obuf, rows, D, q);
      at::mm_out(O, mat(pbuf, rows, n, q), Vt);  // (rows, D)
      scatter(obuf, c, G, D, out);
    }
  });
  return {out.permute({0, 2, 1, 3}), lse};
}

std::tuple<Tensor, Tensor> causal_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                const std::optional<Tensor>& key_ranges, double scale) {
  check_inputs(q, k, v);
  const KeyRanges ranges(key_ranges, q);
  return q.scalar_type() == at::kFloat ? forward<float>(q, k, v, ranges, scale)
                                       : forward<BFloat16>(q, k, v, ranges, scale);
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                            const Tensor& out, const Tensor& lse, const KeyRanges& ranges,
                                            double scale_d) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), KV = k.size(1), G = H / KV;
  const float scale = static_cast<float>(scale_d);
  const auto work = chunks(B, KV, G, L);
  const int64_t max_rows = max_chunk_rows(work);
  const auto lists = deal(work, at::get_num_threads());
  const int64_t nlists = static_cast<int64_t>(lists.size());
  auto dq = at::empty({B, L, H, D}, q.options());
  auto dk_acc = at::zeros({nlists, B, KV, L, D}, q.options().dtype(at::kFloat));  // dK, dV summed per list
  auto dv_acc = at::zeros({nlists, B, KV, L, D}, q.options().dtype(at::kFloat));
  const float* lse_p = lse.data_ptr<float>();
  const View<T> qv(q), kvw(k), vv(v), dov(dout), ov(out);
  at::parallel_for(0, nlists, 1, [&](int64_t begin, int64_t end) {
    // per-thread buffers: stacked q / dO / O rows, S, dP, P, dS, the dQ block, the dK and dV blocks
    Tensor buf = at::empty({max_rows * (4 * D + 4 * L) + 2 * L * D}, q.options());
    T *qbuf = buf.data_ptr<T>(), *dobuf = qbuf + max_rows * D, *obuf = dobuf + max_rows * D,
             *dqbuf = obuf + max_rows * D, *sbuf = dqbuf + max_rows * D, *dpbuf = sbuf + max_rows * L,
             *pbuf = dpbuf + max_rows * L, *dsbuf = pbuf + max_rows * L, *dkbuf = dsbuf + max_rows * L,
             *dvbuf = dkbuf + L * D;
    std::vector<float> f1(D), f2(D);
    for (int64_t t = begin; t < end; ++t) for (const Chunk& c : lists[t]) {
      const int64_t n = c.r0 + c.m, rows = c.ng * c.m;
      Tensor Qc = rows_of(qv, c, G, D, qbuf, q), dOc = rows_of(dov, c, G, D, dobuf, q);
      Tensor Oc = rows_of(ov, c, G, D, obuf, q);
      Tensor Kt = keys_of(kvw, c, n, D, q), Vt = keys_of(vv, c, n, D, q);
      Tensor S = mat(sbuf, rows, n, q), dP = mat(dpbuf, rows, n, q);
      at::mm_out(S, Qc, Kt.t());
      at::mm_out(dP, dOc, Vt.t());
      const T *dop = dOc.data_ptr<T>(), *op = Oc.data_ptr<T>();
      const int64_t dos = dOc.stride(0), os = Oc.stride(0);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t g = r / c.m, i = c.r0 + r % c.m;
        const auto [lo, hi] = ranges.of(c.b, i);
        at::vec::convert(dop + r * dos, f1.data(), D);
        at::vec::convert(op + r * os, f2.data(), D);
        const float dl = at::vec::map2_reduce_all<float>([](Vec a, Vec b) { return a * b; },
                                                         [](Vec a, Vec b) { return a + b; }, f1.data(), f2.data(), D);
        const float l = lse_p[(c.b * H + c.kv * G + c.g0 + g) * L + i];
        softmax_grad_row(sbuf + r * n, dpbuf + r * n, pbuf + r * n, dsbuf + r * n, lo, hi, n, scale, l, dl);
      }
      Tensor P = mat(pbuf, rows, n, q), dS = mat(dsbuf, rows, n, q);
      Tensor dQc = mat(dqbuf, rows, D, q), dKp = mat(dkbuf, n, D, q), dVp = mat(dvbuf, n, D, q);
      at::mm_out(dQc, dS, Kt);
      scatter(dqbuf, c, G, D, dq);
      at::mm_out(dKp, dS.t(), Qc);  // (n, D), summed over the chunk's heads
      at::mm_out(dVp, P.t(), dOc);
      float* dk_p = dk_acc.data_ptr<float>() + ((t * B + c.b) * KV + c.kv) * L * D;
      float* dv_p = dv_acc.data_ptr<float>() + ((t * B + c.b) * KV + c.kv) * L * D;
      add_to_float(dkbuf, dk_p, n * D);
      add_to_float(dvbuf, dv_p, n * D);
    }
  });
  return {dq.permute({0, 2, 1, 3}), dk_acc.sum(0).to(q.scalar_type()), dv_acc.sum(0).to(q.scalar_type())};
}

std::tuple<Tensor, Tensor, Tensor> causal_attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                        const Tensor& v, const Tensor& out, const Tensor& lse,
                                                        const std::optional<Tensor>& key_ranges, double scale) {
  check_inputs(q, k, v);
  const KeyRanges ranges(key_ranges, q);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && dout.stride(3) == 1 && out.stride(3) == 1 &&
              dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "causal_attention_bwd: dout and out must be of q's dtype and shape, with unit stride in head_dim");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == q.size(0) * q.size(1) * q.size(2),
              "causal_attention_bwd: lse must be the forward's (batch, heads, length) fp32 tensor");
  return q.scalar_type() == at::kFloat ? backward<float>(dout, q, k, v, out, lse, ranges, scale)
                                       : backward<BFloat16>(dout, q, k, v, out, lse, ranges, scale);
}

}  // namespace lorakit_attention

TORCH_LIBRARY(lorakit, m) {
  m.def("causal_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_ranges, float scale) -> (Tensor, Tensor)");
  m.def("causal_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_ranges, "
        "float scale) -> (Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(lorakit, CPU, m) {
  m.impl("causal_attention_fwd", lorakit_attention::causal_attention_fwd);
  m.impl("causal_attention_bwd", lorakit_attention::causal_attention_bwd);
}
