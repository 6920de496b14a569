// CUDA mask kernels (no torch headers): fused Dice+BCE forward / backward from low-resolution
// logits, bilinear mask upsampling and per-mask confusion counts. Each launch_* function
// enqueues its kernels on `stream` and returns the launch status; nothing synchronises.
// T is the compute type (float or double); logits are contiguous (N, h, w) planes, targets and
// fields of view contiguous (N, H, W) planes. Results are deterministic: partial sums are
// combined in a fixed order and no floating-point atomics are used.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace hsft::cuda {

// mid_h, mid_w > 0: the Dice+BCE op resizes in two steps, in -> mid -> out (common/resize_plan.h).
struct Geometry {
  int64_t num_masks;
  int64_t in_h;
  int64_t in_w;
  int64_t out_h;
  int64_t out_w;
  int64_t mid_h = 0;
  int64_t mid_w = 0;
};

enum class PlaneType { kByte, kFloat32, kFloat64 };
// Logits and gradients: bfloat16 / float16 are read and written as stored, computed in float32.
enum class ValueType { kFloat32, kFloat64, kBFloat16, kFloat16 };

// Scratch the caller allocates (device memory, 256-byte aligned) for each forward launch; the
// forward clears the part that must start at zero itself.
size_t dice_bce_forward_workspace_bytes(const Geometry& g, bool is_double);

// Dynamic shared memory of one forward block, and whether this device can give it (the largest
// images do not fit; the caller then refuses the call with a message).
size_t dice_bce_forward_shared_bytes(const Geometry& g, bool is_double, bool with_adjoint);

// sums: num_masks x 5 (sum p, sum p g, sum g, sum bce, pixel count; see common/mask_math.h) float64,
// losses: num_masks in T, over the pixels where fov is non-zero (every pixel when fov is null). With
// adjoint not null, also the gradient's adjoint planes (num_masks x 3 x in_h x in_w, T). T is double
// for float64 logits, float for the others. One memset and one kernel.
template <typename T>
cudaError_t launch_dice_bce_forward(const void* logits, ValueType logits_type, const void* target,
                                    PlaneType target_type, const uint8_t* fov, const Geometry& g, double dice_weight,
                                    double bce_weight, double eps, double* sums, T* losses, T* adjoint,
                                    void* workspace, cudaStream_t stream);

// grad (num_masks x in_h x in_w, grad_type) of sum_n grad_loss[n * grad_loss_stride] * loss[n], from the
// forward's sums and adjoint planes: one elementwise kernel.
template <typename T>
cudaError_t launch_dice_bce_backward(const T* adjoint, const double* sums, const T* grad_loss,
                                     int64_t grad_loss_stride, const Geometry& g, double dice_weight,
                                     double bce_weight, double eps, void* grad, ValueType grad_type,
                                     cudaStream_t stream);

// Writes values (if not null) and value > threshold (if above is not null).
template <typename T>
cudaError_t launch_upsample_masks(const T* logits, const Geometry& g, T threshold, T* values, uint8_t* above,
                                  cudaStream_t stream);

// stats: num_masks x 4 int64 [intersection, |pred|, |target|, union]; fov may be null.
template <typename T>
cudaError_t launch_mask_stats(const T* logits, const void* target, PlaneType target_type, const uint8_t* fov,
                              const Geometry& g, int64_t* stats, cudaStream_t stream);

}  // namespace hsft::cuda
