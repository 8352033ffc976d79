// Attention core on CPU: attention_fwd / attention_bwd over the packed qkv
// (contract: ckpt_ops/reference.py attention_fwd / attention_bwd).
//
// Choice: these ops wrap ATen's CPU flash-attention kernels
// (at::_scaled_dot_product_flash_attention_for_cpu and its _backward) instead
// of a kernel of our own. Why:
//  * speed: they are blocked-GEMM flash kernels (q/kv tiles through the CPU
//    BLAS, online softmax, OpenMP over batch x head x q-block), which a
//    hand-written per-row online-softmax loop does not approach on CPU, where
//    matmuls dominate (DESIGN.md section 1);
//  * parity with the baseline: eager F.scaled_dot_product_attention on CPU runs
//    exactly these kernels, so the "selective"/"keep_attn" levels (which call
//    attention_fwd/bwd once each, like eager) stay within noise of eager
//    instead of paying a slower attention core.
//    Measured (fwd + bwd, causal, fp32, 1 thread, median of interleaved
//    rounds on a shared 2-core host, so +-5% noise): this wrapper vs the
//    two ATen calls made directly (no packing): +0.2% (B4 S512 H12 hd64, no
//    mask), +1% (same, key mask), +3..5% (B2 S1024 H16 KV4, key mask; the
//    dqkv packing copy); vs eager SDPA + autograd (bool (B,1,S,S) mask):
//    0.70-0.95x; the materialising reference (what a straightforward
//    non-GEMM-blocked kernel approaches at best): 3.8-4.4x eager.
//  * GQA: they accept num_kv_heads < num_heads (query head h reads KV head
//    h / (H / KV)) and return dk/dv already summed over each group; verified
//    against the reference in tests/test_attention_kernels.py (MHA/GQA/MQA).
// The glue around them:
//  * q/k/v are strided views of qkv (no copy); the output o comes back laid
//    out (B, S, H, hd), i.e. it *is* (B, S, H * hd) contiguous (reshape is a
//    view; .contiguous() below only copies if a future torch changes that).
//  * key_mask becomes an additive (B, 1, 1, S) mask of qkv's dtype (0 / -inf);
//    causal is passed as is_causal (top-left aligned, as the reference's tril).
//  * rows with no key to attend (a fully padded sequence, or left padding
//    under causal) come out of ATen with o = 0 and lse = 0; the contract wants
//    lse = +inf there (probabilities rebuild to exactly 0), so those rows are
//    found from the mask (per batch they form the prefix [0, n_empty)) and
//    set: o = 0 exactly, lse = +inf. The backward is then NaN-free: every key
//    of such a row has score -inf, and exp(-inf - lse) = 0 for lse = +inf.
//  * lse is returned (B, H, S) contiguous in the accumulation dtype: fp32, fp64
//    for fp64 inputs (ATen's is (B, S, H)-strided), so fp64 keeps fp64 accuracy.
//  * dq/dk/dv are packed into one (B, S, (H + 2KV) * hd) tensor (one copy);
//    attention_bwd_ packs them into qkv itself (a backward that frees qkv).
// No S x S matrix is materialised beyond ATen's own per-tile buffers. Inputs
// are never written, but qkv by attention_bwd_, after it has been read.
//
// Attention-probability dropout (dropout_p > 0), a sliding window shorter than
// S (window > 0, causal) and logit soft-capping (softcap > 0): ATen's CPU flash
// kernels have none of them, so those calls run a kernel of ours
// (attention_own_fwd/_bwd below; dropout bits and math in
// ckpt_ops/attention_dropout.h, window and cap math in ckpt_ops/attention_window.h):
//  * window: a query tile [q0, q1) computes only the keys
//    [first_key(q0, w), q1): key blocks fully outside the window are never
//    touched, so the cost is O(S * (w + tile)) instead of O(S^2);
//  * softcap: s = c * tanh(scale q.k / c) on each valid score; the backward
//    recomputes tanh from the same dot product (dRaw = dS * (1 - t^2));
//  * tiles of BM query rows x all the keys they may see (causal: keys < the
//    tile's last row + 1), never a whole S x S per head; scores and P @ V are
//    at::mm on the tile in the accumulation dtype (fp32, fp64 for fp64);
//    exact softmax per row (max, sum, lse = m + log l, P = exp(s - lse)), then
//    Pd = keep ? P / (1 - p) : 0 from the Philox bits at (b, h, q, k);
//  * forward: at::parallel_for over (batch, head, query tile);
//  * backward: at::parallel_for over (batch, KV head): each task owns its KV
//    head's dK/dV (accumulated in the accumulation dtype over the H/KV query
//    heads of the group and the query tiles in a fixed order) and writes the dQ
//    of those heads, so no atomics and no cross-task reduction: results do not
//    depend on the thread count. P is rebuilt from the lse and the same bits.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu_backward.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ne.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "ckpt_ops/attention_dropout.h"
#include "ckpt_ops/attention_host.h"
#include "ckpt_ops/attention_window.h"

