"""Configuration of the Sa2VA-style model: which weights to start from and how it is prompted.

`ModelConfig` picks either an embedded preset (built locally, no download) or a pair of real
local checkpoints in transformers format (an InternVL VLM and a SAM2 model). `PromptConfig` holds
the instruction and the answer the model is trained to give; the answer carries the single
`[SEG]` token whose last-layer hidden state prompts the mask decoder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from hsft.errors import BadValue

from hsft.model.presets import PRESETS
from hsft.model.tiling import TileSettings

__all__ = ["ModelConfig", "PromptConfig", "Conventions", "SEG_TOKEN", "IMAGE_PLACEHOLDER", "CHAT_TOKENS", "DTYPES"]

SEG_TOKEN = "[SEG]"
# Where the image goes in a user's text, as Sa2VA's own examples write it ("<image>Please segment
# ..."); accepted only at the start. Without it the image comes first, followed by a newline.
IMAGE_PLACEHOLDER = "<image>"
# Tokens of the InternVL / Qwen chat template. User text must not contain them: they would break
# the turn structure (and the image-token count the VLM checks).
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>")
DTYPES = ("float32", "bfloat16", "float16")


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise BadValue(f"{name}: {message}")


@dataclass
class PromptConfig:
    """The conversation the model is trained on and asked at inference.

    Rendered in the InternVL/Qwen chat style (see hsft.model.chat):
    `<|im_start|>user\\n<img>` + image context tokens + `</img>\\n{instruction}<|im_end|>\\n`
    `<|im_start|>assistant\\n{response}<|im_end|>`, preceded by a system turn when `system` is set.
    """

    instruction: str = field(
        default="Please segment the blood vessel.", metadata={"help": "the user's request after the image"}
    )
    response: str = field(
        default="Sure, [SEG].", metadata={"help": "the trained answer; must contain exactly one [SEG]"}
    )
    system: str | None = field(default=None, metadata={"help": "optional system message"})

    def validate(self, prefix: str = "prompt") -> None:
        validate_instruction(self.instruction, f"{prefix}.instruction")
        validate_response(self.response, f"{prefix}.response")
        if self.system is not None:
            _check(bool(self.system.strip()), f"{prefix}.system", "must be None or a non-empty string")
            _check(SEG_TOKEN not in self.system, f"{prefix}.system", f"must not contain {SEG_TOKEN}")
            _check_no_chat_tokens(self.system, f"{prefix}.system")


def _check_no_chat_tokens(text: str, name: str) -> None:
    found = [tok for tok in CHAT_TOKENS if tok in text]
    _check(not found, name, f"must not contain the chat template token(s) {found}: {text!r}")


def validate_instruction(instruction: str, name: str = "instruction") -> None:
    _check(isinstance(instruction, str) and bool(instruction.strip()), name, "must be a non-empty string")
    _check(instruction.count(IMAGE_PLACEHOLDER) == 0 or (instruction.count(IMAGE_PLACEHOLDER) == 1 and
                                                         instruction.startswith(IMAGE_PLACEHOLDER)),
           name, f"{IMAGE_PLACEHOLDER} may only lead the text (the image is placed there): {instruction!r}")
    _check(bool(instruction.removeprefix(IMAGE_PLACEHOLDER).strip()), name, "has no text besides the image")
    # The "prompt" form appends [SEG] to the instruction; a [SEG] inside it would make two.
    _check(SEG_TOKEN not in instruction, name, f"must not contain {SEG_TOKEN} (it belongs in the response)")
    _check_no_chat_tokens(instruction, name)


def validate_response(response: str, name: str = "response") -> None:
    _check(isinstance(response, str), name, f"must be a string, got {type(response).__name__}")
    count = response.count(SEG_TOKEN)
    _check(count == 1, name, f"must contain exactly one {SEG_TOKEN}, found {count} in {response!r}")
    _check_no_chat_tokens(response, name)


@dataclass(frozen=True)
class Conventions:
    """How a model forms the mask decoder's prompt, picks its mask and reads its images.

    The defaults are hsft's own conventions (every preset and every model directory written
    before this record existed); `Conventions.release()` are those of a released Sa2VA
    checkpoint's own inference code, which an imported checkpoint uses in training and inference
    alike. Saved in the model directory's hsft_model.json.

    fcs_activation: text_hidden_fcs's activation, "gelu" (hsft: Linear(h, h/4) -> GELU -> Linear)
        or "relu" (release: Linear(h, h) -> ReLU -> Linear); the widths come from the weights.
    decoder_prompt: the SAM2 sparse prompt, "seg" (the projected [SEG] state alone) or "padded"
        (release: SAM2's "no point" prompt, two not-a-point tokens, followed by the state).
    mask_output: "single" (the decoder's single-mask token) or "best_iou" (release: the three
        multimask outputs, the one with the highest predicted IoU).
    object_gate: a mask whose SAM2 object score is <= 0 is emptied (logits -1024), as SAM2's own
        video predictor does. Off in both hsft and the release: Sa2VA's SAM2 skips that gate.
    mask_upsample: how the decoder's low-res logits reach the image's size. "direct" (hsft): one
        bilinear resize to the image. "sam_input" (release): first a bilinear resize to SAM2's input
        size (the release's video predictor returns 1024 x 1024 logits), then the resize to the
        image; the model's mask logits are then at SAM2's input size (in training too).
    image_resize: "bilinear" (antialiased bilinear on float pixels) or "pil_bicubic" (release:
        PIL's bicubic resize of the uint8 image, both for the VLM tile and SAM2's input).
    bos_token: prepend the tokenizer's BOS token to the conversation (release InternLM2 models,
        whose tokenizer adds it).
    dynamic_image_size, min_dynamic_patch, max_dynamic_patch, use_thumbnail: InternVL's dynamic
        tiling (hsft.model.tiling), under the release config's names. False (hsft): every image is
        one VLM tile. True (release): the image is cut into a grid of min..max tiles with the
        closest aspect ratio, plus a thumbnail tile when use_thumbnail and the grid has more than one.
    """

    fcs_activation: str = "gelu"
    decoder_prompt: str = "seg"
    mask_output: str = "single"
    object_gate: bool = False
    mask_upsample: str = "direct"
    image_resize: str = "bilinear"
    bos_token: bool = False
    dynamic_image_size: bool = False
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True

    @classmethod
    def release(cls, *, bos_token: bool = False, dynamic_image_size: bool = True, min_dynamic_patch: int = 1,
                max_dynamic_patch: int = 12, use_thumbnail: bool = True) -> Conventions:
        """The release's conventions; the tiling defaults are those its predict_forward uses."""
        return cls(fcs_activation="relu", decoder_prompt="padded", mask_output="best_iou", object_gate=False,
                   mask_upsample="sam_input", image_resize="pil_bicubic", bos_token=bos_token,
                   dynamic_image_size=dynamic_image_size,
                   min_dynamic_patch=min_dynamic_patch, max_dynamic_patch=max_dynamic_patch,
                   use_thumbnail=use_thumbnail)

    @property
    def tiling(self) -> TileSettings | None:
        """The VLM's tiling, None for one tile per image."""
        if not self.dynamic_image_size:
            return None
        return TileSettings(self.min_dynamic_patch, self.max_dynamic_patch, self.use_thumbnail)

    @classmethod
    def from_dict(cls, data: dict | None) -> Conventions:
        """From hsft_model.json's "conventions" (absent: hsft's defaults); unknown names are refused."""
        data = dict(data or {})
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        _check(not unknown, "conventions", f"unknown field(s) {unknown}")
        conventions = cls(**data)
        conventions.validate()
        return conventions

    def validate(self, prefix: str = "conventions") -> None:
        choices = {"fcs_activation": ("gelu", "relu"), "decoder_prompt": ("seg", "padded"),
                   "mask_output": ("single", "best_iou"), "mask_upsample": ("direct", "sam_input"),
                   "image_resize": ("bilinear", "pil_bicubic")}
        for name, allowed in choices.items():
            value = getattr(self, name)
            _check(value in allowed, f"{prefix}.{name}", f"must be one of {', '.join(allowed)}, got {value!r}")
        for name in ("object_gate", "bos_token", "dynamic_image_size", "use_thumbnail"):
            _check(isinstance(getattr(self, name), bool), f"{prefix}.{name}", "must be true or false")
        for name in ("min_dynamic_patch", "max_dynamic_patch"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"{prefix}.{name}",
                   f"must be a positive integer, got {value!r}")
        _check(self.max_dynamic_patch >= self.min_dynamic_patch, f"{prefix}.max_dynamic_patch",
               f"must be >= min_dynamic_patch ({self.min_dynamic_patch}), got {self.max_dynamic_patch}")


@dataclass
class ModelConfig:
    """Which Sa2VA-style model to build (see hsft.model.build_model).

    Either the embedded `preset` (vlm and sam2 both None), or real local checkpoints: `vlm` is the
    directory of an InternVL checkpoint in transformers format (with its tokenizer) and `sam2` the
    directory of a transformers SAM2 checkpoint; `preset` is ignored then.
    """

    preset: str = field(default="tiny", metadata={"help": f"embedded model size: {', '.join(PRESETS)}"})
    vlm: str | None = field(default=None, metadata={"help": "local InternVL checkpoint directory (transformers format)"})
    sam2: str | None = field(default=None, metadata={"help": "local SAM2 checkpoint directory (transformers format)"})
    fcs_hidden: int | None = field(
        default=None, metadata={"help": "hidden width of text_hidden_fcs; default LLM hidden size // 4"}
    )
    prompt: PromptConfig = field(default_factory=PromptConfig)
    dtype: str = field(default="float32", metadata={"help": f"parameter dtype: {', '.join(DTYPES)}"})

    @property
    def from_checkpoints(self) -> bool:
        return self.vlm is not None

    def validate(self, prefix: str = "model") -> None:
        _check(self.preset in PRESETS, f"{prefix}.preset",
               f"unknown preset {self.preset!r}; valid presets are {', '.join(PRESETS)}")
        _check((self.vlm is None) == (self.sam2 is None), f"{prefix}.vlm" if self.vlm is None else f"{prefix}.sam2",
               "give both vlm and sam2 checkpoint directories, or neither (to build the preset)")
        for name, path in ((f"{prefix}.vlm", self.vlm), (f"{prefix}.sam2", self.sam2)):
            if path is not None:
                _check(os.path.isdir(path), name, f"checkpoint directory {path!r} does not exist")
                _check(os.path.isfile(os.path.join(path, "config.json")), name,
                       f"{path!r} has no config.json: not a transformers checkpoint directory")
        if self.fcs_hidden is not None:
            _check(isinstance(self.fcs_hidden, int) and self.fcs_hidden >= 1, f"{prefix}.fcs_hidden",
                   f"must be None or a positive integer, got {self.fcs_hidden!r}")
        _check(self.dtype in DTYPES, f"{prefix}.dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        self.prompt.validate(f"{prefix}.prompt")
