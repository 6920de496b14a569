#include "cpu/mask_kernels.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/mask_math.h"
#include "common/resize_plan.h"

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

// The plan of every output coordinate along one axis (common/resize_plan.h), as arrays the row
// loops index, and the first output coordinate owned by each logit coordinate.
template <typename T>
struct AxisTable {
  std::vector<int32_t> s0, s1, base;
  std::vector<T> v0, v1;
  std::vector<T> c[kMaxAdjointRows];
  std::vector<int32_t> owner_start;  // in + 1 entries
  // Two steps: the first resize's taps of every intermediate coordinate.
  std::vector<int32_t> f0, f1;
  std::vector<T> fw0, fw1;

  explicit AxisTable(const AxisSizes& a)
      : s0(a.out), s1(a.out), base(a.out), v0(a.out), v1(a.out), owner_start(a.in + 1) {
    for (auto& column : c) column.resize(a.out);
    for (int64_t o = 0; o < a.out; ++o) {
      const AxisPlan<T> plan = axis_plan<T>(o, a);
      s0[o] = plan.s0;
      s1[o] = plan.s1;
      v0[o] = plan.v0;
      v1[o] = plan.v1;
      base[o] = plan.base;
      for (int j = 0; j < kMaxAdjointRows; ++j) c[j][o] = plan.c[j];
    }
    // base is non-decreasing: owner_start[i] = first o with base[o] >= i.
    int64_t o = 0;
    for (int64_t i = 0; i <= a.in; ++i) {
      while (o < a.out && base[o] < i) ++o;
      owner_start[i] = static_cast<int32_t>(o);
    }
    if (is_two_step(a)) {
      f0.resize(a.mid);
      f1.resize(a.mid);
      fw0.resize(a.mid);
      fw1.resize(a.mid);
      for (int64_t m = 0; m < a.mid; ++m) {
        const LinearTap<T> tap = first_step_tap<T>(m, a);
        f0[m] = tap.i0;
        f1[m] = tap.i1;
        fw0[m] = tap.w0;
        fw1[m] = tap.w1;
      }
    }
  }
};

template <typename T>
struct Tables {
  AxisSizes ay, ax;
  AxisTable<T> y;
  AxisTable<T> x;
  explicit Tables(const MaskGeometry& g)
      : ay{g.in_h, g.mid_h, g.out_h}, ax{g.in_w, g.mid_w, g.out_w}, y(ay), x(ax) {}
  bool two_step() const { return is_two_step(ay); }
};

// One-step tables for upsample_masks and mask_stats.
template <typename T>
Tables<T> one_step_tables(const MaskGeometry& g) {
  MaskGeometry one = g;
  one.mid_h = 0;
  one.mid_w = 0;
  return Tables<T>(one);
}

int64_t task_grain(const MaskGeometry& g) {
  const int64_t pixels_per_task = std::max<int64_t>(1, (g.out_h + g.in_h - 1) / g.in_h) * g.out_w;
  return std::max<int64_t>(1, kPixelsPerChunk / pixels_per_task);
}

// Interpolates a source row along x with the taps (s, v) of a table: out[x] = row[s0] v0 + row[s1] v1,
// PyTorch's first step. `n` output coordinates.
template <typename T>
void interpolate_row(const T* row, const int32_t* s0, const int32_t* s1, const T* v0, const T* v1, int64_t n,
                     T* out) {
  for (int64_t x = 0; x < n; ++x) out[x] = row[s0[x]] * v0[x] + row[s1[x]] * v1[x];
}

// A logit row resampled along x in one step.
template <typename T>
void interpolate_x(const T* row, const Tables<T>& t, int64_t out_w, T* out) {
  interpolate_row(row, t.x.s0.data(), t.x.s1.data(), t.x.v0.data(), t.x.v1.data(), out_w, out);
}

