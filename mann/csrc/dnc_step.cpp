// DNC memory machinery fused: one time step from the interface vector to the read vectors, forward and backward,
// on CPU (read mann/csrc/ntm_heads.cpp first: same reasons, same style).
//
// On a CPU the DNC step after its controller is ~60 small ATen ops forward and ~90 backward at ~3-7 us each
// whatever their size. Here they are plain loops over one batch row at a time: one call forward, one backward.
// Every option of mann.dnc.DNC runs here: any read / write head counts, masking, de-allocation, link sharpness,
// clip on or off (so every variant: dnc, dnc-md, dnc-ms, dnc-mds).
//
// Same maths as mann.dnc.DNC.step, steps 2-6 (DNC Methods; Csordas & Schmidhuber 2019; tests/test_fast.py compares
// them in float64): xi clipped; keys and write vectors as they are, strengths and sharpness oneplus, gates and erase sigmoid,
// masks sigmoid floored at mask_min, read modes softmax; retention psi = prod_r (1 - f_r w^r_{t-1,r}); usage
// u = (u_{t-1} + w - u_{t-1} w) psi
// with w = 1 - prod_h (1 - w^w_{t-1,h}); allocation per write head from the usage the heads before it leave
// (stable ascending sort, exclusive cumulative product); content C(M, k, beta) = softmax(beta D) with D the
// (masked) cosine similarity (norms floored at sqrt(smallest normal), eps 1e-6 outside their product); w^w =
// g^w lerp(c^w, a, g^a); M_t = M' prod_h (1 - w_h e_h^T) + sum_h w_h v_h^T with M' = M_{t-1} (* psi with
// de-allocation); L_t = (1 - w_i - w_j) L_{t-1} + w_i p_{t-1,j} with a zero diagonal; p_t = (1 - sum w) p_{t-1}
// + w; f = L_t w^r_{t-1}, b = L_t^T w^r_{t-1} (sharpened: softmax(s log(d + 1e-6))); c^r on M_t; w^r = pi . (b,
// c^r, f); r = w^r M_t.
//
// The link matrix is the big tensor ([B, Hw, N, N]); its update and both directional weightings are one pass
// over it forward, and its whole backward (directional and update) one pass over L_{t-1} and the link gradient:
// L_t is recomputed row by row from L_{t-1} rather than read back, so the backward needs only L_{t-1}.
//
// Step times and memory against the reference: docs/performance.md (bench/step.py).
//
// Layouts (contiguous, batch-first): raw [B, P] in DNC.interface_sizes' order; M [B, N, W]; w^r [B, R, N];
// w^w, p [B, Hw, N]; u [B, N]; L [B, Hw, N, N]; r [B, R W]; aux [B, A]: per row the numbers the backward reads
// back (offsets in Dims).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace {

#include "scalar.h"

constexpr double kContentEps = 1e-6;
constexpr double kLinkEps = 1e-6;  // sharpen_link_distribution's eps

// The passes over the link matrix (and the content look-ups) are compiled three times, for AVX-512, AVX2 and plain
// x86-64, and the CPU picks one when the library loads (GCC's function multi-versioning): the cache folder stays
// valid on every x86-64 node, unlike -march=native. These loops are long (N^2 per row) and vectorise, so the
// wider registers pay here, unlike in the NTM's kernel. Other compilers and CPUs: one plain version.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define DNC_VECTORISED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DNC_VECTORISED
#endif
#define DNC_INLINE inline __attribute__((always_inline))

// kMask: sigmoid floored at mask_min, mask_min + (1 - mask_min) sigmoid(x) (mann.dnc.floored_mask)
enum Kind : int8_t { kIdentity = 0, kSigmoid = 1, kOneplus = 2, kMask = 3 };

struct Dims {
  int64_t B, N, W, R, Hw, K, P;  // K = 2 Hw + 1 read modes
  bool masking, dealloc, sharp;
  double clip;  // <= 0: no clip
  double mask_min;  // floor of the masks (kMask)
  // where each part of xi starts in a row of raw (-1: absent)
  int64_t rk, rs, wk, ws, er, wv, fg, ag, wg, rm, rmask, wmask, sf, sb;
  std::vector<int8_t> kind;  // the squashing of each number of xi (read modes: identity, then a softmax)
  // where each saved quantity starts in a row of aux
  int64_t psi, written, uh, phi, alloc, cw, simw, normw, cr, simr, normr, fraw, braw, fsh, bsh, logf, logb, A;
};

Dims make_dims(int64_t B, int64_t N, int64_t W, int64_t R, int64_t Hw, bool masking, bool dealloc, bool sharp,
               double clip, double mask_min) {
  Dims d{};
  d.B = B, d.N = N, d.W = W, d.R = R, d.Hw = Hw, d.K = 2 * Hw + 1;
  d.masking = masking, d.dealloc = dealloc, d.sharp = sharp, d.clip = clip, d.mask_min = mask_min;
  int64_t o = 0;
  auto part = [&](int64_t size, int8_t kind) {
    d.kind.insert(d.kind.end(), size, kind);
    o += size;
    return o - size;
  };
  d.rk = part(R * W, kIdentity), d.rs = part(R, kOneplus), d.wk = part(Hw * W, kIdentity);
  d.ws = part(Hw, kOneplus), d.er = part(Hw * W, kSigmoid), d.wv = part(Hw * W, kIdentity);
  d.fg = part(R, kSigmoid), d.ag = part(Hw, kSigmoid), d.wg = part(Hw, kSigmoid), d.rm = part(R * d.K, kIdentity);
  d.rmask = masking ? part(R * W, kMask) : -1;
  d.wmask = masking ? part(Hw * W, kMask) : -1;
  d.sf = sharp ? part(R, kOneplus) : -1;
  d.sb = sharp ? part(R, kOneplus) : -1;
  d.P = o;
  int64_t a = 0;
  auto slot = [&](int64_t rows) {
    a += rows * N;
    return a - rows * N;
  };
  d.psi = slot(1), d.written = slot(1), d.uh = slot(Hw), d.phi = slot(Hw), d.alloc = slot(Hw);
  d.cw = slot(Hw), d.simw = slot(Hw), d.normw = slot(masking ? Hw : 1);  // masked norms: one per head
  d.cr = slot(R), d.simr = slot(R), d.normr = slot(masking ? R : 1);
  d.fraw = slot(R * Hw), d.braw = slot(R * Hw);
  d.fsh = sharp ? slot(R * Hw) : d.fraw;  // the weightings the read modes mix: sharpened, or as they are
  d.bsh = sharp ? slot(R * Hw) : d.braw;
  d.logf = sharp ? slot(R * Hw) : -1;
  d.logb = sharp ? slot(R * Hw) : -1;
  d.A = a;
  return d;
}


