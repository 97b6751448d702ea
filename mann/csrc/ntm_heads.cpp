// NTM heads fused: one time step's addressing, read and write for every head, forward and backward, on CPU.
//
// Why a kernel of its own: on a CPU the NTM step is ~50 small ATen ops forward and ~60 backward, and each op
// costs ~3-7 us of dispatch, allocation and TensorIterator set-up whatever its size (measured here: the same
// 12-op chain took 86 us from Python and 101 us from C++ ATen calls, so moving the ops to C++ buys nothing).
// Here the ops from the head parameters to the read vectors and the new memory are plain loops over one batch
// row at a time, which stays in L1: one call forward, one backward.
//
// Same maths, same order, as mann.ntm.NTM.step, steps 2-4 (Graves et al. 2014, Sec. 3.3):
// key k = tanh, strength beta = softplus, gate g = sigmoid, shift s = softmax, gamma = 1 + softplus, erase e =
// sigmoid, add a = tanh; content w^c = softmax(beta K(k, M_i)) with K the cosine similarity (norms floored at
// sqrt(smallest normal), eps 1e-6 outside their product); w^g = lerp(w_{t-1}, w^c, g); w~ = circular
// convolution of w^g with s (+ 1e-12); w = softmax(gamma log w~); r = w M_{t-1};
// M_t = M_{t-1} prod_h (1 - w_h e_h^T) + sum_h w_h a_h^T.
//
// Layouts (all contiguous, batch-first): raw [B, P] with P = H hp + Hw 2W, per head (k W, beta, g, s S, gamma)
// then per write head (e W, a W); M [B, N, W]; w [B, H, N] with the R read heads first; r [B, R W];
// aux [B, 5H + 1, N]: w^c, w^g, w~ (with eps), K and log w~ per head, then |M_i|: what the backward reads back.
//
// exp and log run on ATen's vector type (at::vec::Vectorized, SLEEF's 1-ulp functions from libtorch) when
// mann/native.py builds for an AVX2 CPU; elsewhere the same code runs one number at a time.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

#include "scalar.h"

constexpr double kContentEps = 1e-6;
constexpr double kSharpenEps = 1e-12;

struct Dims {
  int64_t B, N, W, R, Hw, H, S, hp, P;
  double clip;  // <= 0: no clip
};

// i mod N for -N <= i < 2N (shift offsets are at most N / 2), without an integer division
inline int64_t wrap(int64_t i, int64_t N) { return i < 0 ? i + N : (i >= N ? i - N : i); }

// sum_j a_j b_j with four running sums: a single sum is a chain of dependent adds (~4 cycles each), which would make
// these loops latency-bound.
template <typename T>
inline __attribute__((always_inline)) T dot(const T* a, const T* b, int64_t n) {
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    s0 += a[j] * b[j];
    s1 += a[j + 1] * b[j + 1];
    s2 += a[j + 2] * b[j + 2];
    s3 += a[j + 3] * b[j + 3];
  }
  for (; j < n; ++j) s0 += a[j] * b[j];
  return (s0 + s1) + (s2 + s3);
}

template <typename T>
using Vec = at::vec::Vectorized<T>;

// x = tanh(x) over n numbers, in place, on the vector type (one at a time through libm: ~7 ns each here).
template <typename T>
void vec_tanh(T* x, int64_t n) {
  at::vec::map([](Vec<T> v) { return v.tanh(); }, x, x, n);
}

// y = softmax(z) over n numbers, in place.
template <typename T>
void softmax(T* z, int64_t n) {
  const T m = *std::max_element(z, z + n);
  at::vec::map([m](Vec<T> x) { return (x - Vec<T>(m)).exp(); }, z, z, n);
  T sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += z[i];
  for (int64_t i = 0; i < n; ++i) z[i] /= sum;
}

