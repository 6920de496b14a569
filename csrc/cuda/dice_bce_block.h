// The per-block code of the CUDA Dice+BCE forward, written so that a host driver runs the very same
// functions: no CUDA headers or intrinsics here, every function is host+device, and the block's
// schedule (phases separated by barriers) is one template over an "executor". On the device the
// executor runs a phase on the calling thread and then __syncthreads(); on the host
// (csrc/tests/test_cuda_blocks.cpp) it loops over the threads of the block in order, which is what a
// barrier guarantees the device sees too. Nothing in a phase reads what another thread writes in the
// same phase.
//
// A block is one band of kBandRows logit rows of one mask (grid: bands x masks). Its threads own
// output columns in quads (thread t: columns 4 t, 4 t + 1, ... then 4 (t + threads) ...), read each
// target (and field-of-view) byte once, and keep, in shared memory:
//   - the band's logit rows (plus the two after it), converted once to the compute type;
//   - the two source rows at the output width for the current output row's source pair, recomputed
//     only when the pair changes (output rows that share a pair reuse the horizontal interpolation);
//   - a ring of kRows full-width rows of the three adjoint planes: the output rows owned by logit row
//     r feed rows r .. r + kRows - 1 (common/resize_plan.h); when row r is complete the block resamples
//     it along x (a gather, one thread per logit column, fixed order) into the adjoint planes;
//   - the per-column tables of the x axis (plans and owners), computed once per block.
// The block's sums are reduced in a fixed tree order. The last block of a mask to finish (an integer
// ticket: no floating-point atomics) adds the bands' sums in band order, writes the loss, and adds the
// rows each band fed past its end (`carry`) into the next band's rows. The result does not depend on
// the order blocks run in.
#pragma once

#include <cstdint>

#include "common/mask_math.h"
#include "common/resize_plan.h"

// Loops over the four columns of a quad are unrolled on the device, so that the per-quad arrays stay
// in registers rather than in local memory.
#if defined(__CUDA_ARCH__)
#define HSFT_UNROLL _Pragma("unroll")
#else
#define HSFT_UNROLL
#endif

namespace hsft::cuda_block {

constexpr int64_t kBandRows = 16;
constexpr int kForwardThreads = 256;

template <typename T, typename L, typename G>
struct ForwardArgs {
  const L* logits;        // num_masks x in_h x in_w
  const G* target;        // num_masks x out_h x out_w
  const uint8_t* fov;     // like target, or null
  int64_t num_masks, in_h, in_w, out_h, out_w, mid_h, mid_w;
  double dice_weight, bce_weight, eps;
  double* sums;           // num_masks x kNumSums
  T* losses;              // num_masks
  T* adjoint;             // num_masks x kNumAdjoint x in_h x in_w, or null (no gradient wanted)
  double* partial;        // num_masks x bands x kNumSums
  T* carry;               // num_masks x bands x (kMaxAdjointRows - 1) x kNumAdjoint x in_w
  unsigned int* tickets;  // num_masks, zero before the launch
  int64_t bands;
};

HSFT_HD int64_t bands_of(int64_t in_h) { return (in_h + kBandRows - 1) / kBandRows; }

// The block's shared memory, carved from one buffer of T (layout by offsets, see shared_elements).
template <typename T>
struct SharedLayout {
  int64_t rows, source, ring, xs0, xs1, xv0, xv1, xc, owner, reduce, total;
};

template <typename T>
HSFT_HD SharedLayout<T> shared_layout(int64_t in_w, int64_t out_w, int rows_in_ring, int threads) {
  // Integer tables are stored in T-sized slots (int32 fits either way), which keeps one buffer type.
  SharedLayout<T> s;
  s.rows = 0;
  s.source = s.rows + (kBandRows + 2) * in_w;
  s.ring = s.source + 2 * out_w;
  s.xs0 = s.ring + static_cast<int64_t>(rows_in_ring) * kNumAdjoint * out_w;
  s.xs1 = s.xs0 + out_w;
  s.xv0 = s.xs1 + out_w;
  s.xv1 = s.xv0 + out_w;
  s.xc = s.xv1 + out_w;
  s.owner = s.xc + kMaxAdjointRows * out_w;
  s.reduce = s.owner + in_w + 1;
  s.total = s.reduce + static_cast<int64_t>(threads) * kNumSums;
  return s;
}

// What a thread keeps across the phases of its block.
template <typename T>
struct ThreadState {
  T sums[kNumSums];
  int32_t cached_s0, cached_s1;  // source pair in the shared source rows (-1: none yet)
};

template <typename T>
HSFT_HD int32_t as_index(T slot) {
  return static_cast<int32_t>(slot);
}

template <typename T, typename L, typename G, bool kAdjoint, int kRows>
struct ForwardBlock {
  static constexpr int kRowsInRing = kRows;
  ForwardArgs<T, L, G> a;
  int64_t n, band, r_begin, r_end, row_lo, row_hi;
  AxisSizes ay, ax;
  SharedLayout<T> layout;
  T* smem;