namespace ckpt_ops {
namespace {

struct Heads {
  at::Tensor q, k, v;  // (B, heads, S, hd) strided views of qkv
};

Heads split_heads(const at::Tensor& qkv, const attn::QkvShape& sh) {
  const at::Tensor x = qkv.view({sh.B, sh.S, sh.H + 2 * sh.KV, sh.hd});
  return {x.narrow(2, 0, sh.H).transpose(1, 2), x.narrow(2, sh.H, sh.KV).transpose(1, 2),
          x.narrow(2, sh.H + sh.KV, sh.KV).transpose(1, 2)};
}

// (B, S, H * hd) -> (B, H, S, hd) view
at::Tensor heads_view(const at::Tensor& t, const attn::QkvShape& sh, int64_t heads) {
  return t.view({sh.B, sh.S, heads, sh.hd}).transpose(1, 2);
}

// (B, heads, S, hd) -> (B, S, heads * hd), a view when laid out (B, S, heads, hd)
at::Tensor rows_view(const at::Tensor& t, const attn::QkvShape& sh) {
  return t.transpose(1, 2).reshape({sh.B, sh.S, -1});
}

c10::optional<at::Tensor> additive_mask(const c10::optional<at::Tensor>& key_mask, const attn::QkvShape& sh,
                                        const at::Tensor& qkv) {
  if (!key_mask.has_value()) return c10::nullopt;
  const at::Tensor masked = key_mask->eq(0).view({sh.B, 1, 1, sh.S});
  return at::zeros({sh.B, 1, 1, sh.S}, qkv.options()).masked_fill_(masked, -std::numeric_limits<double>::infinity());
}

// Number of leading query rows of each batch that have no key to attend: all
// S rows when the sequence is fully padded; under causal, the rows before the
// first valid key (left padding). Other rows always see at least one key.
std::vector<int64_t> empty_prefix(const c10::optional<at::Tensor>& key_mask, const attn::QkvShape& sh,
                                  bool causal) {
  std::vector<int64_t> n(sh.B, 0);
  if (!key_mask.has_value()) return n;
  const at::Tensor attend = at::ne(*key_mask, 0).contiguous();
  const bool* a = attend.const_data_ptr<bool>();
  for (int64_t b = 0; b < sh.B; ++b) {
    int64_t first = 0;
    while (first < sh.S && !a[b * sh.S + first]) ++first;
    n[b] = (causal || first == sh.S) ? first : 0;
  }
  return n;
}


// ---- kernel of ours: probability dropout, sliding window, soft-capping ------
constexpr int64_t kDropBlockM = 64;  // query rows per tile

// What the own kernel applies beyond plain softmax attention. dropout: p > 0
// (seed, threshold); window: 0 = none (else causal, i - j < window); softcap:
// 0 = none (else c * tanh(raw / c)).
struct OwnArgs {
  bool drop = false;
  int64_t seed = 0;
  uint32_t threshold = 0;
  double p = 0.0;
  int64_t window = 0;
  double softcap = 0.0;
};

void check_dropout(double dropout_p, const c10::optional<at::Tensor>& seed, const at::Tensor& qkv, OwnArgs& a) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "ckpt_ops: dropout_p must be in [0, 1); got ", dropout_p);
  if (dropout_p == 0.0) return;
  TORCH_CHECK(seed.has_value() && seed->numel() == 1 && seed->scalar_type() == at::kLong &&
                  seed->device() == qkv.device(),
              "ckpt_ops: seed must be a 1-element int64 tensor on ", qkv.device(), " when dropout_p > 0");
  a.drop = true;
  a.seed = seed->const_data_ptr<int64_t>()[0];
  a.threshold = philox::dropout_threshold(dropout_p);
  a.p = dropout_p;
}

