// Scalar helpers the kernels share: the squashes and lerp as PyTorch defines them, and the clip with its
// pass-through.
// Included inside each kernel's anonymous namespace (one private copy per library).
#pragma once

#include <algorithm>
#include <cmath>

constexpr double kSoftplusThreshold = 20.0;  // F.softplus's default: above it softplus(x) = x

template <typename T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <typename T>
T softplus(T x) {
  return x > T(kSoftplusThreshold) ? x : std::log1p(std::exp(x));
}

// d softplus / dx, as autograd's (1 above the threshold)
template <typename T>
T softplus_grad(T x) {
  return x > T(kSoftplusThreshold) ? T(1) : sigmoid(x);
}

// torch.lerp's formula (exact at both ends).
template <typename T>
T lerp(T start, T end, T weight) {
  return weight < T(0.5) ? start + weight * (end - start) : end - (end - start) * (T(1) - weight);
}

// clamp(x, -clip, clip); clip <= 0 means no clip
template <typename T>
T clipped(T x, double clip) {
  return clip > 0 ? std::min(std::max(x, T(-clip)), T(clip)) : x;
}

// Where clamp(raw, -clip, clip) passes the gradient (torch: -clip <= raw <= clip), as 0 / 1.
template <typename T>
T pass(T raw, double clip) {
  return clip > 0 && (raw < T(-clip) || raw > T(clip)) ? T(0) : T(1);
}