  HSFT_HD ForwardBlock(const ForwardArgs<T, L, G>& args, int64_t mask, int64_t band_index, T* shared, int threads)
      : a(args), n(mask), band(band_index), smem(shared) {
    r_begin = band * kBandRows;
    r_end = r_begin + kBandRows < a.in_h ? r_begin + kBandRows : a.in_h;
    row_lo = r_begin;
    row_hi = r_end + 1 < a.in_h - 1 ? r_end + 1 : a.in_h - 1;
    ay = AxisSizes{a.in_h, a.mid_h, a.out_h};
    ax = AxisSizes{a.in_w, a.mid_w, a.out_w};
    layout = shared_layout<T>(a.in_w, a.out_w, kRows, threads);
  }

  HSFT_HD T* ring_slot(int64_t row) const { return smem + layout.ring + (row % kRows) * kNumAdjoint * a.out_w; }

  // Phase: the band's logit rows into shared memory, the x tables, the thread's state.
  HSFT_HD void stage(int tid, int threads, ThreadState<T>& st) const {
    const L* plane = a.logits + n * a.in_h * a.in_w;
    const int64_t count = (row_hi - row_lo + 1) * a.in_w;
    for (int64_t i = tid; i < count; i += threads)
      smem[layout.rows + i] = static_cast<T>(to_compute(plane[row_lo * a.in_w + i]));
    for (int64_t x = tid; x < a.out_w; x += threads) {
      const AxisPlan<T> p = axis_plan<T>(x, ax);
      smem[layout.xs0 + x] = static_cast<T>(p.s0);
      smem[layout.xs1 + x] = static_cast<T>(p.s1);
      smem[layout.xv0 + x] = p.v0;
      smem[layout.xv1 + x] = p.v1;
      for (int j = 0; j < kMaxAdjointRows; ++j) smem[layout.xc + j * a.out_w + x] = p.c[j];
    }
    for (int64_t c = tid; c <= a.in_w; c += threads)
      smem[layout.owner + c] = static_cast<T>(owner_begin<T>(c, ax));
    if (kAdjoint)
      for (int64_t i = tid; i < kRows * kNumAdjoint * a.out_w; i += threads) smem[layout.ring + i] = T(0);
    for (int s = 0; s < kNumSums; ++s) st.sums[s] = T(0);
    st.cached_s0 = -1;
    st.cached_s1 = -1;
  }

  // A staged logit value.
  HSFT_HD T logit(int64_t r, int64_t c) const { return smem[layout.rows + (r - row_lo) * a.in_w + c]; }

  // Source row s at output column x, computed as the CPU kernel does (F.interpolate's order).
  HSFT_HD T source_value(int32_t s, int64_t x) const {
    const int32_t s0 = as_index(smem[layout.xs0 + x]);
    const int32_t s1 = as_index(smem[layout.xs1 + x]);
    const T v0 = smem[layout.xv0 + x];
    const T v1 = smem[layout.xv1 + x];
    if (!is_two_step(ay)) return logit(s, s0) * v0 + logit(s, s1) * v1;
    // Intermediate row s at intermediate columns s0, s1: logit rows f0, f1 along x, then along y.
    const LinearTap<T> ty = first_step_tap<T>(s, ay);
    auto mid_value = [&](int32_t m) {
      const LinearTap<T> tx = first_step_tap<T>(m, ax);
      const T upper = logit(ty.i0, tx.i0) * tx.w0 + logit(ty.i0, tx.i1) * tx.w1;
      const T lower = logit(ty.i1, tx.i0) * tx.w0 + logit(ty.i1, tx.i1) * tx.w1;
      return upper * ty.w0 + lower * ty.w1;
    };
    return mid_value(s0) * v0 + mid_value(s1) * v1;
  }

