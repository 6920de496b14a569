"""Training-step cost at the published model sizes, with random weights (nothing is downloaded).

Builds the Sa2VA architecture at its real sizes (InternViT-300M at 448 px, Qwen2.5-0.5B or -3B,
SAM2 Hiera-L at 1024 px, the release's text_hidden_fcs and conventions) and times micro-batch
steps (forward, loss, backward, AdamW step) the way the stages compute them:

- lora: peft LoRA (r 64, alpha 16) on the LLM's q/k/v/o + text_hidden_fcs, CE + Dice/BCE, the full
  forward every step (the LLM trains, so nothing upstream of [SEG] is cacheable);
- hsft: text_hidden_fcs + mask decoder on Dice + 0.5 BCE, "uncached" (the full forward, vision and
  LLM frozen) and "cached" (SAM2 features and the [SEG] state computed once, only the decoder runs).

The optimizer is plain torch AdamW over the trainable parameters: this measures the model's step,
not DeepSpeed's communication.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["COMPILE_MODES", "SHAPES", "RealShape", "build_real_model", "run", "format_summary"]


@dataclass(frozen=True)
class RealShape:
    """LLM sizes of a published Sa2VA (its vision tower and SAM2 are the same across 1B / 4B)."""

    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_intermediate: int
    vocab: int = 151936
    rope_theta: float = 1_000_000.0


SHAPES = {
    "sa2va-1b": RealShape(llm_hidden=896, llm_layers=24, llm_heads=14, llm_kv_heads=2, llm_intermediate=4864),
    "sa2va-4b": RealShape(llm_hidden=2048, llm_layers=36, llm_heads=16, llm_kv_heads=2, llm_intermediate=11008),
}
STAGES = ("lora", "hsft")
# Inductor options of the torch.compile variants the cached HSFT step can be measured in (--compile):
# as torch compiles by default, with CUDA graphs ("reduce-overhead"), and each without inductor's
# channels-last layout optimisation of convolutions.
COMPILE_MODES = {
    "default": {},
    "reduce-overhead": {"triton.cudagraphs": True},
    "default-no-layout-opt": {"layout_optimization": False},
    "reduce-overhead-no-layout-opt": {"triton.cudagraphs": True, "layout_optimization": False},
}


def build_real_model(shape: str, *, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A Sa2VA model at the published sizes with random weights, in eval mode on `device`."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Sam2Model

    from hsft.model.config import Conventions, PromptConfig
    from hsft.model.release.configs import hiera_large_config
    from hsft.model.sa2va import Sa2VAModel
    from hsft.model.tokenizer import IM_END, IMG_CONTEXT, build_preset_tokenizer, single_token_id

    if shape not in SHAPES:
        raise ValueError(f"--shape: must be one of {', '.join(SHAPES)}, got {shape!r}")
    s = SHAPES[shape]
    tokenizer = build_preset_tokenizer(400)
    vision = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  image_size=448, patch_size=14, attention_bias=True, norm_type="layer_norm", layer_norm_eps=1e-6)
    text = dict(model_type="qwen2", vocab_size=s.vocab, hidden_size=s.llm_hidden, num_hidden_layers=s.llm_layers,
                num_attention_heads=s.llm_heads, num_key_value_heads=s.llm_kv_heads,
                intermediate_size=s.llm_intermediate, rope_theta=s.rope_theta, rms_norm_eps=1e-6,
                max_position_embeddings=32768, tie_word_embeddings=True,
                pad_token_id=int(tokenizer.pad_token_id), eos_token_id=single_token_id(tokenizer, IM_END))
    config = InternVLConfig(vision_config=vision, text_config=text,
                            image_token_id=single_token_id(tokenizer, IMG_CONTEXT), image_seq_length=256,
                            downsample_ratio=0.5, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        vlm = InternVLForConditionalGeneration(config)
        sam2 = Sam2Model(hiera_large_config())
        model = Sa2VAModel(vlm, sam2, tokenizer, PromptConfig(), fcs_hidden=s.llm_hidden,
                           conventions=Conventions.release())
    return model.to(device=device, dtype=dtype).eval()


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    # ru_maxrss is in KiB on Linux: the whole process's peak, model build included
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(model, micro_batch: int, image_size: int, device: torch.device, dtype: torch.dtype):
    from hsft.data.synthetic import make_fundus

    samples = [make_fundus(seed=20_000 + i, size=image_size) for i in range(micro_batch)]
    images = model.preprocess([s.image for s in samples]).to(device=device, dtype=dtype)
    targets = torch.stack([torch.from_numpy(s.mask).float() for s in samples]).to(device)
    return images, targets


def _time_steps(step, steps: int, warmup: int, device: torch.device) -> list[float]:
    seconds = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def _row(name: str, seconds: list[float], micro_batch: int, device: torch.device, **extra) -> dict:
    median = statistics.median(seconds)
    return {"config": name, "step_seconds": seconds, "median_s": median,
            "spread_s": (max(seconds) - min(seconds)) if len(seconds) > 1 else 0.0,
            "samples_per_s": micro_batch / median, **_peak_memory(device), **extra}


def _lora_rows(model, images, targets, steps, warmup, micro_batch, device, *, lora_checkpointing: bool = False,
               **_hsft_only) -> list[dict]:
    from peft import LoraConfig, inject_adapter_in_model

    from hsft.ops import dice_bce_loss

    inject_adapter_in_model(LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05,
                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                            model.vlm.model.language_model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or name.startswith("text_hidden_fcs."))
    if lora_checkpointing:  # as the LoRA stage does from a real checkpoint (hsft.stages.lora)
        model.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    tokens = model.tokenize(micro_batch, form="response")
    model.train()

    def step():
        out = model.forward_seg(images, tokens, compute_lm_loss=True)
        loss = out.lm_loss + dice_bce_loss(out.mask_logits.float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _time_steps(step, steps, warmup, device)
    name = "lora, gradient checkpointing" if lora_checkpointing else "lora"
    return [_row(name, seconds, micro_batch, device, trainable_params=sum(p.numel() for p in trainable))]


def _hsft_rows(model, images, targets, steps, warmup, micro_batch, device, *, profile: bool = False,
               compile_modes: tuple[str, ...] = (), cuda_graph: bool = False, **_lora_only) -> list[dict]:
    from hsft.ops import dice_bce_loss

    model.set_trainable({"text_hidden_fcs", "mask_decoder"})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.01)
    tokens = model.tokenize(micro_batch, form="response")
    model.train()

    def uncached():
        loss = dice_bce_loss(model.forward_seg(images, tokens).mask_logits.float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rows = [_row("hsft uncached", _time_steps(uncached, steps, warmup, device), micro_batch, device,
                 trainable_params=sum(p.numel() for p in trainable))]
    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        feats = model.sam_features(images.sam_pixels).detach()
        hidden = model.seg_hidden_states(images, tokens).detach()
        _sync(device)
        fill = time.perf_counter() - start

    decode = model.decode_masks

    def cached():
        loss = dice_bce_loss(decode(feats, hidden).float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rows.append(_row("hsft cached", _time_steps(cached, steps, warmup, device), micro_batch, device,
                     cache_fill_s=fill, trainable_params=sum(p.numel() for p in trainable),
                     **({"profile": _profile(cached, device)} if profile else {})))
    for mode in compile_modes:
        # The decoder (text_hidden_fcs -> SAM2 mask decoder) compiled; a fresh compilation per mode.
        name = f"hsft cached, compiled ({mode})"
        torch._dynamo.reset()
        decode = torch.compile(model.decode_masks, options=COMPILE_MODES[mode])
        try:
            start = time.perf_counter()
            cached()  # the first call compiles
            _sync(device)
            compile_s = time.perf_counter() - start
            seconds = _time_steps(cached, steps, warmup, device)
        except Exception as error:  # noqa: BLE001 - a compiler failure is a result to report, not a crash
            optimizer.zero_grad(set_to_none=True)
            rows.append(_failure_row(name, error))
            continue
        rows.append(_row(name, seconds, micro_batch, device, compile_s=compile_s,
                         trainable_params=sum(p.numel() for p in trainable)))
    if cuda_graph:
        rows += _launch_bound_rows(model, uncached_loss=lambda: dice_bce_loss(
            model.forward_seg(images, tokens).mask_logits.float(), targets), feats=feats, hidden=hidden,
            targets=targets, trainable=trainable, steps=steps, warmup=warmup, micro_batch=micro_batch, device=device)
    return rows


def _failure_row(name: str, error: Exception) -> dict:
    """A configuration that could not run, with the first line of why (a result, not a crash)."""
    message = next((line for line in str(error).splitlines() if line.strip()), "")
    return {"config": name, "error": f"{type(error).__name__}: {message}"[:300]}


def _launch_bound_rows(model, *, uncached_loss, feats, hidden, targets, trainable, steps, warmup, micro_batch,
                       device) -> list[dict]:
    """What cutting the cached step's kernel launches buys: both steps with the fused AdamW (one kernel
    for every tensor), then the cached step as --hsft-cuda-graph runs it (the decoder's forward and
    backward captured once as CUDA graphs and replayed). Freezes the unreached heads of `model` last."""
    from hsft.ops import dice_bce_loss
    from hsft.stages.graphed_decode import GraphedDecode, freeze_unreached_by_the_loss

    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.01, fused=True)

    def run(loss_fn):
        def step():
            loss_fn().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return _time_steps(step, steps, warmup, device)

    rows = [_row("hsft uncached, fused AdamW", run(uncached_loss), micro_batch, device),
            _row("hsft cached, fused AdamW",
                 run(lambda: dice_bce_loss(model.decode_masks(feats, hidden).float(), targets)), micro_batch, device)]
    name = "hsft cached, CUDA graph + fused AdamW"
    if device.type != "cuda":
        return rows + [{"config": name, "error": "needs a CUDA device"}]
    try:
        # As --hsft-cuda-graph trains: the heads the loss never reaches frozen, the decoder replayed.
        freeze_unreached_by_the_loss(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                      weight_decay=0.01, fused=True)
        graphed = GraphedDecode(model)
        seconds = run(lambda: dice_bce_loss(graphed(feats, hidden).float(), targets))
    except Exception as error:  # noqa: BLE001 - a capture failure is a result to report, not a crash
        optimizer.zero_grad(set_to_none=True)
        return rows + [_failure_row(name, error)]
    return rows + [_row(name, seconds, micro_batch, device)]


def _profile(step, device: torch.device, steps: int = 3) -> dict:
    """Where one step's time goes: operator calls and device kernels per step, and the slowest operators
    by self time on the host (which is what a launch-bound step spends)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    events = prof.key_averages()
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    device_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    slowest = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {"aten_ops_per_step": ops / steps, "device_kernels_per_step": kernels / steps,
            "device_busy_ms_per_step": device_us / 1e3 / steps,
            "top_host_self_ms_per_step": {e.key: round(e.self_cpu_time_total / 1e3 / steps, 3) for e in slowest}}


