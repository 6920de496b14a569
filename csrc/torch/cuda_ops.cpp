// CUDA implementations of the hsft ops: argument checks and layout as on CPU (op_inputs.h), then
// the launch_* functions of csrc/cuda on torch's current stream. Compiled only when the
// installed torch has CUDA.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "cuda/mask_kernels_cuda.h"
#include "torch/op_inputs.h"

namespace hsft::torch_glue {
namespace {

void check_launch(const char* op, cudaError_t status) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

cuda::PlaneType plane_type_of(const at::Tensor& planes) {
  switch (planes.scalar_type()) {
    case at::kByte:
      return cuda::PlaneType::kByte;
    case at::kFloat:
      return cuda::PlaneType::kFloat32;
    case at::kDouble:
      return cuda::PlaneType::kFloat64;
    default:
      TORCH_CHECK(false, "hsft: unexpected plane dtype ", planes.scalar_type());
  }
}

cuda::Geometry geometry_of(const PreparedPair& pair, MidSize mid = {}) {
  return {pair.logits.num_masks, pair.logits.in_h, pair.logits.in_w, pair.out_h, pair.out_w, mid.h, mid.w};
}

cuda::ValueType value_type_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return cuda::ValueType::kFloat32;
    case at::kDouble:
      return cuda::ValueType::kFloat64;
    case at::kBFloat16:
      return cuda::ValueType::kBFloat16;
    case at::kHalf:
      return cuda::ValueType::kFloat16;
    default:
      TORCH_CHECK(false, "hsft: unexpected logits dtype ", type);
  }
}

void check_sizes(const char* op, const cuda::Geometry& g) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(g.in_h < kMax && g.in_w < kMax && g.out_h < kMax && g.out_w < kMax && g.num_masks < 65536, op,
              ": sides must be below 2^31 and at most 65535 masks per call");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_bce_loss_forward_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& fov, double dice_weight,
    double bce_weight, double eps, at::OptionalIntArrayRef mid_size, bool with_adjoint) {
  constexpr const char* op = "hsft::dice_bce_loss";
  const c10::cuda::CUDAGuard guard(logits.device());
  check_loss_weights(op, dice_weight, bce_weight, eps);
  const PreparedPair pair = prepare_pair(op, logits, target);
  const MidSize mid = check_mid_size(op, mid_size, pair.logits);
  const std::optional<at::Tensor> fov_planes = prepare_fov(op, fov, pair, logits);
  const uint8_t* fov_ptr = fov_planes.has_value() ? fov_planes->data_ptr<uint8_t>() : nullptr;
  const cuda::Geometry g = geometry_of(pair, mid);
  check_sizes(op, g);
  const bool is_double = logits.scalar_type() == at::kDouble;
  const size_t shared = cuda::dice_bce_forward_shared_bytes(g, is_double, with_adjoint);
  int shared_limit = 0;
  const cudaError_t queried = cudaDeviceGetAttribute(&shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                                     logits.device().index());
  TORCH_CHECK(queried == cudaSuccess, op, ": could not query the device: ", cudaGetErrorString(queried));
  TORCH_CHECK(shared <= static_cast<size_t>(shared_limit), op, ": a target ", g.out_w,
              " pixels wide needs ", shared, " bytes of shared memory per block; this GPU has ", shared_limit);
  const auto compute = logits.options().dtype(compute_dtype(logits));
  at::Tensor sums = at::empty({g.num_masks, 5}, logits.options().dtype(at::kDouble));
  at::Tensor losses = at::empty({g.num_masks}, compute);
  at::Tensor adjoint = with_adjoint ? at::empty({g.num_masks, 3, g.in_h, g.in_w}, compute) : at::empty({0}, compute);
  if (g.num_masks > 0) {
    at::Tensor workspace = at::empty({static_cast<int64_t>(cuda::dice_bce_forward_workspace_bytes(g, is_double))},
                                     logits.options().dtype(at::kByte));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const void* values = pair.logits.planes.data_ptr();
    const cuda::ValueType values_type = value_type_of(logits.scalar_type());
    const void* target_ptr = pair.target.data_ptr();
    const cuda::PlaneType type = plane_type_of(pair.target);
    if (is_double) {
      check_launch(op, cuda::launch_dice_bce_forward<double>(
                           values, values_type, target_ptr, type, fov_ptr, g, dice_weight, bce_weight, eps,
                           sums.data_ptr<double>(), losses.data_ptr<double>(),
                           with_adjoint ? adjoint.data_ptr<double>() : nullptr, workspace.data_ptr(), stream));
    } else {
      check_launch(op, cuda::launch_dice_bce_forward<float>(
                           values, values_type, target_ptr, type, fov_ptr, g, dice_weight, bce_weight, eps,
                           sums.data_ptr<double>(), losses.data_ptr<float>(),
                           with_adjoint ? adjoint.data_ptr<float>() : nullptr, workspace.data_ptr(), stream));
    }
  }
  return {losses, sums, adjoint};
}

std::tuple<at::Tensor, at::Tensor> dice_bce_loss_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                      const std::optional<at::Tensor>& fov, double dice_weight,
                                                      double bce_weight, double eps, at::OptionalIntArrayRef mid_size) {
  auto [losses, sums, adjoint] =
      dice_bce_loss_forward_cuda(logits, target, fov, dice_weight, bce_weight, eps, mid_size, false);
  return {losses, sums};
}

