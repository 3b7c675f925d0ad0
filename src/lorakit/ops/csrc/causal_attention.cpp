// Causal grouped-query attention for bf16 training on the CPU: forward and backward, built on oneDNN matmuls.
//
// Why: PyTorch's CPU flash attention runs its block matmuls through cpublas::brgemm, which without AMX (AVX512-BF16
// machines such as this project's EPYC) falls back to ~100 GFLOP/s, against 260-400 for oneDNN's at::mm on the same
// blocks (docs/performance.md, optimisation 13). Here every matmul is an at::mm on a block of up to 768 rows, and
// the softmax, its gradient and the causal mask are fused row loops on cache-resident blocks.
//
// Math (per head; S and dP are bf16 matmul outputs, as in transformers' eager attention; the softmax is fp32):
//   forward   P = softmax(scale * Q K^T, causal), O = P V, lse = logsumexp of each row (saved); with
//             `key_ranges` (B, L, 2) query i of row b sees keys [lo, hi) within [0, i] instead: right padding,
//             packed sequences, as SDPA's boolean mask has them
//   backward  P = exp(scale * Q K^T - lse); dV = P^T dO; dP = dO V^T; delta = rowsum(dO * O);
//             dS = P * (dP - delta) * scale; dQ = dS K; dK = dS^T Q   (dK, dV summed over the heads of a group)
// Work is split over (batch, kv group, heads, row block): all heads of a group in one matmul when a head fits
// one block (L <= 256) and that leaves every thread several items, else one head per item, in row blocks of 256
// (a block only multiplies the keys it can see). dK and dV are accumulated per thread in fp32.
//
// Inputs: q (B, H, L, D), k and v (B, KV, L, D), bf16, unit stride in D (other strides free), H a multiple of
// KV. Outputs are (B, H, L, D)-shaped views of (B, L, H, D) memory (the layout transformers reshapes into).
// Built on first use by lorakit/ops/cpu_extension.py; used through lorakit/ops/attention.py.
#include "cpu_capability.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>
#include <cmath>
#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