// The source row `s` interpolated to the output width (the "J row" the pixel loops read): the logit
// row itself in one step; in two steps the intermediate row s, made from two logit rows as the first
// F.interpolate makes it, then resized along x by the second.
template <typename T, typename L>
void source_row_at_width(const L* plane, int64_t s, const Tables<T>& t, const MaskGeometry& g, T* scratch_in,
                         T* scratch_mid, T* out) {
  auto load = [&](int64_t r, T* dst) {
    const L* src = plane + r * g.in_w;
    for (int64_t c = 0; c < g.in_w; ++c) dst[c] = static_cast<T>(to_compute(src[c]));
  };
  if (!t.two_step()) {
    load(s, scratch_in);
    interpolate_row(scratch_in, t.x.s0.data(), t.x.s1.data(), t.x.v0.data(), t.x.v1.data(), g.out_w, out);
    return;
  }
  // Intermediate row s = X1(logit row f0) * fw0 + X1(logit row f1) * fw1 (x first, then y).
  T* upper = scratch_mid;
  T* lower = scratch_mid + g.mid_w;
  load(t.y.f0[s], scratch_in);
  interpolate_row(scratch_in, t.x.f0.data(), t.x.f1.data(), t.x.fw0.data(), t.x.fw1.data(), g.mid_w, upper);
  load(t.y.f1[s], scratch_in);
  interpolate_row(scratch_in, t.x.f0.data(), t.x.f1.data(), t.x.fw0.data(), t.x.fw1.data(), g.mid_w, lower);
  const T w0 = t.y.fw0[s], w1 = t.y.fw1[s];
  for (int64_t m = 0; m < g.mid_w; ++m) upper[m] = upper[m] * w0 + lower[m] * w1;
  interpolate_row(upper, t.x.s0.data(), t.x.s1.data(), t.x.v0.data(), t.x.v1.data(), g.out_w, out);
}

// Adjoint of the x resampling for the three adjoint planes of one logit row: out[q][c] = sum over
// the output columns x that depend on logit column c of d value(x) / d logit(c) * in[q][x]. Written
// as a gather (each c sums its window of x in registers, in a fixed order) rather than a scatter,
// whose repeated read-modify-write of one element serialises on the store.
template <int kRows, typename T>
void adjoint_row_x(const T* in, const AxisTable<T>& tx, int64_t out_w, int64_t in_w, T* out0, T* out1, T* out2) {
  const T* in0 = in;
  const T* in1 = in + out_w;
  const T* in2 = in + 2 * out_w;
  const int32_t* owner = tx.owner_start.data();
  for (int64_t c = 0; c < in_w; ++c) {
    T s0 = T(0), s1 = T(0), s2 = T(0);
    for (int j = 0; j < kRows && j <= c; ++j) {
      const T* w = tx.c[j].data();
      for (int32_t x = owner[c - j]; x < owner[c - j + 1]; ++x) {
        s0 += w[x] * in0[x];
        s1 += w[x] * in1[x];
        s2 += w[x] * in2[x];
      }
    }
    out0[c] = s0;
    out1[c] = s1;
    out2[c] = s2;
  }
}

// What one pixel adds to the sums (masked by m) and its adjoint values (see forward_row).
template <typename T>
struct PixelTerms {
  T p, pg, g, bce;
  PixelAdjoint<T> adjoint;
};

template <bool kMasked, bool kAdjoint, typename T>
inline __attribute__((always_inline)) PixelTerms<T> pixel_terms(T z, T target, T m) {
  const LogisticTerms<T> t = logistic_terms(z);
  PixelTerms<T> out;
  out.g = kMasked ? target * m : target;
  out.p = kMasked ? t.p * m : t.p;
  out.pg = out.p * out.g;
  const T bce = bce_with_logits(z, target, t.softplus);
  out.bce = kMasked ? bce * m : bce;
  if (kAdjoint) {
    out.adjoint = dice_bce_pixel_adjoint(t, target, m);
  } else {
    out.adjoint = PixelAdjoint<T>{{T(0), T(0), T(0)}};
  }
  return out;
}

