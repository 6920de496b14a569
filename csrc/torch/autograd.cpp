// Autograd of hsft::dice_bce_loss, registered once for every device: the forward runs
// dice_bce_loss_forward, which also accumulates the gradient's adjoint planes when the logits need
// a gradient, and the backward is dice_bce_loss_backward, one elementwise pass over those planes.
// Both go through the dispatcher, so the device kernels and the fake (meta) implementations serve
// eager calls, torch.compile and torch.export alike.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace hsft::torch_glue {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_forward(const at::Tensor& logits, const at::Tensor& target,
                                                            const std::optional<at::Tensor>& fov, double dice_weight,
                                                            double bce_weight, double eps,
                                                            at::OptionalIntArrayRef mid_size, bool with_adjoint) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("hsft::dice_bce_loss_forward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double,
                                 double, double, at::OptionalIntArrayRef, bool)>();
  return op.call(logits, target, fov, dice_weight, bce_weight, eps, mid_size, with_adjoint);
}

at::Tensor call_backward(const at::Tensor& grad_loss, const at::Tensor& sums, const at::Tensor& adjoint,
                         double dice_weight, double bce_weight, double eps, at::ScalarType dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("hsft::dice_bce_loss_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                               double, double, at::ScalarType)>();
  return op.call(grad_loss, sums, adjoint, dice_weight, bce_weight, eps, dtype);
}

class DiceBceLoss : public torch::autograd::Function<DiceBceLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& fov, double dice_weight, double bce_weight,
                               double eps, at::OptionalIntArrayRef mid_size) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, sums, adjoint] =
        call_forward(logits, target, fov, dice_weight, bce_weight, eps, mid_size, /*with_adjoint=*/true);
    ctx->save_for_backward({sums, adjoint});
    ctx->saved_data["dice_weight"] = dice_weight;
    ctx->saved_data["bce_weight"] = bce_weight;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["dtype"] = logits.scalar_type();
    ctx->saved_data["four_d"] = logits.dim() == 4;
    ctx->mark_non_differentiable({sums});
    return {loss, sums};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    at::Tensor grad_loss = grads[0];
    if (!grad_loss.defined()) grad_loss = at::zeros_like(saved[0].select(1, 0), saved[1].options());
    at::Tensor grad = call_backward(grad_loss, saved[0], saved[1], ctx->saved_data["dice_weight"].toDouble(),
                                    ctx->saved_data["bce_weight"].toDouble(), ctx->saved_data["eps"].toDouble(),
                                    ctx->saved_data["dtype"].toScalarType());
    // (N, h, w) -> the logits' (N, h, w) or (N, 1, h, w): a view.
    if (ctx->saved_data["four_d"].toBool()) grad = grad.unsqueeze(1);
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> dice_bce_loss_autograd(const at::Tensor& logits, const at::Tensor& target,
                                                          const std::optional<at::Tensor>& fov, double dice_weight,
                                                          double bce_weight, double eps,
                                                          at::OptionalIntArrayRef mid_size) {
  if (!(at::GradMode::is_enabled() && logits.requires_grad())) {
    // No graph to record: the forward alone, without the adjoint planes.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, sums, adjoint] =
        call_forward(logits, target, fov, dice_weight, bce_weight, eps, mid_size, /*with_adjoint=*/false);
    return {loss, sums};
  }
  const variable_list out = DiceBceLoss::apply(logits, target, fov, dice_weight, bce_weight, eps, mid_size);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace hsft::torch_glue

TORCH_LIBRARY_IMPL(hsft, Autograd, m) { m.impl("dice_bce_loss", &hsft::torch_glue::dice_bce_loss_autograd); }