template <typename T>
void softmax(T* z, int64_t n) {
  T m = *std::max_element(z, z + n);
  T sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    z[i] = std::exp(z[i] - m);
    sum += z[i];
  }
  for (int64_t i = 0; i < n; ++i) z[i] /= sum;
}

// Reductions keep kLanes running sums, one per lane of a 512-bit register of floats: a single sum is a chain of
// dependent adds (latency-bound), and without -ffast-math the compiler may not reorder a sum
// into vector lanes itself. The order is fixed, so results do not depend on the CPU's version.
constexpr int kLanes = 16;

template <typename T>
DNC_INLINE T reduce(T* acc) {  // pairwise: log2(kLanes) vector adds rather than kLanes dependent ones
  for (int half = kLanes / 2; half > 0; half /= 2) {
    for (int l = 0; l < half; ++l) acc[l] += acc[l + half];
  }
  return acc[0];
}

// sum_j a_j b_j
template <typename T>
DNC_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
  }
  for (; j < n; ++j) acc[0] += a[j] * b[j];
  return reduce(acc);
}

template <typename T>
DNC_INLINE T sum(const T* a, int64_t n) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l];
  }
  for (; j < n; ++j) acc[0] += a[j];
  return reduce(acc);
}

// y += a x
template <typename T>
DNC_INLINE void axpy(T* __restrict y, T a, const T* __restrict x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

// g <- y * (g - sum(g * y)): softmax's backward, in place.
template <typename T>
void softmax_backward(const T* y, T* g, int64_t n) {
  const T s = dot(g, y, n);
  for (int64_t i = 0; i < n; ++i) g[i] = y[i] * (g[i] - s);
}

// sqrt(max(squares, smallest normal)): mann.addressing's norm from a sum of squares.
template <typename T>
T floored_sqrt(T squares) {
  return std::sqrt(std::max(squares, std::numeric_limits<T>::min()));
}

// xi clipped and squashed, [P]; the read modes softmaxed per read head.
template <typename T>
void squash(const Dims& d, const T* raw, T* q) {
  for (int64_t k = 0; k < d.P; ++k) {
    const T x = clipped(raw[k], d.clip);
    switch (d.kind[k]) {
      case kSigmoid: q[k] = sigmoid(x); break;
      case kOneplus: q[k] = T(1) + softplus(x); break;
      case kMask: q[k] = T(d.mask_min) + T(1 - d.mask_min) * sigmoid(x); break;
      default: q[k] = x;
    }
  }
  for (int64_t r = 0; r < d.R; ++r) softmax(q + d.rm + r * d.K, d.K);
}

// One write head on slot i: M_t[i, j] = m_j + w (v_j - m_j e_j), m = M_{t-1}[i] s (s = psi_i with de-allocation,
// else 1: exact).
template <typename T>
DNC_INLINE void one_head_write(int64_t W, T w, T s, const T* __restrict Mi, const T* __restrict v,
                               const T* __restrict e, T* __restrict out) {
  for (int64_t j = 0; j < W; ++j) {
    const T m = Mi[j] * s;
    out[j] = m + w * (v[j] - m * e[j]);
  }
}

// Its reverse: g = dM_t[i] in, dM'[i] out (in place); adds to g_v and g_e; returns dw.
template <typename T>
DNC_INLINE T one_head_write_backward(int64_t W, T w, T s, const T* __restrict Mi, const T* __restrict v,
                                     const T* __restrict e, T* __restrict g, T* __restrict g_v, T* __restrict g_e) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= W; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const int64_t k = j + l;
      const T m = Mi[k] * s, gk = g[k];
      acc[l] += gk * (v[k] - m * e[k]);
      g_v[k] += w * gk;
      g_e[k] -= w * gk * m;
      g[k] = gk * (T(1) - w * e[k]);
    }
  }
  for (; j < W; ++j) {
    const T m = Mi[j] * s, gj = g[j];
    acc[0] += gj * (v[j] - m * e[j]);
    g_v[j] += w * gj;
    g_e[j] -= w * gj * m;
    g[j] = gj * (T(1) - w * e[j]);
  }
  return reduce(acc);
}

// ----------------------------------------------------------------------------------------------------------------
// Content addressing of H heads on one row's memory M [N, W]: c = softmax(beta D(k, M_i)), masked if mask.

template <typename T>
struct ContentHead {  // one head's key as the similarity uses it: k, or k m^2 with m2 = m^2; and its norm
  std::vector<T> kk, m2;
  T norm;
  ContentHead(const T* key, const T* mask, int64_t W) : kk(key, key + W) {
    if (mask == nullptr) {
      norm = floored_sqrt(dot(key, key, W));
      return;
    }
    m2.resize(W);
    for (int64_t j = 0; j < W; ++j) {
      m2[j] = mask[j] * mask[j];
      kk[j] = key[j] * m2[j];
    }
    norm = floored_sqrt(dot(key, kk.data(), W));
  }
};

// acc += m x^2, elementwise
template <typename T>
DNC_INLINE void add_squares(T* __restrict acc, T m, const T* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += m * x[i] * x[i];
}

// keys, masks [H, W] (masks nullptr: none); beta [H] -> c, sim [H, N]; norm: |M_i| [N], or masked [H, N].
// MT: [W, N] scratch for M^T, so that every sum over the word runs along the slots: vectorised, with no
// horizontal sums (one per slot and head otherwise, the larger part of this function's time at W = 32).
template <typename T>
DNC_VECTORISED void content_forward(const T* M, int64_t N, int64_t W, int64_t H, const T* keys, const T* beta,
                                    const T* masks, T* c, T* sim, T* norm, T* MT) {
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t j = 0; j < W; ++j) MT[j * N + i] = M[i * W + j];
  }
  if (masks == nullptr) {
    std::fill(norm, norm + N, T(0));
    for (int64_t j = 0; j < W; ++j) add_squares(norm, T(1), MT + j * N, N);
    for (int64_t i = 0; i < N; ++i) norm[i] = floored_sqrt(norm[i]);
  }
  for (int64_t h = 0; h < H; ++h) {
    ContentHead<T> k(keys + h * W, masks ? masks + h * W : nullptr, W);
    T* nh = masks ? norm + h * N : norm;
    if (masks) {
      std::fill(nh, nh + N, T(0));
      for (int64_t j = 0; j < W; ++j) add_squares(nh, k.m2[j], MT + j * N, N);
      for (int64_t i = 0; i < N; ++i) nh[i] = floored_sqrt(nh[i]);
    }
    T* sh = sim + h * N;
    std::fill(sh, sh + N, T(0));
    for (int64_t j = 0; j < W; ++j) axpy(sh, k.kk[j], MT + j * N, N);  // kk . M_i
    T* ch = c + h * N;
    for (int64_t i = 0; i < N; ++i) {
      sh[i] /= k.norm * nh[i] + T(kContentEps);
      ch[i] = beta[h] * sh[i];
    }
    softmax(ch, N);
  }
}