// g <- y * (g - sum(g * y)): the gradient of softmax's input from that of its output, in place.
template <typename T>
void softmax_backward(const T* y, T* g, int64_t n) {
  const T gy = dot(g, y, n);
  for (int64_t i = 0; i < n; ++i) g[i] = y[i] * (g[i] - gy);
}

template <typename T>
T floored_norm(const T* x, int64_t n) {
  return std::max(std::sqrt(dot(x, x, n)), std::sqrt(std::numeric_limits<T>::min()));
}

// The squashed parameters of head h, from the row's raw numbers.
template <typename T>
struct Head {
  T beta, gate, gamma, key_norm;
  std::vector<T> key, shift;

  Head(const T* raw, const Dims& d, int64_t h) : key(d.W), shift(d.S) {
    const T* q = raw + h * d.hp;
    for (int64_t j = 0; j < d.W; ++j) key[j] = clipped(q[j], d.clip);
    vec_tanh(key.data(), d.W);
    beta = softplus(clipped(q[d.W], d.clip));
    gate = sigmoid(clipped(q[d.W + 1], d.clip));
    for (int64_t m = 0; m < d.S; ++m) shift[m] = clipped(q[d.W + 2 + m], d.clip);
    softmax(shift.data(), d.S);
    gamma = T(1) + softplus(clipped(q[d.W + 2 + d.S], d.clip));
    key_norm = floored_norm(key.data(), d.W);
  }
};

// The write heads' erase (sigmoid) and add (tanh) vectors, [Hw, W] each, from the row's raw numbers.
template <typename T>
void squash_write(const Dims& d, const T* raw, T* erase, T* add) {
  const T* ea = raw + d.H * d.hp;  // per write head: erase W, add W
  for (int64_t v = 0; v < d.Hw; ++v) {
    for (int64_t j = 0; j < d.W; ++j) {
      erase[v * d.W + j] = -clipped(ea[v * 2 * d.W + j], d.clip);
      add[v * d.W + j] = clipped(ea[v * 2 * d.W + d.W + j], d.clip);
    }
  }
  const int64_t n = d.Hw * d.W;  // sigmoid(x) = 1 / (1 + exp(-x)), the exp on the vector type
  at::vec::map([](Vec<T> v) { return Vec<T>(T(1)) / (Vec<T>(T(1)) + v.exp()); }, erase, erase, n);
  vec_tanh(add, n);
}

// x += a y over n numbers. Restrict-qualified parameters (no two overlap) let the compiler vectorize the loop.
template <typename T>
void axpy(int64_t n, T a, const T* __restrict__ y, T* __restrict__ x) {
  for (int64_t j = 0; j < n; ++j) x[j] += a * y[j];
}

// One memory slot of a one-head write: out = M_i + w_i (a - M_i e).
template <typename T>
void one_head_write(int64_t W, T ww, const T* __restrict__ m, const T* __restrict__ a, const T* __restrict__ e,
                    T* __restrict__ out) {
  for (int64_t j = 0; j < W; ++j) out[j] = m[j] + ww * (a[j] - m[j] * e[j]);
}