// Adds the sums of one full-resolution row to lane accumulators (sums[k][lane]). With kMasked,
// only the pixels where fov is non-zero count (fov may be null otherwise). With kAdjoint, adds the
// pixel's adjoint values times the row's weights cy[j] to acc[j][q * out_w + x].
template <bool kMasked, bool kAdjoint, int kRows, typename T, typename G>
HSFT_CPU_CLONES void forward_row(const T* __restrict__ top, const T* __restrict__ bottom, T wy0, T wy1,
                                 const T* __restrict__ cy, const G* __restrict__ target,
                                 const uint8_t* __restrict__ fov, int64_t out_w, T* __restrict__ g_row,
                                 T* __restrict__ m_row, T (&sums)[kNumSums][kLanes], T* const* acc) {
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
  T weight[kRows];
  for (int j = 0; j < kRows; ++j) weight[j] = cy[j];
  T adjoint[kNumAdjoint][kLanes];
  // Adds the adjoint values of lanes [0, count) times the rows' weights to the accumulators at x.
  auto add_adjoint = [&](int64_t x0, int count) {
    for (int j = 0; j < kRows; ++j)
      for (int q = 0; q < kNumAdjoint; ++q) {
        T* __restrict__ row = acc[j] + q * out_w + x0;
        const T w = weight[j];
        for (int k = 0; k < count; ++k) row[k] += w * adjoint[q][k];
      }
  };
  int64_t x = 0;
  for (; x + kLanes <= out_w; x += kLanes) {
    // Kept as a loop (not unrolled) so that it is vectorised across the lanes.
    HSFT_NO_UNROLL
    for (int k = 0; k < kLanes; ++k) {
      const PixelTerms<T> px = pixel_terms<kMasked, kAdjoint>(top[x + k] * wy0 + bottom[x + k] * wy1, g_row[x + k],
                                                              kMasked ? m_row[x + k] : T(1));
      sp[k] += px.p;
      spg[k] += px.pg;
      sg[k] += px.g;
      sb[k] += px.bce;
      for (int q = 0; q < kNumAdjoint; ++q) adjoint[q][k] = px.adjoint.v[q];
    }
    if (kAdjoint) add_adjoint(x, kLanes);
  }
  const int64_t tail = x;
  for (int k = 0; x < out_w; ++x, ++k) {
    const PixelTerms<T> px = pixel_terms<kMasked, kAdjoint>(top[x] * wy0 + bottom[x] * wy1, g_row[x],
                                                            kMasked ? m_row[x] : T(1));
    sp[k] += px.p;
    spg[k] += px.pg;
    sg[k] += px.g;
    sb[k] += px.bce;
    for (int q = 0; q < kNumAdjoint; ++q) adjoint[q][k] = px.adjoint.v[q];
  }
  if (kAdjoint && tail < out_w) add_adjoint(tail, static_cast<int>(out_w - tail));
  for (int k = 0; k < kLanes; ++k) {
    sums[kSumProb][k] = sp[k];
    sums[kSumProbTarget][k] = spg[k];
    sums[kSumTarget][k] = sg[k];
    sums[kSumBce][k] = sb[k];
  }
}

// Logit rows per band of the forward with adjoint planes (see dice_bce_forward_typed).
constexpr int64_t kBandRows = 16;

// Scratch of one thread's tasks.
template <typename T>
struct ForwardScratch {
  std::vector<T> storage;
  T* source;       // rows of the source grid at the output width (max_source_rows x out_w)
  T* g_row;        // out_w
  T* m_row;        // out_w
  T* ring;         // kMaxAdjointRows slots of kNumAdjoint x out_w
  T* scratch_in;   // in_w
  T* scratch_mid;  // 2 x mid_w

