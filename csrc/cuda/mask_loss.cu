// Fused Dice+BCE forward and backward on CUDA: the full-resolution logits are recomputed from the
// low-resolution planes in registers and never stored.
#include <cuda_runtime.h>

#include "common/mask_math.h"
#include "cuda/launch_config.cuh"
#include "cuda/mask_kernels_cuda.h"

namespace hsft::cuda {
namespace {

// Accumulates one pixel's terms into the thread's sums (kSumCount is kept only with a field of view).
template <typename T>
__device__ __forceinline__ void add_pixel(T z, T g, T (&acc)[kNumSums]) {
  const LogisticTerms<T> t = logistic_terms(z);
  acc[kSumProb] += t.p;
  acc[kSumProbTarget] += t.p * g;
  acc[kSumTarget] += g;
  acc[kSumBce] += bce_with_logits(z, g, t.softplus);
  acc[kSumCount] += T(1);
}

// Grid (blocks_per_mask, N). Each thread walks the mask's pixels in a fixed stride; with
// kVec == 4 (width divisible by 4, aligned target and field of view) it takes four pixels of one
// row at a time with one vector load of the target (and of the field of view). Pixels where the
// field of view (when not null) is 0 are skipped. Block sums go to partial[n][block][kNumSums].
template <typename T, typename G, int kVec>
__global__ void __launch_bounds__(kThreads)
    dice_bce_forward_kernel(const T* __restrict__ logits, const G* __restrict__ target,
                            const uint8_t* __restrict__ fov, Geometry g, double* __restrict__ partial) {
  __shared__ T shared_warps[kWarps];
  const int64_t n = blockIdx.y;
  const int64_t pixels = g.out_h * g.out_w;
  const T* plane = logits + n * g.in_h * g.in_w;
  const G* target_plane = target + n * pixels;
  const uint8_t* fov_plane = fov == nullptr ? nullptr : fov + n * pixels;
  const T scale_y = linear_scale<T>(g.in_h, g.out_h);
  const T scale_x = linear_scale<T>(g.in_w, g.out_w);
  T acc[kNumSums] = {T(0), T(0), T(0), T(0), T(0)};
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * kVec;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kVec; i < pixels; i += stride) {
    const int64_t y = i / g.out_w;
    const int64_t x = i - y * g.out_w;
    const LinearTap<T> ty = linear_tap<T>(y, g.in_h, g.out_h, scale_y);
    if (kVec == 4) {
      const Quad<G> quad = *reinterpret_cast<const Quad<G>*>(target_plane + i);
      Quad<uint8_t> inside = {{1, 1, 1, 1}};
      if (fov_plane != nullptr) inside = *reinterpret_cast<const Quad<uint8_t>*>(fov_plane + i);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (inside.v[k] == 0) continue;
        const LinearTap<T> tx = linear_tap<T>(x + k, g.in_w, g.out_w, scale_x);
        add_pixel(bilinear_value(plane, g.in_w, ty, tx), target_value<T>(quad.v[k]), acc);
      }
    } else if (fov_plane == nullptr || fov_plane[i] != 0) {
      const LinearTap<T> tx = linear_tap<T>(x, g.in_w, g.out_w, scale_x);
      add_pixel(bilinear_value(plane, g.in_w, ty, tx), target_value<T>(target_plane[i]), acc);
    }
  }
  double* out = partial + (n * gridDim.x + blockIdx.x) * kNumSums;
#pragma unroll
  for (int s = 0; s < kNumSums; ++s) {
    const T total = block_sum(acc[s], shared_warps);
    if (threadIdx.x == 0) out[s] = static_cast<double>(total);
  }
}