template <typename T>
void forward_row(const Dims& d, const T* raw, const T* M, const T* w_prev, T* r, T* M_next, T* w, T* aux) {
  const int64_t N = d.N, W = d.W, H = d.H, k = d.S / 2;
  T* mem_norm = aux + 5 * H * N;
  for (int64_t i = 0; i < N; ++i) mem_norm[i] = floored_norm(M + i * W, W);
  for (int64_t h = 0; h < H; ++h) {
    Head<T> p(raw, d, h);
    T* wc = aux + h * N;
    T* wg = aux + (H + h) * N;
    T* ws = aux + (2 * H + h) * N;
    T* sim = aux + (3 * H + h) * N;
    T* log_ws = aux + (4 * H + h) * N;
    T* wh = w + h * N;
    const T* wp = w_prev + h * N;
    for (int64_t i = 0; i < N; ++i) {  // content: K(k, M_i), then softmax(beta K)
      sim[i] = dot(p.key.data(), M + i * W, W) / (p.key_norm * mem_norm[i] + T(kContentEps));
      wc[i] = p.beta * sim[i];
    }
    softmax(wc, N);
    for (int64_t i = 0; i < N; ++i) wg[i] = lerp(wp[i], wc[i], p.gate);
    for (int64_t i = 0; i < N; ++i) {  // w~_i = sum_m s_m w^g[(i - (m - k)) mod N]
      T acc = 0;
      for (int64_t m = 0; m < d.S; ++m) acc += p.shift[m] * wg[wrap(i - m + k, N)];
      ws[i] = acc + T(kSharpenEps);
    }
    at::vec::map([](Vec<T> x) { return x.log(); }, log_ws, ws, N);
    for (int64_t i = 0; i < N; ++i) wh[i] = p.gamma * log_ws[i];
    softmax(wh, N);
  }
  for (int64_t h = 0; h < d.R; ++h) {  // read from M_{t-1}: r_h = sum_i w_h[i] M_i (one running sum per j)
    T* rh = r + h * W;
    std::fill(rh, rh + W, T(0));
    for (int64_t i = 0; i < N; ++i) axpy(W, w[h * N + i], M + i * W, rh);
  }
  std::vector<T> erase(d.Hw * W), add(d.Hw * W);
  squash_write(d, raw, erase.data(), add.data());
  for (int64_t i = 0; i < N; ++i) {
    const T* Mi = M + i * W;
    T* out = M_next + i * W;
    if (d.Hw == 1) {  // M + w (a - M e): one pass
      one_head_write(W, w[d.R * N + i], Mi, add.data(), erase.data(), out);
      continue;
    }
    for (int64_t j = 0; j < W; ++j) {
      T keep = 1, added = 0;
      for (int64_t v = 0; v < d.Hw; ++v) {
        const T ww = w[(d.R + v) * N + i];
        keep *= T(1) - ww * erase[v * W + j];
        added += ww * add[v * W + j];
      }
      out[j] = Mi[j] * keep + added;
    }
  }
}

// One memory slot M_i of a one-head write's reverse: out = g (1 - w e), gmm = g * M_i, and the slot's shares of
// the gradients of a and e (restrict: vectorizable).
template <typename T>
void one_head_write_backward(int64_t W, T ww, const T* __restrict__ g, const T* __restrict__ m,
                             const T* __restrict__ e, T* __restrict__ out, T* __restrict__ gmm, T* __restrict__ g_add,
                             T* __restrict__ g_erase) {
  for (int64_t j = 0; j < W; ++j) {
    out[j] = g[j] * (T(1) - ww * e[j]);
    gmm[j] = g[j] * m[j];
    g_add[j] += ww * g[j];
    g_erase[j] -= ww * gmm[j];
  }
}

// x += a y and z += a v over n numbers (restrict: vectorizable).
template <typename T>
void two_axpy(int64_t n, T a, const T* __restrict__ y, T* __restrict__ x, const T* __restrict__ v,
              T* __restrict__ z) {
  for (int64_t j = 0; j < n; ++j) {
    x[j] += a * y[j];
    z[j] += a * v[j];
  }
}