  ForwardScratch(const MaskGeometry& g, int64_t max_source_rows) {
    const int64_t mid_w = std::max<int64_t>(g.mid_w, 0);
    storage.resize((max_source_rows + 2 + kMaxAdjointRows * kNumAdjoint) * g.out_w + g.in_w + 2 * mid_w);
    source = storage.data();
    g_row = source + max_source_rows * g.out_w;
    m_row = g_row + g.out_w;
    ring = m_row + g.out_w;
    scratch_in = ring + kMaxAdjointRows * kNumAdjoint * g.out_w;
    scratch_mid = scratch_in + g.in_w;
  }
  T* slot(int64_t row, int64_t out_w) { return ring + (row % kMaxAdjointRows) * kNumAdjoint * out_w; }
};

// Most source rows one task's output rows read.
template <typename T>
int64_t max_source_rows(const Tables<T>& t, int64_t in_h) {
  int64_t most = 1;
  for (int64_t r = 0; r < in_h; ++r) {
    const int32_t y_begin = t.y.owner_start[r], y_end = t.y.owner_start[r + 1];
    if (y_begin < y_end) most = std::max<int64_t>(most, t.y.s1[y_end - 1] - t.y.s0[y_begin] + 1);
  }
  return most;
}

// Tasks are bands of kBandRows logit rows of one mask, fixed by the geometry. Within a band the rows
// run in order; the output rows owned by row r (base r) feed logit rows r .. r + kRows - 1, whose
// full-width adjoint rows wait in a ring of kRows slots. Row r is complete after its own output rows,
// and is then resampled along x once into the adjoint planes. The rows after the band that it fed go
// to `carry` (resampled the same way) and are added in a final pass, in a fixed order: every result
// is the same bits whatever the number of threads.
template <bool kAdjoint, int kRows, typename T, typename L, typename G>
void dice_bce_forward_typed(const L* logits, const G* target, const uint8_t* fov, const MaskGeometry& g,
                            double dice_weight, double bce_weight, double eps, double* sums, T* losses, T* adjoint,
                            const TaskRunner& runner) {
  const Tables<T> t(g);
  const int64_t bands = (g.in_h + kBandRows - 1) / kBandRows;
  const int64_t num_tasks = g.num_masks * bands;
  const int64_t source_rows = max_source_rows(t, g.in_h);
  const int64_t plane = g.in_h * g.in_w;
  std::vector<double> partial(static_cast<size_t>(g.num_masks * g.in_h) * kNumSums);
  std::vector<T> carry(kAdjoint ? static_cast<size_t>(num_tasks) * (kRows - 1) * kNumAdjoint * g.in_w : 0);
  auto carry_rows = [&](int64_t task, int j) {  // the band's part of logit row band_end + j, 3 planes
    return carry.data() + (task * (kRows - 1) + j) * kNumAdjoint * g.in_w;
  };
  auto adjoint_row = [&](int64_t n, int q, int64_t r) { return adjoint + ((n * kNumAdjoint + q) * g.in_h + r) * g.in_w; };
  const int64_t pixels_per_band = kBandRows * std::max<int64_t>(1, g.out_h / g.in_h) * g.out_w;
  runner(num_tasks, std::max<int64_t>(1, kPixelsPerChunk / pixels_per_band), [&](int64_t begin, int64_t end) {
    ForwardScratch<T> scratch(g, source_rows);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands;
      const int64_t r_begin = (task % bands) * kBandRows;
      const int64_t r_end = std::min(g.in_h, r_begin + kBandRows);
      const L* logit_plane = logits + n * plane;
      if (kAdjoint) std::fill(scratch.ring, scratch.ring + kMaxAdjointRows * kNumAdjoint * g.out_w, T(0));
      for (int64_t r = r_begin; r < r_end; ++r) {
        double row_sums[kNumSums] = {0.0, 0.0, 0.0, 0.0, 0.0};
        const int32_t y_begin = t.y.owner_start[r];
        const int32_t y_end = t.y.owner_start[r + 1];
        T* slots[kRows];
        for (int j = 0; j < kRows; ++j) slots[j] = scratch.slot(r + j, g.out_w);
        if (y_begin < y_end) {
          const int32_t first_source = t.y.s0[y_begin];
          const int32_t last_source = t.y.s1[y_end - 1];
          for (int32_t s = first_source; s <= last_source; ++s)
            source_row_at_width(logit_plane, s, t, g, scratch.scratch_in, scratch.scratch_mid,
                                scratch.source + (s - first_source) * g.out_w);
          for (int32_t y = y_begin; y < y_end; ++y) {
            T lanes[kNumSums][kLanes] = {};
            const int64_t offset = (n * g.out_h + y) * g.out_w;
            const T* top = scratch.source + (t.y.s0[y] - first_source) * g.out_w;
            const T* bottom = scratch.source + (t.y.s1[y] - first_source) * g.out_w;
            T cy[kRows];
            for (int j = 0; j < kRows; ++j) cy[j] = t.y.c[j][y];
            if (fov == nullptr) {
              forward_row<false, kAdjoint, kRows>(top, bottom, t.y.v0[y], t.y.v1[y], cy, target + offset, nullptr,
                                                  g.out_w, scratch.g_row, scratch.m_row, lanes, slots);
              row_sums[kSumCount] += static_cast<double>(g.out_w);
            } else {
              forward_row<true, kAdjoint, kRows>(top, bottom, t.y.v0[y], t.y.v1[y], cy, target + offset,
                                                 fov + offset, g.out_w, scratch.g_row, scratch.m_row, lanes, slots);
              int64_t inside = 0;
              for (int64_t x = 0; x < g.out_w; ++x) inside += fov[offset + x] != 0;
              row_sums[kSumCount] += static_cast<double>(inside);
            }
            for (int s = 0; s < kSumCount; ++s)
              for (int k = 0; k < kLanes; ++k) row_sums[s] += static_cast<double>(lanes[s][k]);
          }
        }
        std::copy(row_sums, row_sums + kNumSums, partial.data() + (n * g.in_h + r) * kNumSums);
        if (kAdjoint) {
          // Row r has all of this band's contributions: resample along x, free its slot.
          adjoint_row_x<kRows>(slots[0], t.x, g.out_w, g.in_w, adjoint_row(n, 0, r), adjoint_row(n, 1, r),
                               adjoint_row(n, 2, r));
          std::fill(slots[0], slots[0] + kNumAdjoint * g.out_w, T(0));
        }
      }
      if (kAdjoint) {
        for (int j = 0; j + 1 < kRows; ++j) {
          T* rows = carry_rows(task, j);
          adjoint_row_x<kRows>(scratch.slot(r_end + j, g.out_w), t.x, g.out_w, g.in_w, rows, rows + g.in_w,
                               rows + 2 * g.in_w);
        }
      }
    }
  });
  if (kAdjoint && bands > 1) {
    runner(num_tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        if (task % bands == 0) continue;
        const int64_t n = task / bands;
        const int64_t r_begin = (task % bands) * kBandRows;
        for (int j = 0; j + 1 < kRows && r_begin + j < g.in_h; ++j) {
          const T* from_above = carry_rows(task - 1, j);
          for (int q = 0; q < kNumAdjoint; ++q) {
            T* row = adjoint_row(n, q, r_begin + j);
            for (int64_t c = 0; c < g.in_w; ++c) row[c] += from_above[q * g.in_w + c];
          }
        }
      }
    });
  }
  for (int64_t n = 0; n < g.num_masks; ++n) {
    double* mask_sums = sums + n * kNumSums;
    std::fill(mask_sums, mask_sums + kNumSums, 0.0);
    for (int64_t r = 0; r < g.in_h; ++r)
      for (int s = 0; s < kNumSums; ++s) mask_sums[s] += partial[(n * g.in_h + r) * kNumSums + s];
    losses[n] = static_cast<T>(dice_bce_value(mask_sums, dice_weight, bce_weight, eps));
  }
}

