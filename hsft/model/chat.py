"""The chat template (InternVL / Qwen style) and its tokenisation into left-padded batches.

One sample renders as

    [<|im_start|>system\\n{system}<|im_end|>\\n]
    <|im_start|>user\\n<img><IMG_CONTEXT> x (tiles * N)</img>\\n{instruction}<|im_end|>\\n
    <|im_start|>assistant\\n{response}<|im_end|>

where N is the image-token count of one VLM tile and `tiles` the sample's tile count (one, unless
the model tiles its images: then it differs from image to image, and so do the sequence lengths).

The part before the response (the prompt) and the response are tokenised separately and
concatenated, so the prompt of a teacher-forced sequence is token for token the prompt that
generation starts from, and the response tokens are exactly what generation must emit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from hsft.model.config import IMAGE_PLACEHOLDER, SEG_TOKEN, validate_instruction, validate_response
from hsft.model.tokenizer import IM_END, IM_START, IMG_END, IMG_START

__all__ = ["FORMS", "IGNORE_INDEX", "TokenBatch", "ChatTemplate", "position_ids_from_mask"]

FORMS = ("response", "prompt", "generate")
IGNORE_INDEX = -100


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, as transformers' generate derives them.

    With left padding the first real token is position 0 in every row; the teacher-forced path
    uses the same rule so both [SEG] paths see identical rotary positions.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


@dataclass
class TokenBatch:
    """Left-padded token ids of one batch of conversations.

    input_ids, attention_mask, labels: (B, L) int64; labels are IGNORE_INDEX on the prompt and the
    padding. seg_positions: (B,) index of the [SEG] token in each row, -1 where a row has none (the
    "generate" form).
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    seg_positions: Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels,
                                                    self.seg_positions)))

    @property
    def position_ids(self) -> Tensor:
        return position_ids_from_mask(self.attention_mask)