// Reverse of content_forward: gc [H, N] (overwritten) -> adds to gM [N, W]; writes g_keys [H, W], g_beta [H]
// (strides between heads: key_stride, 1) and g_masks [H, W] when masked.
template <typename T>
DNC_VECTORISED void content_backward(const T* M, int64_t N, int64_t W, int64_t H, const T* keys, const T* beta, const T* masks,
                      const T* c, const T* sim, const T* norm, T* gc, T* gM, T* g_keys, T* g_beta, T* g_masks) {
  std::vector<T> g_norm(N, T(0)), g_kk(W), g_m2(W);
  for (int64_t h = 0; h < H; ++h) {
    ContentHead<T> k(keys + h * W, masks ? masks + h * W : nullptr, W);
    const T* nh = masks ? norm + h * N : norm;
    T* gz = gc + h * N;  // becomes d(dot) per slot
    softmax_backward(c + h * N, gz, N);
    T gb = 0, g_kn = 0;  // g_kn: of |k|, negated
    if (masks) std::fill(g_norm.begin(), g_norm.end(), T(0));
    for (int64_t i = 0; i < N; ++i) {
      const T s = sim[h * N + i];
      gb += gz[i] * s;
      const T g_dot = gz[i] * beta[h] / (k.norm * nh[i] + T(kContentEps));  // D = dot / denom
      const T g_denom = g_dot * s;  // negated
      g_kn += g_denom * nh[i];
      g_norm[i] += g_denom * k.norm;  // negated
      gz[i] = g_dot;
    }
    g_beta[h] = gb;
    g_kn /= k.norm;
    std::fill(g_kk.begin(), g_kk.end(), T(0));
    for (int64_t i = 0; i < N; ++i) {  // dot = kk . M_i, both ways
      axpy(g_kk.data(), gz[i], M + i * W, W);
      axpy(gM + i * W, gz[i], k.kk.data(), W);
    }
    T* gk = g_keys + h * W;
    const T* key = keys + h * W;
    if (!masks) {
      for (int64_t j = 0; j < W; ++j) gk[j] = g_kk[j] - key[j] * g_kn;
      continue;
    }
    // |k m| = sqrt(sum k^2 m^2), |M_i m| = sqrt(sum M_i^2 m^2): d/d(m^2) and d/dk, d/dM from them
    for (int64_t i = 0; i < N; ++i) g_norm[i] /= nh[i];
    for (int64_t j = 0; j < W; ++j) {
      gk[j] = g_kk[j] * k.m2[j] - g_kn * k.kk[j];
      g_m2[j] = g_kk[j] * key[j] - T(0.5) * g_kn * key[j] * key[j];
    }
    for (int64_t i = 0; i < N; ++i) {
      const T* Mi = M + i * W;
      T* gMi = gM + i * W;
      const T gn = g_norm[i];
      for (int64_t j = 0; j < W; ++j) {
        g_m2[j] -= T(0.5) * gn * Mi[j] * Mi[j];
        gMi[j] -= Mi[j] * gn * k.m2[j];
      }
    }
    const T* mask = masks + h * W;
    for (int64_t j = 0; j < W; ++j) g_masks[h * W + j] = 2 * mask[j] * g_m2[j];
  }
  if (!masks) {  // |M_i|: d|x|/dx = x / |x|, summed over heads
    for (int64_t i = 0; i < N; ++i) axpy(gM + i * W, -g_norm[i] / norm[i], M + i * W, W);
  }
}

// ----------------------------------------------------------------------------------------------------------------
// Temporal links of one row and write head: L [N, N], w = w^w_t, p = p_{t-1} [N]; w^r_{t-1} [R, N]; f, b with
// stride fs between read heads.

// L_t row i into out (not Lp): (1 - w_i - w_j) L_{t-1}[i, j] + w_i p_j, L_t[i, i] = 0.
template <typename T>
DNC_INLINE void link_row(const T* __restrict Lp, T* __restrict out, const T* __restrict w, const T* __restrict p,
                         int64_t i, int64_t N) {
  const T ci = T(1) - w[i], wi = w[i];
  for (int64_t j = 0; j < N; ++j) out[j] = (ci - w[j]) * Lp[j] + wi * p[j];
  out[i] = 0;
}

// L_t from L_{t-1} for `rows` link matrices (Lo may be Lp: then each row goes through `row`, [N]).
template <typename T>
DNC_VECTORISED void link_rows(int64_t N, int64_t rows, const T* Lp, T* Lo, const T* w, const T* p, T* row) {
  for (int64_t k = 0; k < rows; ++k) {
    for (int64_t i = 0; i < N; ++i) {
      const int64_t at = (k * N + i) * N;
      if (Lo == Lp) {
        link_row(Lp + at, row, w + k * N, p + k * N, i, N);
        std::copy(row, row + N, Lo + at);
      } else {
        link_row(Lp + at, Lo + at, w + k * N, p + k * N, i, N);
      }
    }
  }
}

// One row i of L_t and one read head: b += w^r_i L_t[i, :]; returns f_i = L_t[i, :] . w^r (one pass, in L1).
template <typename T>
DNC_INLINE T directional_row(const T* __restrict row, const T* __restrict wr, T wr_i, T* __restrict b, int64_t N) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= N; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      acc[l] += row[j + l] * wr[j + l];
      b[j + l] += wr_i * row[j + l];
    }
  }
  for (; j < N; ++j) {
    acc[0] += row[j] * wr[j];
    b[j] += wr_i * row[j];
  }
  return reduce(acc);
}

// L_t from L_{t-1} (Lo may be Lp), and f = L_t w^r, b = L_t^T w^r: one pass. scratch: [N].
template <typename T>
DNC_VECTORISED void link_forward(int64_t N, int64_t R, const T* Lp, T* Lo, const T* w, const T* p, const T* wr, T* f,
                                 T* b, int64_t fs, T* scratch) {
  for (int64_t r = 0; r < R; ++r) std::fill(b + r * fs, b + r * fs + N, T(0));
  for (int64_t i = 0; i < N; ++i) {
    T* row = Lo == Lp ? scratch : Lo + i * N;
    link_row(Lp + i * N, row, w, p, i, N);
    if (row == scratch) std::copy(row, row + N, Lo + i * N);
    for (int64_t r = 0; r < R; ++r) f[r * fs + i] = directional_row(row, wr + r * N, wr[r * N + i], b + r * fs, N);
  }
}