  // Phase: every output row owned by logit row r, at the thread's columns.
  HSFT_HD void process_row(int tid, int threads, int64_t r, ThreadState<T>& st) const {
    const int64_t y_begin = owner_begin<T>(r, ay);
    const int64_t y_end = owner_begin<T>(r + 1, ay);
    T* source0 = smem + layout.source;
    T* source1 = source0 + a.out_w;
    for (int64_t y = y_begin; y < y_end; ++y) {
      const AxisPlan<T> py = axis_plan<T>(y, ay);
      if (py.s0 != st.cached_s0 || py.s1 != st.cached_s1) {
        for (int64_t q0 = 4 * static_cast<int64_t>(tid); q0 < a.out_w; q0 += 4 * static_cast<int64_t>(threads))
          for (int64_t x = q0; x < q0 + 4 && x < a.out_w; ++x) {
            source0[x] = source_value(py.s0, x);
            source1[x] = source_value(py.s1, x);
          }
        st.cached_s0 = py.s0;
        st.cached_s1 = py.s1;
      }
      const int64_t offset = (n * a.out_h + y) * a.out_w;
      const G* target_row = a.target + offset;
      const uint8_t* fov_row = a.fov == nullptr ? nullptr : a.fov + offset;
      for (int64_t q0 = 4 * static_cast<int64_t>(tid); q0 < a.out_w; q0 += 4 * static_cast<int64_t>(threads)) {
        G g4[4];
        uint8_t m4[4] = {1, 1, 1, 1};
        load_quad(target_row, q0, g4);
        if (fov_row != nullptr) load_quad(fov_row, q0, m4);
        HSFT_UNROLL
        for (int i = 0; i < 4; ++i) {
          const int64_t x = q0 + i;
          if (x >= a.out_w) continue;
          const T z = source0[x] * py.v0 + source1[x] * py.v1;
          const LogisticTerms<T> t = logistic_terms(z);
          const T m = m4[i] != 0 ? T(1) : T(0);
          const T g = target_value<T>(g4[i]);
          st.sums[kSumProb] += t.p * m;
          st.sums[kSumProbTarget] += t.p * m * (g * m);
          st.sums[kSumTarget] += g * m;
          st.sums[kSumBce] += bce_with_logits(z, g, t.softplus) * m;
          st.sums[kSumCount] += m;
          if (kAdjoint) {
            const PixelAdjoint<T> adj = dice_bce_pixel_adjoint(t, g, m);
            HSFT_UNROLL
            for (int j = 0; j < kRows; ++j) {
              T* slot = ring_slot(r + j);
              HSFT_UNROLL
              for (int q = 0; q < kNumAdjoint; ++q) slot[q * a.out_w + x] += py.c[j] * adj.v[q];
            }
          }
        }
      }
    }
  }

  // Four consecutive elements of a row starting at x0 (a multiple of 4); past the end, zeros. One
  // vector load on the device when the four are in range and aligned.
  template <typename E>
  HSFT_HD void load_quad(const E* row, int64_t x0, E (&out)[4]) const {
#if defined(__CUDA_ARCH__)
    if (x0 + 4 <= a.out_w && reinterpret_cast<uintptr_t>(row + x0) % (4 * sizeof(E)) == 0) {
      struct alignas(4 * sizeof(E)) Quad {
        E v[4];
      };
      const Quad quad = *reinterpret_cast<const Quad*>(row + x0);
      HSFT_UNROLL
      for (int i = 0; i < 4; ++i) out[i] = quad.v[i];
      return;
    }
#endif
    HSFT_UNROLL
    for (int i = 0; i < 4; ++i) out[i] = x0 + i < a.out_w ? row[x0 + i] : E(0);
  }

  // Phase: the ring row of logit row `row` resampled along x into out[q][c], c = tid, tid + threads ...
  HSFT_HD void gather_row(int tid, int threads, int64_t row, T* out, int64_t plane_stride) const {
    const T* slot = ring_slot(row);
    for (int64_t c = tid; c < a.in_w; c += threads) {
      T s[kNumAdjoint] = {T(0), T(0), T(0)};
      for (int j = 0; j < kRows && j <= c; ++j) {
        const int32_t x_begin = as_index(smem[layout.owner + c - j]);
        const int32_t x_end = as_index(smem[layout.owner + c - j + 1]);
        for (int32_t x = x_begin; x < x_end; ++x) {
          const T w = smem[layout.xc + j * a.out_w + x];
          HSFT_UNROLL
          for (int q = 0; q < kNumAdjoint; ++q) s[q] += w * slot[q * a.out_w + x];
        }
      }
      HSFT_UNROLL
      for (int q = 0; q < kNumAdjoint; ++q) out[q * plane_stride + c] = s[q];
    }
  }

  // Phase: the ring row of logit row `row` cleared for reuse (the thread's own columns).
  HSFT_HD void clear_row(int tid, int threads, int64_t row) const {
    T* slot = ring_slot(row);
    for (int64_t q0 = 4 * static_cast<int64_t>(tid); q0 < a.out_w; q0 += 4 * static_cast<int64_t>(threads))
      for (int64_t x = q0; x < q0 + 4 && x < a.out_w; ++x)
        for (int q = 0; q < kNumAdjoint; ++q) slot[q * a.out_w + x] = T(0);
  }