@dataclass(frozen=True, eq=False)
class ChatTemplate:
    """Renders and tokenises conversations for one tokenizer and one image-token count per tile."""

    tokenizer: PreTrainedTokenizerBase
    image_context_token: str
    num_image_tokens: int
    seg_token_id: int
    pad_token_id: int
    # Prepended to every conversation when set (the release's InternLM2 models start with BOS).
    bos_token: str | None = None

    def _system_turn(self, system: str | None) -> str:
        bos = self.bos_token or ""
        return bos if system is None else f"{bos}{IM_START}system\n{system}{IM_END}\n"

    def _user_open(self, instruction: str, tiles: int) -> str:
        """The user turn up to the end of the instruction: the image, then the text. A leading
        <image> in the instruction marks where the image goes (the text follows it directly, as in
        the release's own code); otherwise a newline separates them. All tiles share one
        <img> ... </img> span, as in InternVL."""
        image = IMG_START + self.image_context_token * (self.num_image_tokens * tiles) + IMG_END
        if instruction.startswith(IMAGE_PLACEHOLDER):
            return f"{IM_START}user\n{image}{instruction[len(IMAGE_PLACEHOLDER):]}"
        return f"{IM_START}user\n{image}\n{instruction}"

    def render(self, form: str, instruction: str, response: str, system: str | None, tiles: int = 1
               ) -> tuple[str, str]:
        """(prompt text, target text) of one sample; the target is empty except for "response"."""
        head = self._system_turn(system) + self._user_open(instruction, tiles)
        if form == "response":
            return f"{head}{IM_END}\n{IM_START}assistant\n", f"{response}{IM_END}"
        if form == "prompt":
            return f"{head}{SEG_TOKEN}{IM_END}\n", ""
        if form == "generate":
            return f"{head}{IM_END}\n{IM_START}assistant\n", ""
        raise ValueError(f"form: must be one of {', '.join(FORMS)}, got {form!r}")

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def batch(self, n: int, *, form: str, instruction: str | Sequence[str], response: str | Sequence[str],
              system: str | None, tiles: Sequence[int] | None = None) -> TokenBatch:
        """n left-padded conversations; tiles: each sample's VLM tile count (default one each)."""
        if form not in FORMS:
            raise ValueError(f"form: must be one of {', '.join(FORMS)}, got {form!r}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n: must be a positive integer, got {n!r}")
        instructions = _per_sample(instruction, n, "instruction")
        responses = _per_sample(response, n, "response")
        for i, text in enumerate(instructions):
            validate_instruction(text, f"instruction[{i}]")
        if form == "response":
            for i, text in enumerate(responses):
                validate_response(text, f"response[{i}]")
        counts = [1] * n if tiles is None else list(tiles)
        if len(counts) != n or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts):
            raise ValueError(f"tiles: must be {n} positive integers (one tile count per sample), got {tiles!r}")

        encoded: dict[tuple[str, str, int], tuple[list[int], list[int]]] = {}
        rows: list[tuple[list[int], list[int]]] = []
        for inst, resp, count in zip(instructions, responses, counts):
            key = (inst, resp if form == "response" else "", count)
            if key not in encoded:
                prompt_text, target_text = self.render(form, inst, resp, system, count)
                encoded[key] = (self._encode(prompt_text), self._encode(target_text))
            rows.append(encoded[key])

        sequences = [(torch.tensor(p + t, dtype=torch.long),
                      torch.tensor([IGNORE_INDEX] * len(p) + t, dtype=torch.long)) for p, t in rows]
        input_ids, attention_mask, labels, _ = self._left_padded(sequences)
        seg_positions = torch.full((n,), -1, dtype=torch.long)
        if form != "generate":
            for row in range(n):
                hits = (input_ids[row] == self.seg_token_id).nonzero().flatten()
                if hits.numel() != 1:
                    raise ValueError(f"sample {row}: the {form!r} sequence must contain exactly one {SEG_TOKEN} "
                                     f"token, found {hits.numel()} (the tokenizer or the text is wrong)")
                seg_positions[row] = hits[0]
        return TokenBatch(input_ids, attention_mask, labels, seg_positions)

    def _left_padded(self, sequences: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """(input_ids, attention_mask, labels) of (ids, labels) rows padded on the left to the longest,
        and where each row starts."""
        length = max(len(ids) for ids, _ in sequences)
        n = len(sequences)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        starts = []
        for row, (ids, row_labels) in enumerate(sequences):
            start = length - len(ids)
            input_ids[row, start:], labels[row, start:] = ids, row_labels
            attention_mask[row, start:] = 1
            starts.append(start)
        return input_ids, attention_mask, labels, starts

    def with_tiles(self, tokens: TokenBatch, tiles: Sequence[int]) -> TokenBatch:
        """`tokens` with each row's image span widened from one tile's image tokens to `tiles[row]`
        tiles' (rows already at their count are kept), left-padded again; labels and [SEG] positions
        move with their tokens. For token batches built without the images' tile counts; any other
        image-token count is refused."""
        image_id = int(self.tokenizer.convert_tokens_to_ids(self.image_context_token))
        per_tile = self.num_image_tokens
        rows = []
        for row, count in enumerate(tiles):
            real = tokens.attention_mask[row].bool()
            ids, labels = tokens.input_ids[row][real], tokens.labels[row][real]
            first = int(real.long().argmax())  # left padding: the first real token
            seg = int(tokens.seg_positions[row]) - first if int(tokens.seg_positions[row]) >= 0 else -1
            span = (ids == image_id).nonzero().flatten()
            if span.numel() == count * per_tile:
                rows.append((ids, labels, seg))
                continue
            if span.numel() != per_tile:
                raise ValueError(f"row {row}: {span.numel()} image tokens, neither one tile's ({per_tile}) nor its "
                                 f"image's {count} tiles' ({count * per_tile}); tokenize with tiles=images.num_tiles")
            at, extra = int(span[-1]) + 1, (count - 1) * per_tile
            ids = torch.cat([ids[:at], ids.new_full((extra,), image_id), ids[at:]])
            labels = torch.cat([labels[:at], labels.new_full((extra,), IGNORE_INDEX), labels[at:]])
            rows.append((ids, labels, seg + extra if seg >= at else seg))
        input_ids, attention_mask, labels, starts = self._left_padded([(ids.cpu(), lab.cpu()) for ids, lab, _ in rows])
        seg_positions = torch.tensor([start + seg if seg >= 0 else -1 for start, (_, _, seg) in zip(starts, rows)],
                                     dtype=torch.long)
        return TokenBatch(input_ids, attention_mask, labels, seg_positions).to(tokens.input_ids.device)


def _per_sample(value: str | Sequence[str], n: int, name: str) -> list[str]:
    if isinstance(value, str):
        return [value] * n
    values = list(value)
    if len(values) != n or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{name}: must be a string or a list of {n} strings, got {value!r}")
    return values
