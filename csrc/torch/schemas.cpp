// The schemas of the hsft ops, defined once. Device kernels are registered in cpu_ops.cpp and
// cuda_ops.cpp; autograd and fake (meta) implementations in Python (hsft/ops/registration.py).
#include <torch/library.h>

TORCH_LIBRARY(hsft, m) {
  // Per-mask loss dice_weight * dice + bce_weight * mean(bce) of sigmoid(bilinear upsample of
  // logits to target's size), over the pixels where fov (optional, bool / uint8 like target) is
  // non-zero; also returns the per-mask sums the backward needs (N x 5, float64).
  m.def(
      "dice_bce_loss(Tensor logits, Tensor target, Tensor? fov, float dice_weight, float bce_weight, float eps) "
      "-> (Tensor loss, Tensor sums)");
  // Gradient w.r.t. the low-resolution logits, from the forward's sums.
  m.def(
      "dice_bce_loss_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? fov, Tensor sums, "
      "float dice_weight, float bce_weight, float eps) -> Tensor");
  m.def("upsample_masks(Tensor logits, int[2] size, float? threshold) -> Tensor");
  m.def("mask_stats(Tensor logits, Tensor target, Tensor? fov) -> Tensor");
}