  HSFT_HD T* adjoint_row(int64_t r) const { return a.adjoint + (n * kNumAdjoint * a.in_h + r) * a.in_w; }
  HSFT_HD T* carry_rows(int64_t band_index, int j) const {
    return a.carry + ((n * a.bands + band_index) * (kMaxAdjointRows - 1) + j) * kNumAdjoint * a.in_w;
  }

  // Phases of the block reduction: every thread's sums into shared memory, then a fixed tree.
  HSFT_HD void reduce_store(int tid, const ThreadState<T>& st) const {
    for (int s = 0; s < kNumSums; ++s) smem[layout.reduce + tid * kNumSums + s] = st.sums[s];
  }
  HSFT_HD void reduce_step(int tid, int stride) const {
    if (tid < stride)
      for (int s = 0; s < kNumSums; ++s)
        smem[layout.reduce + tid * kNumSums + s] += smem[layout.reduce + (tid + stride) * kNumSums + s];
  }
  HSFT_HD void write_partial(int tid) const {
    if (tid != 0) return;
    for (int s = 0; s < kNumSums; ++s)
      a.partial[(n * a.bands + band) * kNumSums + s] = static_cast<double>(smem[layout.reduce + s]);
  }

  // Phases of the mask's last block: the sums and loss (thread 0), the bands' carries (all threads).
  HSFT_HD void finish_sums(int tid) const {
    if (tid != 0) return;
    double total[kNumSums] = {0.0, 0.0, 0.0, 0.0, 0.0};
    for (int64_t b = 0; b < a.bands; ++b)
      HSFT_UNROLL
      for (int s = 0; s < kNumSums; ++s) total[s] += a.partial[(n * a.bands + b) * kNumSums + s];
    for (int s = 0; s < kNumSums; ++s) a.sums[n * kNumSums + s] = total[s];
    a.losses[n] = static_cast<T>(dice_bce_value(total, a.dice_weight, a.bce_weight, a.eps));
  }
  HSFT_HD void add_carries(int tid, int threads) const {
    const int64_t per_band = static_cast<int64_t>(kRows - 1) * kNumAdjoint * a.in_w;
    for (int64_t b = 1; b < a.bands; ++b)
      for (int64_t i = tid; i < per_band; i += threads) {
        const int64_t j = i / (kNumAdjoint * a.in_w);
        const int64_t q = (i / a.in_w) % kNumAdjoint;
        const int64_t c = i % a.in_w;
        const int64_t r = b * kBandRows + j;
        if (r < a.in_h) adjoint_row(r)[q * a.in_h * a.in_w + c] += carry_rows(b - 1, static_cast<int>(j))[q * a.in_w + c];
      }
  }
};

// The schedule of one block; Exec provides threads(), all(phase) (runs phase(tid, state) on every
// thread, then a barrier) and last_of_mask(n, bands) (the integer ticket).
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename Exec, typename Block>
HSFT_HD void run_forward_block(Exec& exec, const Block& b) {
  const int threads = exec.threads();
  exec.all([&](int tid, auto& st) { b.stage(tid, threads, st); });
  for (int64_t r = b.r_begin; r < b.r_end; ++r) {
    exec.all([&](int tid, auto& st) { b.process_row(tid, threads, r, st); });
    if (b.a.adjoint != nullptr) {
      exec.all([&](int tid, auto&) { b.gather_row(tid, threads, r, b.adjoint_row(r), b.a.in_h * b.a.in_w); });
      exec.all([&](int tid, auto&) { b.clear_row(tid, threads, r); });
    }
  }
  if (b.a.adjoint != nullptr)
    exec.all([&](int tid, auto&) {
      for (int j = 0; j + 1 < Block::kRowsInRing; ++j)
        b.gather_row(tid, threads, b.r_end + j, b.carry_rows(b.band, j), b.a.in_w);
    });
  exec.all([&](int tid, auto& st) { b.reduce_store(tid, st); });
  for (int stride = threads / 2; stride > 0; stride /= 2) exec.all([&](int tid, auto&) { b.reduce_step(tid, stride); });
  exec.all([&](int tid, auto&) { b.write_partial(tid); });
  if (!exec.last_of_mask(b.n, b.a.bands)) return;
  exec.all([&](int tid, auto&) { b.finish_sums(tid); });
  if (b.a.adjoint != nullptr) exec.all([&](int tid, auto&) { b.add_carries(tid, threads); });
}

// Gradient at element i of mask n's planes (the backward kernel's and the host driver's).
template <typename T>
HSFT_HD T grad_at(const T* adjoint, int64_t n, int64_t i, int64_t plane, const DiceBceGradCoefficients<T>& k) {
  const T* base = adjoint + n * kNumAdjoint * plane;
  return dice_bce_grad_from_adjoint(k, base[i], base[plane + i], base[2 * plane + i]);
}

}  // namespace hsft::cuda_block