namespace lorakit_attention {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;
using at::BFloat16;

constexpr int64_t kRowBlock = 256;  // positions per chunk when a head is split

struct Chunk { int64_t b, kv, g0, ng, r0, m; };  // heads g0..g0+ng of group kv, positions r0..r0+m

// Strided (B, heads, L, D) view with unit stride in D.
struct View {
  const BFloat16* p; int64_t sb, sh, sl;
  explicit View(const Tensor& t) : p(t.data_ptr<BFloat16>()), sb(t.stride(0)), sh(t.stride(1)), sl(t.stride(2)) {}
  const BFloat16* row(int64_t b, int64_t h, int64_t i) const { return p + b * sb + h * sh + i * sl; }
};

// Rows of the chunk (head-major, then position) copied into a contiguous (ng*m, D) buffer.
void gather(const View& v, const Chunk& c, int64_t G, int64_t D, BFloat16* dst) {
  for (int64_t g = 0; g < c.ng; ++g)
    for (int64_t i = 0; i < c.m; ++i)
      std::memcpy(dst + (g * c.m + i) * D, v.row(c.b, c.kv * G + c.g0 + g, c.r0 + i), D * sizeof(BFloat16));
}
void scatter(const BFloat16* src, const Chunk& c, int64_t G, int64_t D, Tensor& out) {  // out (B, L, H, D) memory
  BFloat16* p = out.data_ptr<BFloat16>();
  const int64_t sb = out.stride(0), sl = out.stride(1), sh = out.stride(2);
  for (int64_t g = 0; g < c.ng; ++g)
    for (int64_t i = 0; i < c.m; ++i)
      std::memcpy(p + c.b * sb + (c.r0 + i) * sl + (c.kv * G + c.g0 + g) * sh, src + (g * c.m + i) * D, D * sizeof(BFloat16));
}

std::vector<Chunk> chunks(int64_t B, int64_t KV, int64_t G, int64_t L) {
  std::vector<Chunk> out;
  const int64_t threads = at::get_num_threads();
  if (L <= kRowBlock) {
    // whole heads; stack all G heads of a group in one matmul unless that leaves threads idle
    const int64_t ng = (B * KV >= 4 * threads) ? G : 1;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t kv = 0; kv < KV; ++kv)
        for (int64_t g0 = 0; g0 < G; g0 += ng) out.push_back({b, kv, g0, ng, 0, L});
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

// Rows of the largest chunk (the size of the per-thread buffers).
int64_t max_chunk_rows(const std::vector<Chunk>& work) {
  int64_t rows = 1;
  for (const Chunk& c : work) rows = std::max(rows, c.ng * c.m);
  return rows;
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v) {
  for (const Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->dim() == 4 && t->stride(3) == 1,
                "causal_attention: expects bf16 CPU tensors (batch, heads, length, head_dim) with unit stride in head_dim");
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

inline Tensor mat(BFloat16* p, int64_t rows, int64_t cols, const Tensor& like) {
  return at::from_blob(p, {rows, cols}, like.options());
}

std::tuple<Tensor, Tensor> causal_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                const std::optional<Tensor>& key_ranges, double scale_d) {
  check_inputs(q, k, v);
  const KeyRanges ranges(key_ranges, q);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), KV = k.size(1), G = H / KV;
  const float scale = static_cast<float>(scale_d);
  auto out = at::empty({B, L, H, D}, q.options());
  auto lse = at::empty({B, H, L}, q.options().dtype(at::kFloat));
  float* lse_p = lse.data_ptr<float>();
  const View qv(q), kvw(k), vv(v);
  const auto work = chunks(B, KV, G, L);
  const int64_t max_rows = max_chunk_rows(work);
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<BFloat16> qbuf(max_rows * D), kbuf(L * D), vbuf(L * D), pbuf(max_rows * L);
    std::vector<float> prow(L);
    for (int64_t w = begin; w < end; ++w) {
      const Chunk& c = work[w];
      const int64_t n = c.r0 + c.m, rows = c.ng * c.m;  // keys 0..n-1
      gather(qv, c, G, D, qbuf.data());
      for (int64_t j = 0; j < n; ++j) {
        std::memcpy(kbuf.data() + j * D, kvw.row(c.b, c.kv, j), D * sizeof(BFloat16));
        std::memcpy(vbuf.data() + j * D, vv.row(c.b, c.kv, j), D * sizeof(BFloat16));
      }
      Tensor Kt = mat(kbuf.data(), n, D, q), Vt = mat(vbuf.data(), n, D, q);
      Tensor S = at::mm(mat(qbuf.data(), rows, D, q), Kt.t());  // (rows, n) bf16
      const BFloat16* s = S.data_ptr<BFloat16>();
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t g = r / c.m, i = c.r0 + r % c.m;
        const auto [lo, hi] = ranges.of(c.b, i);
        const int64_t width = hi - lo;
        float* row = prow.data();
        std::fill(row, row + n, 0.f);
        float* pr = row + lo;  // the visible keys
        at::vec::convert(s + r * n + lo, pr, width);
        float mx = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, pr, width) * scale;
        const Vec vs(scale), vm(mx);
        Vec acc(0.f);
        int64_t j = 0;
        for (; j + Vec::size() <= width; j += Vec::size()) {
          Vec e = (Vec::loadu(pr + j) * vs - vm).exp_u20();
          e.store(pr + j);
          acc = acc + e;
        }
        float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
        for (; j < width; ++j) { pr[j] = std::exp(pr[j] * scale - mx); sum += pr[j]; }
        const float inv = 1.f / sum;
        at::vec::map([inv](Vec x) { return x * Vec(inv); }, pr, pr, width);
        at::vec::convert(row, pbuf.data() + r * n, n);
        lse_p[(c.b * H + c.kv * G + c.g0 + g) * L + i] = mx + std::log(sum);
      }
      Tensor O = at::mm(mat(pbuf.data(), rows, n, q), Vt);  // (rows, D)
      scatter(O.data_ptr<BFloat16>(), c, G, D, out);
    }
  });
  return {out.permute({0, 2, 1, 3}), lse};
}

