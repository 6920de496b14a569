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

struct Geometry {
  int64_t num_masks;
  int64_t in_h;
  int64_t in_w;
  int64_t out_h;
  int64_t out_w;
};

enum class PlaneType { kByte, kFloat32, kFloat64 };

// Scratch the caller allocates (device memory, any alignment of 256 bytes) for each launch.
size_t dice_bce_forward_workspace_bytes(const Geometry& g);
size_t dice_bce_backward_workspace_bytes(const Geometry& g, bool is_double);

// sums: num_masks x 5 (sum p, sum p g, sum g, sum bce, pixel count; see common/mask_math.h), losses:
// num_masks, both float64; over the pixels where fov is non-zero (every pixel when fov is null).
template <typename T>
cudaError_t launch_dice_bce_forward(const T* logits, const void* target, PlaneType target_type, const uint8_t* fov,
                                    const Geometry& g,
                                    double dice_weight, double bce_weight, double eps, double* sums, double* losses,
                                    void* workspace, cudaStream_t stream);

// grad_logits (num_masks x h x w) of sum_n grad_loss[n] * loss[n]; sums from the forward (same fov).
template <typename T>
cudaError_t launch_dice_bce_backward(const T* logits, const void* target, PlaneType target_type, const uint8_t* fov,
                                     const Geometry& g,
                                     const double* sums, const double* grad_loss, double dice_weight,
                                     double bce_weight, double eps, T* grad_logits, void* workspace,
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
