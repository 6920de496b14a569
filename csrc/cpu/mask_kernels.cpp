#include "cpu/mask_kernels.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/mask_math.h"

namespace hsft::cpu {
namespace {

// The per-row loops are compiled for AVX-512, AVX2 and baseline x86-64 and the loader picks one
// for the CPU it runs on (a portable wheel, still vectorised wide). Multiply-add contraction is
// off (CMakeLists.txt), so every variant computes the same bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define HSFT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HSFT_CPU_CLONES
#endif
#if defined(__clang__)
#define HSFT_NO_UNROLL _Pragma("clang loop unroll(disable)")
#elif defined(__GNUC__)
#define HSFT_NO_UNROLL _Pragma("GCC unroll 1")
#else
#define HSFT_NO_UNROLL
#endif

// Independent accumulators per loop lane: the compiler keeps them in vector registers without
// reassociating floating-point sums, and the summation order stays fixed.
constexpr int kLanes = 16;
// Smallest amount of full-resolution pixels worth handing to a thread at once.
constexpr int64_t kPixelsPerChunk = 32768;

// Source taps of every output coordinate along one axis, and the first output coordinate owned
// by each input coordinate (see fill_owner_start).
template <typename T>
struct AxisTaps {
  std::vector<int32_t> i0, i1;
  std::vector<T> w0, w1;
  std::vector<int32_t> owner_start;