// Validates window / softcap (and dropout); a window >= S is no window.
OwnArgs own_args(double dropout_p, const c10::optional<at::Tensor>& seed, int64_t window, double softcap,
                 bool causal, const attn::QkvShape& sh, const at::Tensor& qkv) {
  TORCH_CHECK(window >= 0, "ckpt_ops: window must be >= 0 (0 = no window); got ", window);
  TORCH_CHECK(window == 0 || causal, "ckpt_ops: window > 0 needs causal=True");
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), "ckpt_ops: softcap must be a finite float >= 0; got ",
              softcap);
  OwnArgs a;
  check_dropout(dropout_p, seed, qkv, a);
  a.window = window < sh.S ? window : 0;
  a.softcap = softcap;
  return a;
}

bool needs_own(const OwnArgs& a) { return a.drop || a.window > 0 || a.softcap > 0.0; }

// (B, S, heads, hd) view of a (B, S, heads * hd) tensor converted to acc (no copy when it already is).
at::Tensor acc4(const at::Tensor& t, const attn::QkvShape& sh, int64_t heads) {
  return t.to(acc_dtype(t.scalar_type())).contiguous().view({sh.B, sh.S, heads, sh.hd});
}

// Attend flags (B * S) as 0/1 bytes, or all ones.
std::vector<uint8_t> attend_flags(const c10::optional<at::Tensor>& key_mask, const attn::QkvShape& sh) {
  std::vector<uint8_t> f(sh.B * sh.S, 1);
  if (key_mask.has_value()) {
    const at::Tensor a = at::ne(*key_mask, 0).contiguous();
    const bool* p = a.const_data_ptr<bool>();
    for (int64_t i = 0; i < sh.B * sh.S; ++i) f[i] = p[i] ? 1 : 0;
  }
  return f;
}

// Key range [kbeg, kend) of the query tile [q0, q0 + m): causal stops at the
// tile's last row, a window starts at its first row's first key (the key
// blocks outside are never computed).
struct TileKeys {
  int64_t kbeg, kend;
};

TileKeys tile_keys(int64_t q0, int64_t m, bool causal, int64_t window, int64_t S) {
  return {attn_window::first_key(q0, window), causal ? q0 + m : S};
}

// Scores of one row in place (raw dot products -> scale, cap), -inf outside
// [jlo, nk) and on padding; `tt` receives the tanh when capped. The scale/cap
// loops are branch-free (`omp simd`), the masking a separate pass.
template <typename T>
inline void row_scores(T* row, T* tt, const uint8_t* ok, int64_t kbeg, int64_t jlo, int64_t nk, int64_t kend,
                       T scale, T cap) {
  T* r = row - kbeg;  // r[j]: key j
  if (cap > T(0)) {
    const T inv = scale / cap;
    if (tt != nullptr) {
      T* u = tt - kbeg;
#pragma omp simd
      for (int64_t j = jlo; j < nk; ++j) r[j] = attn_window::capped(r[j], inv, cap, &u[j]);
    } else {
#pragma omp simd
      for (int64_t j = jlo; j < nk; ++j) {
        T t;
        r[j] = attn_window::capped(r[j], inv, cap, &t);
      }
    }
  } else {
#pragma omp simd
    for (int64_t j = jlo; j < nk; ++j) r[j] *= scale;
  }
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = kbeg; j < jlo; ++j) r[j] = ninf;
  for (int64_t j = jlo; j < nk; ++j) r[j] = ok[j] ? r[j] : ninf;
  for (int64_t j = nk; j < kend; ++j) r[j] = ninf;
}