// directional_row's reverse for row i and one read head, from gf_i and gb [N]: G (dL_t[i, :]) += gf_i w^r + w^r_i gb;
// dw^r += gf_i L_t[i, :] (into g_wr); returns the term of dw^r_i, gb . L_t[i, :]. One pass, in L1.
template <typename T>
DNC_INLINE T directional_row_backward(T* __restrict G, T gf_i, const T* __restrict wr, T wr_i, const T* __restrict gb,
                                      const T* __restrict row, T* __restrict g_wr, int64_t N) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= N; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const int64_t k = j + l;
      G[k] += gf_i * wr[k] + wr_i * gb[k];
      acc[l] += gb[k] * row[k];
      g_wr[k] += gf_i * row[k];
    }
  }
  for (; j < N; ++j) {
    G[j] += gf_i * wr[j] + wr_i * gb[j];
    acc[0] += gb[j] * row[j];
    g_wr[j] += gf_i * row[j];
  }
  return reduce(acc);
}

// Row i of the link update's backward from G = dL_t[i, :]: dL_{t-1}[i, :] into gLi, the column terms of dw into
// col, dp into g_p; returns the row's term of dw_i.
template <typename T>
DNC_INLINE T link_row_backward(const T* __restrict G, const T* __restrict Lpi, T* __restrict gLi,
                               const T* __restrict w, const T* __restrict p, T ci, T wi, T* __restrict col,
                               T* __restrict g_p, int64_t N) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= N; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const int64_t k = j + l;
      acc[l] += G[k] * (p[k] - Lpi[k]);
      col[k] += G[k] * Lpi[k];
      g_p[k] += G[k] * wi;
      gLi[k] = G[k] * (ci - w[k]);
    }
  }
  for (; j < N; ++j) {
    acc[0] += G[j] * (p[j] - Lpi[j]);
    col[j] += G[j] * Lpi[j];
    g_p[j] += G[j] * wi;
    gLi[j] = G[j] * (ci - w[j]);
  }
  return reduce(acc);
}

// Reverse of link_forward, one pass: gL (of L_t) becomes that of L_{t-1} in place; adds to g_w [N], g_p [N],
// g_wr [R, N] from gf, gb (stride fs). row, G, col: [N] scratch.
//   dL_t += gf^T w^r + w^r^T gb (the directional weightings), diagonal cleared (L_t's is a constant 0);
//   dw^r += gf L_t + gb L_t^T;  dw_i = sum_j G[i, j] (p_j - L_{t-1}[i, j]) - sum_j G[j, i] L_{t-1}[j, i];
//   dp_j = sum_i G[i, j] w_i;  dL_{t-1} = G (1 - w_i - w_j).
template <typename T>
DNC_VECTORISED void link_backward(int64_t N, int64_t R, const T* Lp, T* gL, const T* w, const T* p, const T* wr,
                                  const T* gf, const T* gb, int64_t fs, T* g_w, T* g_p, T* g_wr, T* row, T* G,
                                  T* col) {
  std::fill(col, col + N, T(0));
  for (int64_t i = 0; i < N; ++i) {
    const T* Lpi = Lp + i * N;
    T* gLi = gL + i * N;
    link_row(Lpi, row, w, p, i, N);
    std::copy(gLi, gLi + N, G);
    for (int64_t r = 0; r < R; ++r) {
      g_wr[r * N + i] += directional_row_backward(G, gf[r * fs + i], wr + r * N, wr[r * N + i], gb + r * fs, row,
                                                  g_wr + r * N, N);
    }
    G[i] = 0;
    const T ci = T(1) - w[i], wi = w[i];
    g_w[i] += link_row_backward(G, Lpi, gLi, w, p, ci, wi, col, g_p, N);
  }
  for (int64_t j = 0; j < N; ++j) g_w[j] -= col[j];
}

// ----------------------------------------------------------------------------------------------------------------
// Allocation: a[phi[j]] = (1 - u[phi[j]]) prod_{i<j} u[phi[i]], phi sorting u ascending, ties in index order.

template <typename T>
void allocation_forward(const T* u, int64_t N, T* a, T* phi_out, std::vector<int64_t>& phi) {
  std::iota(phi.begin(), phi.end(), int64_t(0));
  std::stable_sort(phi.begin(), phi.end(), [u](int64_t x, int64_t y) { return u[x] < u[y]; });
  T P = 1;
  for (int64_t j = 0; j < N; ++j) {
    const T uj = u[phi[j]];
    a[phi[j]] = (T(1) - uj) * P;
    P *= uj;
    phi_out[j] = T(phi[j]);
  }
}

// Gradient of u [N] from that of a (ga, unsorted), added to gu. With su sorted and P_j = prod_{i<j} su_i:
// da/dsu_j = -ga_j P_j + sum_{k>j} ga_k (1 - su_k) prod_{i<k, i != j} su_i = P_j (S_j - ga_j), where
// S_j = sum_{k>j} gP_k prod_{j<i<k} su_i = gP_{j+1} + su_{j+1} S_{j+1}, gP_k = ga_k (1 - su_k): no division.
template <typename T>
void allocation_backward(const T* u, const T* phi_saved, const T* ga, int64_t N, T* gu, T* P, T* su) {
  T prod = 1;
  for (int64_t j = 0; j < N; ++j) {
    su[j] = u[int64_t(phi_saved[j])];
    P[j] = prod;
    prod *= su[j];
  }
  T S = 0;
  for (int64_t j = N - 1; j >= 0; --j) {
    const int64_t at = int64_t(phi_saved[j]);
    gu[at] += P[j] * (S - ga[at]);
    S = ga[at] * (T(1) - su[j]) + su[j] * S;  // S_{j-1}
  }
}

// ----------------------------------------------------------------------------------------------------------------
// One row, forward

template <typename T>
struct Row {  // one batch row's inputs and outputs
  const T *raw, *M_prev, *wr_prev, *ww_prev, *p_prev, *u_prev, *L_prev;
  T *L_out, *M, *wr, *ww, *p, *u, *r, *aux;
};