at::Tensor dice_bce_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& sums, const at::Tensor& adjoint,
                                       double dice_weight, double bce_weight, double eps, at::ScalarType dtype) {
  constexpr const char* op = "hsft::dice_bce_loss_backward";
  const c10::cuda::CUDAGuard guard(adjoint.device());
  check_loss_weights(op, dice_weight, bce_weight, eps);
  check_backward_inputs(op, grad_loss, sums, adjoint, dtype);
  const int64_t n = adjoint.size(0), h = adjoint.size(2), w = adjoint.size(3);
  at::Tensor grad = at::empty({n, h, w}, adjoint.options().dtype(dtype));
  if (n > 0) {
    const cuda::Geometry g{n, h, w, 1, 1};
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    if (adjoint.scalar_type() == at::kDouble) {
      check_launch(op, cuda::launch_dice_bce_backward<double>(
                           adjoint.data_ptr<double>(), sums.data_ptr<double>(), grad_loss.data_ptr<double>(),
                           grad_loss.stride(0), g, dice_weight, bce_weight, eps, grad.data_ptr(),
                           value_type_of(dtype), stream));
    } else {
      check_launch(op, cuda::launch_dice_bce_backward<float>(
                           adjoint.data_ptr<float>(), sums.data_ptr<double>(), grad_loss.data_ptr<float>(),
                           grad_loss.stride(0), g, dice_weight, bce_weight, eps, grad.data_ptr(),
                           value_type_of(dtype), stream));
    }
  }
  return grad;
}

at::Tensor upsample_masks_cuda(const at::Tensor& logits, at::IntArrayRef size, std::optional<double> threshold) {
  constexpr const char* op = "hsft::upsample_masks";
  const c10::cuda::CUDAGuard guard(logits.device());
  check_size(op, size);
  PreparedLogits prepared = prepare_logits(op, logits);
  prepared.planes = prepared.planes.to(compute_dtype(logits));
  const cuda::Geometry g{prepared.num_masks, prepared.in_h, prepared.in_w, size[0], size[1]};
  check_sizes(op, g);
  at::Tensor out = threshold.has_value()
                       ? at::empty({g.num_masks, g.out_h, g.out_w}, logits.options().dtype(at::kBool))
                       : at::empty({g.num_masks, g.out_h, g.out_w}, prepared.planes.options());
  if (g.num_masks > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    uint8_t* above = threshold.has_value() ? static_cast<uint8_t*>(out.data_ptr()) : nullptr;
    if (prepared.planes.scalar_type() == at::kDouble) {
      double* values = threshold.has_value() ? nullptr : out.data_ptr<double>();
      check_launch(op, cuda::launch_upsample_masks(prepared.planes.data_ptr<double>(), g, threshold.value_or(0.0),
                                                   values, above, stream));
    } else {
      float* values = threshold.has_value() ? nullptr : out.data_ptr<float>();
      check_launch(op, cuda::launch_upsample_masks(prepared.planes.data_ptr<float>(), g,
                                                   static_cast<float>(threshold.value_or(0.0)), values, above,
                                                   stream));
    }
  }
  if (!threshold.has_value()) out = out.to(logits.scalar_type());
  return restore_layout(out, logits);
}

at::Tensor mask_stats_cuda(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& fov) {
  constexpr const char* op = "hsft::mask_stats";
  const c10::cuda::CUDAGuard guard(logits.device());
  PreparedPair pair = prepare_pair(op, logits, target);
  pair.logits.planes = pair.logits.planes.to(compute_dtype(logits));
  const std::optional<at::Tensor> fov_planes = prepare_fov(op, fov, pair, logits);
  const cuda::Geometry g = geometry_of(pair);
  check_sizes(op, g);
  at::Tensor stats = at::empty({g.num_masks, 4}, logits.options().dtype(at::kLong));
  if (g.num_masks > 0) {
    const uint8_t* fov_ptr = fov_planes.has_value() ? fov_planes->data_ptr<uint8_t>() : nullptr;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const void* target_ptr = pair.target.data_ptr();
    const cuda::PlaneType type = plane_type_of(pair.target);
    if (pair.logits.planes.scalar_type() == at::kDouble) {
      check_launch(op, cuda::launch_mask_stats(pair.logits.planes.data_ptr<double>(), target_ptr, type, fov_ptr, g,
                                               stats.data_ptr<int64_t>(), stream));
    } else {
      check_launch(op, cuda::launch_mask_stats(pair.logits.planes.data_ptr<float>(), target_ptr, type, fov_ptr, g,
                                               stats.data_ptr<int64_t>(), stream));
    }
  }
  return stats;
}

}  // namespace
}  // namespace hsft::torch_glue

TORCH_LIBRARY_IMPL(hsft, CUDA, m) {
  m.impl("dice_bce_loss", &hsft::torch_glue::dice_bce_loss_cuda);
  m.impl("dice_bce_loss_forward", &hsft::torch_glue::dice_bce_loss_forward_cuda);
  m.impl("dice_bce_loss_backward", &hsft::torch_glue::dice_bce_loss_backward_cuda);
  m.impl("upsample_masks", &hsft::torch_glue::upsample_masks_cuda);
  m.impl("mask_stats", &hsft::torch_glue::mask_stats_cuda);
}
