// CPU implementations of the hsft ops: argument checks, layout, and the plain-C++ kernels run
// on torch's intra-op thread pool.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/mask_kernels.h"
#include "torch/op_inputs.h"

namespace hsft::torch_glue {
namespace {

void run_on_torch_threads(int64_t num_tasks, int64_t grain, const cpu::TaskBody& body) {
  at::parallel_for(0, num_tasks, grain, [&](int64_t begin, int64_t end) { body(begin, end); });
}

cpu::TargetPlanes planes_of(const at::Tensor& planes) {
  switch (planes.scalar_type()) {
    case at::kByte:
      return {planes.data_ptr(), cpu::PlaneType::kByte};
    case at::kFloat:
      return {planes.data_ptr(), cpu::PlaneType::kFloat32};
    case at::kDouble:
      return {planes.data_ptr(), cpu::PlaneType::kFloat64};
    default:
      TORCH_CHECK(false, "hsft: unexpected plane dtype ", planes.scalar_type());
  }
}

cpu::MaskGeometry geometry_of(const PreparedPair& pair, MidSize mid = {}) {
  return {pair.logits.num_masks, pair.logits.in_h, pair.logits.in_w, pair.out_h, pair.out_w, mid.h, mid.w};
}

cpu::ValueType value_type_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return cpu::ValueType::kFloat32;
    case at::kDouble:
      return cpu::ValueType::kFloat64;
    case at::kBFloat16:
      return cpu::ValueType::kBFloat16;
    case at::kHalf:
      return cpu::ValueType::kFloat16;
    default:
      TORCH_CHECK(false, "hsft: unexpected logits dtype ", type);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_bce_loss_forward_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& fov, double dice_weight,
    double bce_weight, double eps, at::OptionalIntArrayRef mid_size, bool with_adjoint) {
  constexpr const char* op = "hsft::dice_bce_loss";
  check_loss_weights(op, dice_weight, bce_weight, eps);
  const PreparedPair pair = prepare_pair(op, logits, target);
  const MidSize mid = check_mid_size(op, mid_size, pair.logits);
  const std::optional<at::Tensor> fov_planes = prepare_fov(op, fov, pair, logits);
  const uint8_t* fov_ptr = fov_planes.has_value() ? fov_planes->data_ptr<uint8_t>() : nullptr;
  const int64_t n = pair.logits.num_masks;
  const auto compute = logits.options().dtype(compute_dtype(logits));
  at::Tensor sums = at::empty({n, 5}, logits.options().dtype(at::kDouble));
  at::Tensor losses = at::empty({n}, compute);
  at::Tensor adjoint = with_adjoint ? at::empty({n, 3, pair.logits.in_h, pair.logits.in_w}, compute)
                                    : at::empty({0}, compute);
  if (n > 0) {
    const cpu::MaskGeometry g = geometry_of(pair, mid);
    const cpu::ValuePlanes values{pair.logits.planes.data_ptr(), value_type_of(logits.scalar_type())};
    if (losses.scalar_type() == at::kDouble) {
      cpu::dice_bce_forward<double>(values, planes_of(pair.target), fov_ptr, g, dice_weight, bce_weight, eps,
                                    sums.data_ptr<double>(), losses.data_ptr<double>(),
                                    with_adjoint ? adjoint.data_ptr<double>() : nullptr, run_on_torch_threads);
    } else {
      cpu::dice_bce_forward<float>(values, planes_of(pair.target), fov_ptr, g, dice_weight, bce_weight, eps,
                                   sums.data_ptr<double>(), losses.data_ptr<float>(),
                                   with_adjoint ? adjoint.data_ptr<float>() : nullptr, run_on_torch_threads);
    }
  }
  return {losses, sums, adjoint};
}

std::tuple<at::Tensor, at::Tensor> dice_bce_loss_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                     const std::optional<at::Tensor>& fov, double dice_weight,
                                                     double bce_weight, double eps, at::OptionalIntArrayRef mid_size) {
  auto [losses, sums, adjoint] =
      dice_bce_loss_forward_cpu(logits, target, fov, dice_weight, bce_weight, eps, mid_size, false);
  return {losses, sums};
}