template <typename T>
void forward_row(const Dims& d, const Row<T>& x) {
  const int64_t N = d.N, W = d.W, R = d.R, Hw = d.Hw, K = d.K;
  std::vector<T> q(d.P);
  squash(d, x.raw, q.data());
  T* aux = x.aux;
  // 3. retention psi, usage u, allocation a per write head
  T* psi = aux + d.psi;
  T* written = aux + d.written;
  for (int64_t i = 0; i < N; ++i) {
    T keep = 1;
    for (int64_t r = 0; r < R; ++r) keep *= T(1) - q[d.fg + r] * x.wr_prev[r * N + i];
    psi[i] = keep;
    T unwritten = 1;
    for (int64_t h = 0; h < Hw; ++h) unwritten *= T(1) - x.ww_prev[h * N + i];
    written[i] = Hw == 1 ? x.ww_prev[i] : T(1) - unwritten;
    x.u[i] = (x.u_prev[i] + written[i] * (T(1) - x.u_prev[i])) * psi[i];
  }
  std::vector<int64_t> phi(N);
  std::copy(x.u, x.u + N, aux + d.uh);
  for (int64_t k = 0; k < Hw; ++k) {
    const T* uk = aux + d.uh + k * N;
    T* ak = aux + d.alloc + k * N;
    allocation_forward(uk, N, ak, aux + d.phi + k * N, phi);
    if (k < Hw - 1) {  // the next head allocates after this one's write
      const T share = q[d.wg + k] * q[d.ag + k];
      T* next = aux + d.uh + (k + 1) * N;
      for (int64_t i = 0; i < N; ++i) next[i] = uk[i] + (T(1) - uk[i]) * share * ak[i];
    }
  }
  // 4. write weighting from content (on M_{t-1}) and allocation; (de-allocation,) erase and add
  const T* wmask = d.masking ? q.data() + d.wmask : nullptr;
  std::vector<T> MT(N * W);
  content_forward(x.M_prev, N, W, Hw, q.data() + d.wk, q.data() + d.ws, wmask, aux + d.cw, aux + d.simw,
                  aux + d.normw, MT.data());
  for (int64_t h = 0; h < Hw; ++h) {
    const T ga = q[d.ag + h], gw = q[d.wg + h];
    for (int64_t i = 0; i < N; ++i) {
      x.ww[h * N + i] = gw * lerp(aux[d.cw + h * N + i], aux[d.alloc + h * N + i], ga);
    }
  }
  const T* erase = q.data() + d.er;
  const T* add = q.data() + d.wv;
  for (int64_t i = 0; i < N; ++i) {
    const T* Mi = x.M_prev + i * W;
    T* out = x.M + i * W;
    const T s = d.dealloc ? psi[i] : T(1);  // M' = M_{t-1} psi
    if (Hw == 1) {
      one_head_write(W, x.ww[i], s, Mi, add, erase, out);
      continue;
    }
    for (int64_t j = 0; j < W; ++j) {
      T keep = 1, added = 0;
      for (int64_t h = 0; h < Hw; ++h) {
        const T w = x.ww[h * N + i];
        keep *= T(1) - w * erase[h * W + j];
        added += w * add[h * W + j];
      }
      out[j] = Mi[j] * s * keep + added;
    }
  }
  // 5. links from p_{t-1}, precedence, directional weightings from w^r_{t-1} (sharpened)
  const int64_t fs = Hw * N;
  std::vector<T> scratch(N);
  for (int64_t h = 0; h < Hw; ++h) {
    const T* w = x.ww + h * N;
    const T* pp = x.p_prev + h * N;
    link_forward(N, R, x.L_prev + h * N * N, x.L_out + h * N * N, w, pp, x.wr_prev, aux + d.fraw + h * N,
                 aux + d.braw + h * N, fs, scratch.data());
    const T keep = T(1) - sum(w, N);
    for (int64_t i = 0; i < N; ++i) x.p[h * N + i] = w[i] + keep * pp[i];
  }
  if (d.sharp) {
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t h = 0; h < Hw; ++h) {
        const int64_t at = (r * Hw + h) * N;
        for (int from : {0, 1}) {
          const T* raw_d = aux + (from ? d.braw : d.fraw) + at;
          T* lg = aux + (from ? d.logb : d.logf) + at;
          T* y = aux + (from ? d.bsh : d.fsh) + at;
          const T s = q[(from ? d.sb : d.sf) + r];
          for (int64_t i = 0; i < N; ++i) {
            lg[i] = std::log(raw_d[i] + T(kLinkEps));
            y[i] = s * lg[i];
          }
          softmax(y, N);
        }
      }
    }
  }
  // 6. read weighting from b, c^r (on M_t), f by the read modes; read
  const T* rmask = d.masking ? q.data() + d.rmask : nullptr;
  content_forward(x.M, N, W, R, q.data() + d.rk, q.data() + d.rs, rmask, aux + d.cr, aux + d.simr, aux + d.normr,
                  MT.data());
  for (int64_t r = 0; r < R; ++r) {
    const T* pi = q.data() + d.rm + r * K;
    T* wr = x.wr + r * N;
    const T pc = pi[Hw];
    const T* cr = aux + d.cr + r * N;
    for (int64_t i = 0; i < N; ++i) wr[i] = pc * cr[i];
    for (int64_t h = 0; h < Hw; ++h) {
      axpy(wr, pi[h], aux + d.bsh + (r * Hw + h) * N, N);
      axpy(wr, pi[Hw + 1 + h], aux + d.fsh + (r * Hw + h) * N, N);
    }
    T* rr = x.r + r * W;
    std::fill(rr, rr + W, T(0));
    for (int64_t i = 0; i < N; ++i) axpy(rr, wr[i], x.M + i * W, W);
  }
}

// ----------------------------------------------------------------------------------------------------------------
// One row, backward

template <typename T>
struct RowGrad {  // one row's incoming gradients (of M_t, w^r_t, w^w_t, p_t, u_t, r_t; gL of L_t, in place) and
                  // outgoing ones (of M_{t-1}, w^r_{t-1}, w^w_{t-1}, p_{t-1}, u_{t-1}, raw xi)
  const T *gM, *gwr, *gww, *gp, *gu, *gr;
  T* gL;
  T *gM_prev, *gwr_prev, *gww_prev, *gp_prev, *gu_prev, *graw;
};