// grad = a * adjoint0 + b * adjoint1 + c * adjoint2 per mask, stored as O.
template <typename T, typename O>
void dice_bce_backward_typed(const T* adjoint, const double* sums, const T* grad_loss, int64_t grad_loss_stride,
                             const MaskGeometry& g, double dice_weight, double bce_weight, double eps, O* grad,
                             const TaskRunner& runner) {
  const int64_t plane = g.in_h * g.in_w;
  const int64_t chunks_per_mask = (plane + kPixelsPerChunk - 1) / kPixelsPerChunk;
  runner(g.num_masks * chunks_per_mask, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t n = chunk / chunks_per_mask;
      const int64_t lo = (chunk % chunks_per_mask) * kPixelsPerChunk;
      const int64_t hi = std::min(plane, lo + kPixelsPerChunk);
      const DiceBceGradCoefficients<T> k = dice_bce_grad_coefficients<T>(
          sums + n * kNumSums, static_cast<double>(grad_loss[n * grad_loss_stride]), dice_weight, bce_weight, eps);
      const T* a0 = adjoint + (n * kNumAdjoint + kAdjointDp) * plane;
      const T* a1 = adjoint + (n * kNumAdjoint + kAdjointTargetDp) * plane;
      const T* a2 = adjoint + (n * kNumAdjoint + kAdjointProbMinusTarget) * plane;
      O* out = grad + n * plane;
      for (int64_t i = lo; i < hi; ++i) store(out + i, dice_bce_grad_from_adjoint(k, a0[i], a1[i], a2[i]));
    }
  });
}

