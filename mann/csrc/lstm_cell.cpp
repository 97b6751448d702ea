// The LSTM cell's update from its pre-activations, forward and backward, fused: one call each per time step.
//
// nn.LSTMCell's maths (gate order i, f, g, o):
//   i, f, o = sigmoid(pre_i, pre_f, pre_o), g = tanh(pre_g), c = f c_{t-1} + i g, h = o tanh(c).
// The pre-activations themselves (x W_ih^T + h W_hh^T + b) stay matrix products in PyTorch. In PyTorch ops the
// update is 7 ops forward and 6 backward per step, each ~3-7 us on a CPU for [16, 400] numbers; here it is
// one pass over the row (see ntm_heads.cpp for why plain loops).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <atomic>

#include <cmath>
#include <vector>

namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// sigmoid and tanh of n numbers on ATen's vector type (SLEEF's exp and tanh, 8 floats at a time with AVX2):
// one at a time through libm they cost ~7 ns each, which made this cell slower than the PyTorch ops.
template <typename T>
void sigmoid(const T* x, T* y, int64_t n) {
  at::vec::map([](Vec<T> v) { return Vec<T>(T(1)) / (Vec<T>(T(1)) + v.neg().exp()); }, y, x, n);
}

template <typename T>
void tanh(const T* x, T* y, int64_t n) {
  at::vec::map([](Vec<T> v) { return v.tanh(); }, y, x, n);
}

// c = f c_{t-1} + i g and h = o tanh(c) for one row (a: the activated gates i, f, g, o).
template <typename T>
void cell_row(int64_t C, const T* __restrict__ a, const T* __restrict__ cp, T* __restrict__ c, T* __restrict__ tc,
              T* __restrict__ h) {
  for (int64_t k = 0; k < C; ++k) c[k] = a[C + k] * cp[k] + a[k] * a[2 * C + k];
  tanh(c, tc, C);
  for (int64_t k = 0; k < C; ++k) h[k] = a[3 * C + k] * tc[k];
}

// The reverse for one row (restrict: vectorizable).
template <typename T>
void cell_row_backward(int64_t C, const T* __restrict__ a, const T* __restrict__ gh, const T* __restrict__ gc,
                       const T* __restrict__ cp, const T* __restrict__ tc, T* __restrict__ gp,
                       T* __restrict__ gcp) {
  for (int64_t k = 0; k < C; ++k) {
    const T i = a[k], f = a[C + k], g = a[2 * C + k], o = a[3 * C + k], t = tc[k];
    const T dc = gc[k] + gh[k] * (o * (T(1) - t * t));  // h = o tanh(c)
    gp[k] = dc * g * (i * (T(1) - i));
    gp[C + k] = dc * cp[k] * (f * (T(1) - f));
    gp[2 * C + k] = dc * i * (T(1) - g * g);
    gp[3 * C + k] = gh[k] * t * (o * (T(1) - o));
    gcp[k] = dc * f;
  }
}

void check(const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type(),
              "lstm_cell: every input must be a contiguous CPU tensor of ", like.scalar_type());
}

// pre [B, 4C], c_prev [B, C] -> (h [B, C], c [B, C], act [B, 4C] = activated (i, f, g, o), tanh(c) [B, C])
std::vector<at::Tensor> cell_forward(at::Tensor pre, at::Tensor c_prev) {
  check(pre, pre);
  check(c_prev, pre);
  const int64_t B = c_prev.size(0), C = c_prev.size(1);
  TORCH_CHECK(pre.size(0) == B && pre.size(1) == 4 * C, "lstm_cell: pre-activations ", pre.sizes(),
              " do not fit a cell state ", c_prev.sizes());
  auto h = at::empty_like(c_prev), c = at::empty_like(c_prev), tanh_c = at::empty_like(c_prev);
  auto act = at::empty_like(pre);
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "lstm_cell_forward", [&] {
    at::parallel_for(0, B, 8, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* p = pre.data_ptr<scalar_t>() + b * 4 * C;
        const scalar_t* cp = c_prev.data_ptr<scalar_t>() + b * C;
        scalar_t* a = act.data_ptr<scalar_t>() + b * 4 * C;
        scalar_t* hb = h.data_ptr<scalar_t>() + b * C;
        scalar_t* cb = c.data_ptr<scalar_t>() + b * C;
        scalar_t* tb = tanh_c.data_ptr<scalar_t>() + b * C;
        sigmoid(p, a, 2 * C);  // i, f
        tanh(p + 2 * C, a + 2 * C, C);  // g
        sigmoid(p + 3 * C, a + 3 * C, C);  // o
        cell_row(C, a, cp, cb, tb, hb);
      }
    });
  });
  return {h, c, act, tanh_c};
}

// The reverse, from the gradients of h_t and c_t [B, C]: (gradient of pre [B, 4C], of c_{t-1} [B, C]).
std::vector<at::Tensor> cell_backward(at::Tensor gh, at::Tensor gc, at::Tensor act, at::Tensor c_prev,
                                      at::Tensor tanh_c) {
  for (auto* t : {&gh, &gc, &act, &c_prev, &tanh_c}) check(*t, act);
  const int64_t B = c_prev.size(0), C = c_prev.size(1);
  auto g_pre = at::empty_like(act), g_c_prev = at::empty_like(c_prev);
  AT_DISPATCH_FLOATING_TYPES(act.scalar_type(), "lstm_cell_backward", [&] {
    at::parallel_for(0, B, 8, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        cell_row_backward(C, act.data_ptr<scalar_t>() + b * 4 * C, gh.data_ptr<scalar_t>() + b * C,
                          gc.data_ptr<scalar_t>() + b * C, c_prev.data_ptr<scalar_t>() + b * C,
                          tanh_c.data_ptr<scalar_t>() + b * C, g_pre.data_ptr<scalar_t>() + b * 4 * C,
                          g_c_prev.data_ptr<scalar_t>() + b * C);
      }
    });
  });
  return {g_pre, g_c_prev};
}

// How many threads at::parallel_for gives `rows` rows at this grain: a build without OpenMP runs every row on the
// calling thread whatever torch.get_num_threads() says, and nothing else would tell (tests/test_native.py).
int64_t threads_for(int64_t rows, int64_t grain) {
  std::atomic<int64_t> mask{0};
  at::parallel_for(0, rows, grain, [&](int64_t, int64_t) { mask |= int64_t{1} << (at::get_thread_num() % 63); });
  return __builtin_popcountll(mask.load());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cell_forward", &cell_forward, "LSTM cell update: (pre [B, 4C], c_prev [B, C]) -> (h, c, act, tanh(c))");
  m.def("cell_backward", &cell_backward,
        "Its reverse: (gh, gc, act, c_prev, tanh(c)) -> (gradient of pre [B, 4C], of c_prev [B, C])");
  m.def("threads_for", &threads_for, "Threads at::parallel_for splits (rows, grain) across in this build");
}