template <typename T>
void own_fwd_impl(const at::Tensor& qa, const std::vector<uint8_t>& attend, at::Tensor& o, at::Tensor& lse,
                  const attn::QkvShape& sh, bool causal, T scale, const OwnArgs& d) {
  const int64_t nblk = (sh.S + kDropBlockM - 1) / kDropBlockM, group = sh.H / sh.KV;
  const T z = d.drop ? philox::dropout_scale<T>(d.p) : T(1), cap = static_cast<T>(d.softcap);
  T* lse_p = lse.data_ptr<T>();
  const at::Tensor o4 = o.view({sh.B, sh.S, sh.H, sh.hd});
  at::parallel_for(0, sh.B * sh.H * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> buf(d.drop ? 4 * (sh.S / 4 + 2) : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t blk = t % nblk, bh = t / nblk, b = bh / sh.H, h = bh % sh.H, kvh = h / group;
      const int64_t q0 = blk * kDropBlockM, m = std::min(kDropBlockM, sh.S - q0);
      const TileKeys tk = tile_keys(q0, m, causal, d.window, sh.S);
      const int64_t nkt = tk.kend - tk.kbeg;
      const at::Tensor xb = qa.select(0, b);
      const at::Tensor k = xb.narrow(0, tk.kbeg, nkt).select(1, sh.H + kvh);
      const at::Tensor v = xb.narrow(0, tk.kbeg, nkt).select(1, sh.H + sh.KV + kvh);
      at::Tensor sc = at::mm(xb.narrow(0, q0, m).select(1, h), k.t());  // (m, nkt) contiguous
      T* s = sc.data_ptr<T>();
      const uint8_t* ok = attend.data() + b * sh.S;
      for (int64_t i = 0; i < m; ++i) {
        const int64_t q = q0 + i, nk = causal ? q + 1 : tk.kend, jlo = attn_window::first_key(q, d.window);
        T* row = s + i * nkt;
        row_scores<T>(row, nullptr, ok, tk.kbeg, jlo, nk, tk.kend, scale, cap);
        T mx = -std::numeric_limits<T>::infinity();
        for (int64_t j = jlo; j < nk; ++j) mx = std::max(mx, row[j - tk.kbeg]);
        T& l_out = lse_p[bh * sh.S + q];
        if (mx == -std::numeric_limits<T>::infinity()) {  // no key to attend: o = 0, lse = +inf
          for (int64_t j = 0; j < nkt; ++j) row[j] = T(0);
          l_out = std::numeric_limits<T>::infinity();
          continue;
        }
        T l = 0;
        for (int64_t j = jlo; j < nk; ++j) l += std::exp(row[j - tk.kbeg] - mx);
        const T lse_q = mx + std::log(l);
        l_out = lse_q;
        for (int64_t j = tk.kbeg; j < jlo; ++j) row[j - tk.kbeg] = T(0);
        if (d.drop) {
          const uint32_t* bits = attn_dropout::row_bits(d.seed, attn_dropout::row_index(b, h, q, sh.H, sh.S) + jlo,
                                                        nk - jlo, buf.data());
          for (int64_t j = jlo; j < nk; ++j) {
            row[j - tk.kbeg] = attn_dropout::dropped(std::exp(row[j - tk.kbeg] - lse_q), bits[j - jlo],
                                                     d.threshold, z);
          }
        } else {
          for (int64_t j = jlo; j < nk; ++j) row[j - tk.kbeg] = std::exp(row[j - tk.kbeg] - lse_q);
        }
        for (int64_t j = nk; j < tk.kend; ++j) row[j - tk.kbeg] = T(0);
      }
      o4.select(0, b).narrow(0, q0, m).select(1, h).copy_(at::mm(sc, v));
    }
  });
}

