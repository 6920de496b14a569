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

cpu::MaskGeometry geometry_of(const PreparedPair& pair) {
  return {pair.logits.num_masks, pair.logits.in_h, pair.logits.in_w, pair.out_h, pair.out_w};
}

std::tuple<at::Tensor, at::Tensor> dice_bce_loss_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                     const std::optional<at::Tensor>& fov, double dice_weight,
                                                     double bce_weight, double eps) {
  constexpr const char* op = "hsft::dice_bce_loss";
  check_loss_weights(op, dice_weight, bce_weight, eps);
  const PreparedPair pair = prepare_pair(op, logits, target);
  const std::optional<at::Tensor> fov_planes = prepare_fov(op, fov, pair, logits);
  const uint8_t* fov_ptr = fov_planes.has_value() ? fov_planes->data_ptr<uint8_t>() : nullptr;
  const int64_t n = pair.logits.num_masks;
  const auto f64 = logits.options().dtype(at::kDouble);
  at::Tensor sums = at::empty({n, 5}, f64);
  at::Tensor losses = at::empty({n}, f64);
  if (n > 0) {
    const cpu::MaskGeometry g = geometry_of(pair);
    if (pair.logits.planes.scalar_type() == at::kDouble) {
      cpu::dice_bce_forward(pair.logits.planes.data_ptr<double>(), planes_of(pair.target), fov_ptr, g, dice_weight,
                            bce_weight, eps, sums.data_ptr<double>(), losses.data_ptr<double>(), run_on_torch_threads);
    } else {
      cpu::dice_bce_forward(pair.logits.planes.data_ptr<float>(), planes_of(pair.target), fov_ptr, g, dice_weight,
                            bce_weight, eps, sums.data_ptr<double>(), losses.data_ptr<double>(), run_on_torch_threads);
    }
  }
  return {losses.to(loss_dtype(logits)), sums};
}

at::Tensor dice_bce_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                      const std::optional<at::Tensor>& fov, const at::Tensor& sums,
                                      double dice_weight, double bce_weight, double eps) {
  constexpr const char* op = "hsft::dice_bce_loss_backward";
  check_loss_weights(op, dice_weight, bce_weight, eps);
  const PreparedPair pair = prepare_pair(op, logits, target);
  const std::optional<at::Tensor> fov_planes = prepare_fov(op, fov, pair, logits);
  const uint8_t* fov_ptr = fov_planes.has_value() ? fov_planes->data_ptr<uint8_t>() : nullptr;
  const int64_t n = pair.logits.num_masks;
  check_backward_inputs(op, grad_loss, sums, logits, n);
  at::Tensor grad = at::empty_like(pair.logits.planes);
  if (n > 0) {
    const at::Tensor grad_loss64 = grad_loss.to(at::kDouble).contiguous();
    const at::Tensor sums64 = sums.to(at::kDouble).contiguous();
    const cpu::MaskGeometry g = geometry_of(pair);
    if (grad.scalar_type() == at::kDouble) {
      cpu::dice_bce_backward(pair.logits.planes.data_ptr<double>(), planes_of(pair.target), fov_ptr, g,
                             sums64.data_ptr<double>(), grad_loss64.data_ptr<double>(), dice_weight, bce_weight, eps,
                             grad.data_ptr<double>(), run_on_torch_threads);
    } else {
      cpu::dice_bce_backward(pair.logits.planes.data_ptr<float>(), planes_of(pair.target), fov_ptr, g,
                             sums64.data_ptr<double>(), grad_loss64.data_ptr<double>(), dice_weight, bce_weight, eps,
                             grad.data_ptr<float>(), run_on_torch_threads);
    }
  }
  return grad.to(logits.scalar_type()).view(logits.sizes());
}

at::Tensor upsample_masks_cpu(const at::Tensor& logits, at::IntArrayRef size, std::optional<double> threshold) {
  constexpr const char* op = "hsft::upsample_masks";
  check_size(op, size);
  const PreparedLogits prepared = prepare_logits(op, logits);
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
  const PreparedPair pair = prepare_pair(op, logits, target);
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
  m.impl("dice_bce_loss_backward", &hsft::torch_glue::dice_bce_loss_backward_cpu);
  m.impl("upsample_masks", &hsft::torch_glue::upsample_masks_cpu);
  m.impl("mask_stats", &hsft::torch_glue::mask_stats_cpu);
}
