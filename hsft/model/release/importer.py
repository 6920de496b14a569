"""Import a released Sa2VA checkpoint into an hsft model directory (no remote code is run).

    import_sa2va("/ckpt/Sa2VA-1B", "runs/sa2va1b")

Everything is checked from the config, the tokenizer and the safetensors headers before a tensor
is read: a problem stops the import with one line naming the file or tensor. The output is an
ordinary hsft model directory (hsft.model.checkpoint) using the release's conventions
(Conventions.release()), plus

    release/layout.json        every source tensor: name, file, dtype, shape, and how it was mapped
    release/kept.safetensors   the tensors image inference does not use (SAM2's video memory,
                               object pointers ...), unchanged
    release/files/             the source's non-weight files (config, tokenizer, remote code)
    conversion_report.json/md  what was mapped, what was kept aside, the conventions in use
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, InternVLForConditionalGeneration, Sam2Model

from hsft.model.checkpoint import save_model
from hsft.model.config import SEG_TOKEN, Conventions, PromptConfig
from hsft.model.images import IMAGENET_NORM, ImageNorm
from hsft.model.release.configs import internvl_config, llm_heads, sam2_config, tiling_fields
from hsft.model.release.keys import (
    internlm2_renamer,
    is_sam2_unused,
    projector_renamer,
    qwen2_renamer,
    sam2_renamer,
    vision_renamer,
)
from hsft.model.release.plan import PROMPT_ONLY, SAM2_SHARED_POSITIONAL, Entry, plan_keys, to_hsft
from hsft.model.release.source import WEIGHTS_FILE, ReleaseError, ReleaseSource, read_release
from hsft.model.sa2va import Sa2VAModel
from hsft.model.tokenizer import IM_END, IMG_CONTEXT, IMG_END, IMG_START, single_token_id

__all__ = ["import_sa2va", "ImportReport", "LAYOUT_FILE", "KEPT_FILE", "FILES_DIR", "REPORT_FILE"]

LAYOUT_FILE = "layout.json"
KEPT_FILE = "kept.safetensors"
FILES_DIR = "files"
REPORT_FILE = "conversion_report"
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_EMBED = "vlm.model.language_model.embed_tokens.weight"
_LM_HEAD = "vlm.lm_head.weight"
# SAM2's input normalisation as the release's inference runs it: its SAM2.preprocess_image builds the
# ImageNet mean and std as bfloat16 tensors (its dtype argument's default, which predict_forward
# keeps), so even a float32 run subtracts and divides by the bfloat16-rounded constants.
RELEASE_SAM_NORM = ImageNorm(*(tuple(torch.tensor(values).to(torch.bfloat16).float().tolist())
                               for values in (IMAGENET_NORM.mean, IMAGENET_NORM.std)))


@dataclass
class ImportReport:
    source: str
    output: str
    llm_family: str
    template: str
    dtype: str
    sam2_sizes: str
    tensors: int
    mapped: int
    mapped_prompt_only: list[str]
    kept: list[str]
    unrecognised: list[str]  # kept too, but not a tensor this converter knows of: check them
    tied_lm_head: bool
    conventions: dict
    sam_norm: dict


def _load_tokenizer(source: ReleaseSource):
    directory = source.directory
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ReleaseError(f"{directory}: no tokenizer that loads without remote code "
                           f"({str(err).splitlines()[0]})") from err
    for token in (SEG_TOKEN, IMG_CONTEXT, IMG_START, IMG_END, IM_END):
        if token not in tokenizer.get_vocab():
            raise ReleaseError(f"{directory}: the tokenizer has no {token} token; not a Sa2VA tokenizer")
        try:
            single_token_id(tokenizer, token, where=f"{directory} tokenizer")
        except ValueError as err:
            raise ReleaseError(str(err)) from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = IM_END  # padded positions are masked out, any token serves
    return tokenizer


def _expected_shapes(model: torch.nn.Module, prefix: str) -> dict[str, tuple[int, ...]]:
    return {prefix + key: tuple(value.shape) for key, value in model.state_dict().items()}


def _check_plan(source: ReleaseSource, entries: list[Entry], expected: dict[str, tuple[int, ...]],
                tied: bool) -> None:
    """Every expected tensor is supplied, every mapped tensor has the expected shape (by release key)."""
    supplied: dict[str, str] = {}
    for entry in entries:
        if entry.kind == "kept":
            continue
        shape = source.shapes[entry.release_key]
        if entry.kind == "copy":
            want = [expected.get(entry.hsft_keys[0])]
        elif entry.kind == "point_row":
            table = expected.get(entry.hsft_keys[0])
            want = [None if table is None else (1, table[1])]
        elif entry.kind == "vision_qkv":
            q = expected.get(entry.hsft_keys[0])
            want = [None if q is None else (3 * q[0], *q[1:])]
        else:  # wqkv
            q, k = expected.get(entry.hsft_keys[0]), expected.get(entry.hsft_keys[1])
            want = [None if q is None or k is None else (q[0] + 2 * k[0], *q[1:])]
        if want[0] is None:
            if entry.hsft_keys[0].startswith("fcs."):
                continue
            raise ReleaseError(f"{source.directory}: tensor {entry.release_key!r} maps to {entry.hsft_keys[0]!r}, "
                               "which the model built from config.json does not have (config and weights disagree)")
        if shape != want[0]:
            raise ReleaseError(f"{source.directory}: tensor {entry.release_key!r} has shape {list(shape)}, expected "
                               f"{list(want[0])} from the configuration (config.json, and the SAM2 sizes in use)")
        for key in entry.hsft_keys:
            supplied[key] = entry.release_key
    derived = {SAM2_SHARED_POSITIONAL} | ({_LM_HEAD} if tied else set())
    missing = [key for key in expected if key not in supplied and key not in derived]
    if missing:
        raise ReleaseError(f"{source.directory}: {len(missing)} tensor(s) the model needs are missing, e.g. "
                           f"{', '.join(_release_name(key, source.llm_family) for key in missing[:3])}")


def _release_name(hsft_key: str, family: str) -> str:
    for renamer in (vision_renamer(), projector_renamer(), *(qwen2_renamer() if family == "qwen2"
                                                              else internlm2_renamer()), sam2_renamer()):
        name = renamer.backward(hsft_key)
        if name is not None:
            return repr(name)
    return repr(hsft_key)


def _read_tensors(source: ReleaseSource) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name in source.weight_files:
        with safe_open(source.directory / name, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = handle.get_tensor(key)
    return tensors


def _choose_dtype(source: ReleaseSource, dtype: str | None) -> torch.dtype:
    if dtype is not None:
        return getattr(torch, dtype)
    counts = Counter(source.dtypes[key] for key in source.dtypes if source.dtypes[key] in _DTYPES)
    if not counts:
        raise ReleaseError(f"{source.directory}: no floating-point tensors in BF16, F16 or F32")
    return _DTYPES[counts.most_common(1)[0][0]]


def _lm_head_tied(source: ReleaseSource, entries: list[Entry]) -> bool:
    """Whether the LLM's output layer is its input embedding (as the release's config says, and as
    the weights agree: an lm_head stored with other values than the embedding unties them)."""
    llm = source.config["llm_config"]
    if source.llm_family != "qwen2" or not llm.get("tie_word_embeddings", False):
        return False
    head = next((e.release_key for e in entries if e.hsft_keys == (_LM_HEAD,)), None)
    if head is None:
        return True
    embed = next(e.release_key for e in entries if e.hsft_keys == (_EMBED,))
    with safe_open(source.directory / source.key_files[head], framework="pt") as handle:
        head_tensor = handle.get_tensor(head)
    with safe_open(source.directory / source.key_files[embed], framework="pt") as handle:
        embed_tensor = handle.get_tensor(embed)
    return head_tensor.shape == embed_tensor.shape and torch.equal(head_tensor, embed_tensor)


def _prepare_output(output: Path, overwrite: bool) -> None:
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise ReleaseError(f"{output}: output directory exists and is not empty (use --overwrite)")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def import_sa2va(source_dir: str | os.PathLike, output_dir: str | os.PathLike, *, sam2_config_file: str | None = None,
                 dtype: str | None = None, prompt: PromptConfig | None = None, overwrite: bool = False
                 ) -> ImportReport:
    """Convert the release in `source_dir` into an hsft model directory `output_dir`.

    dtype: the hsft model's parameter dtype (default: the source's). sam2_config_file: SAM2 sizes
    (default: the release's Hiera-L). prompt: the instruction and trained answer recorded in the
    model (default: PromptConfig()).
    """
    source = read_release(source_dir)
    tokenizer = _load_tokenizer(source)
    tiling = tiling_fields(source.config, source.directory / "config.json")
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise ReleaseError(f"dtype: must be float32, bfloat16 or float16, got {dtype!r}")
    sam_cfg = sam2_config(sam2_config_file)
    entries = plan_keys(list(source.key_files), source.llm_family)
    tied = _lm_head_tied(source, entries)
    vlm_cfg = internvl_config(source, image_token_id=single_token_id(tokenizer, IMG_CONTEXT), tie_word_embeddings=tied)
    heads = llm_heads(vlm_cfg)
    vision_width = int(vlm_cfg.vision_config.hidden_size)
    with torch.device("meta"):
        expected = {**_expected_shapes(InternVLForConditionalGeneration(vlm_cfg), "vlm."),
                    **_expected_shapes(Sam2Model(sam_cfg), "sam2.")}
    _check_plan(source, entries, expected, tied)
    fcs = _fcs_shapes(source, entries, int(vlm_cfg.text_config.hidden_size),
                      int(sam_cfg.mask_decoder_config.hidden_size))
    output = Path(output_dir)
    _prepare_output(output, overwrite)

    # ---- the work: read, map, build, save
    target = _choose_dtype(source, dtype)
    tensors = _read_tensors(source)
    state = to_hsft(entries, tensors, vision_width, heads)
    if tied:
        state.pop(_LM_HEAD, None)
    vlm_state = {k[len("vlm."):]: v for k, v in state.items() if k.startswith("vlm.")}
    sam_state = {k[len("sam2."):]: v for k, v in state.items() if k.startswith("sam2.")}
    fcs_state = {k[len("fcs."):]: v for k, v in state.items() if k.startswith("fcs.")}
    vlm = InternVLForConditionalGeneration(vlm_cfg)
    _load_strict(vlm, vlm_state, tied, source)
    sam2 = Sam2Model(sam_cfg)
    _load_strict(sam2, sam_state, False, source)
    vlm.generation_config.eos_token_id = single_token_id(tokenizer, IM_END)
    vlm.generation_config.pad_token_id = int(tokenizer.pad_token_id)
    conventions = Conventions.release(bos_token=source.template == "internlm2_chat", **tiling)
    model = Sa2VAModel(vlm, sam2, tokenizer, prompt or PromptConfig(), fcs_hidden=fcs, conventions=conventions,
                       sam_norm=RELEASE_SAM_NORM)
    model.text_hidden_fcs.load_state_dict(fcs_state, strict=True)
    model = model.to(target).eval()

    release_dir = output / "release"
    _write_release_files(source, entries, tensors, release_dir, tied)
    model.release_dir = str(release_dir)
    save_model(model, output)
    report = ImportReport(
        source=str(source.directory.resolve()), output=str(output.resolve()), llm_family=source.llm_family,
        template=source.template, dtype=str(target).removeprefix("torch."),
        sam2_sizes=sam2_config_file or "Hiera-L at 1024 px (the release's default)",
        tensors=len(entries), mapped=sum(e.kind != "kept" for e in entries),
        mapped_prompt_only=sorted(e.release_key for e in entries
                                  if e.kind != "kept" and e.hsft_keys[0].startswith(PROMPT_ONLY)),
        kept=[e.release_key for e in entries if e.kind == "kept"],
        unrecognised=[e.release_key for e in entries if e.kind == "kept" and not is_sam2_unused(e.release_key)],
        tied_lm_head=tied,
        conventions=asdict(conventions),
        sam_norm=RELEASE_SAM_NORM.to_dict(),
    )
    _write_report(report, output)
    return report


def _fcs_shapes(source: ReleaseSource, entries: list[Entry], hidden: int, width: int) -> int:
    """text_hidden_fcs's middle width, after checking its two layers against the LLM and SAM2 widths."""
    where = source.directory
    shapes = {e.hsft_keys[0]: source.shapes[e.release_key] for e in entries if e.kind == "copy"
              and e.hsft_keys[0].startswith("fcs.")}
    for key in ("fcs.0.weight", "fcs.0.bias", "fcs.2.weight", "fcs.2.bias"):
        if key not in shapes:
            raise ReleaseError(f"{where}: tensor 'text_hidden_fcs.{key[4:]}' is missing")
    middle = shapes["fcs.0.weight"][0]
    want = {"fcs.0.weight": (middle, hidden), "fcs.0.bias": (middle,), "fcs.2.weight": (width, middle),
            "fcs.2.bias": (width,)}
    for key, shape in want.items():
        if shapes[key] != shape:
            raise ReleaseError(f"{where}: tensor 'text_hidden_fcs.{key[4:]}' has shape {list(shapes[key])}, "
                               f"expected {list(shape)} (LLM width {hidden}, SAM2 prompt width {width})")
    return int(middle)


def _load_strict(module: torch.nn.Module, state: dict, tied: bool, source: ReleaseSource) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [key for key in missing if not (tied and key == "lm_head.weight")]
    if missing or unexpected:  # _check_plan makes this unreachable; kept as a guard against drift
        raise ReleaseError(f"{source.directory}: mapping incomplete (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]})")


def _write_release_files(source: ReleaseSource, entries: list[Entry], tensors: dict[str, torch.Tensor],
                         release_dir: Path, tied: bool) -> None:
    release_dir.mkdir(parents=True, exist_ok=True)
    kept = {e.release_key: tensors[e.release_key].contiguous() for e in entries if e.kind == "kept"}
    save_file(kept, str(release_dir / KEPT_FILE))
    metadata = {}
    for name in source.weight_files:
        with safe_open(source.directory / name, framework="pt") as handle:
            metadata[name] = handle.metadata() or {}
    layout = {
        "llm_family": source.llm_family,
        "tied_lm_head": tied,
        "sharded": (source.directory / WEIGHTS_FILE).exists() is False,
        "file_metadata": metadata,
        "tensors": [
            {"key": e.release_key, "file": source.key_files[e.release_key], "dtype": source.dtypes[e.release_key],
             "shape": list(source.shapes[e.release_key]), "kind": e.kind, "hsft": list(e.hsft_keys), "row": e.row}
            for e in entries
        ],
    }
    (release_dir / LAYOUT_FILE).write_text(json.dumps(layout, indent=1), encoding="utf-8")
    files = release_dir / FILES_DIR
    files.mkdir(exist_ok=True)
    weights = set(source.weight_files)
    for path in sorted(source.directory.iterdir()):
        if path.is_file() and path.name not in weights:
            shutil.copy2(path, files / path.name)


def _write_report(report: ImportReport, output: Path) -> None:
    (output / f"{REPORT_FILE}.json").write_text(json.dumps(asdict(report), indent=2), encoding="utf-8")
    lines = [
        "# Conversion report", "",
        f"- source: `{report.source}`",
        f"- LLM: {report.llm_family}, chat template {report.template}; parameters in {report.dtype}",
        f"- SAM2 sizes: {report.sam2_sizes}",
        f"- tensors in the source: {report.tensors}; mapped into the hsft model: {report.mapped}; "
        f"kept unchanged beside it (release/kept.safetensors): {len(report.kept)}",
        f"- lm_head tied to the input embedding: {report.tied_lm_head}",
        "- conventions (hsft_model.json): " + ", ".join(f"{k}={v}" for k, v in report.conventions.items()),
        f"- SAM2 input normalisation (the release's, ImageNet rounded to bfloat16): mean "
        f"{report.sam_norm['mean']}, std {report.sam_norm['std']}",
        "",
        "Mapped tensors are the ones image segmentation runs; those below are mapped too but only serve",
        "point or mask prompts, which [SEG] prompting does not use:", "",
        *[f"- `{key}`" for key in report.mapped_prompt_only],
        "", "Kept beside the model (SAM2's video memory and object pointers, unused for images); export",
        "writes them back unchanged:", "",
        *[f"- `{key}`" for key in report.kept if key not in report.unrecognised],
    ]
    if report.unrecognised:
        lines += ["", f"Not recognised ({len(report.unrecognised)}): kept and exported unchanged, but not part of the "
                  "hsft model; a tensor the release's inference uses must not be here:", "",
                  *[f"- `{key}`" for key in report.unrecognised]]
    (output / f"{REPORT_FILE}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