// One warp per mask: adds the blocks' partial sums in a fixed order, then the loss. Without a field
// of view the pixel count is the plane's size, exactly.
__global__ void dice_bce_finalize_kernel(const double* __restrict__ partial, int blocks, Geometry g, bool masked,
                                         double dice_weight, double bce_weight, double eps,
                                         double* __restrict__ sums, double* __restrict__ losses) {
  const int64_t n = blockIdx.x;
  const int lane = threadIdx.x;
  double acc[kNumSums] = {0.0, 0.0, 0.0, 0.0, 0.0};
  for (int b = lane; b < blocks; b += 32)
    for (int s = 0; s < kNumSums; ++s) acc[s] += partial[(n * blocks + b) * kNumSums + s];
  for (int s = 0; s < kNumSums; ++s)
    for (int offset = 16; offset > 0; offset >>= 1) acc[s] += __shfl_down_sync(0xffffffffu, acc[s], offset);
  if (lane == 0) {
    if (!masked) acc[kSumCount] = static_cast<double>(g.out_h * g.out_w);
    for (int s = 0; s < kNumSums; ++s) sums[n * kNumSums + s] = acc[s];
    losses[n] = dice_bce_value(acc, dice_weight, bce_weight, eps);
  }
}

// owner_start tables of both axes (see fill_owner_start in common/mask_math.h).
template <typename T>
__global__ void owner_start_kernel(Geometry g, int32_t* __restrict__ rows, int32_t* __restrict__ cols) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i <= g.out_h) fill_owner_start<T>(i, g.in_h, g.out_h, linear_scale<T>(g.in_h, g.out_h), rows);
  if (i <= g.out_w) fill_owner_start<T>(i, g.in_w, g.out_w, linear_scale<T>(g.in_w, g.out_w), cols);
}

template <typename T>
__global__ void grad_coefficients_kernel(const double* __restrict__ sums, const double* __restrict__ grad_loss,
                                         Geometry g, double dice_weight, double bce_weight, double eps,
                                         DiceBceGradCoefficients<T>* __restrict__ coeff) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= g.num_masks) return;
  coeff[n] = dice_bce_grad_coefficients<T>(sums + n * kNumSums, grad_loss[n], dice_weight, bce_weight, eps);
}

// One thread per low-resolution cell (n, r, c): it owns the full-resolution pixels whose upper-left
// source is (r, c), and splits their gradient into the four cells of the bilinear stencil:
// quarters[0..3][n][r][c] hold what goes to (r, c), (r, c+1), (r+1, c), (r+1, c+1).
template <typename T, typename G>
__global__ void __launch_bounds__(kThreads)
    dice_bce_backward_cells_kernel(const T* __restrict__ logits, const G* __restrict__ target,
                                   const uint8_t* __restrict__ fov, Geometry g,
                                   const DiceBceGradCoefficients<T>* __restrict__ coeff,
                                   const int32_t* __restrict__ row_start, const int32_t* __restrict__ col_start,
                                   T* __restrict__ quarters) {
  const int64_t cells = g.num_masks * g.in_h * g.in_w;
  const int64_t cell = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (cell >= cells) return;
  const int64_t c = cell % g.in_w;
  const int64_t r = (cell / g.in_w) % g.in_h;
  const int64_t n = cell / (g.in_w * g.in_h);
  const T* plane = logits + n * g.in_h * g.in_w;
  const G* target_plane = target + n * g.out_h * g.out_w;
  const uint8_t* fov_plane = fov == nullptr ? nullptr : fov + n * g.out_h * g.out_w;
  const DiceBceGradCoefficients<T> k = coeff[n];
  const T scale_y = linear_scale<T>(g.in_h, g.out_h);
  const T scale_x = linear_scale<T>(g.in_w, g.out_w);
  T acc00 = T(0), acc01 = T(0), acc10 = T(0), acc11 = T(0);
  for (int32_t y = row_start[r]; y < row_start[r + 1]; ++y) {
    const LinearTap<T> ty = linear_tap<T>(y, g.in_h, g.out_h, scale_y);
    const G* target_row = target_plane + static_cast<int64_t>(y) * g.out_w;
    const uint8_t* fov_row = fov_plane == nullptr ? nullptr : fov_plane + static_cast<int64_t>(y) * g.out_w;
    for (int32_t x = col_start[c]; x < col_start[c + 1]; ++x) {
      if (fov_row != nullptr && fov_row[x] == 0) continue;  // outside the field of view: no gradient
      const LinearTap<T> tx = linear_tap<T>(x, g.in_w, g.out_w, scale_x);
      const T z = bilinear_value(plane, g.in_w, ty, tx);
      const T dz = dice_bce_pixel_grad(k, logistic_terms(z), target_value<T>(target_row[x]));
      // A clamped tap (last row / column) sends both weights to the same cell.
      T top = ty.w0 * dz, bottom = ty.w1 * dz;
      if (ty.i1 == ty.i0) {
        top += bottom;
        bottom = T(0);
      }
      T left = tx.w0, right = tx.w1;
      if (tx.i1 == tx.i0) {
        left += right;
        right = T(0);
      }
      acc00 += top * left;
      acc01 += top * right;
      acc10 += bottom * left;
      acc11 += bottom * right;
    }
  }
  quarters[cell] = acc00;
  quarters[cells + cell] = acc01;
  quarters[2 * cells + cell] = acc10;
  quarters[3 * cells + cell] = acc11;
}