template <typename T>
void backward_row(const Dims& d, const Row<T>& x, const RowGrad<T>& g) {
  const int64_t N = d.N, W = d.W, R = d.R, Hw = d.Hw, K = d.K;
  const T* aux = x.aux;
  std::vector<T> q(d.P), gq(d.P, T(0));
  squash(d, x.raw, q.data());
  // 6. read r = w^r M_t; w^r = pi . (b, c^r, f)
  T* gM = g.gM_prev;  // d M_t here, turned into d M_{t-1} below
  std::copy(g.gM, g.gM + N * W, gM);
  std::vector<T> g_wr(g.gwr, g.gwr + R * N), g_cr(R * N), g_fsh(R * Hw * N), g_bsh(R * Hw * N);
  for (int64_t i = 0; i < N; ++i) {
    const T* Mi = x.M + i * W;
    for (int64_t r = 0; r < R; ++r) {
      g_wr[r * N + i] += dot(g.gr + r * W, Mi, W);
      axpy(gM + i * W, x.wr[r * N + i], g.gr + r * W, W);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const T* pi = q.data() + d.rm + r * K;
    const T* gw = g_wr.data() + r * N;
    T* gpi = gq.data() + d.rm + r * K;
    for (int64_t h = 0; h < Hw; ++h) {
      const int64_t at = (r * Hw + h) * N;
      gpi[h] = dot(aux + d.bsh + at, gw, N);
      gpi[Hw + 1 + h] = dot(aux + d.fsh + at, gw, N);
      for (int64_t i = 0; i < N; ++i) {
        g_bsh[at + i] = pi[h] * gw[i];
        g_fsh[at + i] = pi[Hw + 1 + h] * gw[i];
      }
    }
    gpi[Hw] = dot(aux + d.cr + r * N, gw, N);
    for (int64_t i = 0; i < N; ++i) g_cr[r * N + i] = pi[Hw] * gw[i];
    softmax_backward(pi, gpi, K);
  }
  const T* rmask = d.masking ? q.data() + d.rmask : nullptr;
  content_backward(x.M, N, W, R, q.data() + d.rk, q.data() + d.rs, rmask, aux + d.cr, aux + d.simr, aux + d.normr,
                   g_cr.data(), gM, gq.data() + d.rk, gq.data() + d.rs, d.masking ? gq.data() + d.rmask : nullptr);
  if (d.sharp) {  // y = softmax(s log(d + eps)): dd = dz s / (d + eps), ds = sum dz log(d + eps)
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t h = 0; h < Hw; ++h) {
        const int64_t at = (r * Hw + h) * N;
        for (int from : {0, 1}) {
          T* gy = (from ? g_bsh : g_fsh).data() + at;
          softmax_backward(aux + (from ? d.bsh : d.fsh) + at, gy, N);
          const T* lg = aux + (from ? d.logb : d.logf) + at;
          const T* raw_d = aux + (from ? d.braw : d.fraw) + at;
          const int64_t qs = (from ? d.sb : d.sf) + r;
          gq[qs] += dot(gy, lg, N);
          for (int64_t i = 0; i < N; ++i) gy[i] = gy[i] * q[qs] / (raw_d[i] + T(kLinkEps));
        }
      }
    }
  }
  // 5. directional weightings and link (one pass per write head); precedence p_t = (1 - sum w) p_{t-1} + w
  std::fill(g.gwr_prev, g.gwr_prev + R * N, T(0));
  std::fill(g.gp_prev, g.gp_prev + Hw * N, T(0));
  std::vector<T> g_ww(Hw * N), scratch(3 * N);
  const int64_t fs = Hw * N;
  for (int64_t h = 0; h < Hw; ++h) {
    const T* w = x.ww + h * N;
    const T* pp = x.p_prev + h * N;
    const T* gp = g.gp + h * N;
    T* gw = g_ww.data() + h * N;
    const T back = dot(gp, pp, N);
    for (int64_t i = 0; i < N; ++i) gw[i] = g.gww[h * N + i] + gp[i] - back;
    link_backward(N, R, x.L_prev + h * N * N, g.gL + h * N * N, w, pp, x.wr_prev, g_fsh.data() + h * N,
                  g_bsh.data() + h * N, fs, gw, g.gp_prev + h * N, g.gwr_prev, scratch.data(), scratch.data() + N,
                  scratch.data() + 2 * N);
    axpy(g.gp_prev + h * N, T(1) - sum(w, N), gp, N);
  }
  // 4. write M_t = M' prod_h (1 - w_h e_h^T) + sum_h w_h v_h^T, M' = M_{t-1} (psi)
  const T* erase = q.data() + d.er;
  const T* add = q.data() + d.wv;
  T* g_erase = gq.data() + d.er;
  T* g_add = gq.data() + d.wv;
  const T* psi = aux + d.psi;
  std::vector<T> g_psi(N, T(0)), factor(Hw);
  for (int64_t i = 0; i < N; ++i) {
    const T* Mi = x.M_prev + i * W;
    T* gMi = gM + i * W;
    const T s = d.dealloc ? psi[i] : T(1);
    if (Hw == 1) {
      g_ww[i] += one_head_write_backward(W, x.ww[i], s, Mi, add, erase, gMi, g_add, g_erase);
    } else {
      for (int64_t j = 0; j < W; ++j) {
        const T gj = gMi[j];
        const T m = Mi[j] * s;
        T keep = 1;
        for (int64_t h = 0; h < Hw; ++h) {
          factor[h] = T(1) - x.ww[h * N + i] * erase[h * W + j];
          keep *= factor[h];
        }
        for (int64_t h = 0; h < Hw; ++h) {
          const T w = x.ww[h * N + i];
          T others = 1;  // no division: a factor can be 0
          for (int64_t v = 0; v < Hw; ++v) {
            if (v != h) others *= factor[v];
          }
          const T g_factor = gj * m * others;
          g_add[h * W + j] += w * gj;
          g_erase[h * W + j] -= w * g_factor;
          g_ww[h * N + i] += gj * add[h * W + j] - g_factor * erase[h * W + j];
        }
        gMi[j] = gj * keep;
      }
    }
    if (d.dealloc) {  // M' = M_{t-1} psi
      g_psi[i] = dot(gMi, Mi, W);
      for (int64_t j = 0; j < W; ++j) gMi[j] *= s;
    }
  }
  // write weighting w^w = g^w lerp(c^w, a, g^a)
  std::vector<T> g_cw(Hw * N), g_alloc(Hw * N);
  for (int64_t h = 0; h < Hw; ++h) {
    const T ga = q[d.ag + h], gw = q[d.wg + h];
    const T* cw = aux + d.cw + h * N;
    const T* a = aux + d.alloc + h * N;
    T g_gw = 0, g_ga = 0;
    for (int64_t i = 0; i < N; ++i) {
      const T gi = g_ww[h * N + i];
      g_gw += gi * lerp(cw[i], a[i], ga);
      const T g_inner = gi * gw;
      g_ga += g_inner * (a[i] - cw[i]);
      g_alloc[h * N + i] = g_inner * ga;
      g_cw[h * N + i] = g_inner - g_alloc[h * N + i];
    }
    gq[d.wg + h] += g_gw;
    gq[d.ag + h] += g_ga;
  }
  const T* wmask = d.masking ? q.data() + d.wmask : nullptr;
  content_backward(x.M_prev, N, W, Hw, q.data() + d.wk, q.data() + d.ws, wmask, aux + d.cw, aux + d.simw,
                   aux + d.normw, g_cw.data(), gM, gq.data() + d.wk, gq.data() + d.ws,
                   d.masking ? gq.data() + d.wmask : nullptr);
  // 3. allocation: u^(k+1) = u^(k) + (1 - u^(k)) g^w_k g^a_k a_k, a_k = alloc(u^(k)), u^(0) = u_t
  std::vector<T> g_u(N, T(0)), g_ak(N), P(N), su(N);
  allocation_backward(aux + d.uh + (Hw - 1) * N, aux + d.phi + (Hw - 1) * N, g_alloc.data() + (Hw - 1) * N, N,
                      g_u.data(), P.data(), su.data());
  for (int64_t k = Hw - 2; k >= 0; --k) {
    const T* uk = aux + d.uh + k * N;
    const T* ak = aux + d.alloc + k * N;
    const T share = q[d.wg + k] * q[d.ag + k];
    T g_share = 0;
    for (int64_t i = 0; i < N; ++i) {
      g_ak[i] = g_alloc[k * N + i] + g_u[i] * (T(1) - uk[i]) * share;
      g_share += g_u[i] * (T(1) - uk[i]) * ak[i];
      g_u[i] *= T(1) - share * ak[i];
    }
    allocation_backward(uk, aux + d.phi + k * N, g_ak.data(), N, g_u.data(), P.data(), su.data());
    gq[d.wg + k] += g_share * q[d.ag + k];
    gq[d.ag + k] += g_share * q[d.wg + k];
  }
  // usage u_t = (u_{t-1} + w - u_{t-1} w) psi; retention psi = prod_r (1 - f_r w^r_{t-1,r})
  const T* written = aux + d.written;
  for (int64_t i = 0; i < N; ++i) {
    const T gu = g_u[i] + g.gu[i];
    const T up = x.u_prev[i];
    g_psi[i] += gu * (up + written[i] * (T(1) - up));
    const T g_inner = gu * psi[i];
    const T g_written = g_inner * (T(1) - up);
    g.gu_prev[i] = g_inner * (T(1) - written[i]);
    for (int64_t h = 0; h < Hw; ++h) {
      T others = 1;
      for (int64_t v = 0; v < Hw; ++v) {
        if (v != h) others *= T(1) - x.ww_prev[v * N + i];
      }
      g.gww_prev[h * N + i] = g_written * others;
    }
    for (int64_t r = 0; r < R; ++r) {
      T others = 1;
      for (int64_t v = 0; v < R; ++v) {
        if (v != r) others *= T(1) - q[d.fg + v] * x.wr_prev[v * N + i];
      }
      const T g_factor = g_psi[i] * others;
      gq[d.fg + r] -= g_factor * x.wr_prev[r * N + i];
      g.gwr_prev[r * N + i] -= g_factor * q[d.fg + r];
    }
  }
  // 2. the squashes' and the clip's derivatives
  for (int64_t k = 0; k < d.P; ++k) {
    const T x_raw = x.raw[k];
    T dk = 1;
    if (d.kind[k] == kSigmoid) {
      dk = q[k] * (T(1) - q[k]);
    } else if (d.kind[k] == kMask) {
      const T s = sigmoid(clipped(x_raw, d.clip));
      dk = T(1 - d.mask_min) * s * (T(1) - s);
    } else if (d.kind[k] == kOneplus) {
      const T c = clipped(x_raw, d.clip);
      dk = softplus_grad(c);
    }
    g.graw[k] = gq[k] * dk * pass(x_raw, d.clip);
  }
}

