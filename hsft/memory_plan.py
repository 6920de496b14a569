"""The memory plan: what each stage of a run will hold, per rank, before the run starts.

From the model's parameter counts (per part), each stage's trainable parts, the precision, the
DeepSpeed config (ZeRO stage, optimizer offload), the micro-batch, the longest sequence (image tiles
x image tokens + text) and the caches, the plan adds up per stage:

    params       the model in the training / inference dtype
    grads        the trainable parameters' gradients, plus ZeRO's fp32 gradient partition
    optimizer    AdamW's two moments and ZeRO's fp32 master partition (on the host when the
                 config offloads the optimizer)
    activations  what the backward pass keeps (modelled per token and layer for the LLM, per image for
                 the mask decoder), or for inference the largest transient of one batch (the vision
                 tower over all tiles, one LLM layer, the KV cache, SAM2's image encoder)
    caches       the frozen-feature caches of DPO, HSFT and the control (pinned host memory unless
                 --hsft-cache-on-device), and DPO's reference, which is a precomputed log-likelihood
                 pair per sample (the reference model is never held)
    export       LoRA writes its merged model from a fresh float32 copy of its input model, loaded in
                 host memory while the trained one is still there (so does every training stage of a
                 --standalone run); the other stages write only their trained tensors

Where the numbers come from: parameter, gradient, optimizer and cache sizes are exact counts; the
activation terms are models with the constants below, set from measured peaks (docs/gpus.md says
where they are rough). `plan_run` is printed at the start of every run and stored in report.json;
`launch/hsft.py --plan` prints it without running, with which ds_configs/ fit --plan-gpu-memory.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = ["ModelShape", "StagePlan", "RunPlan", "model_shape", "shape_of_model", "plan_run", "plan_for_run",
           "plan_command", "format_plan", "format_fits", "parse_size", "config_fits", "TRAINABLE"]

GiB = 2**30
# Python, torch, transformers and DeepSpeed loaded, before any model (measured on the CPU: ~0.6 GiB).
HOST_BASE_GIB = 0.7
# Text tokens around the image tokens (chat template, instruction, answer): the default prompt is ~26-30.
TEXT_TOKENS = 32
# LLM activations kept for backward, bytes per token, layer and hidden unit at 2-byte precision
# (attention without the quadratic score matrix: SDPA; Korthikanti et al.'s 34 per layer without it).
LLM_ACT_PER_HIDDEN = 34
# LoRA's LM loss applies the LM head to the answer's positions only (hsft.model.sa2va.labelled_lm_loss):
# about this many per sample, in float32: logits, log-softmax and its gradient.
ANSWER_TOKENS = 16
LOGIT_COPIES = 3
# SAM2's image encoder, largest transient per image per (input pixel) at 4-byte precision: Hiera's
# first stage at 1/4 resolution with its 4x MLP, a few tensors alive at once.
SAM_BYTES_PER_PIXEL = 96
# The mask decoder's training activations per image per pixel of SAM2's input, 4-byte precision
# (upscaling to 1/4 resolution, hypernetwork products, the logits at SAM2's input size and the loss).
DECODER_BYTES_PER_PIXEL = 48
# Vision tower transient per token of a tile at 4-byte precision, per intermediate unit (MLP input and
# output alive at once).
VISION_TRANSIENT_COPIES = 2

# What each stage trains (hsft.model.PARTS names). LoRA trains adapters inside the LLM: counted apart.
TRAINABLE = {
    "lora": (),
    "dpo": ("text_hidden_fcs", "mask_decoder"),
    "hsft": ("text_hidden_fcs", "mask_decoder"),
    "control": ("text_hidden_fcs", "mask_decoder"),
}
INFERENCE_STAGES = ("mining", "eval")
LORA_TARGETS = 4  # q, k, v, o of every LLM layer


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of a model: parameters per part and the sizes that set activations."""

    parts: dict[str, int]
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_intermediate: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_intermediate: int
    vision_tokens: int  # per tile, class token included
    image_tokens: int  # per tile, what the LLM sees
    tile: int  # pixels of a tile's side
    sam_image: int  # SAM2's input side
    sam_width: int  # the mask decoder's width
    tiling: bool = False
    min_tiles: int = 1
    max_tiles: int = 12
    thumbnail: bool = True
    stored_bytes: int = 4  # bytes per parameter in the model directory

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def tiles(self, height: int, width: int) -> int:
        if not self.tiling:
            return 1
        from hsft.model.tiling import TileSettings, tile_count

        return tile_count(width, height, self.tile, TileSettings(self.min_tiles, self.max_tiles, self.thumbnail))

    def tokens(self, tiles: int) -> int:
        return tiles * self.image_tokens + TEXT_TOKENS

    def feature_bytes(self, precision_bytes: int) -> int:
        """One image's cached SAM2 features (three levels) and [SEG] state."""
        s, c = self.sam_image, self.sam_width
        values = c * (s // 16) ** 2 + (c // 8) * (s // 4) ** 2 + (c // 4) * (s // 8) ** 2
        return (values + self.llm_hidden) * precision_bytes


def _side(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _shape(vlm_config, sam2_config, parts: dict[str, int], conventions: dict | None, stored_bytes: int) -> ModelShape:
    text, vision = vlm_config.text_config, vlm_config.vision_config
    tile, patch = _side(vision.image_size), _side(vision.patch_size)
    conventions = conventions or {}
    return ModelShape(
        parts=parts, llm_hidden=int(text.hidden_size), llm_layers=int(text.num_hidden_layers),
        llm_heads=int(text.num_attention_heads),
        llm_kv_heads=int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads),
        llm_intermediate=int(text.intermediate_size), vocab=int(text.vocab_size),
        vision_hidden=int(vision.hidden_size), vision_layers=int(vision.num_hidden_layers),
        vision_intermediate=int(vision.intermediate_size), vision_tokens=(tile // patch) ** 2 + 1,
        image_tokens=int(vlm_config.image_seq_length), tile=tile,
        sam_image=_side(sam2_config.vision_config.backbone_config.image_size),
        sam_width=int(sam2_config.mask_decoder_config.hidden_size),
        tiling=bool(conventions.get("dynamic_image_size", False)),
        min_tiles=int(conventions.get("min_dynamic_patch", 1)), max_tiles=int(conventions.get("max_dynamic_patch", 12)),
        thumbnail=bool(conventions.get("use_thumbnail", True)), stored_bytes=stored_bytes)


def shape_of_model(model) -> ModelShape:
    """The shape of a built Sa2VAModel."""
    counts = {k: v for k, v in model.parameter_counts().items() if k != "total"}
    return _shape(model.vlm.config, model.sam2.config, counts, asdict(model.conventions),
                  next(model.parameters()).element_size())


def model_shape(directory: str | Path) -> ModelShape:
    """The shape of the model saved in `directory` (a lean one through its chain), read from its configs:
    the architecture is built on the meta device, so nothing is loaded."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Sam2Config, Sam2Model

    from hsft.model.chain import chain_of
    from hsft.model.sa2va import Sa2VAModel

    full = chain_of(directory)[-1]
    meta = json.loads((full / "hsft_model.json").read_text(encoding="utf-8"))
    vlm_config = InternVLConfig.from_pretrained(str(full / "vlm"))
    sam2_config = Sam2Config.from_pretrained(str(full / "sam2"))
    with torch.device("meta"):
        vlm, sam2 = InternVLForConditionalGeneration(vlm_config), Sam2Model(sam2_config)
    parts: dict[str, int] = {}
    seen = set()
    for prefix, module in (("vlm.", vlm), ("sam2.", sam2)):
        for name, param in module.named_parameters():  # tied weights are yielded once
            if id(param) in seen:
                continue
            seen.add(id(param))
            part = Sa2VAModel._part_of(prefix + name)
            parts[part] = parts.get(part, 0) + param.numel()
    hidden, fcs, width = int(meta["hidden_size"]), int(meta["fcs_hidden"]), int(meta["prompt_width"])
    parts["text_hidden_fcs"] = hidden * fcs + fcs + fcs * width + width
    stored = {"float32": 4, "bfloat16": 2, "float16": 2}.get(meta.get("dtype", "float32"), 4)
    return _shape(vlm_config, sam2_config, parts, meta.get("conventions"), stored)


# ---------------------------------------------------------------------------- the plan
@dataclass
class StagePlan:
    stage: str
    trainable: int = 0
    params_gib: float = 0.0
    grads_gib: float = 0.0
    optimizer_gib: float = 0.0  # where the optimizer lives (device, or host with offload)
    activations_gib: float = 0.0
    caches_gib: float = 0.0
    export_gib: float = 0.0  # host
    gpu_gib: float | None = None  # None on a CPU run
    host_gib: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class RunPlan:
    device: str
    precision: str
    world_size: int
    zero_stage: int
    offload_optimizer: bool
    longest_tokens: int
    longest_tiles: int
    stages: dict[str, StagePlan]
    parameters: dict[str, int]

    @property
    def peak_gpu_gib(self) -> float | None:
        values = [s.gpu_gib for s in self.stages.values() if s.gpu_gib is not None]
        return max(values) if values else None

    @property
    def peak_host_gib(self) -> float:
        return max(s.host_gib for s in self.stages.values())

    def to_dict(self) -> dict:
        out = asdict(self)
        out["stages"] = {name: asdict(stage) for name, stage in self.stages.items()}
        out["peak_gpu_gib"], out["peak_host_gib"] = self.peak_gpu_gib, self.peak_host_gib
        return out


def _offload(ds_config: dict) -> bool:
    zero = ds_config.get("zero_optimization") or {}
    return str((zero.get("offload_optimizer") or {}).get("device", "none")).lower() == "cpu"


def _zero_stage(ds_config: dict) -> int:
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


def _lora_params(shape: ModelShape, rank: int) -> int:
    head_dim = shape.llm_hidden // shape.llm_heads
    kv = shape.llm_kv_heads * head_dim
    per_layer = rank * ((shape.llm_hidden + shape.llm_hidden) * 2 + (shape.llm_hidden + kv) * 2)  # q, o; k, v
    return shape.llm_layers * per_layer


def _inference_transient(shape: ModelShape, batch_tiles: list[int], new_tokens: int, p: int) -> float:
    """Bytes of the largest transient of one inference batch (images x their tiles): the vision tower over
    every tile, or one LLM layer with the KV cache, or SAM2's image encoder over the batch."""
    if not batch_tiles:
        return 0.0
    b = len(batch_tiles)
    tiles = sum(batch_tiles)
    tokens = shape.tokens(max(batch_tiles))
    vision = tiles * shape.vision_tokens * shape.vision_intermediate * p * VISION_TRANSIENT_COPIES
    head_dim = shape.llm_hidden // shape.llm_heads
    kv = 2 * shape.llm_layers * shape.llm_kv_heads * head_dim * b * (tokens + new_tokens) * p
    llm = b * tokens * (3 * shape.llm_intermediate + 4 * shape.llm_hidden) * p + kv
    sam = b * shape.sam_image ** 2 * SAM_BYTES_PER_PIXEL * p / 4
    return max(vision, llm, sam)


def plan_run(cfg, shape: ModelShape, *, ds_config: dict, device: str, precision: str, world_size: int = 1,
             train_sizes: list[tuple[int, int]], val_sizes: list[tuple[int, int]] | None = None,
             test_sizes: list[tuple[int, int]], stages: tuple[str, ...] | None = None) -> RunPlan:
    """The plan of `cfg` (a RunConfig) for a model of `shape`: per stage of `stages` (default cfg.stages),
    per rank. Image sizes are (height, width) of the splits' images."""
    p = 2 if precision == "bf16" else 4
    gpu = device == "cuda"
    offload = _offload(ds_config)
    zero = _zero_stage(ds_config)
    shard = world_size if zero >= 1 else 1
    grad_shard = world_size if zero >= 2 else 1
    train_tiles = sorted((shape.tiles(h, w) for h, w in train_sizes), reverse=True)
    val_tiles = sorted((shape.tiles(h, w) for h, w in (val_sizes or [])), reverse=True)
    test_tiles = sorted((shape.tiles(h, w) for h, w in test_sizes), reverse=True)
    longest = max(train_tiles + test_tiles + val_tiles + [1])
    weights = shape.total * p
    plans: dict[str, StagePlan] = {}
    per_rank = max(1, math.ceil(len(train_tiles) / world_size))

    for stage in stages or cfg.stages:
        plan = StagePlan(stage)
        plan.params_gib = weights / GiB
        if stage in ("lora", "dpo", "hsft", "control"):
            stage_cfg = cfg.lora if stage == "lora" else (cfg.dpo if stage == "dpo" else cfg.hsft)
            mb = stage_cfg.train.micro_batch
            if stage == "lora":
                trainable = _lora_params(shape, cfg.lora.rank)
                if cfg.lora.mask_loss_weight > 0:
                    trainable += shape.parts.get("text_hidden_fcs", 0)
                if cfg.lora.train_mask_decoder:
                    trainable += shape.parts.get("mask_decoder", 0)
                tiles = train_tiles[:min(mb, len(train_tiles))] or [1]
                tokens = shape.tokens(max(tiles)) * len(tiles)
                layer = tokens * LLM_ACT_PER_HIDDEN * shape.llm_hidden * p / 2
                checkpointing = (cfg.lora.gradient_checkpointing if cfg.lora.gradient_checkpointing is not None
                                 else not cfg.embedded_default)
                # With gradient checkpointing only each layer's input stays, plus one layer's activations
                # while it is recomputed.
                llm = (shape.llm_layers * tokens * shape.llm_hidden * p + layer if checkpointing
                       else shape.llm_layers * layer)
                logits = len(tiles) * ANSWER_TOKENS * shape.vocab * 4 * LOGIT_COPIES
                plan.activations_gib = (llm + logits + _inference_transient(shape, tiles, 0, p)) / GiB
                plan.params_gib += trainable * p / GiB  # the adapters sit beside the frozen weights
                plan.notes.append(f"LoRA micro-batch of {len(tiles)}, longest {shape.tokens(max(tiles))} tokens")
            else:
                trainable = sum(shape.parts.get(part, 0) for part in TRAINABLE[stage])
                samples = len(train_tiles)  # DPO's pairs and the hard set are parts of the training split
                cached = per_rank if (stage == "dpo" or cfg.hsft.cache_features) else 0
                plan.caches_gib = cached * shape.feature_bytes(p) / GiB
                fill = _inference_transient(shape, train_tiles[:cfg.mining.batch_size], 0, p)
                decoder = mb * shape.sam_image ** 2 * DECODER_BYTES_PER_PIXEL * p / 4
                if stage != "dpo" and not cfg.hsft.cache_features:
                    fill = _inference_transient(shape, train_tiles[:mb], 0, p)
                plan.activations_gib = max(fill, decoder) / GiB
                plan.notes.append(f"{samples} training samples at most; {cached} cached a rank")
            plan.trainable = trainable
            plan.grads_gib = (trainable * p + trainable * 4 / grad_shard) / GiB
            plan.optimizer_gib = trainable * 12 / shard / GiB
            # LoRA merges its adapters into a float32 copy of its input model; the other stages write their
            # trained tensors over the input directory (a lean directory) unless the run writes
            # self-contained ones (--standalone), which takes the float32 copy too.
            full_copy = stage == "lora" or cfg.standalone
            plan.export_gib = ((shape.total * 4 if full_copy else 0) + trainable * 4) / GiB
        elif stage in INFERENCE_STAGES:
            batch = cfg.mining.batch_size if stage == "mining" else cfg.eval.batch_size
            new = cfg.mining.max_new_tokens if stage == "mining" else cfg.eval.max_new_tokens
            tiles = (train_tiles if stage == "mining" else test_tiles)[:batch]
            plan.activations_gib = _inference_transient(shape, tiles, new, p) / GiB
        else:  # stage 0 of the embedded default, and the variants beside HSFT: as HSFT
            plan.notes.append("planned as HSFT")
            plan.activations_gib = _inference_transient(shape, train_tiles[:cfg.mining.batch_size], 0, p) / GiB
        device_side = plan.params_gib + plan.grads_gib + plan.activations_gib
        optimizer_on_device = not offload
        caches_on_device = gpu and cfg.hsft.cache_on_device
        if gpu:
            plan.gpu_gib = device_side + (plan.optimizer_gib if optimizer_on_device else 0.0) + \
                (plan.caches_gib if caches_on_device else 0.0)
            # the host holds the process, the model loaded before it moves to the GPU, what is offloaded
            plan.host_gib = HOST_BASE_GIB + shape.total * shape.stored_bytes / GiB + plan.export_gib + \
                (0.0 if optimizer_on_device else plan.optimizer_gib) + (0.0 if caches_on_device else plan.caches_gib)
        else:
            plan.host_gib = HOST_BASE_GIB + device_side + plan.optimizer_gib + plan.caches_gib + plan.export_gib
        plans[stage] = plan
    return RunPlan(device=device, precision=precision, world_size=world_size, zero_stage=zero,
                   offload_optimizer=offload, longest_tokens=shape.tokens(longest), longest_tiles=longest,
                   stages=plans, parameters={**shape.parts, "total": shape.total})


# ---------------------------------------------------------------------------- fitting and printing
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|G|MiB|MB|M)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> float:
    """'24GiB', '24GB', '24G' or '24' (GiB) -> GiB; '80000MiB' -> GiB. GB is read as GiB (how GPUs are sold)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"--plan-gpu-memory: expected a size such as 24GiB or 80GB, got {text!r}")
    value, unit = float(match.group(1)), (match.group(2) or "GiB").lower()
    if value <= 0:
        raise ValueError(f"--plan-gpu-memory: must be positive, got {text!r}")
    return value / 1024 if unit.startswith("m") else value


def config_fits(plans: dict[str, RunPlan], gpu_gib: float, headroom: float = 0.9) -> dict[str, bool]:
    """Which configs' GPU peak fits in `headroom` of `gpu_gib` (the rest: CUDA context, the allocator's
    fragmentation)."""
    return {name: plan.peak_gpu_gib is not None and plan.peak_gpu_gib <= headroom * gpu_gib
            for name, plan in plans.items()}


def format_plan(plan: RunPlan, *, title: str = "memory plan") -> str:
    gpu = plan.peak_gpu_gib is not None
    lines = [f"{title}: {plan.precision}, {plan.world_size} rank(s), ZeRO-{plan.zero_stage}"
             f"{' with optimizer offload' if plan.offload_optimizer else ''}; {plan.parameters['total'] / 1e9:.3f} B "
             f"parameters; longest sequence {plan.longest_tokens} tokens ({plan.longest_tiles} tile(s)); GiB per rank",
             "| stage | trainable | params | grads | optimizer | activations | caches | export (host) | "
             + ("GPU | host |" if gpu else "host |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
    for stage in plan.stages.values():
        cells = [stage.stage, f"{stage.trainable / 1e6:.1f} M", f"{stage.params_gib:.2f}", f"{stage.grads_gib:.2f}",
                 f"{stage.optimizer_gib:.2f}", f"{stage.activations_gib:.2f}", f"{stage.caches_gib:.2f}",
                 f"{stage.export_gib:.2f}"]
        if gpu:
            cells.append(f"{stage.gpu_gib:.2f}")
        cells.append(f"{stage.host_gib:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("peak: " + (f"GPU {plan.peak_gpu_gib:.2f} GiB, " if gpu else "")
                 + f"host {plan.peak_host_gib:.2f} GiB")
    return "\n".join(lines)


def format_fits(plans: dict[str, RunPlan], gpu_gib: float) -> str:
    fits = config_fits(plans, gpu_gib)
    lines = [f"DeepSpeed configs against {gpu_gib:g} GiB of GPU memory (90 % usable):"]
    for name, plan in plans.items():
        verdict = "fits" if fits[name] else "does not fit"
        lines.append(f"- {name}: GPU peak {plan.peak_gpu_gib:.2f} GiB, host peak {plan.peak_host_gib:.2f} GiB: "
                     f"{verdict}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- a run's plan
def _sizes(samples) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in s.image.shape[:2]) for s in samples]


def start_shape(cfg, start: Path | None) -> ModelShape:
    """The shape of the model a run starts from: its directory, or the embedded preset (built: it is tiny)."""
    if start is not None:
        return model_shape(start)
    from hsft.model import build_model

    return shape_of_model(build_model(cfg.model, seed=cfg.seed))


def plan_for_run(cfg, ds_config: dict, *, device: str, precision: str, world_size: int, splits,
                 start: Path | None) -> RunPlan:
    """The plan of the run the pipeline is about to start (its splits loaded, its starting model known)."""
    return plan_run(cfg, start_shape(cfg, start), ds_config=ds_config, device=device, precision=precision,
                    world_size=world_size, train_sizes=_sizes(splits.train), val_sizes=_sizes(splits.val),
                    test_sizes=_sizes(splits.test))


def plan_command(cfg, *, gpu_memory: float | None, world_size: int = 1) -> str:
    """What `launch/hsft.py --plan` prints: the plan of the run as configured, on a GPU, for its
    --deepspeed config and for every config beside it in the same directory, and which of those fit
    `gpu_memory` GiB."""
    from hsft.data import load_splits
    from hsft.engine.context import run_precision
    from hsft.engine.ds_config import apply_precision, load_ds_config

    if cfg.start_model is None and cfg.model.vlm is not None:
        raise ValueError("--plan: reads the model's sizes from a model directory; import the checkpoint first "
                         "(launch/convert.py) and pass --model DIR")
    splits = load_splits(cfg.data)
    shape = start_shape(cfg, Path(cfg.start_model) if cfg.start_model else None)
    chosen = Path(cfg.deepspeed)
    configs = {chosen.name: chosen, **{p.name: p for p in sorted(chosen.parent.glob("*.json")) if p != chosen}}
    plans = {}
    for name, path in configs.items():
        ds_file = load_ds_config(str(path))
        precision = run_precision(cfg, ds_file, torch.device("cuda"))
        plans[name] = plan_run(cfg, shape, ds_config=apply_precision(ds_file, precision), device="cuda",
                               precision=precision, world_size=world_size, train_sizes=_sizes(splits.train),
                               val_sizes=_sizes(splits.val), test_sizes=_sizes(splits.test))
    text = [format_plan(plans[chosen.name], title=f"memory plan ({chosen.name}, on a GPU)")]
    if gpu_memory is not None:
        text.append(format_fits(plans, gpu_memory))
    return "\n\n".join(text)


def main(cfg, *, gpu_memory: float | None) -> int:
    """`launch/hsft.py --plan`: print the plan; bad input ends with one line naming it (exit 2)."""
    from hsft.engine.ds_config import DeepSpeedConfigError

    try:
        cfg.validate()
        print(plan_command(cfg, gpu_memory=gpu_memory))
    except (ValueError, FileNotFoundError, DeepSpeedConfigError, OSError) as error:
        print(f"launch/hsft.py --plan: error: {error}", file=sys.stderr)
        return 2
    return 0