template <typename T>
void own_bwd_impl(const at::Tensor& qa, const at::Tensor& doa, const at::Tensor& oa, const at::Tensor& lse,
                  const std::vector<uint8_t>& attend, at::Tensor& dqkv, const attn::QkvShape& sh, bool causal,
                  T scale, const OwnArgs& d) {
  const int64_t nblk = (sh.S + kDropBlockM - 1) / kDropBlockM, group = sh.H / sh.KV;
  const T z = d.drop ? philox::dropout_scale<T>(d.p) : T(1), cap = static_cast<T>(d.softcap);
  const T* lse_p = lse.const_data_ptr<T>();
  const at::Tensor dx = dqkv.view({sh.B, sh.S, sh.H + 2 * sh.KV, sh.hd});
  at::parallel_for(0, sh.B * sh.KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> buf(d.drop ? 4 * (sh.S / 4 + 2) : 0);
    std::vector<T> tt(cap > T(0) ? static_cast<size_t>(sh.S) : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / sh.KV, kvh = t % sh.KV;
      const at::Tensor xb = qa.select(0, b);
      const at::Tensor kall = xb.select(1, sh.H + kvh), vall = xb.select(1, sh.H + sh.KV + kvh);
      at::Tensor dk = at::zeros({sh.S, sh.hd}, qa.options()), dv = at::zeros({sh.S, sh.hd}, qa.options());
      const uint8_t* ok = attend.data() + b * sh.S;
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = kvh * group + g, bh = b * sh.H + h;
        for (int64_t blk = 0; blk < nblk; ++blk) {
          const int64_t q0 = blk * kDropBlockM, m = std::min(kDropBlockM, sh.S - q0);
          const TileKeys tk = tile_keys(q0, m, causal, d.window, sh.S);
          const int64_t nkt = tk.kend - tk.kbeg;
          const at::Tensor q = xb.narrow(0, q0, m).select(1, h), k = kall.narrow(0, tk.kbeg, nkt),
                           v = vall.narrow(0, tk.kbeg, nkt);
          const at::Tensor dob = doa.select(0, b).narrow(0, q0, m).select(1, h);
          const at::Tensor ob = oa.select(0, b).narrow(0, q0, m).select(1, h);
          at::Tensor pm = at::mm(q, k.t());     // scores -> P (m, nkt)
          at::Tensor dpm = at::mm(dob, v.t());  // dPd -> dS
          const at::Tensor delta = dob.mul(ob).sum(1).contiguous();
          at::Tensor pd = d.drop ? at::empty_like(pm) : pm;   // Pd (dropped P, for dV)
          T *P = pm.data_ptr<T>(), *DP = dpm.data_ptr<T>(), *PD = pd.data_ptr<T>();
          const T* dl = delta.const_data_ptr<T>();
          for (int64_t i = 0; i < m; ++i) {
            const int64_t qi = q0 + i, nk = causal ? qi + 1 : tk.kend, jlo = attn_window::first_key(qi, d.window);
            const T lse_q = lse_p[bh * sh.S + qi];
            T *prow = P + i * nkt, *dprow = DP + i * nkt, *pdrow = PD + i * nkt;
            row_scores<T>(prow, tt.empty() ? nullptr : tt.data(), ok, tk.kbeg, jlo, nk, tk.kend, scale, cap);
            const uint32_t* bits = d.drop ? attn_dropout::row_bits(
                d.seed, attn_dropout::row_index(b, h, qi, sh.H, sh.S) + jlo, nk - jlo, buf.data()) : nullptr;
            for (int64_t j = tk.kbeg; j < jlo; ++j) pdrow[j - tk.kbeg] = prow[j - tk.kbeg] = dprow[j - tk.kbeg] = T(0);
            for (int64_t j = jlo; j < nk; ++j) {
              const int64_t c = j - tk.kbeg;
              const T pij = ok[j] ? std::exp(prow[c] - lse_q) : T(0);  // lse = +inf: 0
              T ds;
              if (d.drop) {
                pdrow[c] = attn_dropout::dropped(pij, bits[j - jlo], d.threshold, z);
                ds = attn_dropout::grad_scores(pij, dprow[c], dl[i], bits[j - jlo], d.threshold, z);
              } else {
                prow[c] = pij;
                ds = pij * (dprow[c] - dl[i]);
              }
              dprow[c] = (cap > T(0) && ok[j]) ? attn_window::cap_grad(ds, tt[c]) : ds;
            }
            for (int64_t j = nk; j < tk.kend; ++j) pdrow[j - tk.kbeg] = prow[j - tk.kbeg] = dprow[j - tk.kbeg] = T(0);
          }
          dv.narrow(0, tk.kbeg, nkt).addmm_(pd.t(), dob);
          dk.narrow(0, tk.kbeg, nkt).addmm_(dpm.t(), q);
          dx.select(0, b).narrow(0, q0, m).select(1, h).copy_(at::mm(dpm, k).mul_(scale));
        }
      }
      dx.select(0, b).select(1, sh.H + kvh).copy_(dk.mul_(scale));
      dx.select(0, b).select(1, sh.H + sh.KV + kvh).copy_(dv);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_own_fwd(const at::Tensor& qkv, const c10::optional<at::Tensor>& key_mask,
                                                     const attn::QkvShape& sh, bool causal, double scale,
                                                     const OwnArgs& d) {
  const auto acc = acc_dtype(qkv.scalar_type());
  at::Tensor o = at::empty({sh.B, sh.S, sh.H * sh.hd}, qkv.options());
  at::Tensor lse = at::empty({sh.B, sh.H, sh.S}, qkv.options().dtype(acc));
  const at::Tensor qa = acc4(qkv, sh, sh.H + 2 * sh.KV);
  const std::vector<uint8_t> attend = attend_flags(key_mask, sh);
  if (acc == at::kDouble) {
    own_fwd_impl<double>(qa, attend, o, lse, sh, causal, scale, d);
  } else {
    own_fwd_impl<float>(qa, attend, o, lse, sh, causal, static_cast<float>(scale), d);
  }
  return {o, lse};
}

at::Tensor attention_own_bwd(const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& o,
                             const at::Tensor& lse, const c10::optional<at::Tensor>& key_mask,
                             const attn::QkvShape& sh, bool causal, double scale, const OwnArgs& d) {
  const auto acc = acc_dtype(qkv.scalar_type());
  // The kernel writes acc values; one rounding to qkv's dtype at the end (a no-op copy for fp32/fp64).
  at::Tensor dqkv = at::empty({sh.B, sh.S, sh.width()}, qkv.options().dtype(acc));
  const at::Tensor qa = acc4(qkv, sh, sh.H + 2 * sh.KV), doa = acc4(dout, sh, sh.H), oa = acc4(o, sh, sh.H);
  const std::vector<uint8_t> attend = attend_flags(key_mask, sh);
  if (acc == at::kDouble) {
    own_bwd_impl<double>(qa, doa, oa, lse, attend, dqkv, sh, causal, scale, d);
  } else {
    own_bwd_impl<float>(qa, doa, oa, lse, attend, dqkv, sh, causal, static_cast<float>(scale), d);
  }
  return dqkv.to(qkv.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& qkv, const c10::optional<at::Tensor>& key_mask,
                                                 int64_t num_heads, int64_t num_kv_heads, bool causal,
                                                 double scale, double dropout_p,
                                                 const c10::optional<at::Tensor>& seed, int64_t window,
                                                 double softcap) {
  const attn::QkvShape sh = attn::check_qkv(qkv, num_heads, num_kv_heads);
  attn::check_key_mask(key_mask, sh, qkv);
  TORCH_CHECK(qkv.device().is_cpu(), "ckpt_ops: attention_fwd (C++) takes CPU tensors; got ", qkv.device());
  if (sh.B == 0 || sh.S == 0) {
    return {at::empty({sh.B, sh.S, sh.H * sh.hd}, qkv.options()),
            at::empty({sh.B, sh.H, sh.S}, qkv.options().dtype(acc_dtype(qkv.scalar_type())))};
  }
  const OwnArgs own = own_args(dropout_p, seed, window, softcap, causal, sh, qkv);
  if (needs_own(own)) return attention_own_fwd(qkv, key_mask, sh, causal, scale, own);
  const Heads x = split_heads(qkv, sh);
  auto [o4, lse4] = at::_scaled_dot_product_flash_attention_for_cpu(x.q, x.k, x.v, /*dropout_p=*/0.0, causal,
                                                                    additive_mask(key_mask, sh, qkv), scale);
  at::Tensor o = rows_view(o4, sh).contiguous();
  at::Tensor lse = lse4.to(acc_dtype(qkv.scalar_type())).contiguous();  // fp64 stays fp64
  const std::vector<int64_t> n_empty = empty_prefix(key_mask, sh, causal);
  for (int64_t b = 0; b < sh.B; ++b) {
    if (n_empty[b] == 0) continue;
    o.select(0, b).narrow(0, 0, n_empty[b]).zero_();
    lse.select(0, b).narrow(1, 0, n_empty[b]).fill_(std::numeric_limits<double>::infinity());
  }
  return {o, lse};
}

at::Tensor attention_bwd_impl(const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& o,
                              const at::Tensor& lse, const c10::optional<at::Tensor>& key_mask, int64_t num_heads,
                              int64_t num_kv_heads, bool causal, double scale, double dropout_p,
                              const c10::optional<at::Tensor>& seed, int64_t window, double softcap, bool into_qkv) {
  const attn::QkvShape sh = attn::check_qkv(qkv, num_heads, num_kv_heads);
  attn::check_key_mask(key_mask, sh, qkv);
  TORCH_CHECK(qkv.device().is_cpu(), "ckpt_ops: attention_bwd (C++) takes CPU tensors; got ", qkv.device());
  attn::check_rows_of(dout, sh, sh.H * sh.hd, qkv, "do");
  attn::check_rows_of(o, sh, sh.H * sh.hd, qkv, "o");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == sh.B && lse.size(1) == sh.H && lse.size(2) == sh.S,
              "ckpt_ops: lse must have shape (", sh.B, ", ", sh.H, ", ", sh.S, "); got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == acc_dtype(qkv.scalar_type()), "ckpt_ops: lse must be ",
              acc_dtype(qkv.scalar_type()), " (float64 for float64 qkv, else float32); got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == qkv.device() && lse.is_contiguous(), "ckpt_ops: lse must be contiguous on ",
              qkv.device());
  if (sh.B == 0 || sh.S == 0) return into_qkv ? qkv : at::empty_like(qkv);
  const OwnArgs own = own_args(dropout_p, seed, window, softcap, causal, sh, qkv);
  if (needs_own(own)) {  // its dK/dV accumulate in fp32 buffers of its own: one copy back into qkv
    at::Tensor dqkv = attention_own_bwd(dout, qkv, o, lse, key_mask, sh, causal, scale, own);
    return into_qkv ? qkv.copy_(dqkv) : dqkv;
  }
  const Heads x = split_heads(qkv, sh);
  const at::Tensor& lse_in = lse;  // already the accumulation dtype ATen wants (fp64 for fp64)
  auto [dq, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
      heads_view(dout, sh, sh.H), x.q, x.k, x.v, heads_view(o, sh, sh.H), lse_in, /*dropout_p=*/0.0, causal,
      additive_mask(key_mask, sh, qkv), scale);
  const std::vector<at::Tensor> parts{rows_view(dq, sh), rows_view(dk, sh), rows_view(dv, sh)};
  if (into_qkv) {  // q, k and v are read: the packing copy lands in qkv's own pages
    at::Tensor out = qkv;  // (attention_bwd_ took qkv mutable; the handle here is const)
    at::cat_out(out, parts, 2);
    return out;
  }
  return at::cat(parts, 2);
}

at::Tensor attention_bwd(const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& o, const at::Tensor& lse,
                         const c10::optional<at::Tensor>& key_mask, int64_t num_heads, int64_t num_kv_heads,
                         bool causal, double scale, double dropout_p, const c10::optional<at::Tensor>& seed,
                         int64_t window, double softcap) {
  return attention_bwd_impl(dout, qkv, o, lse, key_mask, num_heads, num_kv_heads, causal, scale, dropout_p, seed,
                            window, softcap, /*into_qkv=*/false);
}

// attention_bwd writing dqkv over qkv (a backward that may free qkv: no fresh qkv-sized buffer).
void attention_bwd_(const at::Tensor& dout, at::Tensor& qkv, const at::Tensor& o, const at::Tensor& lse,
                    const c10::optional<at::Tensor>& key_mask, int64_t num_heads, int64_t num_kv_heads, bool causal,
                    double scale, double dropout_p, const c10::optional<at::Tensor>& seed, int64_t window,
                    double softcap) {
  at::assert_no_overlap(qkv, dout);
  at::assert_no_overlap(qkv, o);
  at::assert_no_overlap(qkv, lse);
  attention_bwd_impl(dout, qkv, o, lse, key_mask, num_heads, num_kv_heads, causal, scale, dropout_p, seed, window,
                     softcap, /*into_qkv=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ops, CPU, m) {
  m.impl("attention_fwd", attention_fwd);
  m.impl("attention_bwd", attention_bwd);
  m.impl("attention_bwd_", attention_bwd_);
}

}  // namespace ckpt_ops