  AxisTaps(int64_t in_size, int64_t out_size)
      : i0(out_size), i1(out_size), w0(out_size), w1(out_size), owner_start(in_size + 1) {
    const T scale = linear_scale<T>(in_size, out_size);
    for (int64_t o = 0; o < out_size; ++o) {
      const LinearTap<T> tap = linear_tap<T>(o, in_size, out_size, scale);
      i0[o] = tap.i0;
      i1[o] = tap.i1;
      w0[o] = tap.w0;
      w1[o] = tap.w1;
    }
    for (int64_t o = 0; o <= out_size; ++o) fill_owner_start<T>(o, in_size, out_size, scale, owner_start.data());
  }
};

template <typename T>
struct Taps {
  AxisTaps<T> y;
  AxisTaps<T> x;
  explicit Taps(const MaskGeometry& g) : y(g.in_h, g.out_h), x(g.in_w, g.out_w) {}
};

int64_t task_grain(const MaskGeometry& g) {
  const int64_t pixels_per_task = std::max<int64_t>(1, (g.out_h + g.in_h - 1) / g.in_h) * g.out_w;
  return std::max<int64_t>(1, kPixelsPerChunk / pixels_per_task);
}

// Interpolates low-resolution row `row` along x to full width: PyTorch's first step.
template <typename T>
void interpolate_row_x(const T* row, const AxisTaps<T>& tx, int64_t out_w, T* out) {
  const int32_t* i0 = tx.i0.data();
  const int32_t* i1 = tx.i1.data();
  const T* w0 = tx.w0.data();
  const T* w1 = tx.w1.data();
  for (int64_t x = 0; x < out_w; ++x) out[x] = row[i0[x]] * w0[x] + row[i1[x]] * w1[x];
}

// Adjoint of interpolate_row_x: out (in_w) = sum over x of the taps' weights times in[x].
template <typename T>
void scatter_row_x(const T* in, const AxisTaps<T>& tx, int64_t out_w, int64_t in_w, T* out) {
  std::fill(out, out + in_w, T(0));
  const int32_t* i0 = tx.i0.data();
  const int32_t* i1 = tx.i1.data();
  const T* w0 = tx.w0.data();
  const T* w1 = tx.w1.data();
  for (int64_t x = 0; x < out_w; ++x) {
    out[i0[x]] += w0[x] * in[x];
    out[i1[x]] += w1[x] * in[x];
  }
}

// Adds the sums of one full-resolution row to lane accumulators (sums[k][lane]). With kMasked,
// only the pixels where fov is non-zero count (fov may be null otherwise).
template <bool kMasked, typename T, typename G>
HSFT_CPU_CLONES void forward_row(const T* top, const T* bottom, T wy0, T wy1, const G* target, const uint8_t* fov,
                                 int64_t out_w, T* g_row, T* m_row, T (&sums)[kNumSums][kLanes]) {
  // Target values (and field-of-view weights) first, in their own loop: mixing byte loads into the
  // main loop makes the vectoriser pick narrow vectors for all of it.
  for (int64_t x = 0; x < out_w; ++x) g_row[x] = target_value<T>(target[x]);
  if (kMasked)
    for (int64_t x = 0; x < out_w; ++x) m_row[x] = fov[x] != 0 ? T(1) : T(0);
  // Local copies: the compiler cannot prove `sums` does not alias the inputs, and would
  // otherwise store the accumulators back to memory on every iteration.
  T sp[kLanes], spg[kLanes], sg[kLanes], sb[kLanes];
  for (int k = 0; k < kLanes; ++k) {
    sp[k] = sums[kSumProb][k];
    spg[k] = sums[kSumProbTarget][k];
    sg[k] = sums[kSumTarget][k];
    sb[k] = sums[kSumBce][k];
  }
  int64_t x = 0;
  for (; x + kLanes <= out_w; x += kLanes) {
    // Kept as a loop (not unrolled) so that it is vectorised across the lanes.
    HSFT_NO_UNROLL
    for (int k = 0; k < kLanes; ++k) {
      const T z = top[x + k] * wy0 + bottom[x + k] * wy1;
      const LogisticTerms<T> t = logistic_terms(z);
      const T m = kMasked ? m_row[x + k] : T(1);
      const T g = kMasked ? g_row[x + k] * m : g_row[x + k];
      const T p = kMasked ? t.p * m : t.p;
      const T bce = bce_with_logits(z, g_row[x + k], t.softplus);
      sp[k] += p;
      spg[k] += p * g;
      sg[k] += g;
      sb[k] += kMasked ? bce * m : bce;
    }
  }
  for (int k = 0; x < out_w; ++x, ++k) {
    const T z = top[x] * wy0 + bottom[x] * wy1;
    const LogisticTerms<T> t = logistic_terms(z);
    const T m = kMasked ? m_row[x] : T(1);
    const T g = kMasked ? g_row[x] * m : g_row[x];
    const T p = kMasked ? t.p * m : t.p;
    const T bce = bce_with_logits(z, g_row[x], t.softplus);
    sp[k] += p;
    spg[k] += p * g;
    sg[k] += g;
    sb[k] += kMasked ? bce * m : bce;
  }
  for (int k = 0; k < kLanes; ++k) {
    sums[kSumProb][k] = sp[k];
    sums[kSumProbTarget][k] = spg[k];
    sums[kSumTarget][k] = sg[k];
    sums[kSumBce][k] = sb[k];
  }
}

// Accumulates the row's dL/dz, weighted by the two vertical taps, into acc_top / acc_bottom. With
// kMasked, pixels where fov is 0 contribute nothing. The field of view is a template parameter, not
// a null test inside the loop: a conditional load there keeps the loop from being vectorised.
template <bool kMasked, typename T, typename G>
HSFT_CPU_CLONES void backward_row(const T* __restrict__ top, const T* __restrict__ bottom, T wy0, T wy1,
                                  const G* __restrict__ target, const uint8_t* __restrict__ fov, int64_t out_w,
                                  const DiceBceGradCoefficients<T>& coeff, T* __restrict__ m_row,
                                  T* __restrict__ acc_top, T* __restrict__ acc_bottom) {
  // Field-of-view weights first, in their own loop, as in forward_row.
  if (kMasked)
    for (int64_t x = 0; x < out_w; ++x) m_row[x] = fov[x] != 0 ? T(1) : T(0);
  for (int64_t x = 0; x < out_w; ++x) {
    const T z = top[x] * wy0 + bottom[x] * wy1;
    const LogisticTerms<T> t = logistic_terms(z);
    T dz = dice_bce_pixel_grad(coeff, t, target_value<T>(target[x]));
    if (kMasked) dz *= m_row[x];
    acc_top[x] += wy0 * dz;
    acc_bottom[x] += wy1 * dz;
  }
}

template <typename T, typename G>
void dice_bce_forward_typed(const T* logits, const G* target, const uint8_t* fov, const MaskGeometry& g,
                            double dice_weight, double bce_weight, double eps, double* sums, double* losses,
                            const TaskRunner& runner) {
  const Taps<T> taps(g);
  const int64_t num_tasks = g.num_masks * g.in_h;
  std::vector<double> partial(static_cast<size_t>(num_tasks) * kNumSums);
  runner(num_tasks, task_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(4 * g.out_w);
    T* top = scratch.data();
    T* bottom = top + g.out_w;
    T* g_row = bottom + g.out_w;
    T* m_row = g_row + g.out_w;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / g.in_h;
      const int64_t r = task % g.in_h;
      double task_sums[kNumSums] = {0.0, 0.0, 0.0, 0.0, 0.0};
      const int32_t y_begin = taps.y.owner_start[r];
      const int32_t y_end = taps.y.owner_start[r + 1];
      if (y_begin < y_end) {
        const T* plane = logits + n * g.in_h * g.in_w;
        interpolate_row_x(plane + r * g.in_w, taps.x, g.out_w, top);
        interpolate_row_x(plane + taps.y.i1[y_begin] * g.in_w, taps.x, g.out_w, bottom);
        for (int32_t y = y_begin; y < y_end; ++y) {
          T lanes[kNumSums][kLanes] = {};
          const int64_t offset = (n * g.out_h + y) * g.out_w;
          if (fov == nullptr) {
            forward_row<false>(top, bottom, taps.y.w0[y], taps.y.w1[y], target + offset, nullptr, g.out_w, g_row,
                               m_row, lanes);
            task_sums[kSumCount] += static_cast<double>(g.out_w);
          } else {
            forward_row<true>(top, bottom, taps.y.w0[y], taps.y.w1[y], target + offset, fov + offset, g.out_w,
                              g_row, m_row, lanes);
            int64_t inside = 0;
            for (int64_t x = 0; x < g.out_w; ++x) inside += fov[offset + x] != 0;
            task_sums[kSumCount] += static_cast<double>(inside);
          }
          for (int s = 0; s < kSumCount; ++s)
            for (int k = 0; k < kLanes; ++k) task_sums[s] += static_cast<double>(lanes[s][k]);
        }
      }
      std::copy(task_sums, task_sums + kNumSums, partial.data() + task * kNumSums);
    }
  });
  for (int64_t n = 0; n < g.num_masks; ++n) {
    double* mask_sums = sums + n * kNumSums;
    std::fill(mask_sums, mask_sums + kNumSums, 0.0);
    for (int64_t r = 0; r < g.in_h; ++r)
      for (int s = 0; s < kNumSums; ++s) mask_sums[s] += partial[(n * g.in_h + r) * kNumSums + s];
    losses[n] = dice_bce_value(mask_sums, dice_weight, bce_weight, eps);
  }
}