// ----------------------------------------------------------------------------------------------------------------
// Entry points

void check(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type(), "dnc_step: ", name,
              " must be a contiguous CPU tensor of ", like.scalar_type());
}

Dims dims_of(const at::Tensor& raw, const at::Tensor& M, int64_t R, int64_t Hw, bool masking, bool dealloc,
             bool sharp, double clip, double mask_min) {
  Dims d = make_dims(M.size(0), M.size(1), M.size(2), R, Hw, masking, dealloc, sharp, clip, mask_min);
  TORCH_CHECK(raw.dim() == 2 && raw.size(0) == d.B && raw.size(1) == d.P, "dnc_step: interface of shape ",
              raw.sizes(), " does not fit memory ", M.sizes(), " with R=", R, " Hw=", Hw, " masking=", masking,
              " sharpness=", sharp);
  return d;
}

// Rows per task: enough work per thread that splitting pays (a row is ~2 R Hw N^2 + 10 (R + Hw) N W flops).
int64_t grain(const Dims& d) {
  const int64_t work = 2 * (d.R + 2) * d.Hw * d.N * d.N + 10 * (d.R + d.Hw) * d.N * d.W;
  return std::max<int64_t>(1, 262144 / std::max<int64_t>(1, work));
}

template <typename T>
Row<T> row_of(const Dims& d, int64_t b, const at::Tensor& raw, const at::Tensor& M_prev, const at::Tensor& wr_prev,
              const at::Tensor& ww_prev, const at::Tensor& p_prev, const at::Tensor& u_prev, const at::Tensor& L_prev,
              const at::Tensor& L_out, const at::Tensor& M, const at::Tensor& wr, const at::Tensor& ww,
              const at::Tensor& p, const at::Tensor& u, const at::Tensor& r, const at::Tensor& aux) {
  const int64_t N = d.N, NW = d.N * d.W, RN = d.R * N, HN = d.Hw * N, LL = d.Hw * N * N;
  auto at = [b](const at::Tensor& t, int64_t per_row) { return t.defined() ? t.data_ptr<T>() + b * per_row : nullptr; };
  return Row<T>{at(raw, d.P), at(M_prev, NW), at(wr_prev, RN), at(ww_prev, HN), at(p_prev, HN), at(u_prev, N),
                at(L_prev, LL), at(L_out, LL), at(M, NW), at(wr, RN), at(ww, HN), at(p, HN), at(u, N),
                at(r, d.R * d.W), at(aux, d.A)};
}