std::tuple<Tensor, Tensor, Tensor> causal_attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                        const Tensor& v, const Tensor& out, const Tensor& lse,
                                                        const std::optional<Tensor>& key_ranges, double scale_d) {
  check_inputs(q, k, v);
  const KeyRanges ranges(key_ranges, q);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && dout.stride(3) == 1 && out.stride(3) == 1 &&
              dout.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16,
              "causal_attention_bwd: dout and out must be bf16 and shaped as q, with unit stride in head_dim");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == q.size(0) * q.size(1) * q.size(2),
              "causal_attention_bwd: lse must be the forward's (batch, heads, length) fp32 tensor");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), KV = k.size(1), G = H / KV;
  const float scale = static_cast<float>(scale_d);
  const int nthreads = at::get_num_threads();
  auto dq = at::empty({B, L, H, D}, q.options());
  auto dk_acc = at::zeros({nthreads, B, KV, L, D}, q.options().dtype(at::kFloat));
  auto dv_acc = at::zeros({nthreads, B, KV, L, D}, q.options().dtype(at::kFloat));
  const float* lse_p = lse.data_ptr<float>();
  const View qv(q), kvw(k), vv(v), dov(dout), ov(out);
  const auto work = chunks(B, KV, G, L);
  const int64_t max_rows = max_chunk_rows(work);
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    std::vector<BFloat16> qbuf(max_rows * D), dobuf(max_rows * D), obuf(max_rows * D), kbuf(L * D), vbuf(L * D),
        pbuf(max_rows * L), dsbuf(max_rows * L);
    std::vector<float> prow(L), dprow(L), tmp(L * D), f1(D), f2(D);
    for (int64_t w = begin; w < end; ++w) {
      const Chunk& c = work[w];
      const int64_t n = c.r0 + c.m, rows = c.ng * c.m;
      gather(qv, c, G, D, qbuf.data());
      gather(dov, c, G, D, dobuf.data());
      gather(ov, c, G, D, obuf.data());
      for (int64_t j = 0; j < n; ++j) {
        std::memcpy(kbuf.data() + j * D, kvw.row(c.b, c.kv, j), D * sizeof(BFloat16));
        std::memcpy(vbuf.data() + j * D, vv.row(c.b, c.kv, j), D * sizeof(BFloat16));
      }
      Tensor Qc = mat(qbuf.data(), rows, D, q), dOc = mat(dobuf.data(), rows, D, q);
      Tensor Kt = mat(kbuf.data(), n, D, q), Vt = mat(vbuf.data(), n, D, q);
      Tensor S = at::mm(Qc, Kt.t());
      Tensor dP = at::mm(dOc, Vt.t());
      const BFloat16* s = S.data_ptr<BFloat16>();
      const BFloat16* dp = dP.data_ptr<BFloat16>();
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t g = r / c.m, i = c.r0 + r % c.m;
        const auto [lo, hi] = ranges.of(c.b, i);
        const int64_t width = hi - lo;
        at::vec::convert(dobuf.data() + r * D, f1.data(), D);
        at::vec::convert(obuf.data() + r * D, f2.data(), D);
        const float dl = at::vec::map2_reduce_all<float>([](Vec a, Vec b) { return a * b; },
                                                         [](Vec a, Vec b) { return a + b; }, f1.data(), f2.data(), D);
        const float l = lse_p[(c.b * H + c.kv * G + c.g0 + g) * L + i];
        std::fill(prow.begin(), prow.begin() + n, 0.f);
        std::fill(dprow.begin(), dprow.begin() + n, 0.f);
        float* pr = prow.data() + lo;  // the visible keys
        float* dr = dprow.data() + lo;
        at::vec::convert(s + r * n + lo, pr, width);
        at::vec::convert(dp + r * n + lo, dr, width);
        const Vec vs(scale), vl(l), vd(dl);
        int64_t j = 0;
        for (; j + Vec::size() <= width; j += Vec::size()) {
          Vec p = (Vec::loadu(pr + j) * vs - vl).exp_u20();
          p.store(pr + j);
          ((Vec::loadu(dr + j) - vd) * p * vs).store(dr + j);
        }
        for (; j < width; ++j) { pr[j] = std::exp(pr[j] * scale - l); dr[j] = (dr[j] - dl) * pr[j] * scale; }
        at::vec::convert(prow.data(), pbuf.data() + r * n, n);
        at::vec::convert(dprow.data(), dsbuf.data() + r * n, n);
      }
      Tensor P = mat(pbuf.data(), rows, n, q), dS = mat(dsbuf.data(), rows, n, q);
      Tensor dQc = at::mm(dS, Kt);
      scatter(dQc.data_ptr<BFloat16>(), c, G, D, dq);
      Tensor dKp = at::mm(dS.t(), Qc);  // (n, D), summed over the chunk's heads
      Tensor dVp = at::mm(P.t(), dOc);
      float* dk_p = dk_acc.data_ptr<float>() + ((tid * B + c.b) * KV + c.kv) * L * D;
      float* dv_p = dv_acc.data_ptr<float>() + ((tid * B + c.b) * KV + c.kv) * L * D;
      at::vec::convert(dKp.data_ptr<BFloat16>(), tmp.data(), n * D);
      at::vec::map2([](Vec a, Vec b) { return a + b; }, dk_p, dk_p, tmp.data(), n * D);
      at::vec::convert(dVp.data_ptr<BFloat16>(), tmp.data(), n * D);
      at::vec::map2([](Vec a, Vec b) { return a + b; }, dv_p, dv_p, tmp.data(), n * D);
    }
  });
  return {dq.permute({0, 2, 1, 3}), dk_acc.sum(0).to(at::kBFloat16), dv_acc.sum(0).to(at::kBFloat16)};
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
