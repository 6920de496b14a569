// Naive double-precision reference of the fused Dice+BCE loss and its gradient for the C++ kernel
// tests: it materialises the full-resolution logits through dense resampling matrices and is written
// independently of common/mask_math.h and common/resize_plan.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/mask_kernels.h"

namespace hsft::test {

using hsft::cpu::MaskGeometry;

// Source coordinate and weights of output index o (bilinear, align_corners=False), in double.
struct RefTap {
  int64_t lo, hi;
  double w_lo, w_hi;
};

inline RefTap ref_tap(int64_t o, int64_t in, int64_t out) {
  if (in == out) return {o, o, 1.0, 0.0};
  double src = (static_cast<double>(o) + 0.5) * static_cast<double>(in) / static_cast<double>(out) - 0.5;
  src = std::max(src, 0.0);
  const int64_t lo = std::min<int64_t>(static_cast<int64_t>(std::floor(src)), in - 1);
  const int64_t hi = std::min<int64_t>(lo + 1, in - 1);
  const double frac = std::min(std::max(src - static_cast<double>(lo), 0.0), 1.0);
  return {lo, hi, 1.0 - frac, frac};
}

// Dense resampling matrix of one axis (out x in, row-major): one bilinear step, or two steps
// (in -> mid -> out) as the product of two.
inline std::vector<double> ref_axis_matrix(int64_t in, int64_t mid, int64_t out) {
  auto one = [](int64_t from, int64_t to) {
    std::vector<double> m(to * from, 0.0);
    for (int64_t o = 0; o < to; ++o) {
      const RefTap t = ref_tap(o, from, to);
      m[o * from + t.lo] += t.w_lo;
      m[o * from + t.hi] += t.w_hi;
    }
    return m;
  };
  if (mid == 0) return one(in, out);
  const std::vector<double> first = one(in, mid), second = one(mid, out);
  std::vector<double> m(out * in, 0.0);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t k = 0; k < mid; ++k)
      for (int64_t i = 0; i < in; ++i) m[o * in + i] += second[o * mid + k] * first[k * in + i];
  return m;
}

struct RefResize {
  std::vector<double> wy, wx;  // out_h x in_h, out_w x in_w
  explicit RefResize(const MaskGeometry& g)
      : wy(ref_axis_matrix(g.in_h, g.mid_h, g.out_h)), wx(ref_axis_matrix(g.in_w, g.mid_w, g.out_w)) {}
};

// Full-resolution logits of all masks.
inline std::vector<double> ref_upsample(const std::vector<double>& logits, const MaskGeometry& g) {
  const RefResize m(g);
  std::vector<double> out(g.num_masks * g.out_h * g.out_w, 0.0);
  for (int64_t n = 0; n < g.num_masks; ++n)
    for (int64_t y = 0; y < g.out_h; ++y)
      for (int64_t x = 0; x < g.out_w; ++x) {
        double v = 0;
        for (int64_t r = 0; r < g.in_h; ++r)
          for (int64_t c = 0; c < g.in_w; ++c)
            v += m.wy[y * g.in_h + r] * m.wx[x * g.in_w + c] * logits[(n * g.in_h + r) * g.in_w + c];
        out[(n * g.out_h + y) * g.out_w + x] = v;
      }
  return out;
}

inline double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }
inline double bce(double z, double g) { return std::max(z, 0.0) - z * g + std::log1p(std::exp(-std::fabs(z))); }

struct RefLoss {
  std::vector<double> loss;  // per mask
  std::vector<double> grad;  // d(sum_n loss_n) / d logits
};

// fov: empty (every pixel counts) or one byte per target pixel (only non-zero ones count).
inline RefLoss ref_dice_bce(const std::vector<double>& logits, const std::vector<double>& target,
                     const std::vector<uint8_t>& fov, const MaskGeometry& g, double dice_weight, double bce_weight,
                     double eps) {
  const std::vector<double> z = ref_upsample(logits, g);
  const int64_t hw = g.out_h * g.out_w;
  RefLoss out{std::vector<double>(g.num_masks), std::vector<double>(logits.size(), 0.0)};
  for (int64_t n = 0; n < g.num_masks; ++n) {
    double sp = 0, spg = 0, sg = 0, sb = 0, count = 0;
    auto inside = [&](int64_t i) { return fov.empty() || fov[n * hw + i] != 0; };
    for (int64_t i = 0; i < hw; ++i) {
      if (!inside(i)) continue;
      count += 1;
      const double zi = z[n * hw + i], gi = target[n * hw + i], p = sigmoid(zi);
      sp += p;
      spg += p * gi;
      sg += gi;
      sb += bce(zi, gi);
    }
    const double num = 2 * spg + eps, den = sp + sg + eps;
    out.loss[n] = dice_weight * (1 - num / den) + (count > 0 ? bce_weight * sb / count : 0.0);
    // Chain rule pixel by pixel, then through the resampling matrices.
    const RefResize m(g);
    for (int64_t y = 0; y < g.out_h; ++y)
      for (int64_t x = 0; x < g.out_w; ++x) {
        const int64_t i = y * g.out_w + x;
        if (!inside(i)) continue;
        const double zi = z[n * hw + i], gi = target[n * hw + i], p = sigmoid(zi);
        const double ddice_dp = -(2 * gi * den - num) / (den * den);
        const double dz = dice_weight * ddice_dp * p * (1 - p) + bce_weight * (p - gi) / count;
        for (int64_t r = 0; r < g.in_h; ++r)
          for (int64_t c = 0; c < g.in_w; ++c)
            out.grad[(n * g.in_h + r) * g.in_w + c] += m.wy[y * g.in_h + r] * m.wx[x * g.in_w + c] * dz;
      }
  }
  return out;
}

}  // namespace hsft::test
