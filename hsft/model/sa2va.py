"""The Sa2VA-style model: InternVL reads the image and the prompt and answers with `[SEG]`; the LLM's
hidden state at `[SEG]` goes through `text_hidden_fcs` into SAM2's mask decoder as its prompt.

Composed from maintained transformers classes (`InternVLForConditionalGeneration`, `Sam2Model`);
nothing of them is re-implemented, only wired together the way Sam2Model.forward wires its parts.

The [SEG] convention (the same in both paths): the LLM's LAST-LAYER hidden state AT the [SEG]
position, i.e. the state computed when [SEG] is the input token, after the LLM's final norm (the
tensor the LM head reads; `last_hidden_state` of the forward, `hidden_states[-1]` of generate).

Two paths produce it:
- forward_seg: teacher-forced prompt + response containing [SEG], batched, differentiable;
- generate_seg: greedy generation with the KV cache, the state recovered from generate's hidden
  states (with one extra cached step when [SEG] is the last generated token, whose state generate
  never computes).

Mask decoding is split for caching: forward_seg == decode_masks(sam_features(pixels),
seg_hidden_states(images, tokens)), computation for computation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    InternVLForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    Sam2Model,
)

from hsft.model.chat import IGNORE_INDEX, ChatTemplate, TokenBatch, position_ids_from_mask
from hsft.model.config import SEG_TOKEN, Conventions, PromptConfig
from hsft.model.features import SamFeatures
from hsft.model.images import IMAGENET_NORM, ImageBatch, ImageNorm, ImagePreprocessor
from hsft.model.modes import eval_mode
from hsft.model.outputs import SegForwardOutput, SegGenerateOutput
from hsft.model.tokenizer import IM_END, single_token_id

__all__ = ["Sa2VAModel", "PARTS", "EMPTY_MASK_LOGIT", "causal_lm_loss"]

# Logit written where generation emitted no [SEG]: sigmoid is ~0 and it is below any sane
# threshold, so the mask is empty; finite so that losses on it stay finite.
EMPTY_MASK_LOGIT = -1.0e4

# What SAM2 writes into the masks of an image it finds no object in (its NO_OBJ_SCORE); used by the
# release's object-score gate.
NO_OBJECT_LOGIT = -1024.0

# Trainable groups (see Sa2VAModel.trainable_groups).
PARTS = ("vision", "projector", "llm", "text_hidden_fcs", "sam2_encoder", "mask_decoder")

# Parameter-name prefixes of each part; the first matching prefix wins, so the two SAM2 decoder
# projections listed under sam2_encoder are taken before the generic mask_decoder prefix.
_PART_PREFIXES: tuple[tuple[str, str], ...] = (
    ("vlm.model.vision_tower.", "vision"),
    ("vlm.model.multi_modal_projector.", "projector"),
    ("vlm.model.language_model.", "llm"),
    ("vlm.lm_head.", "llm"),
    ("seg_rows.", "llm"),  # trainable [SEG] rows of the embedding / LM head (hsft.model.token_rows)
    ("text_hidden_fcs.", "text_hidden_fcs"),
    ("sam2.vision_encoder.", "sam2_encoder"),
    ("sam2.mask_decoder.conv_s0.", "sam2_encoder"),
    ("sam2.mask_decoder.conv_s1.", "sam2_encoder"),
    ("sam2.no_memory_embedding", "sam2_encoder"),
    ("sam2.mask_decoder.", "mask_decoder"),
    ("sam2.prompt_encoder.", "mask_decoder"),
    ("sam2.shared_image_embedding.", "mask_decoder"),
)


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy (float32) over the tokens whose label is not IGNORE_INDEX."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    if not bool((shift_labels != IGNORE_INDEX).any()):
        raise ValueError("lm_loss: the batch has no labelled tokens; build it with tokenize(form='response')")
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def labelled_lm_loss(lm_head: nn.Module, hidden: Tensor, labels: Tensor) -> Tensor:
    """causal_lm_loss with the LM head applied only at the positions that predict a label: the same mean
    cross-entropy, without the (B, L, vocab) logits. A tiled image makes L thousands of tokens and the
    vocabulary is 151,936 words at the published sizes, so the full logits (with their float32 copy,
    log-softmax and gradient) would be gigabytes per sample for the ten or so tokens of the answer."""
    shift_labels = labels[:, 1:].to(hidden.device)
    where = shift_labels != IGNORE_INDEX
    if not bool(where.any()):
        raise ValueError("lm_loss: the batch has no labelled tokens; build it with tokenize(form='response')")
    logits = lm_head(hidden[:, :-1][where])
    return F.cross_entropy(logits.float(), shift_labels[where])


class Sa2VAModel(nn.Module):
    """InternVL + [SEG] + text_hidden_fcs + SAM2 mask decoder. Build it with hsft.model.build_model.

    Attributes: vlm, sam2, text_hidden_fcs, tokenizer, seg_token_id, prompt, hidden_size (LLM),
    prompt_width (C, SAM2 prompt/decoder width), fcs_hidden, mask_size (h, w) of the mask logits
    (the decoder's low-res size, or SAM2's input size under conventions.mask_upsample "sam_input"),
    vlm_image_size, sam_image_size, num_image_tokens (per VLM tile).
    """

    def __init__(
        self,
        vlm: InternVLForConditionalGeneration,
        sam2: Sam2Model,
        tokenizer: PreTrainedTokenizerBase,
        prompt: PromptConfig,
        *,
        fcs_hidden: int | None = None,
        vlm_norm: ImageNorm = IMAGENET_NORM,
        sam_norm: ImageNorm = IMAGENET_NORM,
        conventions: Conventions = Conventions(),
    ) -> None:
        super().__init__()
        prompt.validate()
        conventions.validate()
        self.conventions = conventions
        # Directory of the released checkpoint's files kept beside an imported model (tensors
        # image inference does not use, the source's config and code) so that export can give
        # them back; carried along by save_model. None for models not imported from a release.
        self.release_dir: str | None = None
        self.vlm = vlm
        self.sam2 = sam2
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.vlm_norm = vlm_norm
        self.sam_norm = sam_norm

        self.seg_token_id = single_token_id(tokenizer, SEG_TOKEN)
        self.eos_token_id = single_token_id(tokenizer, IM_END)
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer: has no pad token; left-padded batches need one")
        self.pad_token_id = int(tokenizer.pad_token_id)
        if self.seg_token_id >= vlm.get_input_embeddings().num_embeddings:
            raise ValueError(f"tokenizer: [SEG] id {self.seg_token_id} is outside the LLM's embedding table "
                             f"({vlm.get_input_embeddings().num_embeddings} rows); resize the embeddings")

        self.hidden_size = int(vlm.config.text_config.hidden_size)
        self.prompt_width = int(sam2.config.mask_decoder_config.hidden_size)
        self.fcs_hidden = int(fcs_hidden) if fcs_hidden is not None else max(1, self.hidden_size // 4)
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(self.hidden_size, self.fcs_hidden),
            nn.ReLU() if conventions.fcs_activation == "relu" else nn.GELU(),
            nn.Linear(self.fcs_hidden, self.prompt_width),
        )

        # One mask per [SEG]: the decoder's single-mask token, in training and inference alike.
        # SAM2's eval-only fallback to the best multimask output would make inference decode
        # differently from training, so it is switched off (and saved so in the config).
        sam2.config.mask_decoder_config.dynamic_multimask_via_stability = False
        sam2.mask_decoder.dynamic_multimask_via_stability = False

        vision_cfg = vlm.config.vision_config
        height, width = vision_cfg.image_size
        if height != width:
            raise ValueError(f"vlm: non-square vision input {height}x{width} is not supported")
        self.vlm_image_size = int(height)
        patches = (height // vision_cfg.patch_size[0]) * (width // vision_cfg.patch_size[1])
        self.num_image_tokens = int(round(patches * vlm.config.downsample_ratio ** 2))
        self.sam_image_size = int(sam2.config.prompt_encoder_config.image_size)
        self.decoder_mask_size = tuple(int(s) for s in sam2.prompt_encoder.mask_input_size)
        self.mask_size = ((self.sam_image_size, self.sam_image_size) if conventions.mask_upsample == "sam_input"
                          else self.decoder_mask_size)

        image_context = tokenizer.convert_ids_to_tokens(int(vlm.config.image_token_id))
        if single_token_id(tokenizer, image_context) != vlm.config.image_token_id:
            raise ValueError(f"tokenizer: image token {image_context!r} does not encode to the VLM's "
                             f"image_token_id {vlm.config.image_token_id}")
        bos = None
        if conventions.bos_token:
            if tokenizer.bos_token is None:
                raise ValueError("tokenizer: conventions.bos_token is set but the tokenizer has no BOS token")
            bos = str(tokenizer.bos_token)
        self.chat = ChatTemplate(tokenizer, image_context, self.num_image_tokens, self.seg_token_id,
                                 self.pad_token_id, bos_token=bos)
        self.preprocessor = ImagePreprocessor(self.vlm_image_size, self.sam_image_size, vlm_norm, sam_norm,
                                              resize=conventions.image_resize, tiling=conventions.tiling)
        self.image_token_id = int(vlm.config.image_token_id)
        self.trainable_groups()  # fails now, not mid-training, if a parameter has no part

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return self.text_hidden_fcs[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_hidden_fcs[0].weight.dtype

    def preprocess(self, images: Sequence) -> ImageBatch:
        """(H, W, 3) uint8 RGB images of any sizes -> ImageBatch (float32, CPU); see hsft.model.images."""
        return self.preprocessor(images)

    def tokenize(self, n: int, *, form: str = "response", instruction: str | Sequence[str] | None = None,
                 response: str | Sequence[str] | None = None, tiles: Sequence[int] | None = None) -> TokenBatch:
        """n conversations, left padded (see hsft.model.chat for the template).

        form "response": prompt + response with [SEG] (teacher forcing; labels on the response and
        its end token); "prompt": [SEG] appended to the user's instruction, no answer (labels all
        ignored); "generate": the prompt up to the assistant header. instruction / response default
        to the PromptConfig's and may be one string or one per sample. tiles: each sample's VLM tile
        count, `ImageBatch.num_tiles` of the images the tokens go with (default one each, which is
        what a model without tiling always has).
        """
        return self.chat.batch(
            n, form=form,
            instruction=self.prompt.instruction if instruction is None else instruction,
            response=self.prompt.response if response is None else response,
            system=self.prompt.system, tiles=tiles,
        )

    # ------------------------------------------------------------------ LLM side
    def _check_batch(self, images: ImageBatch, tokens: TokenBatch) -> TokenBatch:
        """`tokens`, with their image spans widened to the images' tiles where they were tokenized for
        one tile each (tokenize without tiles=); refused when the counts disagree otherwise."""
        if len(images) != len(tokens):
            raise ValueError(f"batch mismatch: {len(images)} images but {len(tokens)} token sequences")
        have = (tokens.input_ids == self.image_token_id).sum(dim=1).tolist()
        if have == [n * self.num_image_tokens for n in images.num_tiles]:
            return tokens
        return self.chat.with_tiles(tokens, images.num_tiles)

    def _require_one_seg(self, tokens: TokenBatch) -> None:
        counts = (tokens.input_ids == self.seg_token_id).sum(dim=1)
        bad = (counts != 1).nonzero().flatten().tolist()
        if bad:
            found = {row: int(counts[row]) for row in bad}
            raise ValueError(f"every sequence must contain exactly one {SEG_TOKEN} token; rows with another "
                             f"count (row: count): {found}")
        at_position = tokens.input_ids.gather(1, tokens.seg_positions.clamp(min=0)[:, None])[:, 0]
        if bool((at_position != self.seg_token_id).any()) or bool((tokens.seg_positions < 0).any()):
            raise ValueError(f"tokens.seg_positions does not point at the {SEG_TOKEN} token of every row")

    def _llm_last_hidden(self, images: ImageBatch, tokens: TokenBatch) -> Tensor:
        """(B, L, H) last-layer hidden states after the final norm, image tokens filled in (`tokens`
        as _check_batch returns them)."""
        tokens = tokens.to(self.device)
        out = self.vlm.model(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            position_ids=tokens.position_ids,
            pixel_values=images.vlm_pixels.to(self.device),
            use_cache=False,
        )
        return out.last_hidden_state

    @staticmethod
    def _gather(hidden: Tensor, positions: Tensor) -> Tensor:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, positions.to(hidden.device)]

    def seg_hidden_states(self, images: ImageBatch, tokens: TokenBatch) -> Tensor:
        """(B, H) LLM last-layer hidden state at each row's [SEG] (the frozen-LLM cacheable half)."""
        tokens = self._check_batch(images, tokens)
        self._require_one_seg(tokens)
        return self._gather(self._llm_last_hidden(images, tokens), tokens.seg_positions)

    # ------------------------------------------------------------------ SAM2 side
    def sam_features(self, sam_pixels: Tensor | ImageBatch) -> SamFeatures:
        """SAM2 image features the mask decoder reads (the frozen-encoder cacheable half).

        Same computation as Sam2Model.forward before its prompt encoder: Sam2Model.get_image_features
        (vision encoder + the decoder's conv_s0/conv_s1 projections of the two high-res levels),
        the no-memory embedding added to the lowest level, reshaped to (B, C, h, w).
        """
        if isinstance(sam_pixels, ImageBatch):
            sam_pixels = sam_pixels.sam_pixels
        pixels = sam_pixels.to(self.device)
        batch = pixels.shape[0]
        out = self.sam2.get_image_features(pixel_values=pixels)
        levels = list(out.fpn_hidden_states)  # each (h*w, B, C), highest resolution first
        levels[-1] = levels[-1] + self.sam2.no_memory_embedding
        maps = [level.permute(1, 2, 0).reshape(batch, -1, *size)
                for level, size in zip(levels, self.sam2.backbone_feature_sizes)]
        return SamFeatures(image_embedding=maps[-1], feat_s0=maps[0], feat_s1=maps[1])

    def _decode(self, sam_feats: SamFeatures, seg_hidden: Tensor, *, at_decoder_size: bool = False
                ) -> tuple[Tensor, Tensor]:
        if len(sam_feats) != seg_hidden.shape[0]:
            raise ValueError(f"batch mismatch: {len(sam_feats)} SAM2 feature rows but {seg_hidden.shape[0]} "
                             "[SEG] hidden states")
        if seg_hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"seg_hidden: expected width {self.hidden_size}, got {tuple(seg_hidden.shape)}")
        decoder_dtype = self.sam2.mask_decoder.iou_token.weight.dtype
        feats = sam_feats.to(self.device, decoder_dtype)
        seg_embedding = self.text_hidden_fcs(seg_hidden.to(self.device, self.dtype))
        batch = seg_embedding.shape[0]
        # The positional-encoding matrix is a buffer, which DeepSpeed's bf16 cast leaves in float32.
        positional = self.sam2.get_image_wide_positional_embeddings().to(decoder_dtype).repeat(batch, 1, 1, 1)
        # No points, boxes or masks: the prompt encoder returns its "no mask" dense embedding.
        _, dense = self.sam2.prompt_encoder(input_points=None, input_labels=None, input_boxes=None,
                                            input_masks=None)
        multimask = self.conventions.mask_output == "best_iou"
        masks, iou, _, object_score = self.sam2.mask_decoder(
            image_embeddings=feats.image_embedding,
            image_positional_embeddings=positional,
            # one prompt (point batch 1): the projected [SEG] state, after SAM2's "no point"
            # tokens when the model follows the release's convention
            sparse_prompt_embeddings=self._sparse_prompt(seg_embedding.to(decoder_dtype)),
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            high_resolution_features=[feats.feat_s0, feats.feat_s1],
        )
        masks = masks[:, 0]  # (B, M, h, w): M = 3 with multimask output, else 1
        if multimask:
            best = iou[:, 0].argmax(dim=-1)
            masks = masks[torch.arange(batch, device=masks.device), best]
        else:
            masks = masks[:, 0]
        if self.conventions.object_gate:
            present = object_score[:, 0, 0] > 0
            masks = torch.where(present[:, None, None], masks, torch.full_like(masks, NO_OBJECT_LOGIT))
        if self.conventions.mask_upsample == "sam_input" and not at_decoder_size:
            # the release's video predictor hands back its masks at SAM2's input size (bilinear,
            # in float32); its predict_forward then resizes those to the image
            size = (self.sam_image_size, self.sam_image_size)
            masks = F.interpolate(masks[:, None].float(), size=size, mode="bilinear",
                                  align_corners=False)[:, 0].to(masks.dtype)
        return masks, seg_embedding

    def _sparse_prompt(self, seg_embedding: Tensor) -> Tensor:
        """(B, 1, T, C) sparse prompt tokens of the [SEG] embedding, per self.conventions.decoder_prompt.

        "padded" is what SAM2 builds for an image with no point prompt (one (0, 0) point labelled
        -1, plus the padding point added when there is no box; both become the not-a-point
        embedding) with the [SEG] embedding appended, as the release's decoder receives it.
        """
        tokens = seg_embedding[:, None, None, :]
        if self.conventions.decoder_prompt == "padded":
            no_point = self.sam2.prompt_encoder.not_a_point_embed.weight.to(tokens.dtype)  # (1, C)
            pad = no_point.expand(2, -1)[None, None].expand(tokens.shape[0], 1, 2, -1)
            tokens = torch.cat([pad, tokens], dim=2)
        return tokens

    def decode_masks(self, sam_feats: SamFeatures, seg_hidden: Tensor, *, at_decoder_size: bool = False) -> Tensor:
        """(B, h, w) mask logits (h, w = self.mask_size): text_hidden_fcs -> sparse prompt -> SAM2 mask
        decoder (-> resize to SAM2's input size under conventions.mask_upsample "sam_input", unless
        at_decoder_size: then the decoder's own logits, which the mask loss resizes through SAM2's
        input size itself; see loss_mid_size)."""
        return self._decode(sam_feats, seg_hidden, at_decoder_size=at_decoder_size)[0]

    def loss_mid_size(self, mask_logits: Tensor) -> tuple[int, int] | None:
        """The intermediate grid the mask loss resizes `mask_logits` through: under the release's
        convention, logits at the decoder's size go to SAM2's input size first, as the release does
        (the fused op does both resizes without storing the intermediate logits); None otherwise."""
        if self.conventions.mask_upsample == "sam_input" and tuple(mask_logits.shape[-2:]) != self.mask_size:
            return self.mask_size
        return None

    # ------------------------------------------------------------------ the two [SEG] paths
    def forward_seg(self, images: ImageBatch, tokens: TokenBatch, *, compute_lm_loss: bool = False,
                    sam_feats: SamFeatures | None = None, full_lm_logits: bool = True,
                    masks_at_decoder_size: bool = False) -> SegForwardOutput:
        """Teacher-forced path; exactly one [SEG] per sequence. Differentiable. With tiled images,
        `tokens` tokenized without the tile counts are widened to them (lm_logits then follow the
        widened sequence). `sam_feats`: these images' sam_features, when already computed.
        full_lm_logits=False (training): the LM loss from the labelled positions alone, lm_logits None.
        masks_at_decoder_size (training): mask_logits at the decoder's size (see decode_masks)."""
        tokens = self._check_batch(images, tokens)
        self._require_one_seg(tokens)
        hidden = self._llm_last_hidden(images, tokens)
        seg_hidden = self._gather(hidden, tokens.seg_positions)
        if sam_feats is None:
            sam_feats = self.sam_features(images.sam_pixels)
        mask_logits, seg_embedding = self._decode(sam_feats, seg_hidden, at_decoder_size=masks_at_decoder_size)
        lm_loss = lm_logits = None
        if compute_lm_loss and full_lm_logits:
            lm_logits = self.vlm.lm_head(hidden)
            lm_loss = causal_lm_loss(lm_logits, tokens.labels)
        elif compute_lm_loss:
            lm_loss = labelled_lm_loss(self.vlm.lm_head, hidden, tokens.labels)
        return SegForwardOutput(mask_logits, seg_hidden, seg_embedding, lm_loss, lm_logits)

    def forward(self, images: ImageBatch, tokens: TokenBatch, *, compute_lm_loss: bool = False
                ) -> SegForwardOutput:
        """Same as forward_seg (so engines that call the module directly get the training path)."""
        return self.forward_seg(images, tokens, compute_lm_loss=compute_lm_loss)

    @torch.no_grad()
    def generate_seg(
        self,
        images: ImageBatch,
        *,
        max_new_tokens: int = 16,
        instruction: str | Sequence[str] | None = None,
        logits_processor: LogitsProcessorList | Iterable[LogitsProcessor] | None = None,
        sam_feats: SamFeatures | None = None,
    ) -> SegGenerateOutput:
        """Greedy generation with the KV cache, batched with left padding; see SegGenerateOutput.

        Runs in eval mode (the previous mode is restored), as inference does. `sam_feats`: these
        images' sam_features, when already computed (in eval mode).
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be a positive integer, got {max_new_tokens!r}")
        with eval_mode(self):
            return self._generate_seg(images, max_new_tokens, instruction, logits_processor, sam_feats)

    def _generate_seg(self, images: ImageBatch, max_new_tokens: int, instruction: str | Sequence[str] | None,
                      logits_processor: LogitsProcessorList | Iterable[LogitsProcessor] | None,
                      sam_feats: SamFeatures | None = None) -> SegGenerateOutput:
        batch = len(images)
        tokens = self.tokenize(batch, form="generate", instruction=instruction, tiles=images.num_tiles)
        tokens = tokens.to(self.device)
        processors = None
        if logits_processor is not None:
            processors = (logits_processor if isinstance(logits_processor, LogitsProcessorList)
                          else LogitsProcessorList(list(logits_processor)))
        out = self.vlm.generate(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            pixel_values=images.vlm_pixels.to(self.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            logits_processor=processors,
            use_cache=True,
            return_dict_in_generate=True,
            output_hidden_states=True,
        )
        generated = out.sequences[:, tokens.input_ids.shape[1]:]
        steps = generated.shape[1]

        # The answer is everything before the first end token (generate pads finished rows).
        in_answer = (generated == self.eos_token_id).long().cumsum(dim=1) == 0
        is_seg = (generated == self.seg_token_id) & in_answer
        num_seg = is_seg.sum(dim=1)
        emitted = num_seg > 0
        seg_index = torch.where(emitted, is_seg.long().argmax(dim=1), torch.full_like(num_seg, -1))

        # Step k's hidden states are those of its input: step 0 reads the prompt, step k >= 1 reads
        # generated token k-1. So generated token t's state is hidden_states[t + 1][-1][:, -1].
        per_token = [out.hidden_states[k][-1][:, -1] for k in range(1, steps)]
        if bool((emitted & (seg_index == steps - 1)).any()):
            per_token.append(self._last_token_hidden(tokens, generated, out.cache))
        else:
            per_token.append(torch.zeros_like(out.hidden_states[0][-1][:, -1]))
        token_hidden = torch.stack(per_token, dim=1)  # (B, T, H)
        seg_hidden = self._gather(token_hidden, seg_index.clamp(min=0))
        seg_hidden = torch.where(emitted[:, None], seg_hidden, torch.zeros_like(seg_hidden))

        if sam_feats is None:
            sam_feats = self.sam_features(images.sam_pixels)
        mask_logits, seg_embedding = self._decode(sam_feats, seg_hidden)
        mask_logits = torch.where(emitted[:, None, None], mask_logits,
                                  torch.full_like(mask_logits, EMPTY_MASK_LOGIT))
        seg_embedding = torch.where(emitted[:, None], seg_embedding, torch.zeros_like(seg_embedding))
        text = [self.tokenizer.decode(row[keep].tolist(), skip_special_tokens=False)
                for row, keep in zip(generated, in_answer)]
        return SegGenerateOutput(text=text, seg_emitted=emitted, num_seg=num_seg, seg_index=seg_index,
                                 seg_hidden=seg_hidden, seg_embedding=seg_embedding, mask_logits=mask_logits,
                                 generated_ids=generated)

    def _last_token_hidden(self, tokens: TokenBatch, generated: Tensor, cache) -> Tensor:
        """(B, H) hidden state of the last generated token: one more cached step, which generate skips.

        The attention mask and positions continue exactly as generate extends them (ones appended
        per step), so the state equals the teacher-forced one.
        """
        full_mask = torch.cat([tokens.attention_mask, torch.ones_like(generated)], dim=1)
        out = self.vlm.model(
            input_ids=generated[:, -1:],
            attention_mask=full_mask,
            position_ids=position_ids_from_mask(full_mask)[:, -1:],
            cache=cache,
            use_cache=True,
        )
        return out.last_hidden_state[:, -1]

    # ------------------------------------------------------------------ trainable parts
    @staticmethod
    def _part_of(name: str) -> str:
        part = next((p for prefix, p in _PART_PREFIXES if name.startswith(prefix)), None)
        if part is None:
            raise RuntimeError(f"parameter {name!r} belongs to no trainable part; extend _PART_PREFIXES")
        return part

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter in exactly one of PARTS (tied LM head = input embeddings: once, in "llm").

        vision: InternVL vision tower; projector: its pixel-shuffle MLP projector; llm: Qwen2 + LM
        head; text_hidden_fcs; sam2_encoder: SAM2 Hiera + FPN, plus the two 1x1 projections of the
        high-res levels (mask_decoder.conv_s0/conv_s1, which transformers' Sam2Model applies while
        computing image features) and the no-memory embedding, i.e. everything in SamFeatures;
        mask_decoder: the two-way transformer, upscaling, hypernetwork/IoU/object heads and the
        prompt encoder (whose no-mask embedding is the dense prompt), i.e. everything after
        SamFeatures that the prompt passes through. This split makes cached SamFeatures exact
        whenever sam2_encoder is frozen.

        Parts are found by parameter name on every call, so adapters injected in place later (peft
        LoRA inside the language model) fall into their host's part.
        """
        groups: dict[str, list[nn.Parameter]] = {part: [] for part in PARTS}
        for name, param in self.named_parameters():
            groups[self._part_of(name)].append(param)
        return groups

    def set_trainable(self, parts: Iterable[str]) -> None:
        """requires_grad = True on the named parts, False on all others."""
        wanted = set(parts)
        unknown = wanted - set(PARTS)
        if unknown:
            raise ValueError(f"parts: unknown {sorted(unknown)}; valid parts are {', '.join(PARTS)}")
        for part, params in self.trainable_groups().items():
            for param in params:
                param.requires_grad_(part in wanted)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part and in total (tied weights counted once)."""
        counts = {part: sum(p.numel() for p in params) for part, params in self.trainable_groups().items()}
        counts["total"] = sum(counts.values())
        return counts
