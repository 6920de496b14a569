"""Stage 1, LoRA: adapt the language model's attention projections (q/k/v/o) with peft LoRA, and train
`text_hidden_fcs` with it, on next-token cross-entropy over the response (prompt masked, [SEG]
included) plus the Dice + BCE mask loss through the forward path (weight `mask_loss_weight`; 0 is
the published CE-only recipe). With `train_mask_decoder` the SAM2 mask decoder trains on that mask
loss too, as Sa2VA's own fine-tuning does (the tiny recipe; off in the published one).

Only the language model is adapted: the vision tower and the SAM2 attention blocks also have layers
named q_proj/k_proj/v_proj, so the targets are given as a pattern anchored at the language model,
and the modules that received an adapter are checked against that list.

The stage directory `<out>/lora/` holds, next to what every training stage writes:
    adapter/                            the standard peft adapter directory (adapter_config.json,
                                        adapter_model.safetensors), for the input model's VLM
    non_lora_trainable.safetensors      the other weights this stage trained (text_hidden_fcs, the mask
                                        decoder with --lora-train-mask-decoder and, with
                                        --lora-seg-rows, the [SEG] rows of the input embedding and the
                                        LM head as seg_rows.*), keyed as in the Sa2VA model
    model/                              the merged export: LoRA folded into the weights, a plain
                                        Sa2VA model directory (what the DPO stage reads)
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from hsft.config import LoraStageConfig
from hsft.data import Sample
from hsft.engine.context import RunContext
from hsft.model import Sa2VAModel, load_model, save_model
from hsft.model.token_rows import attach_seg_rows, merge_seg_rows
from hsft.stages.objective import SegObjective, SegTask
from hsft.stages.training import StageResult, Validation, model_dir, train_stage

__all__ = [
    "ATTENTION_PROJECTIONS",
    "ADAPTER_DIR",
    "NON_LORA_FILE",
    "language_model_attention",
    "lora_target_pattern",
    "attach_lora",
    "adapted_modules",
    "LoraTask",
    "LoraExport",
    "run",
]

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Where the language model sits inside transformers' InternVLForConditionalGeneration.
LANGUAGE_MODEL_PREFIX = "model.language_model."
ADAPTER_NAME = "default"
ADAPTER_DIR = "adapter"
NON_LORA_FILE = "non_lora_trainable.safetensors"


def lora_target_pattern() -> str:
    """peft target regex (full match on the module name inside the VLM): the attention projections of
    the language model's decoder layers and nothing else."""
    projections = "|".join(ATTENTION_PROJECTIONS)
    return rf"{re.escape(LANGUAGE_MODEL_PREFIX)}layers\.\d+\.self_attn\.({projections})"


def language_model_attention(vlm: torch.nn.Module) -> list[str]:
    """Names (inside the VLM) of the language model's q/k/v/o projection Linear layers."""
    pattern = re.compile(lora_target_pattern())
    return [name for name, module in vlm.named_modules()
            if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name)]


def attach_lora(model: Sa2VAModel, cfg: LoraStageConfig):
    """Inject LoRA adapters into `model.vlm` in place and return the peft wrapper (kept outside the
    Sa2VA module tree, so parameter names and the VLM's attributes stay as they were, plus the
    adapters). Only the adapters inside the VLM are trainable afterwards; parts outside the VLM keep
    their requires_grad.
    """
    from peft import LoraConfig, get_peft_model

    expected = language_model_attention(model.vlm)
    if not expected:
        raise ValueError(f"lora: the VLM has no attention projections matching {lora_target_pattern()!r} "
                         f"(expected {', '.join(ATTENTION_PROJECTIONS)} under {LANGUAGE_MODEL_PREFIX}layers.N."
                         "self_attn); this language model architecture is not supported by the LoRA stage")
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=lora_target_pattern(), bias="none")
    wrapper = get_peft_model(model.vlm, config, adapter_name=ADAPTER_NAME)
    adapted = adapted_modules(model.vlm)
    if adapted != expected:
        raise RuntimeError(f"lora: adapters landed on {adapted[:4]}..., expected exactly the language model's "
                           f"attention projections {expected[:4]}...")
    return wrapper


def adapted_modules(module: torch.nn.Module) -> list[str]:
    """Names of the modules that carry a LoRA adapter."""
    from peft.tuners.lora import LoraLayer

    return [name for name, sub in module.named_modules() if isinstance(sub, LoraLayer)]


def lora_trained_parts(cfg: LoraStageConfig) -> set[str]:
    """The model parts (hsft.model PARTS) stage 1 trains besides the adapters."""
    # text_hidden_fcs only sits on the mask path: with the CE-only recipe (weight 0) no gradient
    # reaches it and training it would only apply weight decay, so it stays frozen then.
    parts = {"text_hidden_fcs"} if cfg.mask_loss_weight > 0 else set()
    if cfg.train_mask_decoder:
        parts.add("mask_decoder")
    return parts


def prepare_for_lora(model: Sa2VAModel, cfg: LoraStageConfig, seg_rows: bool, *, checkpointing: bool = False):
    """Freeze what stage 1 does not train, attach the adapters (and, with `seg_rows`, trainable copies of
    the [SEG] rows of the input embedding and the LM head); returns the peft wrapper. With `checkpointing`
    the LLM's layers recompute their activations in the backward pass (training mode only)."""
    model.set_trainable(lora_trained_parts(cfg))
    wrapper = attach_lora(model, cfg)
    if seg_rows:
        attach_seg_rows(model)
    if checkpointing:
        # Non-reentrant: it needs no input that requires grad (the LLM's input embeddings do not) and
        # replays the LoRA dropout masks exactly, so the gradients are those of the plain backward.
        model.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return wrapper