// Step 4's reverse: the write's and the read's gradients w.r.t. M_{t-1} (into g_M), w (added to g_w), e and a.
template <typename T>
void write_read_backward(const Dims& d, const T* M, const T* w, const T* gM, const T* gr, const T* erase,
                         const T* add, T* g_M, T* g_w, T* g_erase, T* g_add) {
  const int64_t N = d.N, W = d.W, R = d.R, Hw = d.Hw;
  std::vector<T> gm_m(W), factor(Hw);
  for (int64_t i = 0; i < N; ++i) {
    const T* Mi = M + i * W;
    const T* gMi = gM + i * W;
    T* out = g_M + i * W;
    if (Hw == 1) {  // M_t = M + w (a - M e)
      const T ww = w[R * N + i];
      one_head_write_backward(W, ww, gMi, Mi, erase, out, gm_m.data(), g_add, g_erase);
      g_w[R * N + i] += dot(gMi, add, W) - dot(gm_m.data(), erase, W);
    } else {
      for (int64_t j = 0; j < W; ++j) {
        const T g = gMi[j];
        T keep = 1;
        for (int64_t v = 0; v < Hw; ++v) {
          factor[v] = T(1) - w[(R + v) * N + i] * erase[v * W + j];
          keep *= factor[v];
        }
        for (int64_t v = 0; v < Hw; ++v) {
          const T ww = w[(R + v) * N + i];
          T others = 1;  // prod of the other heads' factors, no division (a factor can be 0)
          for (int64_t u = 0; u < Hw; ++u) {
            if (u != v) others *= factor[u];
          }
          const T g_factor = g * Mi[j] * others;
          g_add[v * W + j] += ww * g;
          g_erase[v * W + j] -= ww * g_factor;
          g_w[(R + v) * N + i] += g * add[v * W + j] - g_factor * erase[v * W + j];
        }
        out[j] = g * keep;
      }
    }
    for (int64_t h = 0; h < R; ++h) {  // r_h = w_h M_{t-1}
      const T wi = w[h * N + i];
      for (int64_t j = 0; j < W; ++j) out[j] += wi * gr[h * W + j];
      g_w[h * N + i] += dot(gr + h * W, Mi, W);
    }
  }
}