// grad[n][r][c] = the four quarters that land on (r, c), added in a fixed order.
template <typename T>
__global__ void dice_bce_backward_gather_kernel(const T* __restrict__ quarters, Geometry g, T* __restrict__ grad) {
  const int64_t cells = g.num_masks * g.in_h * g.in_w;
  const int64_t cell = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cell >= cells) return;
  const int64_t c = cell % g.in_w;
  const int64_t r = (cell / g.in_w) % g.in_h;
  T value = quarters[cell];
  if (c > 0) value += quarters[cells + cell - 1];
  if (r > 0) value += quarters[2 * cells + cell - g.in_w];
  if (r > 0 && c > 0) value += quarters[3 * cells + cell - g.in_w - 1];
  grad[cell] = value;
}

template <typename T, typename G>
cudaError_t forward_typed(const T* logits, const G* target, const uint8_t* fov, const Geometry& g, double dice_weight,
                          double bce_weight, double eps, double* sums, double* losses, void* workspace,
                          cudaStream_t stream) {
  const int blocks = blocks_per_mask(g);
  double* partial = static_cast<double*>(workspace);
  const dim3 grid(blocks, static_cast<unsigned int>(g.num_masks));
  const bool vec4 = g.out_w % 4 == 0 && reinterpret_cast<uintptr_t>(target) % (4 * sizeof(G)) == 0 &&
                    reinterpret_cast<uintptr_t>(fov) % 4 == 0;
  if (vec4) {
    dice_bce_forward_kernel<T, G, 4><<<grid, kThreads, 0, stream>>>(logits, target, fov, g, partial);
  } else {
    dice_bce_forward_kernel<T, G, 1><<<grid, kThreads, 0, stream>>>(logits, target, fov, g, partial);
  }
  dice_bce_finalize_kernel<<<static_cast<unsigned int>(g.num_masks), 32, 0, stream>>>(
      partial, blocks, g, fov != nullptr, dice_weight, bce_weight, eps, sums, losses);
  return cudaGetLastError();
}

// Backward workspace layout: [coefficients | row_start | col_start | quarters], each 256-aligned.
struct BackwardWorkspace {
  size_t coeff_offset, rows_offset, cols_offset, quarters_offset, total;
};

size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

BackwardWorkspace backward_layout(const Geometry& g, size_t value_bytes) {
  BackwardWorkspace w{};
  w.coeff_offset = 0;
  w.rows_offset = w.coeff_offset + align256(static_cast<size_t>(g.num_masks) * 3 * value_bytes);
  w.cols_offset = w.rows_offset + align256(static_cast<size_t>(g.in_h + 1) * sizeof(int32_t));
  w.quarters_offset = w.cols_offset + align256(static_cast<size_t>(g.in_w + 1) * sizeof(int32_t));
  w.total = w.quarters_offset + align256(static_cast<size_t>(4 * g.num_masks * g.in_h * g.in_w) * value_bytes);
  return w;
}

