// Fused Dice+BCE forward and backward on CUDA. The forward is one kernel (after a memset of the
// per-mask tickets) whose blocks run the code of cuda/dice_bce_block.h: the full-resolution logits
// are recomputed in registers and shared memory and never stored, each target byte is read once,
// and the gradient's adjoint planes come out of the same pass. The backward is one elementwise kernel.
#include <cuda_runtime.h>

#include "common/mask_math.h"
#include "cuda/dice_bce_block.h"
#include "cuda/launch_config.cuh"
#include "cuda/mask_kernels_cuda.h"

namespace hsft::cuda {
namespace {

using cuda_block::ForwardArgs;
using cuda_block::kForwardThreads;

// The executor of cuda/dice_bce_block.h on the device: a phase runs on the calling thread, then the
// block waits at a barrier.
template <typename T>
struct DeviceExec {
  cuda_block::ThreadState<T> state;
  unsigned int* tickets;

  __device__ int threads() const { return static_cast<int>(blockDim.x); }

  template <typename F>
  __device__ void all(F&& phase) {
    phase(static_cast<int>(threadIdx.x), state);
    __syncthreads();
  }

  // The integer ticket: true in every thread of the mask's last block to finish. The fences make the
  // other blocks' partial sums, adjoint rows and carries visible to it.
  __device__ bool last_of_mask(int64_t n, int64_t bands) {
    __shared__ bool last;
    __threadfence();
    if (threadIdx.x == 0) last = atomicAdd(tickets + n, 1u) == static_cast<unsigned int>(bands - 1);
    __syncthreads();
    if (last) __threadfence();
    return last;
  }
};

template <typename T, typename L, typename G, bool kAdjoint, int kRows>
__global__ void __launch_bounds__(kForwardThreads) dice_bce_forward_kernel(ForwardArgs<T, L, G> args) {
  extern __shared__ double shared_storage[];  // double: aligned for either compute type
  T* smem = reinterpret_cast<T*>(shared_storage);
  const cuda_block::ForwardBlock<T, L, G, kAdjoint, kRows> block(args, blockIdx.y, blockIdx.x, smem,
                                                                  static_cast<int>(blockDim.x));
  DeviceExec<T> exec{{}, args.tickets};
  cuda_block::run_forward_block(exec, block);
}

// Grid (blocks, N): grad = a * adjoint0 + b * adjoint1 + c * adjoint2 with mask n's coefficients.
template <typename T, typename O>
__global__ void __launch_bounds__(kThreads)
    dice_bce_backward_kernel(const T* __restrict__ adjoint, const double* __restrict__ sums,
                             const T* __restrict__ grad_loss, int64_t grad_loss_stride, int64_t plane,
                             double dice_weight, double bce_weight, double eps, O* __restrict__ grad) {
  const int64_t n = blockIdx.y;
  const DiceBceGradCoefficients<T> k = dice_bce_grad_coefficients<T>(
      sums + n * kNumSums, static_cast<double>(grad_loss[n * grad_loss_stride]), dice_weight, bce_weight, eps);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < plane; i += stride)
    store(grad + n * plane + i, cuda_block::grad_at(adjoint, n, i, plane, k));
}

size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

struct ForwardWorkspace {
  size_t partial_offset, carry_offset, tickets_offset, total;
};

ForwardWorkspace forward_layout(const Geometry& g, size_t value_bytes) {
  const int64_t bands = cuda_block::bands_of(g.in_h);
  ForwardWorkspace w{};
  w.partial_offset = 0;
  w.carry_offset = align256(static_cast<size_t>(g.num_masks * bands * kNumSums) * sizeof(double));
  w.tickets_offset = w.carry_offset + align256(static_cast<size_t>(g.num_masks * bands * (kMaxAdjointRows - 1) *
                                                                    kNumAdjoint * g.in_w) * value_bytes);
  w.total = w.tickets_offset + align256(static_cast<size_t>(g.num_masks) * sizeof(unsigned int));
  return w;
}

template <typename T, typename L, typename G, bool kAdjoint, int kRows>
cudaError_t forward_launch(const ForwardArgs<T, L, G>& args, const Geometry& g, cudaStream_t stream) {
  const size_t shared = dice_bce_forward_shared_bytes(g, sizeof(T) == 8, kAdjoint);
  auto kernel = dice_bce_forward_kernel<T, L, G, kAdjoint, kRows>;
  if (shared > 48 * 1024) {
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    if (status != cudaSuccess) return status;
  }
  const dim3 grid(static_cast<unsigned int>(args.bands), static_cast<unsigned int>(g.num_masks));
  kernel<<<grid, kForwardThreads, shared, stream>>>(args);
  return cudaGetLastError();
}

template <typename T, typename L, typename G>
cudaError_t forward_typed(const L* logits, const G* target, const uint8_t* fov, const Geometry& g, double dice_weight,
                          double bce_weight, double eps, double* sums, T* losses, T* adjoint, void* workspace,
                          cudaStream_t stream) {
  const ForwardWorkspace layout = forward_layout(g, sizeof(T));
  char* base = static_cast<char*>(workspace);
  unsigned int* tickets = reinterpret_cast<unsigned int*>(base + layout.tickets_offset);
  const cudaError_t cleared =
      cudaMemsetAsync(tickets, 0, static_cast<size_t>(g.num_masks) * sizeof(unsigned int), stream);
  if (cleared != cudaSuccess) return cleared;
  const ForwardArgs<T, L, G> args{logits, target, fov, g.num_masks, g.in_h, g.in_w, g.out_h, g.out_w, g.mid_h,
                                  g.mid_w, dice_weight, bce_weight, eps, sums, losses, adjoint,
                                  reinterpret_cast<double*>(base + layout.partial_offset),
                                  reinterpret_cast<T*>(base + layout.carry_offset), tickets,
                                  cuda_block::bands_of(g.in_h)};
  const bool two_step = g.mid_h > 0;
  if (adjoint != nullptr)
    return two_step ? forward_launch<T, L, G, true, 3>(args, g, stream)
                    : forward_launch<T, L, G, true, 2>(args, g, stream);
  return two_step ? forward_launch<T, L, G, false, 3>(args, g, stream)
                  : forward_launch<T, L, G, false, 2>(args, g, stream);
}

// Float targets come in the compute type (the torch glue converts soft targets), so only bytes and T
// are instantiated.
template <typename T, typename L>
cudaError_t forward_target(const L* logits, const void* target, PlaneType target_type, const uint8_t* fov,
                           const Geometry& g, double dice_weight, double bce_weight, double eps, double* sums,
                           T* losses, T* adjoint, void* workspace, cudaStream_t stream) {
  const PlaneType float_type = sizeof(T) == sizeof(double) ? PlaneType::kFloat64 : PlaneType::kFloat32;
  if (target_type == PlaneType::kByte)
    return forward_typed(logits, static_cast<const uint8_t*>(target), fov, g, dice_weight, bce_weight, eps, sums,
                         losses, adjoint, workspace, stream);
  if (target_type == float_type)
    return forward_typed(logits, static_cast<const T*>(target), fov, g, dice_weight, bce_weight, eps, sums, losses,
                         adjoint, workspace, stream);
  return cudaErrorInvalidValue;
}

template <typename T, typename O>
cudaError_t backward_typed(const T* adjoint, const double* sums, const T* grad_loss, int64_t grad_loss_stride,
                           const Geometry& g, double dice_weight, double bce_weight, double eps, O* grad,
                           cudaStream_t stream) {
  const int64_t plane = g.in_h * g.in_w;
  int64_t blocks = (plane + kThreads * 4 - 1) / (kThreads * 4);
  blocks = blocks < 1 ? 1 : (blocks > 1024 ? 1024 : blocks);
  const dim3 grid(static_cast<unsigned int>(blocks), static_cast<unsigned int>(g.num_masks));
  dice_bce_backward_kernel<T, O><<<grid, kThreads, 0, stream>>>(adjoint, sums, grad_loss, grad_loss_stride, plane,
                                                                 dice_weight, bce_weight, eps, grad);
  return cudaGetLastError();
}

}  // namespace

