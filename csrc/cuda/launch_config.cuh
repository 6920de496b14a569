// Launch shapes and block-level reductions shared by the CUDA mask kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/mask_kernels_cuda.h"

namespace hsft::cuda {

constexpr int kThreads = 256;  // threads per block of the pixel kernels
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBlocksPerMask = 512;
// Pixels a thread handles at least before the grid is widened; fixes the partial-sum layout from
// the geometry alone, so results do not depend on the device.
constexpr int64_t kPixelsPerThread = 16;

inline int blocks_per_mask(const Geometry& g) {
  const int64_t pixels = g.out_h * g.out_w;
  int64_t blocks = (pixels + kThreads * kPixelsPerThread - 1) / (kThreads * kPixelsPerThread);
  if (blocks < 1) blocks = 1;
  if (blocks > kMaxBlocksPerMask) blocks = kMaxBlocksPerMask;
  return static_cast<int>(blocks);
}

inline unsigned int grid_for(int64_t items, int threads) {
  int64_t blocks = (items + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  const int64_t cap = int64_t{1} << 30;
  return static_cast<unsigned int>(blocks < cap ? blocks : cap);
}

// Sum over the block in a fixed tree order; the result is valid in thread 0.
template <typename V>
__device__ __forceinline__ V block_sum(V value, V* shared_warps) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) shared_warps[warp] = value;
  __syncthreads();
  V total = V(0);
  if (warp == 0) {
    total = lane < kWarps ? shared_warps[lane] : V(0);
    for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_down_sync(0xffffffffu, total, offset);
  }
  __syncthreads();
  return total;
}

// Target elements of a plane type, for the templated kernels.
template <PlaneType P>
struct PlaneElement;
template <>
struct PlaneElement<PlaneType::kByte> {
  using type = uint8_t;
};
template <>
struct PlaneElement<PlaneType::kFloat32> {
  using type = float;
};
template <>
struct PlaneElement<PlaneType::kFloat64> {
  using type = double;
};

// Four consecutive elements loaded at once (one 4-, 16- or 32-byte access).
template <typename G>
struct alignas(4 * sizeof(G)) Quad {
  G v[4];
};

}  // namespace hsft::cuda