template <typename T, typename G>
void dice_bce_backward_typed(const T* logits, const G* target, const uint8_t* fov, const MaskGeometry& g,
                             const double* sums,
                             const double* grad_loss, double dice_weight, double bce_weight, double eps,
                             T* grad_logits, const TaskRunner& runner) {
  const Taps<T> taps(g);
  const int64_t num_tasks = g.num_masks * g.in_h;
  // A task's full-resolution rows also feed the next low-resolution row; that part goes to
  // `carry` and is added in a second pass, so no two tasks write the same element.
  std::vector<T> carry(static_cast<size_t>(num_tasks) * g.in_w);
  runner(num_tasks, task_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(5 * g.out_w);
    T* top = scratch.data();
    T* bottom = top + g.out_w;
    T* acc_top = bottom + g.out_w;
    T* acc_bottom = acc_top + g.out_w;
    T* m_row = acc_bottom + g.out_w;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / g.in_h;
      const int64_t r = task % g.in_h;
      T* self_row = grad_logits + task * g.in_w;
      T* carry_row = carry.data() + task * g.in_w;
      const int32_t y_begin = taps.y.owner_start[r];
      const int32_t y_end = taps.y.owner_start[r + 1];
      if (y_begin == y_end) {
        std::fill(self_row, self_row + g.in_w, T(0));
        std::fill(carry_row, carry_row + g.in_w, T(0));
        continue;
      }
      const DiceBceGradCoefficients<T> coeff = dice_bce_grad_coefficients<T>(
          sums + n * kNumSums, grad_loss[n], dice_weight, bce_weight, eps);
      const T* plane = logits + n * g.in_h * g.in_w;
      const int32_t r1 = taps.y.i1[y_begin];
      interpolate_row_x(plane + r * g.in_w, taps.x, g.out_w, top);
      interpolate_row_x(plane + r1 * g.in_w, taps.x, g.out_w, bottom);
      std::fill(acc_top, acc_top + 2 * g.out_w, T(0));
      for (int32_t y = y_begin; y < y_end; ++y) {
        const int64_t offset = (n * g.out_h + y) * g.out_w;
        if (fov == nullptr)
          backward_row<false>(top, bottom, taps.y.w0[y], taps.y.w1[y], target + offset, nullptr, g.out_w, coeff,
                              m_row, acc_top, acc_bottom);
        else
          backward_row<true>(top, bottom, taps.y.w0[y], taps.y.w1[y], target + offset, fov + offset, g.out_w, coeff,
                             m_row, acc_top, acc_bottom);
      }
      if (r1 == r) {
        // Last row: both vertical taps point at this row.
        for (int64_t x = 0; x < g.out_w; ++x) acc_top[x] += acc_bottom[x];
        std::fill(carry_row, carry_row + g.in_w, T(0));
      } else {
        scatter_row_x(acc_bottom, taps.x, g.out_w, g.in_w, carry_row);
      }
      scatter_row_x(acc_top, taps.x, g.out_w, g.in_w, self_row);
    }
  });
  runner(num_tasks, std::max<int64_t>(1, kPixelsPerChunk / g.in_w), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      if (task % g.in_h == 0) continue;
      T* row = grad_logits + task * g.in_w;
      const T* from_above = carry.data() + (task - 1) * g.in_w;
      for (int64_t c = 0; c < g.in_w; ++c) row[c] += from_above[c];
    }
  });
}

