// CPU mask kernels on raw pointers (no torch): fused Dice+BCE forward / backward from
// low-resolution logits, bilinear mask upsampling and per-mask confusion counts.
//
// Work is split into tasks of one (mask, low-resolution row): a task handles the
// full-resolution rows whose first logit row (AxisPlan::base, common/resize_plan.h) is that row.
// Tasks write their own partial results and a final pass combines them in a fixed order, so every
// result is bit-identical whatever the number of threads or the order tasks run in.
#pragma once

#include <cstdint>
#include <functional>

namespace hsft::cpu {

// Runs body(begin, end) over task ranges covering [0, num_tasks), in any order and on any
// threads; grain is a hint for the smallest useful range. The torch glue passes
// at::parallel_for; the C++ tests pass a serial runner.
using TaskBody = std::function<void(int64_t begin, int64_t end)>;
using TaskRunner = std::function<void(int64_t num_tasks, int64_t grain, const TaskBody& body)>;

// Runs every task on the calling thread, in order.
void run_serial(int64_t num_tasks, int64_t grain, const TaskBody& body);

// Sizes: num_masks low-resolution planes of in_h x in_w, full resolution out_h x out_w. With
// mid_h, mid_w > 0 the Dice+BCE op resizes in two steps, in -> mid -> out (common/resize_plan.h);
// 0 (the default) is one step. upsample_masks and mask_stats always resize in one step.
struct MaskGeometry {
  int64_t num_masks;
  int64_t in_h;
  int64_t in_w;
  int64_t out_h;
  int64_t out_w;
  int64_t mid_h = 0;
  int64_t mid_w = 0;
};

// Element type of a target or field-of-view plane. Bool planes are read as their bytes.
enum class PlaneType { kByte, kFloat32, kFloat64 };

// Element type of a logits or gradient plane. bfloat16 / float16 are read and written as they are
// stored and computed in float32; float64 is computed in float64.
enum class ValueType { kFloat32, kFloat64, kBFloat16, kFloat16 };

struct ValuePlanes {
  const void* data;  // num_masks x in_h x in_w, contiguous
  ValueType type;
};

struct TargetPlanes {
  const void* data;  // num_masks x out_h x out_w, contiguous
  PlaneType type;
};

// Throws std::invalid_argument when a size is not positive or too large for 32-bit indices, or the
// two-step sizes are not supported (an intermediate grid smaller than the logits).
void check_geometry(const MaskGeometry& geometry);

// Per-mask sums (num_masks x kNumSums, see common/mask_math.h) and losses
//   dice_weight * dice + bce_weight * mean(bce)
// of sigmoid(upsampled logits) against the target, over the pixels where fov (a byte plane like the
// target) is non-zero, or every pixel when fov is null. T is the compute type: double for float64
// logits, float for the others. When `adjoint` is not null the forward also writes the gradient's
// adjoint planes (num_masks x kNumAdjoint x in_h x in_w, see common/mask_math.h), so that the
// backward is one elementwise pass.
template <typename T>
void dice_bce_forward(ValuePlanes logits, TargetPlanes target, const uint8_t* fov, const MaskGeometry& geometry,
                      double dice_weight, double bce_weight, double eps, double* sums, T* losses, T* adjoint,
                      const TaskRunner& runner);

// Gradient of sum_n grad_loss[n * grad_loss_stride] * loss[n] w.r.t. the logits (num_masks x in_h x
// in_w, written in grad.type) from the forward's sums and adjoint planes.
template <typename T>
void dice_bce_backward(const T* adjoint, const double* sums, const T* grad_loss, int64_t grad_loss_stride,
                       const MaskGeometry& geometry, double dice_weight, double bce_weight, double eps, void* grad,
                       ValueType grad_type, const TaskRunner& runner);

// Bilinear upsampling (align_corners=False). Writes the values to `values` when it is not null
// and (value > threshold) to `above` when it is not null.
template <typename T>
void upsample_masks(const T* logits, const MaskGeometry& geometry, T threshold, T* values, uint8_t* above,
                    const TaskRunner& runner);

// Per-mask [intersection, |pred|, |target|, union] (num_masks x kNumStats) of
// (upsampled logits > 0) against the target, over the pixels where fov is non-zero (all pixels
// when fov is null; fov is a byte plane).
template <typename T>
void mask_stats(const T* logits, TargetPlanes target, const uint8_t* fov, const MaskGeometry& geometry,
                int64_t* stats, const TaskRunner& runner);

}  // namespace hsft::cpu