size_t dice_bce_forward_workspace_bytes(const Geometry& g, bool is_double) {
  return forward_layout(g, is_double ? sizeof(double) : sizeof(float)).total;
}

size_t dice_bce_forward_shared_bytes(const Geometry& g, bool is_double, bool with_adjoint) {
  const int rows = with_adjoint ? (g.mid_h > 0 ? 3 : 2) : 0;
  const size_t value_bytes = is_double ? sizeof(double) : sizeof(float);
  return static_cast<size_t>(cuda_block::shared_layout<float>(g.in_w, g.out_w, rows, kForwardThreads).total) *
         value_bytes;
}

template <typename T>
cudaError_t launch_dice_bce_forward(const void* logits, ValueType logits_type, const void* target,
                                    PlaneType target_type, const uint8_t* fov, const Geometry& g, double dice_weight,
                                    double bce_weight, double eps, double* sums, T* losses, T* adjoint,
                                    void* workspace, cudaStream_t stream) {
  if (g.num_masks == 0) return cudaSuccess;
  auto run = [&](const auto* values) {
    return forward_target<T>(values, target, target_type, fov, g, dice_weight, bce_weight, eps, sums, losses,
                             adjoint, workspace, stream);
  };
  if constexpr (sizeof(T) == sizeof(double)) {
    if (logits_type != ValueType::kFloat64) return cudaErrorInvalidValue;
    return run(static_cast<const double*>(logits));
  } else {
    switch (logits_type) {
      case ValueType::kFloat32:
        return run(static_cast<const float*>(logits));
      case ValueType::kBFloat16:
        return run(static_cast<const BFloat16Bits*>(logits));
      case ValueType::kFloat16:
        return run(static_cast<const Float16Bits*>(logits));
      case ValueType::kFloat64:
        return cudaErrorInvalidValue;
    }
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_dice_bce_backward(const T* adjoint, const double* sums, const T* grad_loss,
                                     int64_t grad_loss_stride, const Geometry& g, double dice_weight,
                                     double bce_weight, double eps, void* grad, ValueType grad_type,
                                     cudaStream_t stream) {
  if (g.num_masks == 0) return cudaSuccess;
  auto run = [&](auto* out) {
    return backward_typed(adjoint, sums, grad_loss, grad_loss_stride, g, dice_weight, bce_weight, eps, out, stream);
  };
  if constexpr (sizeof(T) == sizeof(double)) {
    if (grad_type != ValueType::kFloat64) return cudaErrorInvalidValue;
    return run(static_cast<double*>(grad));
  } else {
    switch (grad_type) {
      case ValueType::kFloat32:
        return run(static_cast<float*>(grad));
      case ValueType::kBFloat16:
        return run(static_cast<BFloat16Bits*>(grad));
      case ValueType::kFloat16:
        return run(static_cast<Float16Bits*>(grad));
      case ValueType::kFloat64:
        return cudaErrorInvalidValue;
    }
  }
  return cudaErrorInvalidValue;
}

#define HSFT_INSTANTIATE(T)                                                                                        \
  template cudaError_t launch_dice_bce_forward<T>(const void*, ValueType, const void*, PlaneType, const uint8_t*,  \
                                                  const Geometry&, double, double, double, double*, T*, T*, void*, \
                                                  cudaStream_t);                                                   \
  template cudaError_t launch_dice_bce_backward<T>(const T*, const double*, const T*, int64_t, const Geometry&,    \
                                                   double, double, double, void*, ValueType, cudaStream_t);
HSFT_INSTANTIATE(float)
HSFT_INSTANTIATE(double)
#undef HSFT_INSTANTIATE

}  // namespace hsft::cuda
