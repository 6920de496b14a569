// Math shared by the CPU and CUDA mask kernels: bilinear source taps (PyTorch's
// align_corners=False rule), the logistic terms of one logit, the Dice+BCE value and its
// per-pixel gradient coefficients. Everything here is inline and host+device so that the
// two back ends compute the same numbers from one definition.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define HSFT_HD __host__ __device__ __forceinline__
#else
#define HSFT_HD inline
#endif

namespace hsft {

// Per-mask sums kept by the Dice+BCE forward and reused by its backward, over the pixels inside the
// field of view (every pixel when there is none); kSumCount is the number of those pixels.
enum MaskSum : int { kSumProb = 0, kSumProbTarget = 1, kSumTarget = 2, kSumBce = 3, kSumCount = 4, kNumSums = 5 };
// Columns of mask_stats.
enum MaskStat : int { kStatIntersection = 0, kStatPred = 1, kStatTarget = 2, kStatUnion = 3, kNumStats = 4 };

// The two source indices and weights of one output coordinate along one axis.
template <typename T>
struct LinearTap {
  int32_t i0;
  int32_t i1;
  T w0;
  T w1;
};

// Ratio in/out in the compute type, as F.interpolate computes it when given `size`.
template <typename T>
HSFT_HD T linear_scale(int64_t in_size, int64_t out_size) {
  return static_cast<T>(in_size) / static_cast<T>(out_size);
}

// Source taps of output coordinate `out_index` for bilinear, align_corners=False. Mirrors the
// rule of F.interpolate (equal sizes copy; the source coordinate is clamped at 0 from below;
// the upper neighbour is clamped to the last index), so results agree with PyTorch.
template <typename T>
HSFT_HD LinearTap<T> linear_tap(int64_t out_index, int64_t in_size, int64_t out_size, T scale) {
  LinearTap<T> tap;
  if (in_size == out_size) {
    tap.i0 = static_cast<int32_t>(out_index);
    tap.i1 = static_cast<int32_t>(out_index);
    tap.w0 = T(1);
    tap.w1 = T(0);
    return tap;
  }
  T src = scale * (static_cast<T>(out_index) + T(0.5)) - T(0.5);
  if (src < T(0)) src = T(0);
  int64_t i0 = static_cast<int64_t>(src);  // src >= 0, so truncation is floor
  if (i0 > in_size - 1) i0 = in_size - 1;
  T lambda = src - static_cast<T>(i0);
  if (lambda < T(0)) lambda = T(0);
  if (lambda > T(1)) lambda = T(1);
  tap.i0 = static_cast<int32_t>(i0);
  tap.i1 = static_cast<int32_t>(i0 < in_size - 1 ? i0 + 1 : i0);
  tap.w1 = lambda;
  tap.w0 = T(1) - lambda;
  return tap;
}

// Bilinear value at one output pixel, in PyTorch's order of operations (interpolate along x
// in the two source rows, then along y) so that thresholds agree bit for bit on CPU.
template <typename T>
HSFT_HD T bilinear_value(const T* plane, int64_t in_w, const LinearTap<T>& ty, const LinearTap<T>& tx) {
  const T* row0 = plane + static_cast<int64_t>(ty.i0) * in_w;
  const T* row1 = plane + static_cast<int64_t>(ty.i1) * in_w;
  const T top = row0[tx.i0] * tx.w0 + row0[tx.i1] * tx.w1;
  const T bottom = row1[tx.i0] * tx.w0 + row1[tx.i1] * tx.w1;
  return top * ty.w0 + bottom * ty.w1;
}

// First output index owned by each input index: output i is owned by input tap(i).i0, which is
// non-decreasing in i. `owner_start` has in_size + 1 entries; owner_start[in_size] = out_size.
// Call with out_index in [0, out_size]; it writes the entries that this output index starts.
template <typename T>
HSFT_HD void fill_owner_start(int64_t out_index, int64_t in_size, int64_t out_size, T scale,
                              int32_t* owner_start) {
  const int64_t prev = out_index == 0 ? -1 : linear_tap<T>(out_index - 1, in_size, out_size, scale).i0;
  const int64_t cur = out_index == out_size ? in_size : linear_tap<T>(out_index, in_size, out_size, scale).i0;
  for (int64_t i = prev + 1; i <= cur; ++i) owner_start[i] = static_cast<int32_t>(out_index);
}

// ---- logistic terms -------------------------------------------------------------------------

// Terms of one logit z: p = sigmoid(z), softplus = log(1 + exp(-|z|)) (the stable part of
// BCE-with-logits), dp = p * (1 - p) computed from exp(-|z|) so it stays accurate for |z| >> 1.
template <typename T>
struct LogisticTerms {
  T p;
  T softplus;
  T dp;
};

// exp(t) for t <= 0 in float, branch-free so loops over it vectorise: Cody-Waite reduction by
// ln 2 and a degree-7 Taylor polynomial on |r| <= ln(2)/2 (relative error < 1e-8 before the
// final rounding). Inputs below -87 are clamped; exp(-87) ~ 1.6e-38 is still a normal float.
HSFT_HD float exp_nonpositive(float t) {
  t = t < -87.0f ? -87.0f : t;
  // Round t / ln 2 to the nearest integer with the 1.5 * 2^23 trick (|t / ln 2| < 2^22).
  const float shifter = 12582912.0f;
  float k = t * 1.44269504088896341f + shifter;
  k = k - shifter;
  const float r = (t - k * 0.693359375f) - k * -2.12194440e-4f;
  float poly = 1.0f / 5040.0f;
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  // 2^k with k in [-126, 0]: build the exponent field directly.
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
#if defined(__CUDA_ARCH__)
  const float scale = __int_as_float(bits);
#else
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
#endif
  return poly * scale;
}

// log(1 + e) for e in [0, 1] in float: log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3, by its
// odd series truncated after s^15 (relative error < 2e-9). Accurate for tiny e, branch-free.
HSFT_HD float log1p_unit(float e) {
  const float s = e / (2.0f + e);
  const float s2 = s * s;
  float poly = 1.0f / 15.0f;
  poly = poly * s2 + 1.0f / 13.0f;
  poly = poly * s2 + 1.0f / 11.0f;
  poly = poly * s2 + 1.0f / 9.0f;
  poly = poly * s2 + 1.0f / 7.0f;
  poly = poly * s2 + 1.0f / 5.0f;
  poly = poly * s2 + 1.0f / 3.0f;
  poly = poly * s2 + 1.0f;
  return 2.0f * s * poly;
}

HSFT_HD LogisticTerms<float> logistic_terms(float z) {
  const float az = z < 0.0f ? -z : z;
  const float e = exp_nonpositive(-az);
  const float r = 1.0f / (1.0f + e);
  LogisticTerms<float> out;
  out.p = z >= 0.0f ? r : e * r;
  out.softplus = log1p_unit(e);
  out.dp = e * r * r;
  return out;
}

// float64 keeps the library functions: it is the precision gradcheck runs in.
HSFT_HD LogisticTerms<double> logistic_terms(double z) {
  const double e = exp(-fabs(z));
  const double r = 1.0 / (1.0 + e);
  LogisticTerms<double> out;
  out.p = z >= 0.0 ? r : e * r;
  out.softplus = log1p(e);
  out.dp = e * r * r;
  return out;
}

// BCE-with-logits of logit z against target g, given the logistic terms of z.
template <typename T>
HSFT_HD T bce_with_logits(T z, T g, T softplus) {
  return (z > T(0) ? z : T(0)) - z * g + softplus;
}

// ---- targets --------------------------------------------------------------------------------

// Target value in [0, 1]: bool / uint8 targets count any non-zero byte as foreground (so a
// 0/255 mask means the same as a 0/1 mask); float targets are used as they are (soft labels).
template <typename T>
HSFT_HD T target_value(uint8_t v) {
  return v != 0 ? T(1) : T(0);
}
template <typename T>
HSFT_HD T target_value(float v) {
  return static_cast<T>(v);
}
template <typename T>
HSFT_HD T target_value(double v) {
  return static_cast<T>(v);
}

// Foreground test for mask_stats: non-zero byte, or float above 0.5.
HSFT_HD bool target_positive(uint8_t v) { return v != 0; }
HSFT_HD bool target_positive(float v) { return v > 0.5f; }
HSFT_HD bool target_positive(double v) { return v > 0.5; }

// ---- Dice + BCE -----------------------------------------------------------------------------

// Loss of one mask from its sums over the sums[kSumCount] pixels inside its field of view:
//   dice_weight * (1 - (2 sum(p g) + eps) / (sum p + sum g + eps)) + bce_weight * mean(bce).
// An empty field of view has no BCE term (a mean over no pixels counts as 0).
HSFT_HD double dice_bce_value(const double* sums, double dice_weight, double bce_weight, double eps) {
  const double dice = 1.0 - (2.0 * sums[kSumProbTarget] + eps) / (sums[kSumProb] + sums[kSumTarget] + eps);
  const double count = sums[kSumCount];
  return dice_weight * dice + (count > 0.0 ? bce_weight * sums[kSumBce] / count : 0.0);
}

// dL/dz at a pixel inside the field of view is (a + b g) * p (1 - p) + c (p - g), with a, b, c per
// mask (outside it, 0):
//   d dice / d p = (I - 2 g D) / D^2 with I = 2 sum(p g) + eps, D = sum p + sum g + eps,
//   d mean(bce) / d z = (p - g) / count; everything scaled by the incoming gradient.
template <typename T>
struct DiceBceGradCoefficients {
  T a;
  T b;
  T c;
};

template <typename T>
HSFT_HD DiceBceGradCoefficients<T> dice_bce_grad_coefficients(const double* sums, double grad_loss,
                                                               double dice_weight, double bce_weight,
                                                               double eps) {
  const double inter = 2.0 * sums[kSumProbTarget] + eps;
  const double denom = sums[kSumProb] + sums[kSumTarget] + eps;
  const double count = sums[kSumCount];
  DiceBceGradCoefficients<T> k;
  k.a = static_cast<T>(grad_loss * dice_weight * inter / (denom * denom));
  k.b = static_cast<T>(-grad_loss * dice_weight * 2.0 / denom);
  k.c = static_cast<T>(count > 0.0 ? grad_loss * bce_weight / count : 0.0);
  return k;
}

template <typename T>
HSFT_HD T dice_bce_pixel_grad(const DiceBceGradCoefficients<T>& k, const LogisticTerms<T>& t, T g) {
  return (k.a + k.b * g) * t.dp + k.c * (t.p - g);
}

// ---- the gradient computed in the forward pass ----------------------------------------------

// dL/dz = a dp + b (g dp) + c (p - g) is linear in the per-mask scalars a, b, c, which are known only
// once the forward's sums are. So the forward accumulates the three planes U^T(m dp), U^T(m g dp) and
// U^T(m (p - g)) at the logits' resolution (U the upsampling, m the field of view), and the backward
// is a * plane0 + b * plane1 + c * plane2: one elementwise pass over the low-resolution planes.
enum AdjointPlane : int { kAdjointDp = 0, kAdjointTargetDp = 1, kAdjointProbMinusTarget = 2, kNumAdjoint = 3 };

template <typename T>
struct PixelAdjoint {
  T v[kNumAdjoint];
};

// The three per-pixel values of the adjoint planes; m is 1 inside the field of view, 0 outside.
template <typename T>
HSFT_HD PixelAdjoint<T> dice_bce_pixel_adjoint(const LogisticTerms<T>& t, T g, T m) {
  PixelAdjoint<T> out;
  const T dp = t.dp * m;
  out.v[kAdjointDp] = dp;
  out.v[kAdjointTargetDp] = g * dp;
  out.v[kAdjointProbMinusTarget] = (t.p - g) * m;
  return out;
}

// Gradient at one low-resolution cell from its three adjoint values.
template <typename T>
HSFT_HD T dice_bce_grad_from_adjoint(const DiceBceGradCoefficients<T>& k, T dp, T target_dp, T prob_minus_target) {
  return k.a * dp + k.b * target_dp + k.c * prob_minus_target;
}

// ---- 16-bit floating-point storage ----------------------------------------------------------

// bfloat16 / float16 values as stored (raw bits), read and written by the kernels directly so that
// half-precision logits and gradients need no conversion pass. Conversions round to nearest even.
struct BFloat16Bits {
  uint16_t bits;
};
struct Float16Bits {
  uint16_t bits;
};

HSFT_HD float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float out;
  __builtin_memcpy(&out, &bits, sizeof(out));
  return out;
#endif
}