template <typename T>
void backward_row(const Dims& d, const T* raw, const T* M, const T* w_prev, const T* w, const T* aux, const T* gM,
                  const T* gw, const T* gr, T* g_M, T* g_w_prev, T* g_raw) {
  const int64_t N = d.N, W = d.W, H = d.H, Hw = d.Hw, k = d.S / 2;
  const T* mem_norm = aux + 5 * H * N;
  const T* ea = raw + H * d.hp;
  T* g_ea = g_raw + H * d.hp;
  std::vector<T> g_w(gw, gw + H * N), g_mem_norm(N, T(0)), erase(Hw * W), add(Hw * W), g_erase(Hw * W, T(0)),
      g_add(Hw * W, T(0));
  squash_write(d, raw, erase.data(), add.data());
  // 4. write M_t = M_{t-1} prod_v (1 - w_v e_v^T) + sum_v w_v a_v^T, and read r = w^r M_{t-1}
  write_read_backward(d, M, w, gM, gr, erase.data(), add.data(), g_M, g_w.data(), g_erase.data(), g_add.data());
  for (int64_t v = 0; v < Hw; ++v) {
    for (int64_t j = 0; j < W; ++j) {
      const T e = erase[v * W + j], a = add[v * W + j];
      g_ea[v * 2 * W + j] = g_erase[v * W + j] * e * (T(1) - e) * pass(ea[v * 2 * W + j], d.clip);
      g_ea[v * 2 * W + W + j] = g_add[v * W + j] * (T(1) - a * a) * pass(ea[v * 2 * W + W + j], d.clip);
    }
  }
  // 3. per head: sharpen, shift, interpolate, content
  std::vector<T> g_ws(N), g_wg(N), g_wc(N), g_dot(N), g_s(d.S), g_key(W);
  for (int64_t h = 0; h < H; ++h) {
    Head<T> p(raw, d, h);
    const T* wc = aux + h * N;
    const T* wg = aux + (H + h) * N;
    const T* ws = aux + (2 * H + h) * N;
    const T* sim = aux + (3 * H + h) * N;
    const T* log_ws = aux + (4 * H + h) * N;
    const T* wh = w + h * N;
    const T* wp = w_prev + h * N;
    T* gz = g_w.data() + h * N;
    softmax_backward(wh, gz, N);  // w = softmax(gamma log w~)
    T g_gamma = 0;
    for (int64_t i = 0; i < N; ++i) {
      g_gamma += gz[i] * log_ws[i];
      g_ws[i] = gz[i] * p.gamma / ws[i];
    }
    std::fill(g_s.begin(), g_s.end(), T(0));
    std::fill(g_wg.begin(), g_wg.end(), T(0));
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t m = 0; m < d.S; ++m) {
        const int64_t src = wrap(i - m + k, N);
        g_s[m] += wg[src] * g_ws[i];
        g_wg[src] += p.shift[m] * g_ws[i];
      }
    }
    T g_gate = 0;
    T* g_wp = g_w_prev + h * N;
    for (int64_t i = 0; i < N; ++i) {
      g_wc[i] = g_wg[i] * p.gate;
      g_wp[i] = g_wg[i] - g_wc[i];
      g_gate += g_wg[i] * (wc[i] - wp[i]);
    }
    softmax_backward(wc, g_wc.data(), N);  // now d(beta K)
    T g_beta = 0, g_key_norm = 0;
    for (int64_t i = 0; i < N; ++i) {
      const T denom = p.key_norm * mem_norm[i] + T(kContentEps);
      g_beta += g_wc[i] * sim[i];
      g_dot[i] = g_wc[i] * p.beta / denom;
      const T g_denom = g_dot[i] * sim[i];  // negated
      g_key_norm += g_denom * mem_norm[i];
      g_mem_norm[i] += g_denom * p.key_norm;
    }
    g_key_norm /= p.key_norm;
    for (int64_t j = 0; j < W; ++j) g_key[j] = -p.key[j] * g_key_norm;
    for (int64_t i = 0; i < N; ++i) {  // K's dot k . M_i: both ways at once, one running sum per j
      two_axpy(W, g_dot[i], M + i * W, g_key.data(), p.key.data(), g_M + i * W);
    }
    T* gq = g_raw + h * d.hp;
    const T* q = raw + h * d.hp;
    for (int64_t j = 0; j < W; ++j) gq[j] = g_key[j] * (T(1) - p.key[j] * p.key[j]) * pass(q[j], d.clip);
    gq[W] = g_beta * softplus_grad(clipped(q[W], d.clip)) * pass(q[W], d.clip);
    gq[W + 1] = g_gate * p.gate * (T(1) - p.gate) * pass(q[W + 1], d.clip);
    softmax_backward(p.shift.data(), g_s.data(), d.S);
    for (int64_t m = 0; m < d.S; ++m) gq[W + 2 + m] = g_s[m] * pass(q[W + 2 + m], d.clip);
    gq[W + 2 + d.S] = g_gamma * softplus_grad(clipped(q[W + 2 + d.S], d.clip)) * pass(q[W + 2 + d.S], d.clip);
  }
  for (int64_t i = 0; i < N; ++i) {  // |M_i|: d|x|/dx = x / |x|
    const T g = g_mem_norm[i] / mem_norm[i];
    for (int64_t j = 0; j < W; ++j) g_M[i * W + j] -= M[i * W + j] * g;
  }
}

Dims dims_of(const at::Tensor& raw, const at::Tensor& M, int64_t R, int64_t Hw, int64_t S, double clip) {
  Dims d{M.size(0), M.size(1), M.size(2), R, Hw, R + Hw, S, 0, raw.size(1), clip};
  d.hp = d.W + 3 + S;
  TORCH_CHECK(raw.size(0) == d.B && d.P == d.H * d.hp + Hw * 2 * d.W, "ntm_heads: raw parameters of shape ",
              raw.sizes(), " do not fit memory ", M.sizes(), " with R=", R, " Hw=", Hw, " S=", S);
  TORCH_CHECK(S % 2 == 1 && S / 2 <= d.N, "ntm_heads: ", S, " shift weights need an odd count and at most ",
              2 * d.N + 1, " for ", d.N, " memory slots");  // wrap() reads w[i - m + k] for -N <= i - m + k < 2N
  return d;
}