def run(*, shape: str, stages: list[str], device: str, dtype: str, steps: int, warmup: int, micro_batch: int,
        image_size: int, out: Path | None, echo=None, profile: bool = False,
        compile_modes: tuple[str, ...] = (), cuda_graph: bool = False, lora_checkpointing: bool = False) -> dict:
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    bad_modes = [m for m in compile_modes if m not in COMPILE_MODES]
    if bad_modes:
        raise ValueError(f"--compile: unknown mode(s) {bad_modes}; choose from {', '.join(COMPILE_MODES)}")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"--stage: unknown {unknown}; choose from {', '.join(STAGES)}")
    if steps < 1 or warmup < 0 or micro_batch < 1:
        raise ValueError("--steps and --micro-batch must be >= 1, --warmup >= 0")
    torch_dtype = getattr(torch, dtype)
    rows = []
    build_seconds = counts = None
    for stage in stages:
        start = time.perf_counter()
        model = build_real_model(shape, device=target, dtype=torch_dtype)  # fresh per stage: LoRA adds modules
        build_seconds = time.perf_counter() - start
        counts = counts or model.parameter_counts()
        images, targets = _batch(model, micro_batch, image_size, target, torch_dtype)
        if target.type == "cuda":
            torch.cuda.reset_peak_memory_stats(target)
        fn = _lora_rows if stage == "lora" else _hsft_rows
        for row in fn(model, images, targets, steps, warmup, micro_batch, target, profile=profile,
                      compile_modes=compile_modes, cuda_graph=cuda_graph, lora_checkpointing=lora_checkpointing):
            rows.append(row)
            if echo is not None:
                echo(f"{row['config']}: failed: {row['error']}" if "error" in row else
                     f"{row['config']}: step seconds {', '.join(f'{x:.3f}' for x in row['step_seconds'])}")
        del model
    summary = {
        "benchmark": "real_shape_step", "shape": shape, "shape_sizes": asdict(SHAPES[shape]),
        "device": torch.cuda.get_device_name(target) if target.type == "cuda" else (platform.processor()
                                                                                   or platform.machine()),
        "threads": torch.get_num_threads(), "dtype": dtype, "micro_batch": micro_batch, "image_size": image_size,
        "steps": steps, "warmup": warmup, "model_build_seconds": build_seconds, "rows": rows,
        "date": time.strftime("%Y-%m-%d"), "parameter_counts": counts,
    }
    by_name = {row["config"]: row for row in rows}
    if "hsft uncached" in by_name and "hsft cached" in by_name:
        summary["hsft_cache_speedup"] = by_name["hsft uncached"]["median_s"] / by_name["hsft cached"]["median_s"]
        # Each cached variant against the uncached step with the same optimizer.
        summary["hsft_cache_speedup_by_config"] = {
            name: by_name[_uncached_twin(name)]["median_s"] / row["median_s"]
            for name, row in by_name.items()
            if name.startswith("hsft cached") and "median_s" in row and "median_s" in by_name.get(_uncached_twin(name), {})}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"step_{shape}_{target.type}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _uncached_twin(cached_name: str) -> str:
    return "hsft uncached, fused AdamW" if cached_name.endswith("fused AdamW") else "hsft uncached"


