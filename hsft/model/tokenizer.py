"""Tokenizers: the locally trained one of the presets, and the `[SEG]` checks for any tokenizer.

The preset tokenizer is a byte-level BPE trained in-process (tokenizers library, nothing
downloaded) on a small embedded corpus of segmentation instructions and answers. Byte-level
means every string encodes (unseen words fall back to bytes), and the corpus only decides which
merges exist. Training is deterministic, so every build yields the same vocabulary.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from hsft.model.config import SEG_TOKEN

__all__ = [
    "PAD_TOKEN",
    "IM_START",
    "IM_END",
    "IMG_START",
    "IMG_END",
    "IMG_CONTEXT",
    "build_preset_tokenizer",
    "single_token_id",
    "add_seg_token",
]

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, SEG_TOKEN)

# What the presets are asked and answer, plus enough plain English that other instructions do not
# fall all the way back to single bytes.
_CORPUS = (
    "user\n", "assistant\n", "system\n",
    "Please segment the blood vessel.",
    "Please segment the blood vessels.",
    "Please segment the retinal vessels in this image.",
    "Segment the blood vessels in this fundus photograph.",
    "Can you segment the vessel tree of the retina?",
    "Where are the blood vessels? Please output the segmentation mask.",
    "Please identify and segment the vessels.",
    "Sure, [SEG].", "Sure, it is [SEG].", "It is [SEG].", "Sure, the blood vessel is [SEG].",
    "You are a helpful assistant for medical image segmentation.",
    "The optic disc, the macula, the fovea, arteries, veins and capillaries of the eye.",
    "Describe the image. This is a colour fundus image of a retina.",
    "a an the of in on at to for with and or is are was be this that these those it its",
    "what where which who how please can could would you your image photo mask region area",
    "left right top bottom center small large thin thick dark bright red green blue",
    "0 1 2 3 4 5 6 7 8 9 10 100 yes no none not found.",
)


def build_preset_tokenizer(vocab_size: int, *, include_seg: bool = True) -> PreTrainedTokenizerFast:
    """Train the preset byte-level BPE tokenizer; left padding, chat and [SEG] special tokens.

    include_seg=False leaves [SEG] out, giving a tokenizer like a published VLM's before Sa2VA adds
    [SEG] (the checkpoint-loading path is tested with it).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [tok for tok in SPECIAL_TOKENS if include_seg or tok != SEG_TOKEN]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size: must be at least {256 + len(specials)} "
                         f"(256 bytes + {len(specials)} special tokens), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeating the corpus only scales pair counts; it keeps the merges stable and deterministic.
    backend.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[tok for tok in specials if tok not in (PAD_TOKEN, IM_END)],
        padding_side="left",
    )
    if include_seg:
        single_token_id(tokenizer, SEG_TOKEN)
    return tokenizer


def single_token_id(tokenizer: PreTrainedTokenizerBase, token: str, *, where: str = "tokenizer") -> int:
    """The id `token` encodes to; ValueError when it does not encode to exactly one id.

    The [SEG] convention reads the hidden state at one position, so [SEG] (and the chat tokens the
    template relies on) must be atomic.
    """
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"{where}: {token!r} must encode to exactly one token id, but it encodes to "
                         f"{len(ids)} ids {ids} ({pieces}); add it as a special token")
    return int(ids[0])


def add_seg_token(tokenizer: PreTrainedTokenizerBase, *, where: str = "tokenizer") -> int:
    """Add [SEG] as a special token (no-op when present), left padding; returns its checked id."""
    if SEG_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([SEG_TOKEN], special_tokens=True)
    tokenizer.padding_side = "left"
    return single_token_id(tokenizer, SEG_TOKEN, where=where)
