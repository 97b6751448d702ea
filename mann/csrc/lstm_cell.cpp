// The LSTM cell's update from its pre-activations, forward and backward, fused: one call each per time step.
//
// nn.LSTMCell's maths (gate order i, f, g, o), as mann/fast.py's lstm_forward / lstm_step_backward:
//   i, f, o = sigmoid(pre_i, pre_f, pre_o), g = tanh(pre_g), c = f c_{t-1} + i g, h = o tanh(c).
// The pre-activations themselves (x W_ih^T + h W_hh^T + b) stay matrix products in PyTorch. In PyTorch ops the
// update is 7 ops forward and 6 backward per step, each ~3-7 us on this CPU for [16, 400] numbers; here it is
// one pass over the row (see ntm_heads.cpp for why plain loops).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

template <typename T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
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
        for (int64_t k = 0; k < 4 * C; ++k) a[k] = k / C == 2 ? std::tanh(p[k]) : sigmoid(p[k]);
        for (int64_t k = 0; k < C; ++k) {
          cb[k] = a[C + k] * cp[k] + a[k] * a[2 * C + k];
          tb[k] = std::tanh(cb[k]);
          hb[k] = a[3 * C + k] * tb[k];
        }
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
        const scalar_t* a = act.data_ptr<scalar_t>() + b * 4 * C;
        const scalar_t* ghb = gh.data_ptr<scalar_t>() + b * C;
        const scalar_t* gcb = gc.data_ptr<scalar_t>() + b * C;
        const scalar_t* cp = c_prev.data_ptr<scalar_t>() + b * C;
        const scalar_t* tb = tanh_c.data_ptr<scalar_t>() + b * C;
        scalar_t* gp = g_pre.data_ptr<scalar_t>() + b * 4 * C;
        scalar_t* gcp = g_c_prev.data_ptr<scalar_t>() + b * C;
        for (int64_t k = 0; k < C; ++k) {
          const scalar_t i = a[k], f = a[C + k], g = a[2 * C + k], o = a[3 * C + k], t = tb[k];
          const scalar_t dc = gcb[k] + ghb[k] * (o * (scalar_t(1) - t * t));  // h = o tanh(c)
          gp[k] = dc * g * (i * (scalar_t(1) - i));
          gp[C + k] = dc * cp[k] * (f * (scalar_t(1) - f));
          gp[2 * C + k] = dc * i * (scalar_t(1) - g * g);
          gp[3 * C + k] = ghb[k] * t * (o * (scalar_t(1) - o));
          gcp[k] = dc * f;
        }
      }
    });
  });
  return {g_pre, g_c_prev};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cell_forward", &cell_forward, "LSTM cell update: (pre [B, 4C], c_prev [B, C]) -> (h, c, act, tanh(c))");
  m.def("cell_backward", &cell_backward,
        "Its reverse: (gh, gc, act, c_prev, tanh(c)) -> (gradient of pre [B, 4C], of c_prev [B, C])");
}