void check(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type(), "ntm_heads: ",
              name, " must be a contiguous CPU tensor of ", like.scalar_type());
}

// Rows per task: enough work per thread that splitting pays (a row is ~10 N W flops forward).
int64_t grain(const Dims& d) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, 10 * d.N * d.W)); }

std::vector<at::Tensor> heads_forward(at::Tensor raw, at::Tensor M, at::Tensor w_prev, int64_t R, int64_t Hw,
                                      int64_t S, double clip) {
  for (auto* t : {&raw, &M, &w_prev}) check(*t, M, "every input");
  const Dims d = dims_of(raw, M, R, Hw, S, clip);
  auto r = at::empty({d.B, R * d.W}, M.options());
  auto M_next = at::empty_like(M);
  auto w = at::empty({d.B, d.H, d.N}, M.options());
  auto aux = at::empty({d.B, 5 * d.H + 1, d.N}, M.options());
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "ntm_heads_forward", [&] {
    const auto* raw_p = raw.data_ptr<scalar_t>();
    const auto* M_p = M.data_ptr<scalar_t>();
    const auto* wp_p = w_prev.data_ptr<scalar_t>();
    auto* r_p = r.data_ptr<scalar_t>();
    auto* Mn_p = M_next.data_ptr<scalar_t>();
    auto* w_p = w.data_ptr<scalar_t>();
    auto* aux_p = aux.data_ptr<scalar_t>();
    at::parallel_for(0, d.B, grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        forward_row(d, raw_p + b * d.P, M_p + b * d.N * d.W, wp_p + b * d.H * d.N, r_p + b * R * d.W,
                    Mn_p + b * d.N * d.W, w_p + b * d.H * d.N, aux_p + b * (5 * d.H + 1) * d.N);
      }
    });
  });
  return {r, M_next, w, aux};
}

std::vector<at::Tensor> heads_backward(at::Tensor raw, at::Tensor M, at::Tensor w_prev, at::Tensor w, at::Tensor aux,
                                       at::Tensor gM, at::Tensor gw, at::Tensor gr, int64_t R, int64_t Hw, int64_t S,
                                       double clip) {
  for (auto* t : {&raw, &M, &w_prev, &w, &aux, &gM, &gw, &gr}) check(*t, M, "every input");
  const Dims d = dims_of(raw, M, R, Hw, S, clip);
  auto g_M = at::empty_like(M);
  auto g_w_prev = at::empty_like(w_prev);
  auto g_raw = at::empty_like(raw);
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "ntm_heads_backward", [&] {
    at::parallel_for(0, d.B, grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t nw = d.N * d.W, hn = d.H * d.N;
        backward_row(d, raw.data_ptr<scalar_t>() + b * d.P, M.data_ptr<scalar_t>() + b * nw,
                     w_prev.data_ptr<scalar_t>() + b * hn, w.data_ptr<scalar_t>() + b * hn,
                     aux.data_ptr<scalar_t>() + b * (5 * d.H + 1) * d.N, gM.data_ptr<scalar_t>() + b * nw,
                     gw.data_ptr<scalar_t>() + b * hn, gr.data_ptr<scalar_t>() + b * R * d.W,
                     g_M.data_ptr<scalar_t>() + b * nw, g_w_prev.data_ptr<scalar_t>() + b * hn,
                     g_raw.data_ptr<scalar_t>() + b * d.P);
      }
    });
  });
  return {g_M, g_w_prev, g_raw};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("heads_forward", &heads_forward, "NTM heads, one step: (raw, M, w_prev, R, Hw, S, clip) -> (r, M_t, w, aux)");
  m.def("heads_backward", &heads_backward,
        "Reverse of heads_forward: (raw, M, w_prev, w, aux, gM, gw, gr, R, Hw, S, clip) -> (gM_prev, gw_prev, g_raw)");
}