template <typename T, typename G>
void mask_stats_typed(const T* logits, const G* target, const uint8_t* fov, const MaskGeometry& g, int64_t* stats,
                      const TaskRunner& runner) {
  const Taps<T> taps(g);
  const int64_t num_tasks = g.num_masks * g.in_h;
  std::vector<int64_t> partial(static_cast<size_t>(num_tasks) * kNumStats);
  runner(num_tasks, task_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(2 * g.out_w);
    T* top = scratch.data();
    T* bottom = top + g.out_w;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / g.in_h;
      const int64_t r = task % g.in_h;
      int64_t inter = 0, pred = 0, gt = 0;
      const int32_t y_begin = taps.y.owner_start[r];
      const int32_t y_end = taps.y.owner_start[r + 1];
      if (y_begin < y_end) {
        const T* plane = logits + n * g.in_h * g.in_w;
        interpolate_row_x(plane + r * g.in_w, taps.x, g.out_w, top);
        interpolate_row_x(plane + taps.y.i1[y_begin] * g.in_w, taps.x, g.out_w, bottom);
        for (int32_t y = y_begin; y < y_end; ++y) {
          const T wy0 = taps.y.w0[y];
          const T wy1 = taps.y.w1[y];
          const int64_t offset = (n * g.out_h + y) * g.out_w;
          const G* target_row = target + offset;
          const uint8_t* fov_row = fov == nullptr ? nullptr : fov + offset;
          int32_t row_inter = 0, row_pred = 0, row_gt = 0;
          for (int64_t x = 0; x < g.out_w; ++x) {
            const int32_t inside = fov_row == nullptr ? 1 : (fov_row[x] != 0);
            const int32_t p = (top[x] * wy0 + bottom[x] * wy1 > T(0)) ? inside : 0;
            const int32_t t = target_positive(target_row[x]) ? inside : 0;
            row_inter += p & t;
            row_pred += p;
            row_gt += t;
          }
          inter += row_inter;
          pred += row_pred;
          gt += row_gt;
        }
      }
      int64_t* out = partial.data() + task * kNumStats;
      out[kStatIntersection] = inter;
      out[kStatPred] = pred;
      out[kStatTarget] = gt;
      out[kStatUnion] = pred + gt - inter;
    }
  });
  for (int64_t n = 0; n < g.num_masks; ++n) {
    int64_t* out = stats + n * kNumStats;
    std::fill(out, out + kNumStats, int64_t{0});
    for (int64_t r = 0; r < g.in_h; ++r)
      for (int s = 0; s < kNumStats; ++s) out[s] += partial[(n * g.in_h + r) * kNumStats + s];
  }
}

template <typename Fn>
void dispatch_plane(TargetPlanes target, Fn&& fn) {
  switch (target.type) {
    case PlaneType::kByte:
      fn(static_cast<const uint8_t*>(target.data));
      return;
    case PlaneType::kFloat32:
      fn(static_cast<const float*>(target.data));
      return;
    case PlaneType::kFloat64:
      fn(static_cast<const double*>(target.data));
      return;
  }
  throw std::invalid_argument("hsft mask kernels: unknown target plane type");
}

}  // namespace

void run_serial(int64_t num_tasks, int64_t /*grain*/, const TaskBody& body) {
  if (num_tasks > 0) body(0, num_tasks);
}