template <typename T, typename G>
void mask_stats_typed(const T* logits, const G* target, const uint8_t* fov, const MaskGeometry& g, int64_t* stats,
                      const TaskRunner& runner) {
  const Tables<T> taps = one_step_tables<T>(g);
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
        interpolate_x(plane + r * g.in_w, taps, g.out_w, top);
        interpolate_x(plane + taps.y.s1[y_begin] * g.in_w, taps, g.out_w, bottom);
        for (int32_t y = y_begin; y < y_end; ++y) {
          const T wy0 = taps.y.v0[y];
          const T wy1 = taps.y.v1[y];
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

template <typename Fn>
void dispatch_values(ValuePlanes values, Fn&& fn) {
  switch (values.type) {
    case ValueType::kFloat32:
      fn(static_cast<const float*>(values.data));
      return;
    case ValueType::kFloat64:
      fn(static_cast<const double*>(values.data));
      return;
    case ValueType::kBFloat16:
      fn(static_cast<const BFloat16Bits*>(values.data));
      return;
    case ValueType::kFloat16:
      fn(static_cast<const Float16Bits*>(values.data));
      return;
  }
  throw std::invalid_argument("hsft mask kernels: unknown value type");
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
  if ((g.mid_h > 0) != (g.mid_w > 0) || g.mid_h < 0 || g.mid_w < 0 || g.mid_h >= kMax || g.mid_w >= kMax)
    throw std::invalid_argument("hsft mask kernels: the intermediate size must be two positive sides or none, got " +
                                std::to_string(g.mid_h) + "x" + std::to_string(g.mid_w));
  if (!two_step_sizes_supported({g.in_h, g.mid_h, g.out_h}) || !two_step_sizes_supported({g.in_w, g.mid_w, g.out_w}))
    throw std::invalid_argument("hsft mask kernels: the intermediate size " + std::to_string(g.mid_h) + "x" +
                                std::to_string(g.mid_w) + " is smaller than the logits " + std::to_string(g.in_h) +
                                "x" + std::to_string(g.in_w) + "; two-step resizing needs a first step that does "
                                "not shrink");
}

template <typename T>
void dice_bce_forward(ValuePlanes logits, TargetPlanes target, const uint8_t* fov, const MaskGeometry& geometry,
                      double dice_weight, double bce_weight, double eps, double* sums, T* losses, T* adjoint,
                      const TaskRunner& runner) {
  check_geometry(geometry);
  if ((logits.type == ValueType::kFloat64) != std::is_same_v<T, double>)
    throw std::invalid_argument("hsft mask kernels: float64 logits compute in double, the others in float");
  const bool two_step = geometry.mid_h > 0;
  dispatch_values(logits, [&](const auto* values) {
    using L = std::remove_cv_t<std::remove_pointer_t<decltype(values)>>;
    if constexpr (std::is_same_v<L, double> == std::is_same_v<T, double>) {
      dispatch_plane(target, [&](const auto* planes) {
        auto run = [&](auto adjoint_flag, auto rows) {
          dice_bce_forward_typed<decltype(adjoint_flag)::value, decltype(rows)::value, T>(
              values, planes, fov, geometry, dice_weight, bce_weight, eps, sums, losses, adjoint, runner);
        };
        using Yes = std::true_type;
        using No = std::false_type;
        using Two = std::integral_constant<int, 2>;
        using Three = std::integral_constant<int, 3>;
        if (adjoint != nullptr) {
          two_step ? run(Yes{}, Three{}) : run(Yes{}, Two{});
        } else {
          two_step ? run(No{}, Three{}) : run(No{}, Two{});
        }
      });
    }
  });
}

template <typename T>
void dice_bce_backward(const T* adjoint, const double* sums, const T* grad_loss, int64_t grad_loss_stride,
                       const MaskGeometry& geometry, double dice_weight, double bce_weight, double eps, void* grad,
                       ValueType grad_type, const TaskRunner& runner) {
  check_geometry(geometry);
  auto run = [&](auto* out) {
    dice_bce_backward_typed(adjoint, sums, grad_loss, grad_loss_stride, geometry, dice_weight, bce_weight, eps, out,
                            runner);
  };
  if constexpr (std::is_same_v<T, double>) {
    if (grad_type != ValueType::kFloat64)
      throw std::invalid_argument("hsft mask kernels: a float64 gradient is written as float64");
    run(static_cast<double*>(grad));
  } else {
    switch (grad_type) {
      case ValueType::kFloat32:
        run(static_cast<float*>(grad));
        return;
      case ValueType::kBFloat16:
        run(static_cast<BFloat16Bits*>(grad));
        return;
      case ValueType::kFloat16:
        run(static_cast<Float16Bits*>(grad));
        return;
      case ValueType::kFloat64:
        throw std::invalid_argument("hsft mask kernels: a float32-computed gradient is not written as float64");
    }
  }
}

template <typename T>
void upsample_masks(const T* logits, const MaskGeometry& g, T threshold, T* values, uint8_t* above,
                    const TaskRunner& runner) {
  check_geometry(g);
  const Tables<T> taps = one_step_tables<T>(g);
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
      interpolate_x(plane + r * g.in_w, taps, g.out_w, top);
      interpolate_x(plane + taps.y.s1[y_begin] * g.in_w, taps, g.out_w, bottom);
      for (int32_t y = y_begin; y < y_end; ++y) {
        const T wy0 = taps.y.v0[y];
        const T wy1 = taps.y.v1[y];
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
  template void dice_bce_forward<T>(ValuePlanes, TargetPlanes, const uint8_t*, const MaskGeometry&, double, double, \
                                    double, double*, T*, T*, const TaskRunner&);                                    \
  template void dice_bce_backward<T>(const T*, const double*, const T*, int64_t, const MaskGeometry&, double,        \
                                     double, double, void*, ValueType, const TaskRunner&);                          \
  template void upsample_masks<T>(const T*, const MaskGeometry&, T, T*, uint8_t*, const TaskRunner&);               \
  template void mask_stats<T>(const T*, TargetPlanes, const uint8_t*, const MaskGeometry&, int64_t*,                \
                              const TaskRunner&);

HSFT_INSTANTIATE(float)
HSFT_INSTANTIATE(double)
#undef HSFT_INSTANTIATE

}  // namespace hsft::cpu
