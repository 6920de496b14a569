// Bilinear mask upsampling and per-mask confusion counts on CUDA.
#include <cuda_runtime.h>

#include "common/mask_math.h"
#include "cuda/launch_config.cuh"
#include "cuda/mask_kernels_cuda.h"

namespace hsft::cuda {
namespace {

// One thread per output pixel (grid-stride).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    upsample_kernel(const T* __restrict__ logits, Geometry g, T threshold, T* __restrict__ values,
                    uint8_t* __restrict__ above) {
  const int64_t pixels = g.out_h * g.out_w;
  const int64_t total = g.num_masks * pixels;
  const T scale_y = linear_scale<T>(g.in_h, g.out_h);
  const T scale_x = linear_scale<T>(g.in_w, g.out_w);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total; i += stride) {
    const int64_t n = i / pixels;
    const int64_t p = i - n * pixels;
    const int64_t y = p / g.out_w;
    const int64_t x = p - y * g.out_w;
    const T z = bilinear_value(logits + n * g.in_h * g.in_w, g.in_w, linear_tap<T>(y, g.in_h, g.out_h, scale_y),
                               linear_tap<T>(x, g.in_w, g.out_w, scale_x));
    if (values != nullptr) values[i] = z;
    if (above != nullptr) above[i] = z > threshold ? 1 : 0;
  }
}

// Grid (blocks_per_mask, N). Integer counts: the atomic adds are exact, so the result does not
// depend on their order.
template <typename T, typename G>
__global__ void __launch_bounds__(kThreads)
    mask_stats_kernel(const T* __restrict__ logits, const G* __restrict__ target, const uint8_t* __restrict__ fov,
                      Geometry g, unsigned long long* __restrict__ stats) {
  __shared__ unsigned long long shared_warps[kWarps];
  const int64_t n = blockIdx.y;
  const int64_t pixels = g.out_h * g.out_w;
  const T* plane = logits + n * g.in_h * g.in_w;
  const T scale_y = linear_scale<T>(g.in_h, g.out_h);
  const T scale_x = linear_scale<T>(g.in_w, g.out_w);
  unsigned long long counts[3] = {0, 0, 0};
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < pixels; i += stride) {
    const int64_t y = i / g.out_w;
    const int64_t x = i - y * g.out_w;
    const int64_t offset = n * pixels + i;
    const bool inside = fov == nullptr || fov[offset] != 0;
    const T z = bilinear_value(plane, g.in_w, linear_tap<T>(y, g.in_h, g.out_h, scale_y),
                               linear_tap<T>(x, g.in_w, g.out_w, scale_x));
    const bool pred = inside && z > T(0);
    const bool gt = inside && target_positive(target[offset]);
    counts[0] += pred && gt;
    counts[1] += pred;
    counts[2] += gt;
  }
  for (int s = 0; s < 3; ++s) {
    const unsigned long long total = block_sum(counts[s], shared_warps);
    if (threadIdx.x == 0 && total != 0) atomicAdd(stats + n * kNumStats + s, total);
  }
}

__global__ void mask_stats_union_kernel(int64_t num_masks, int64_t* __restrict__ stats) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= num_masks) return;
  int64_t* s = stats + n * kNumStats;
  s[kStatUnion] = s[kStatPred] + s[kStatTarget] - s[kStatIntersection];
}

template <typename T, typename G>
cudaError_t stats_typed(const T* logits, const G* target, const uint8_t* fov, const Geometry& g, int64_t* stats,
                        cudaStream_t stream) {
  cudaError_t status = cudaMemsetAsync(stats, 0, static_cast<size_t>(g.num_masks) * kNumStats * sizeof(int64_t), stream);
  if (status != cudaSuccess) return status;
  const dim3 grid(blocks_per_mask(g), static_cast<unsigned int>(g.num_masks));
  mask_stats_kernel<T, G><<<grid, kThreads, 0, stream>>>(logits, target, fov, g,
                                                        reinterpret_cast<unsigned long long*>(stats));
  mask_stats_union_kernel<<<grid_for(g.num_masks, 128), 128, 0, stream>>>(g.num_masks, stats);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_upsample_masks(const T* logits, const Geometry& g, T threshold, T* values, uint8_t* above,
                                  cudaStream_t stream) {
  const int64_t total = g.num_masks * g.out_h * g.out_w;
  if (total == 0) return cudaSuccess;
  upsample_kernel<T><<<grid_for(total, kThreads), kThreads, 0, stream>>>(logits, g, threshold, values, above);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_mask_stats(const T* logits, const void* target, PlaneType target_type, const uint8_t* fov,
                              const Geometry& g, int64_t* stats, cudaStream_t stream) {
  if (g.num_masks == 0) return cudaSuccess;
  switch (target_type) {
    case PlaneType::kByte:
      return stats_typed(logits, static_cast<const uint8_t*>(target), fov, g, stats, stream);
    case PlaneType::kFloat32:
      return stats_typed(logits, static_cast<const float*>(target), fov, g, stats, stream);
    case PlaneType::kFloat64:
      return stats_typed(logits, static_cast<const double*>(target), fov, g, stats, stream);
  }
  return cudaErrorInvalidValue;
}

#define HSFT_INSTANTIATE(T)                                                                                     \
  template cudaError_t launch_upsample_masks<T>(const T*, const Geometry&, T, T*, uint8_t*, cudaStream_t);      \
  template cudaError_t launch_mask_stats<T>(const T*, const void*, PlaneType, const uint8_t*, const Geometry&,  \
                                            int64_t*, cudaStream_t);
HSFT_INSTANTIATE(float)
HSFT_INSTANTIATE(double)
#undef HSFT_INSTANTIATE

}  // namespace hsft::cuda
