// The schemas of the hsft ops, defined once. Device kernels are registered in cpu_ops.cpp and
// cuda_ops.cpp, the autograd kernel of dice_bce_loss in autograd.cpp, fake (meta) implementations
// in Python (hsft/ops/registration.py).
#include <torch/library.h>

TORCH_LIBRARY(hsft, m) {
  // Per-mask loss dice_weight * dice + bce_weight * mean(bce) of sigmoid(bilinear resize of logits to
  // target's size), over the pixels where fov (optional, bool / uint8 like target) is non-zero; also
  // returns the per-mask sums (N x 5, float64). With mid_size the resize goes through an intermediate
  // grid of that size (two bilinear steps, never stored). Differentiable w.r.t. logits.
  m.def(
      "dice_bce_loss(Tensor logits, Tensor target, Tensor? fov, float dice_weight, float bce_weight, float eps, "
      "int[]? mid_size=None) -> (Tensor loss, Tensor sums)");
  // The forward autograd runs: with with_adjoint, also the gradient's adjoint planes (N x 3 x h x w,
  // in the compute dtype), from which the backward is one elementwise pass; else an empty tensor.
  m.def(
      "dice_bce_loss_forward(Tensor logits, Tensor target, Tensor? fov, float dice_weight, float bce_weight, "
      "float eps, int[]? mid_size, bool with_adjoint) -> (Tensor loss, Tensor sums, Tensor adjoint)");
  // Gradient w.r.t. the logits as (N, h, w) planes of `dtype`, from the forward's sums and adjoint planes.
  m.def(
      "dice_bce_loss_backward(Tensor grad_loss, Tensor sums, Tensor adjoint, float dice_weight, float bce_weight, "
      "float eps, ScalarType dtype) -> Tensor");
  m.def("upsample_masks(Tensor logits, int[2] size, float? threshold) -> Tensor");
  m.def("mask_stats(Tensor logits, Tensor target, Tensor? fov) -> Tensor");
}
