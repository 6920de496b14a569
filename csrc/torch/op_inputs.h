// Argument checks and layout preparation shared by the CPU and CUDA registrations of the hsft
// ops: both see the same messages and the same normalised inputs.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

namespace hsft::torch_glue {

// The compute type of the kernels: float64 stays float64, every other float type runs in
// float32. Logits are read in their own dtype (bfloat16 / float16 included), never converted.
inline at::ScalarType compute_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

struct PreparedLogits {
  at::Tensor planes;  // (N, h, w), contiguous, the logits' dtype
  int64_t num_masks;
  int64_t in_h;
  int64_t in_w;
};

// The logits as (N, h, w) planes: a view when they are contiguous (the usual case), a copy otherwise.
inline PreparedLogits prepare_logits(const char* op, const at::Tensor& logits) {
  const bool four_d = logits.dim() == 4 && logits.size(1) == 1;
  TORCH_CHECK(logits.dim() == 3 || four_d, op, ": logits must have shape (N, h, w) or (N, 1, h, w), got ",
              logits.sizes());
  const at::ScalarType type = logits.scalar_type();
  TORCH_CHECK(type == at::kDouble || type == at::kFloat || type == at::kBFloat16 || type == at::kHalf, op,
              ": logits must be float64, float32, bfloat16 or float16, got ", type);
  const int64_t n = logits.size(0);
  const int64_t h = logits.size(-2);
  const int64_t w = logits.size(-1);
  TORCH_CHECK(h > 0 && w > 0, op, ": logits planes must not be empty, got ", logits.sizes());
  at::Tensor planes = logits.reshape({n, h, w}).contiguous();
  return {planes, n, h, w};
}

// (mid_h, mid_w) of the two-step resize, or (0, 0) for one step.
struct MidSize {
  int64_t h = 0;
  int64_t w = 0;
};

inline MidSize check_mid_size(const char* op, at::OptionalIntArrayRef mid_size, const PreparedLogits& logits) {
  if (!mid_size.has_value()) return {};
  const at::IntArrayRef size = *mid_size;
  TORCH_CHECK(size.size() == 2 && size[0] > 0 && size[1] > 0, op,
              ": mid_size must be None or two positive ints (H, W), got ", size);
  TORCH_CHECK(size[0] >= logits.in_h && size[1] >= logits.in_w, op, ": mid_size ", size,
              " is smaller than the logits (", logits.in_h, ", ", logits.in_w,
              "); the two-step resize needs a first step that does not shrink");
  return {size[0], size[1]};
}

// A (N, H, W) plane stack read by the kernels: bool / uint8 as bytes, floats in `float_dtype`.
inline at::Tensor prepare_planes(const char* op, const char* name, const at::Tensor& planes, const at::Tensor& logits,
                                 int64_t num_masks, at::ScalarType float_dtype, bool allow_float) {
  TORCH_CHECK(planes.dim() == 3, op, ": ", name, " must have shape (N, H, W), got ", planes.sizes());
  TORCH_CHECK(planes.size(0) == num_masks, op, ": ", name, " has ", planes.size(0), " masks but logits have ",
              num_masks);
  TORCH_CHECK(planes.size(1) > 0 && planes.size(2) > 0, op, ": ", name, " planes must not be empty, got ",
              planes.sizes());
  TORCH_CHECK(planes.device() == logits.device(), op, ": ", name, " is on ", planes.device(), " but logits are on ",
              logits.device());
  const at::ScalarType type = planes.scalar_type();
  if (type == at::kBool) return planes.contiguous().view(at::kByte);
  if (type == at::kByte) return planes.contiguous();
  TORCH_CHECK(allow_float && at::isFloatingType(type), op, ": ", name, " must be ",
              allow_float ? "bool, uint8 or floating point" : "bool or uint8", ", got ", type);
  return planes.to(float_dtype).contiguous();
}

struct PreparedPair {
  PreparedLogits logits;
  at::Tensor target;  // (N, H, W) bytes or compute-dtype floats, contiguous
  int64_t out_h;
  int64_t out_w;
};

inline PreparedPair prepare_pair(const char* op, const at::Tensor& logits, const at::Tensor& target) {
  PreparedLogits prepared = prepare_logits(op, logits);
  at::Tensor planes =
      prepare_planes(op, "target", target, logits, prepared.num_masks, compute_dtype(logits), /*allow_float=*/true);
  const int64_t out_h = planes.size(1);
  const int64_t out_w = planes.size(2);
  return {std::move(prepared), std::move(planes), out_h, out_w};
}

inline std::optional<at::Tensor> prepare_fov(const char* op, const std::optional<at::Tensor>& fov,
                                             const PreparedPair& pair, const at::Tensor& logits) {
  if (!fov.has_value()) return std::nullopt;
  at::Tensor planes =
      prepare_planes(op, "fov", *fov, logits, pair.logits.num_masks, at::kByte, /*allow_float=*/false);
  TORCH_CHECK(planes.size(1) == pair.out_h && planes.size(2) == pair.out_w, op, ": fov has shape ", fov->sizes(),
              " but target has (", pair.logits.num_masks, ", ", pair.out_h, ", ", pair.out_w, ")");
  return planes;
}

inline void check_loss_weights(const char* op, double dice_weight, double bce_weight, double eps) {
  TORCH_CHECK(dice_weight >= 0 && bce_weight >= 0, op, ": dice_weight and bce_weight must be >= 0, got ",
              dice_weight, " and ", bce_weight);
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
}

inline void check_backward_inputs(const char* op, const at::Tensor& grad_loss, const at::Tensor& sums,
                                  const at::Tensor& adjoint, at::ScalarType dtype) {
  TORCH_CHECK(adjoint.dim() == 4 && adjoint.size(1) == 3 && adjoint.is_contiguous(), op,
              ": adjoint must be the forward's contiguous (N, 3, h, w) planes, got ", adjoint.sizes());
  const int64_t num_masks = adjoint.size(0);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == num_masks, op, ": grad_loss must have shape (",
              num_masks, ",), got ", grad_loss.sizes());
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == num_masks && sums.size(1) == 5 && sums.is_contiguous() &&
                  sums.scalar_type() == at::kDouble,
              op, ": sums must be the forward's contiguous float64 (", num_masks, ", 5) tensor, got ", sums.sizes(),
              " ", sums.scalar_type());
  TORCH_CHECK(grad_loss.scalar_type() == adjoint.scalar_type(), op, ": grad_loss is ", grad_loss.scalar_type(),
              " but the forward computed in ", adjoint.scalar_type());
  TORCH_CHECK(grad_loss.device() == adjoint.device() && sums.device() == adjoint.device(), op,
              ": grad_loss and sums must be on the adjoint planes' device ", adjoint.device());
  TORCH_CHECK((adjoint.scalar_type() == at::kDouble) == (dtype == at::kDouble) &&
                  (dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf),
              op, ": cannot write a gradient of ", dtype, " from ", adjoint.scalar_type(), " adjoint planes");
}

// (N, H, W) result back in the caller's layout: (N, 1, H, W) when logits were 4-D.
inline at::Tensor restore_layout(const at::Tensor& planes, const at::Tensor& logits) {
  return logits.dim() == 4 ? planes.unsqueeze(1) : planes;
}

inline void check_size(const char* op, at::IntArrayRef size) {
  TORCH_CHECK(size.size() == 2 && size[0] > 0 && size[1] > 0, op, ": size must be two positive ints (H, W), got ",
              size);
}

}  // namespace hsft::torch_glue
