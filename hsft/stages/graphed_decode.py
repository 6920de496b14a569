"""The cached HSFT step's decoder, replayed as CUDA graphs (`--hsft-cuda-graph`).

With the feature cache a training step runs only text_hidden_fcs and the SAM2 mask decoder: on a GPU,
hundreds of small kernels whose launches take longer than their arithmetic (BENCHMARKS.md, the profile of
the real-shape step). GraphedDecode captures the decoder's forward and backward once per input shape
(torch.cuda.make_graphed_callables) and replays them; the loss, the optimizer and DeepSpeed stay eager.

Only training calls replay (grad mode on, model in training mode); validation and the hard-set probes
run the eager decoder. The parameters the loss never reaches must be frozen first (hsft.stages.hsft
does): a replayed backward hands every trainable parameter a gradient slot, and DeepSpeed's gradient
hooks cannot take an empty one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hsft.model.features import SamFeatures

__all__ = ["GraphedDecode", "TensorDecode", "capture_cuda_graphs", "freeze_unreached_by_the_loss"]


class TensorDecode(nn.Module):
    """model.decode_masks over plain tensors, the form make_graphed_callables takes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image_embedding, feat_s0, feat_s1, seg_hidden):
        return self.model.decode_masks(SamFeatures(image_embedding, feat_s0, feat_s1), seg_hidden)


def capture_cuda_graphs(module: nn.Module, sample_args: tuple[torch.Tensor, ...]) -> Callable:
    """`module`'s forward and backward captured as CUDA graphs (warm-up iterations included)."""
    # allow_unused_input=False: a trainable parameter the decoder does not reach stops the capture here,
    # instead of reaching DeepSpeed's gradient hooks without a gradient.
    return torch.cuda.make_graphed_callables(module, sample_args, allow_unused_input=False)


# Trainable parts of the mask decoder that the mask loss never reaches: the IoU and object-score heads
# only pick or gate a mask (an argmax, a comparison), and the point and mask prompt embeddings are unused
# (no points, no mask prompt). Eager training leaves their gradients empty, so that only weight decay
# moves them; a replayed backward cannot leave a trainable parameter without a gradient.
UNREACHED_BY_THE_LOSS = ("sam2.mask_decoder.iou_prediction_head.", "sam2.mask_decoder.pred_obj_score_head.",
                         "sam2.prompt_encoder.mask_embed.", "sam2.prompt_encoder.point_embed.")
# ... and SAM2's not-a-point embedding, unless the model's convention pads the prompt with it.
NOT_A_POINT = "sam2.prompt_encoder.not_a_point_embed."


def freeze_unreached_by_the_loss(model: nn.Module) -> list[str]:
    """Freeze the trainable parameters the mask loss cannot reach; returns their names."""
    unreached = UNREACHED_BY_THE_LOSS + (() if model.conventions.decoder_prompt == "padded" else (NOT_A_POINT,))
    frozen = []
    for name, param in model.named_parameters():
        if param.requires_grad and name.startswith(unreached):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


class GraphedDecode:
    """Call as model.decode_masks(sam_features, seg_hidden). `capture` turns a TensorDecode and sample
    inputs into the replaying callable (CUDA graphs by default)."""

    def __init__(self, model: nn.Module, capture: Callable | None = None):
        self.model = model
        self.capture = capture or capture_cuda_graphs
        self._replays: dict[tuple, Callable] = {}  # one capture per input shape (the last batch may be short)

    def __len__(self) -> int:
        return len(self._replays)

    def __call__(self, feats: SamFeatures, seg_hidden: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.model.training):
            return self.model.decode_masks(feats, seg_hidden)
        args = (feats.image_embedding, feats.feat_s0, feats.feat_s1, seg_hidden)
        key = tuple((tuple(a.shape), a.dtype, str(a.device)) for a in args)
        if key not in self._replays:
            # A fresh module per shape: capturing replaces the module's forward.
            self._replays[key] = self.capture(TensorDecode(self.model), tuple(a.detach() for a in args))
        return self._replays[key](*args)