std::vector<at::Tensor> step_forward(at::Tensor raw, at::Tensor M_prev, at::Tensor wr_prev, at::Tensor ww_prev,
                                     at::Tensor p_prev, at::Tensor u_prev, at::Tensor L_prev, at::Tensor L_out,
                                     int64_t R, int64_t Hw, bool masking, bool dealloc, bool sharp, double clip,
                                     double mask_min) {
  for (auto* t : {&raw, &M_prev, &wr_prev, &ww_prev, &p_prev, &u_prev, &L_prev, &L_out}) {
    check(*t, M_prev, "every input");
  }
  const Dims d = dims_of(raw, M_prev, R, Hw, masking, dealloc, sharp, clip, mask_min);
  TORCH_CHECK(L_prev.numel() == d.B * Hw * d.N * d.N && L_out.numel() == L_prev.numel(), "dnc_step: link of shape ",
              L_prev.sizes());
  auto opts = M_prev.options();
  auto M = at::empty_like(M_prev);
  auto wr = at::empty({d.B, R, d.N}, opts), ww = at::empty({d.B, Hw, d.N}, opts), p = at::empty({d.B, Hw, d.N}, opts);
  auto u = at::empty({d.B, d.N}, opts), r = at::empty({d.B, R * d.W}, opts), aux = at::empty({d.B, d.A}, opts);
  AT_DISPATCH_FLOATING_TYPES(M_prev.scalar_type(), "dnc_step_forward", [&] {
    at::parallel_for(0, d.B, grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        forward_row(d, row_of<scalar_t>(d, b, raw, M_prev, wr_prev, ww_prev, p_prev, u_prev, L_prev, L_out, M, wr,
                                        ww, p, u, r, aux));
      }
    });
  });
  return {M, wr, ww, p, u, r, aux};
}

std::vector<at::Tensor> step_backward(at::Tensor raw, at::Tensor M_prev, at::Tensor M, at::Tensor wr_prev,
                                      at::Tensor ww_prev, at::Tensor p_prev, at::Tensor u_prev, at::Tensor L_prev,
                                      at::Tensor wr, at::Tensor ww, at::Tensor aux, at::Tensor gM, at::Tensor gwr,
                                      at::Tensor gww, at::Tensor gp, at::Tensor gu, at::Tensor gr, at::Tensor gL,
                                      int64_t R, int64_t Hw, bool masking, bool dealloc, bool sharp, double clip,
                                      double mask_min) {
  for (auto* t : {&raw, &M_prev, &M, &wr_prev, &ww_prev, &p_prev, &u_prev, &L_prev, &wr, &ww, &aux, &gM, &gwr, &gww,
                  &gp, &gu, &gr, &gL}) {
    check(*t, M_prev, "every input");
  }
  const Dims d = dims_of(raw, M_prev, R, Hw, masking, dealloc, sharp, clip, mask_min);
  TORCH_CHECK(aux.size(1) == d.A && gL.numel() == L_prev.numel() && L_prev.numel() == d.B * Hw * d.N * d.N,
              "dnc_step: saved numbers do not fit the dimensions");
  auto g_M = at::empty_like(M_prev), g_wr = at::empty_like(wr_prev), g_ww = at::empty_like(ww_prev);
  auto g_p = at::empty_like(p_prev), g_u = at::empty_like(u_prev), g_raw = at::empty_like(raw);
  AT_DISPATCH_FLOATING_TYPES(M_prev.scalar_type(), "dnc_step_backward", [&] {
    at::parallel_for(0, d.B, grain(d), [&](int64_t begin, int64_t end) {
      const at::Tensor none;
      const int64_t N = d.N, NW = d.N * d.W, RN = R * N, HN = Hw * N;
      for (int64_t b = begin; b < end; ++b) {
        const Row<scalar_t> x = row_of<scalar_t>(d, b, raw, M_prev, wr_prev, ww_prev, p_prev, u_prev, L_prev, none,
                                                 M, wr, ww, none, none, none, aux);
        auto at = [b](const at::Tensor& t, int64_t per_row) { return t.data_ptr<scalar_t>() + b * per_row; };
        const RowGrad<scalar_t> g{at(gM, NW), at(gwr, RN), at(gww, HN), at(gp, HN), at(gu, N), at(gr, R * d.W),
                                  at(gL, HN * N), at(g_M, NW), at(g_wr, RN), at(g_ww, HN), at(g_p, HN), at(g_u, N),
                                  at(g_raw, d.P)};
        backward_row(d, x, g);
      }
    });
  });
  return {g_M, g_wr, g_ww, g_p, g_u, g_raw};
}

// L_t from L_{t-1} alone (the backward's recomputation between kept copies): out may be L_prev.
at::Tensor link_step(at::Tensor L_prev, at::Tensor ww, at::Tensor p_prev, at::Tensor out) {
  for (auto* t : {&L_prev, &ww, &p_prev, &out}) check(*t, L_prev, "every input");
  const int64_t N = L_prev.size(-1), rows = ww.numel() / N;
  TORCH_CHECK(L_prev.numel() == rows * N * N && out.numel() == L_prev.numel() && p_prev.numel() == ww.numel(),
              "dnc_step: link of shape ", L_prev.sizes(), " and write weights of shape ", ww.sizes());
  AT_DISPATCH_FLOATING_TYPES(L_prev.scalar_type(), "dnc_link_step", [&] {
    const auto* Lp = L_prev.data_ptr<scalar_t>();
    const auto* w = ww.data_ptr<scalar_t>();
    const auto* p = p_prev.data_ptr<scalar_t>();
    auto* Lo = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / (N * N)), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> row(N);
      const int64_t at = begin * N * N;
      link_rows(N, end - begin, Lp + at, Lo + at, w + begin * N, p + begin * N, row.data());
    });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("step_forward", &step_forward,
        "DNC memory, one step: (raw, M, w^r, w^w, p, u, L, L_out, R, Hw, masking, dealloc, sharpness, clip, "
        "mask_min) -> "
        "(M_t, w^r_t, w^w_t, p_t, u_t, r_t, aux); L_t is written into L_out (may be L)");
  m.def("step_backward", &step_backward,
        "Reverse of step_forward: (raw, M, M_t, w^r, w^w, p, u, L, w^r_t, w^w_t, aux, gM_t, gw^r_t, gw^w_t, gp_t, "
        "gu_t, gr_t, gL_t, R, Hw, masking, dealloc, sharpness, clip, mask_min) -> (gM, gw^r, gw^w, gp, gu, g_raw); "
        "gL_t "
        "becomes gL in place");
  m.def("link_step", &link_step, "L_t from (L, w^w_t, p, out): the link update alone, into out (may be L)");
}
