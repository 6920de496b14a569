// How one output coordinate of the fused Dice+BCE op samples the logits along one axis, for the two
// resize modes, and which low-resolution coordinates its gradient goes to. Inline host+device: the
// CPU kernels, the CUDA kernels and the host emulation of the CUDA blocks use these functions.
//
//   one step   logits (in) -> output (out): bilinear, align_corners=False, as F.interpolate.
//   two steps  logits (in) -> intermediate (mid) -> output (out), both bilinear align_corners=False:
//              the release's convention (its predictor returns 1024 x 1024 masks, resized to the
//              image after). The intermediate grid is never stored: an intermediate row is made
//              from two logit rows when it is needed, exactly as the first F.interpolate computes it.
//
// Either way an output coordinate reads two rows (columns) of a "source grid" (the logits in one
// step, the intermediate grid in two), and its value is linear in at most three consecutive logit
// rows starting at `base` (two in one step; three in two steps because the two intermediate rows
// may straddle a logit row). Those weights are what the gradient needs.
#pragma once

#include <cstdint>

#include "common/mask_math.h"

namespace hsft {

constexpr int kMaxAdjointRows = 3;

template <typename T>
struct AxisPlan {
  int32_t s0;  // source-grid coordinates read, and their weights (F.interpolate's order)
  int32_t s1;
  T v0;
  T v1;
  int32_t base;            // first logit coordinate the value depends on
  T c[kMaxAdjointRows];    // d value / d logit[base + j]
};

// Sizes along one axis; mid == 0 means one step.
struct AxisSizes {
  int64_t in;
  int64_t mid;
  int64_t out;
};

HSFT_HD bool is_two_step(const AxisSizes& a) { return a.mid > 0; }

// Adds weight w on logit coordinate i to the plan (relative to its base).
template <typename T>
HSFT_HD void add_adjoint(AxisPlan<T>& plan, int32_t i, T w) {
  plan.c[i - plan.base] += w;
}

template <typename T>
HSFT_HD AxisPlan<T> axis_plan(int64_t o, const AxisSizes& a) {
  AxisPlan<T> plan;
  plan.c[0] = T(0);
  plan.c[1] = T(0);
  plan.c[2] = T(0);
  if (!is_two_step(a)) {
    const LinearTap<T> t = linear_tap<T>(o, a.in, a.out, linear_scale<T>(a.in, a.out));
    plan.s0 = t.i0;
    plan.s1 = t.i1;
    plan.v0 = t.w0;
    plan.v1 = t.w1;
    plan.base = t.i0;
    add_adjoint(plan, t.i0, t.w0);
    add_adjoint(plan, t.i1, t.w1);
    return plan;
  }
  const LinearTap<T> second = linear_tap<T>(o, a.mid, a.out, linear_scale<T>(a.mid, a.out));
  const T scale_first = linear_scale<T>(a.in, a.mid);
  const LinearTap<T> first0 = linear_tap<T>(second.i0, a.in, a.mid, scale_first);
  const LinearTap<T> first1 = linear_tap<T>(second.i1, a.in, a.mid, scale_first);
  plan.s0 = second.i0;
  plan.s1 = second.i1;
  plan.v0 = second.w0;
  plan.v1 = second.w1;
  plan.base = first0.i0;
  add_adjoint(plan, first0.i0, second.w0 * first0.w0);
  add_adjoint(plan, first0.i1, second.w0 * first0.w1);
  add_adjoint(plan, first1.i0, second.w1 * first1.w0);
  add_adjoint(plan, first1.i1, second.w1 * first1.w1);
  return plan;
}

// Taps of source-grid coordinate s on the logits (two steps only): the first resize.
template <typename T>
HSFT_HD LinearTap<T> first_step_tap(int64_t s, const AxisSizes& a) {
  return linear_tap<T>(s, a.in, a.mid, linear_scale<T>(a.in, a.mid));
}

// Size of the source grid: the intermediate grid in two steps, the logits in one.
HSFT_HD int64_t source_size(const AxisSizes& a) { return is_two_step(a) ? a.mid : a.in; }

// First output coordinate whose plan has base >= i (base is non-decreasing in o), by bisection:
// output coordinates [owner_begin(i), owner_begin(i + 1)) are "owned" by logit coordinate i.
template <typename T>
HSFT_HD int64_t owner_begin(int64_t i, const AxisSizes& a) {
  int64_t lo = 0, hi = a.out;
  while (lo < hi) {
    const int64_t m = lo + (hi - lo) / 2;
    if (axis_plan<T>(m, a).base < i) {
      lo = m + 1;
    } else {
      hi = m;
    }
  }
  return lo;
}

// Whether the two-step mode supports these sizes: the first step must not shrink (the release's is
// 256 -> 1024), which keeps every output coordinate within three consecutive logit coordinates.
HSFT_HD bool two_step_sizes_supported(const AxisSizes& a) { return !is_two_step(a) || a.mid >= a.in; }

}  // namespace hsft