at::Tensor dice_bce_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& sums, const at::Tensor& adjoint,
                                      double dice_weight, double bce_weight, double eps, at::ScalarType dtype) {
  constexpr const char* op = "hsft::dice_bce_loss_backward";
  check_loss_weights(op, dice_weight, bce_weight, eps);
  check_backward_inputs(op, grad_loss, sums, adjoint, dtype);
  const int64_t n = adjoint.size(0), h = adjoint.size(2), w = adjoint.size(3);
  at::Tensor grad = at::empty({n, h, w}, adjoint.options().dtype(dtype));
  if (n > 0) {
    // Only the sizes of the low-resolution planes matter to the elementwise pass.
    const cpu::MaskGeometry g{n, h, w, 1, 1};
    if (adjoint.scalar_type() == at::kDouble) {
      cpu::dice_bce_backward<double>(adjoint.data_ptr<double>(), sums.data_ptr<double>(),
                                     grad_loss.data_ptr<double>(), grad_loss.stride(0), g, dice_weight, bce_weight,
                                     eps, grad.data_ptr(), value_type_of(dtype), run_on_torch_threads);
    } else {
      cpu::dice_bce_backward<float>(adjoint.data_ptr<float>(), sums.data_ptr<double>(), grad_loss.data_ptr<float>(),
                                    grad_loss.stride(0), g, dice_weight, bce_weight, eps, grad.data_ptr(),
                                    value_type_of(dtype), run_on_torch_threads);
    }
  }
  return grad;
}

at::Tensor upsample_masks_cpu(const at::Tensor& logits, at::IntArrayRef size, std::optional<double> threshold) {
  constexpr const char* op = "hsft::upsample_masks";
  check_size(op, size);
  PreparedLogits prepared = prepare_logits(op, logits);
  prepared.planes = prepared.planes.to(compute_dtype(logits));
  const cpu::MaskGeometry g{prepared.num_masks, prepared.in_h, prepared.in_w, size[0], size[1]};
  const auto options = logits.options();
  at::Tensor out = threshold.has_value() ? at::empty({g.num_masks, g.out_h, g.out_w}, options.dtype(at::kBool))
                                         : at::empty({g.num_masks, g.out_h, g.out_w}, prepared.planes.options());
  if (g.num_masks > 0) {
    uint8_t* above = threshold.has_value() ? static_cast<uint8_t*>(out.data_ptr()) : nullptr;
    if (prepared.planes.scalar_type() == at::kDouble) {
      double* values = threshold.has_value() ? nullptr : out.data_ptr<double>();
      cpu::upsample_masks(prepared.planes.data_ptr<double>(), g, threshold.value_or(0.0), values, above,
                          run_on_torch_threads);
    } else {
      float* values = threshold.has_value() ? nullptr : out.data_ptr<float>();
      cpu::upsample_masks(prepared.planes.data_ptr<float>(), g, static_cast<float>(threshold.value_or(0.0)), values,
                          above, run_on_torch_threads);
    }
  }
  if (!threshold.has_value()) out = out.to(logits.scalar_type());
  return restore_layout(out, logits);
}

at::Tensor mask_stats_cpu(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& fov) {
  constexpr const char* op = "hsft::mask_stats";
  PreparedPair pair = prepare_pair(op, logits, target);
  pair.logits.planes = pair.logits.planes.to(compute_dtype(logits));
  const std::optional<at::Tensor> fov_planes = prepare_fov(op, fov, pair, logits);
  at::Tensor stats = at::empty({pair.logits.num_masks, 4}, logits.options().dtype(at::kLong));
  if (pair.logits.num_masks > 0) {
    const uint8_t* fov_ptr = fov_planes.has_value() ? fov_planes->data_ptr<uint8_t>() : nullptr;
    const cpu::MaskGeometry g = geometry_of(pair);
    if (pair.logits.planes.scalar_type() == at::kDouble) {
      cpu::mask_stats(pair.logits.planes.data_ptr<double>(), planes_of(pair.target), fov_ptr, g,
                      stats.data_ptr<int64_t>(), run_on_torch_threads);
    } else {
      cpu::mask_stats(pair.logits.planes.data_ptr<float>(), planes_of(pair.target), fov_ptr, g,
                      stats.data_ptr<int64_t>(), run_on_torch_threads);
    }
  }
  return stats;
}

}  // namespace
}  // namespace hsft::torch_glue

TORCH_LIBRARY_IMPL(hsft, CPU, m) {
  m.impl("dice_bce_loss", &hsft::torch_glue::dice_bce_loss_cpu);
  m.impl("dice_bce_loss_forward", &hsft::torch_glue::dice_bce_loss_forward_cpu);
  m.impl("dice_bce_loss_backward", &hsft::torch_glue::dice_bce_loss_backward_cpu);
  m.impl("upsample_masks", &hsft::torch_glue::upsample_masks_cpu);
  m.impl("mask_stats", &hsft::torch_glue::mask_stats_cpu);
}