template <typename T, typename G>
cudaError_t backward_typed(const T* logits, const G* target, const uint8_t* fov, const Geometry& g, const double* sums,
                           const double* grad_loss, double dice_weight, double bce_weight, double eps, T* grad,
                           void* workspace, cudaStream_t stream) {
  const BackwardWorkspace layout = backward_layout(g, sizeof(T));
  char* base = static_cast<char*>(workspace);
  auto* coeff = reinterpret_cast<DiceBceGradCoefficients<T>*>(base + layout.coeff_offset);
  auto* rows = reinterpret_cast<int32_t*>(base + layout.rows_offset);
  auto* cols = reinterpret_cast<int32_t*>(base + layout.cols_offset);
  auto* quarters = reinterpret_cast<T*>(base + layout.quarters_offset);
  const int64_t longest = (g.out_h > g.out_w ? g.out_h : g.out_w) + 1;
  owner_start_kernel<T><<<grid_for(longest, 128), 128, 0, stream>>>(g, rows, cols);
  grad_coefficients_kernel<T><<<grid_for(g.num_masks, 128), 128, 0, stream>>>(sums, grad_loss, g, dice_weight,
                                                                              bce_weight, eps, coeff);
  const int64_t cells = g.num_masks * g.in_h * g.in_w;
  dice_bce_backward_cells_kernel<T, G><<<grid_for(cells, kThreads), kThreads, 0, stream>>>(logits, target, fov, g,
                                                                                         coeff, rows, cols, quarters);
  dice_bce_backward_gather_kernel<T><<<grid_for(cells, kThreads), kThreads, 0, stream>>>(quarters, g, grad);
  return cudaGetLastError();
}

}  // namespace

size_t dice_bce_forward_workspace_bytes(const Geometry& g) {
  return static_cast<size_t>(g.num_masks) * blocks_per_mask(g) * kNumSums * sizeof(double);
}

size_t dice_bce_backward_workspace_bytes(const Geometry& g, bool is_double) {
  return backward_layout(g, is_double ? sizeof(double) : sizeof(float)).total;
}

template <typename T>
cudaError_t launch_dice_bce_forward(const T* logits, const void* target, PlaneType target_type, const uint8_t* fov,
                                    const Geometry& g,
                                    double dice_weight, double bce_weight, double eps, double* sums, double* losses,
                                    void* workspace, cudaStream_t stream) {
  if (g.num_masks == 0) return cudaSuccess;
  switch (target_type) {
    case PlaneType::kByte:
      return forward_typed(logits, static_cast<const uint8_t*>(target), fov, g, dice_weight, bce_weight, eps, sums, losses,
                           workspace, stream);
    case PlaneType::kFloat32:
      return forward_typed(logits, static_cast<const float*>(target), fov, g, dice_weight, bce_weight, eps, sums, losses,
                           workspace, stream);
    case PlaneType::kFloat64:
      return forward_typed(logits, static_cast<const double*>(target), fov, g, dice_weight, bce_weight, eps, sums, losses,
                           workspace, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_dice_bce_backward(const T* logits, const void* target, PlaneType target_type, const uint8_t* fov,
                                     const Geometry& g,
                                     const double* sums, const double* grad_loss, double dice_weight,
                                     double bce_weight, double eps, T* grad_logits, void* workspace,
                                     cudaStream_t stream) {
  if (g.num_masks == 0) return cudaSuccess;
  switch (target_type) {
    case PlaneType::kByte:
      return backward_typed(logits, static_cast<const uint8_t*>(target), fov, g, sums, grad_loss, dice_weight, bce_weight,
                            eps, grad_logits, workspace, stream);
    case PlaneType::kFloat32:
      return backward_typed(logits, static_cast<const float*>(target), fov, g, sums, grad_loss, dice_weight, bce_weight,
                            eps, grad_logits, workspace, stream);
    case PlaneType::kFloat64:
      return backward_typed(logits, static_cast<const double*>(target), fov, g, sums, grad_loss, dice_weight, bce_weight,
                            eps, grad_logits, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

#define HSFT_INSTANTIATE(T)                                                                                       \
  template cudaError_t launch_dice_bce_forward<T>(const T*, const void*, PlaneType, const uint8_t*, const Geometry&, \
                                                  double,                                                         \
                                                  double, double, double*, double*, void*, cudaStream_t);         \
  template cudaError_t launch_dice_bce_backward<T>(const T*, const void*, PlaneType, const uint8_t*,               \
                                                   const Geometry&,                                               \
                                                   const double*, const double*, double, double, double, T*,      \
                                                   void*, cudaStream_t);
HSFT_INSTANTIATE(float)
HSFT_INSTANTIATE(double)
#undef HSFT_INSTANTIATE

}  // namespace hsft::cuda