HSFT_HD uint32_t float_to_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t out;
  __builtin_memcpy(&out, &value, sizeof(out));
  return out;
#endif
}

HSFT_HD float to_compute(BFloat16Bits v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }

HSFT_HD float to_compute(Float16Bits v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exponent = (v.bits >> 10) & 0x1fu;
  const uint32_t mantissa = v.bits & 0x3ffu;
  if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf / nan
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  // Zero or subnormal: mantissa * 2^-24, exact in float.
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
  return sign != 0 ? -magnitude : magnitude;
}

HSFT_HD float to_compute(float v) { return v; }
HSFT_HD double to_compute(double v) { return v; }

// Stores a compute value in an element of a plane: float and double as they are, 16-bit types
// rounded to nearest even (what PyTorch's conversions do).
HSFT_HD void store(float* out, float v) { *out = v; }
HSFT_HD void store(double* out, double v) { *out = v; }

HSFT_HD void store(BFloat16Bits* out, float v) {
  const uint32_t bits = float_to_bits(v);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    out->bits = static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet nan
  } else {
    out->bits = static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
}

HSFT_HD void store(Float16Bits* out, float v) {
  const uint32_t bits = float_to_bits(v);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) {
    out->bits = static_cast<uint16_t>(sign | 0x7e00u);
  } else if (magnitude >= 0x477ff000u) {
    out->bits = static_cast<uint16_t>(sign | 0x7c00u);  // rounds to infinity
  } else if (magnitude >= 0x38800000u) {
    // Normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even.
    const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
    out->bits = static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
  } else {
    // Subnormal or zero: v * 2^24 rounded to an integer, nearest even (adding 2^23 makes the float
    // addition do that rounding, for values below 2^10).
    const float shifted = bits_to_float(magnitude) * 16777216.0f + 8388608.0f;
    out->bits = static_cast<uint16_t>(sign | (float_to_bits(shifted) - 0x4b000000u));
  }
}

}  // namespace hsft