class LoraTask(SegTask):
    """LoRA adapters (LLM q/k/v/o) + text_hidden_fcs on CE (+ mask loss) over the training split."""

    name = "lora"

    def __init__(self, model: Sa2VAModel, samples: list[Sample], cfg: LoraStageConfig, validation: Validation, *,
                 seg_rows: bool = False, checkpointing: bool = False):
        super().__init__(model, samples, validation)
        self.cfg = cfg
        self.peft = prepare_for_lora(model, cfg, seg_rows, checkpointing=checkpointing)
        self.module = SegObjective(model, lm_weight=1.0, mask_weight=cfg.mask_loss_weight)

    def client_state(self) -> dict:
        return {"lora_rank": self.cfg.rank, "lora_alpha": self.cfg.alpha}


class LoraExport:
    """Builds the export copy of the input model (LoRA attached, float32) and writes the stage's three
    artefacts from it once the trained weights are loaded: the peft adapter directory, the non-LoRA
    trained weights, and the merged plain model."""

    def __init__(self, start: Path, cfg: LoraStageConfig, *, seg_rows: bool = False):
        self.start, self.cfg, self.seg_rows = Path(start), cfg, seg_rows
        self._peft = None

    def load_input_model(self) -> Sa2VAModel:
        model = load_model(self.start, dtype="float32")
        self._peft = prepare_for_lora(model, self.cfg, self.seg_rows)
        # The adapter is for the VLM this stage started from; record where it lives.
        self._peft.peft_config[ADAPTER_NAME].base_model_name_or_path = str((self.start / "vlm").resolve())
        return model

    def export(self, model: Sa2VAModel, stage_dir: Path) -> None:
        if self._peft is None or self._peft.base_model.model is not model.vlm:
            raise RuntimeError("lora export: the model was not built by LoraExport.load_input_model")
        stage_dir = Path(stage_dir)
        self._peft.save_pretrained(str(stage_dir / ADAPTER_DIR), safe_serialization=True,
                                   save_embedding_layers=False)
        non_lora = {name: p.detach().float().contiguous() for name, p in model.named_parameters()
                    if p.requires_grad and not name.startswith("vlm.")}
        if non_lora:
            save_file(non_lora, str(stage_dir / NON_LORA_FILE))
        if self.seg_rows:
            merge_seg_rows(model)  # the trained [SEG] rows go into the plain tables of the merged model
        model.vlm = self._peft.merge_and_unload()
        self._peft = None
        save_model(model, model_dir(stage_dir))


def run(ctx: RunContext, cfg: LoraStageConfig, start: Path | None) -> StageResult:
    """Stage 1 from the model directory `start`; its result is the merged model directory DPO reads."""
    if start is None:
        raise ValueError("lora: needs a starting model directory (--model, or an earlier stage)")
    start = Path(start)
    # Cast to the training dtype up front: DeepSpeed's bf16 cast converts parameters only, and the float32
    # buffers left behind (SAM2's positional encoding) would meet bf16 weights. The export starts again
    # from the float32 input model and the float32 master weights, so nothing is lost.
    model = load_model(start, device=ctx.device, dtype=ctx.dtype)
    # The adapters' initial values come from the global generator, which each process seeds differently:
    # the run's seed must decide them, or two runs of one command train different models.
    torch.manual_seed(ctx.seed)
    seg_rows = cfg.seg_rows if cfg.seg_rows is not None else not ctx.cfg.embedded_default
    checkpointing = (cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None
                     else not ctx.cfg.embedded_default)
    task = LoraTask(model, ctx.splits.train, cfg, Validation.of(ctx), seg_rows=seg_rows, checkpointing=checkpointing)
    exporter = LoraExport(start, cfg, seg_rows=seg_rows)
    result = train_stage(ctx, task, cfg.train, load_input_model=exporter.load_input_model, export=exporter.export)
    stage_dir = ctx.stage_dir("lora")
    summary = {
        "samples": len(task),
        "adapted_modules": len(adapted_modules(model.vlm)),
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "mask_loss_weight": cfg.mask_loss_weight,
        "train_mask_decoder": cfg.train_mask_decoder,
        "seg_rows": seg_rows,
        "gradient_checkpointing": checkpointing,
        "adapter": str(stage_dir / ADAPTER_DIR),
        "optimizer_steps": result.optimizer_steps,
        "epochs": result.epoch_metrics,
        "first_loss": result.losses[0] if result.losses else None,
        "last_loss": result.losses[-1] if result.losses else None,
    }
    trains = (f"LoRA adapters (r {cfg.rank}, alpha {cfg.alpha}) on {summary['adapted_modules']} language-model "
              "projections (attention q/k/v/o)")
    decoder = (", text_hidden_fcs and the SAM2 mask decoder with its prompt encoder (conv_s0/conv_s1 frozen)"
               if cfg.train_mask_decoder else " and text_hidden_fcs")
    trains += (f"{decoder}, on CE + {cfg.mask_loss_weight} x Dice/BCE" if cfg.mask_loss_weight > 0
               else ", on CE alone (text_hidden_fcs gets no gradient and stays frozen)")
    summary["trains"] = trains
    return StageResult(model_dir=model_dir(stage_dir), summary=summary, global_step=result.global_step)