void check_geometry(const MaskGeometry& g) {
  if (g.num_masks < 0) throw std::invalid_argument("hsft mask kernels: negative number of masks");
  if (g.in_h < 1 || g.in_w < 1 || g.out_h < 1 || g.out_w < 1)
    throw std::invalid_argument("hsft mask kernels: logits and target sizes must be positive, got logits " +
                                std::to_string(g.in_h) + "x" + std::to_string(g.in_w) + " and target " +
                                std::to_string(g.out_h) + "x" + std::to_string(g.out_w));
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (g.in_h >= kMax || g.in_w >= kMax || g.out_h >= kMax || g.out_w >= kMax)
    throw std::invalid_argument("hsft mask kernels: a side of 2^31 or more is not supported");
}

template <typename T>
void dice_bce_forward(const T* logits, TargetPlanes target, const uint8_t* fov, const MaskGeometry& geometry,
                      double dice_weight, double bce_weight, double eps, double* sums, double* losses,
                      const TaskRunner& runner) {
  check_geometry(geometry);
  dispatch_plane(target, [&](const auto* planes) {
    dice_bce_forward_typed(logits, planes, fov, geometry, dice_weight, bce_weight, eps, sums, losses, runner);
  });
}

template <typename T>
void dice_bce_backward(const T* logits, TargetPlanes target, const uint8_t* fov, const MaskGeometry& geometry,
                       const double* sums, const double* grad_loss, double dice_weight, double bce_weight, double eps,
                       T* grad_logits, const TaskRunner& runner) {
  check_geometry(geometry);
  dispatch_plane(target, [&](const auto* planes) {
    dice_bce_backward_typed(logits, planes, fov, geometry, sums, grad_loss, dice_weight, bce_weight, eps,
                            grad_logits, runner);
  });
}

template <typename T>
void upsample_masks(const T* logits, const MaskGeometry& g, T threshold, T* values, uint8_t* above,
                    const TaskRunner& runner) {
  check_geometry(g);
  const Taps<T> taps(g);
  runner(g.num_masks * g.in_h, task_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(2 * g.out_w);
    T* top = scratch.data();
    T* bottom = top + g.out_w;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / g.in_h;
      const int64_t r = task % g.in_h;
      const int32_t y_begin = taps.y.owner_start[r];
      const int32_t y_end = taps.y.owner_start[r + 1];
      if (y_begin == y_end) continue;
      const T* plane = logits + n * g.in_h * g.in_w;
      interpolate_row_x(plane + r * g.in_w, taps.x, g.out_w, top);
      interpolate_row_x(plane + taps.y.i1[y_begin] * g.in_w, taps.x, g.out_w, bottom);
      for (int32_t y = y_begin; y < y_end; ++y) {
        const T wy0 = taps.y.w0[y];
        const T wy1 = taps.y.w1[y];
        const int64_t offset = (n * g.out_h + y) * g.out_w;
        if (values != nullptr) {
          T* out = values + offset;
          for (int64_t x = 0; x < g.out_w; ++x) out[x] = top[x] * wy0 + bottom[x] * wy1;
        }
        if (above != nullptr) {
          uint8_t* out = above + offset;
          for (int64_t x = 0; x < g.out_w; ++x) out[x] = (top[x] * wy0 + bottom[x] * wy1) > threshold ? 1 : 0;
        }
      }
    }
  });
}

template <typename T>
void mask_stats(const T* logits, TargetPlanes target, const uint8_t* fov, const MaskGeometry& geometry,
                int64_t* stats, const TaskRunner& runner) {
  check_geometry(geometry);
  dispatch_plane(target,
                 [&](const auto* planes) { mask_stats_typed(logits, planes, fov, geometry, stats, runner); });
}

#define HSFT_INSTANTIATE(T)                                                                                         \
  template void dice_bce_forward<T>(const T*, TargetPlanes, const uint8_t*, const MaskGeometry&, double, double,  \
                                    double, double*, double*, const TaskRunner&);                                   \
  template void dice_bce_backward<T>(const T*, TargetPlanes, const uint8_t*, const MaskGeometry&, const double*,    \
                                     const double*, double, double, double, T*, const TaskRunner&);                 \
  template void upsample_masks<T>(const T*, const MaskGeometry&, T, T*, uint8_t*, const TaskRunner&);               \
  template void mask_stats<T>(const T*, TargetPlanes, const uint8_t*, const MaskGeometry&, int64_t*,                \
                              const TaskRunner&);

HSFT_INSTANTIATE(float)
HSFT_INSTANTIATE(double)
#undef HSFT_INSTANTIATE

}  // namespace hsft::cpu