def format_summary(summary: dict) -> str:
    memory = "peak GPU GiB" if any("peak_gpu_gib" in r for r in summary["rows"]) else "peak RSS GiB (process)"
    lines = [f"{summary['shape']} on {summary['device']} ({summary['threads']} threads), {summary['dtype']}, "
             f"micro-batch {summary['micro_batch']}, {summary['steps']} timed step(s) after {summary['warmup']} "
             f"warm-up", f"| config | median s/step | spread s | samples/s | {memory} |", "|---|---:|---:|---:|---:|"]
    for row in summary["rows"]:
        if "error" in row:
            lines.append(f"| {row['config']} | failed: {row['error']} | | | |")
            continue
        peak = row.get("peak_gpu_gib", row.get("peak_rss_gib"))
        lines.append(f"| {row['config']} | {row['median_s']:.3f} | {row['spread_s']:.3f} | "
                     f"{row['samples_per_s']:.3f} | {peak:.2f} |")
    for name, speedup in summary.get("hsft_cache_speedup_by_config", {}).items():
        lines.append(f"{name}: {speedup:.1f}x faster than {_uncached_twin(name)}")
    for row in summary["rows"]:
        if "profile" in row:
            p = row["profile"]
            lines.append(f"{row['config']} profile: {p['aten_ops_per_step']:.0f} aten ops and "
                         f"{p['device_kernels_per_step']:.0f} device kernels per step, device busy "
                         f"{p['device_busy_ms_per_step']:.2f} ms of a {row['median_s'] * 1e3:.2f} ms step")
    return "\n".join(lines)
