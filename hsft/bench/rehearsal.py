"""The paper's run rehearsed at a published size: a random-weight Sa2VA release of that size goes
through every command a user runs, with real-resolution images, and each step's cost is recorded.

    1 write    the release checkpoint (hsft.model.release.builder), random weights at the shape
    2 import   launch/convert.py import-sa2va
    3 data     synthetic fundus images at DRIVE, STARE and CHASE_DB1 resolutions (folder layout)
    4 pipeline launch/hsft.py: LoRA, DPO, mining, HSFT, control, evaluation (the real DeepSpeed
               config and conventions; only the epochs are capped)
    5 export   launch/convert.py export-sa2va of the HSFT model
    6 re-import of the export, whose masks are compared with the HSFT model's

Every command runs as its own process, as a user would run it. The pipeline's stages report their
own wall time and peak memory (report.json "resources"); the other steps are measured from outside
(the child's peak resident set from wait4). rehearsal.json and rehearsal.md hold the table, the
memory plan's estimate beside each measured peak (report.json "memory_plan"), tokens per sample,
disk written and each stage's evidence lines.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hsft.engine.config import PRECISIONS
from hsft.engine.resources import GiB, disk_bytes, measure
from hsft.errors import BadValue, MissingFile

__all__ = ["SHAPES", "DATASET_SIZES", "RehearsalConfig", "rehearse", "summarise", "replan", "format_markdown",
           "image_plan", "build_shape_model"]

REPO = Path(__file__).resolve().parents[2]
SHAPES = ("tiny", "sa2va-1b", "sa2va-4b")
# (height, width) of the public vessel datasets' images. With the release's tiling (448-px tiles, at
# most 12, a thumbnail) DRIVE is one tile, STARE 4 + 1 and CHASE_DB1 9 + 1 (2,560 image tokens).
DATASET_SIZES = {"DRIVE": (584, 565), "STARE": (605, 700), "CHASE_DB1": (960, 999)}
RELEASE_TILE = 448
# The stages the main command runs from a released checkpoint (no stage 0).
PIPELINE_STAGES = ("lora", "dpo", "mining", "hsft", "control", "eval")


@dataclass
class RehearsalConfig:
    shape: str = "sa2va-1b"
    device: str = "cpu"
    images: int = 4
    output_dir: str = "runs/rehearsal"
    precision: str | None = None  # None: fp32 on a CPU (bf16 is 3-4x slower there), bf16 on a GPU
    deepspeed: str = "ds_configs/zero2.json"
    epochs: int = 1  # of LoRA, DPO, HSFT and the control: the cap that makes the run finish
    max_new_tokens: int | None = None  # generation budget of mining, DPO pairs and evaluation (None: default)
    overwrite: bool = False
    main_args: tuple[str, ...] = ()  # more options of the main command (e.g. --hsft-cuda-graph)
    shares: bool | None = None  # time the parts of an HSFT step at the end (None: on a GPU only)

    def __post_init__(self) -> None:
        if self.shares is None:
            self.shares = self.device == "cuda"

    def validate(self) -> None:
        if self.shape not in SHAPES:
            raise BadValue(f"--shape: must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        if self.device not in ("cpu", "cuda"):
            raise BadValue(f"--device: must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BadValue("--device cuda: no CUDA device is available")
        if self.images < 4:
            raise BadValue(f"--images: at least 4 (two held out, two to train on and validate), got {self.images}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise BadValue(f"--precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not Path(self.deepspeed).is_file():
            raise BadValue(f"--deepspeed {self.deepspeed}: file does not exist")
        if self.epochs < 1:
            raise BadValue(f"--epochs: must be >= 1, got {self.epochs}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise BadValue(f"--max-new-tokens: must be >= 1, got {self.max_new_tokens}")
        out = Path(self.output_dir)
        if out.exists() and any(out.iterdir()) and not self.overwrite:
            raise BadValue(f"--output-dir {out}: exists and is not empty (pass --overwrite to replace it)")

    @property
    def run_precision(self) -> str:
        return self.precision or ("bf16" if self.device == "cuda" else "fp32")


# ---------------------------------------------------------------------------- the model and the data
def build_shape_model(shape: str, *, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A Sa2VA model with the release's conventions and random weights: the published sizes
    (hsft.bench.step.build_real_model), or "tiny", the embedded tiny preset's sizes (for tests)."""
    if shape != "tiny":
        from hsft.bench.step import build_real_model

        return _one_positional_matrix(build_real_model(shape, device=device, dtype=dtype, seed=seed))
    from hsft.model import build_model
    from hsft.model.config import Conventions, ModelConfig, PromptConfig
    from hsft.model.sa2va import Sa2VAModel

    tiny = build_model(ModelConfig(), seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sa2VAModel(tiny.vlm, tiny.sam2, tiny.tokenizer, PromptConfig(),
                           fcs_hidden=int(tiny.vlm.config.text_config.hidden_size), conventions=Conventions.release())
    return _one_positional_matrix(model.to(device=device, dtype=dtype).eval())


def _one_positional_matrix(model):
    """SAM2 has one positional matrix, which transformers holds twice (prompt encoder, image side) and a
    release stores once; random initialisation draws the two apart, so make them one again."""
    with torch.no_grad():
        model.sam2.shared_image_embedding.positional_embedding.copy_(
            model.sam2.prompt_encoder.shared_embedding.positional_embedding)
    return model


def image_plan(images: int, tile: int = RELEASE_TILE) -> dict[str, list[tuple[str, int, int]]]:
    """(dataset, height, width) of every image by split: a quarter (at least two) held out, DRIVE
    size first then CHASE_DB1 and STARE; the training images start with CHASE_DB1 and STARE (the
    multi-tile sizes) and go on with DRIVE. Sizes scale with `tile` so that a model with smaller
    tiles cuts each image into the same number of tiles as the release does."""
    def sized(name: str) -> tuple[str, int, int]:
        h, w = DATASET_SIZES[name]
        return name, max(32, round(h * tile / RELEASE_TILE)), max(32, round(w * tile / RELEASE_TILE))

    n_test = max(2, images // 4)  # an effect's interval over held-out images needs two of them
    test_order = ("DRIVE", "CHASE_DB1", "STARE")
    train_order = ("CHASE_DB1", "STARE", "DRIVE", "DRIVE")
    return {"test": [sized(test_order[i % len(test_order)]) for i in range(n_test)],
            "train": [sized(train_order[i] if i < len(train_order) else "DRIVE") for i in range(images - n_test)]}


def write_images(root: Path, plan: dict[str, list[tuple[str, int, int]]], seed: int = 0) -> list[dict]:
    """Synthetic fundus images in the folder layout (root/train, root/test), each generated square at
    its longer side and centre-cropped to the dataset's size. Returns what was written."""
    from hsft.data.export import write_sample
    from hsft.data.sample import Sample
    from hsft.data.synthetic import make_fundus

    written = []
    index = 0
    for split, items in plan.items():
        for name, height, width in items:
            side = max(height, width)
            full = make_fundus(seed + index, side)
            top, left = (side - height) // 2, (side - width) // 2
            crop = (slice(top, top + height), slice(left, left + width))
            sample = Sample(id=f"{name.lower()}_{index:02d}", image=np.ascontiguousarray(full.image[crop]),
                            mask=np.ascontiguousarray(full.mask[crop]),
                            fov=None if full.fov is None else np.ascontiguousarray(full.fov[crop]),
                            source=f"synthetic:seed={seed + index}")
            write_sample(sample, root / split)
            written.append({"id": sample.id, "split": split, "dataset": name, "height": height, "width": width})
            index += 1
    return written


# ---------------------------------------------------------------------------- processes
def _run_child(cmd: list[str], log: Path, env: dict, echo) -> dict:
    """Run `cmd` to the end, its output appended to `log` (and echoed); wall time, the child's peak
    resident set (its process tree's largest, from wait4) and the exit status."""
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as sink:
        sink.write(f"$ {' '.join(cmd)}\n")
        sink.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=REPO)
        for line in proc.stdout:
            sink.write(line)
            if echo is not None:
                echo(line.rstrip("\n"))
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": time.perf_counter() - start, "peak_host_gib": usage.ru_maxrss * 1024 / GiB,
            "returncode": proc.returncode}


class RehearsalError(RuntimeError):
    """A step of the rehearsal failed at this size: what the rehearsal exists to find (its log is named)."""


def _child_env(cfg: RehearsalConfig) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("HSFT_CACHE", str(Path(cfg.output_dir).resolve() / "cache"))
    return env


def _python(script: str) -> list[str]:
    return [sys.executable, str(REPO / "launch" / script)]


def _main_command(cfg: RehearsalConfig) -> list[str]:
    """The main command as a user launches it (the deepspeed launcher, one rank)."""
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    return [launcher, "--num_gpus", "1", "--master_port", str(29700 + os.getpid() % 200),
            str(REPO / "launch" / "hsft.py")] if Path(launcher).exists() else _python("hsft.py")


# ---------------------------------------------------------------------------- the rehearsal
def rehearse(cfg: RehearsalConfig, echo=print) -> dict:
    cfg.validate()
    out = Path(cfg.output_dir).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log = out / "rehearsal.log"
    env = _child_env(cfg)
    device = torch.device(cfg.device)
    steps: list[dict] = []
    summary = {"shape": cfg.shape, "config": asdict(cfg), "precision": cfg.run_precision,
               "machine": _machine(device), "threads": torch.get_num_threads(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "commit": _commit(), "steps": steps}

    def record(name: str, measured: dict, path: Path | None = None, **extra) -> dict:
        row = {"step": name, **measured, **extra}
        if path is not None and path.exists():
            row["disk_gib"] = disk_bytes(path) / GiB
        steps.append(row)
        _save(out, summary)
        if row.get("returncode", 0) != 0:
            raise RehearsalError(f"{name} failed (exit {row['returncode']}); see {log}")
        return row

    # 1 the release checkpoint, written in this process
    release, sam2_json = out / "release", None
    with measure(device) as usage:
        model = build_shape_model(cfg.shape, device=device, dtype=torch.float32 if cfg.shape == "tiny"
                                  else torch.bfloat16)
        from hsft.model.release.builder import sam2_config_json, write_release_checkpoint

        write_release_checkpoint(model, release, shards=1 if cfg.shape == "tiny" else 2)
        if cfg.shape == "tiny":  # the release's code builds Hiera-L; the tiny SAM2 needs its sizes given
            sam2_json = sam2_config_json(model, out / "sam2_config.json")
        counts = model.parameter_counts()
        tile = int(model.vlm.config.vision_config.image_size[0]
                   if isinstance(model.vlm.config.vision_config.image_size, (list, tuple))
                   else model.vlm.config.vision_config.image_size)
        del model
        gc.collect()
    summary["parameter_counts"] = counts
    record("write release", {**usage.to_dict(), "returncode": 0}, release)
    echo(f"[rehearsal] wrote the {cfg.shape} release checkpoint to {release}")

    # 2 import with the real command
    imported = out / "imported"
    cmd = _python("convert.py") + ["import-sa2va", str(release), str(imported)]
    if sam2_json is not None:
        cmd += ["--sam2-config", str(sam2_json)]
    record("import-sa2va", _run_child(cmd, log, env, echo), imported)

    # 3 data at the datasets' resolutions (scaled to the model's tile for the tiny shape)
    data = out / "data"
    with measure() as usage:
        images = write_images(data, image_plan(cfg.images, tile))
    summary["images"] = images
    record("data", {**usage.to_dict(), "returncode": 0}, data)

    # 4 the main command
    run = out / "run"
    args = ["--deepspeed", str(Path(cfg.deepspeed).resolve()), "--model", str(imported), "--output-dir", str(run),
            "--data-format", "folder", "--data-root", str(data), "--precision", cfg.run_precision,
            "--stages", ",".join(PIPELINE_STAGES), "--lora-epochs", str(cfg.epochs), "--dpo-epochs", str(cfg.epochs),
            "--hsft-epochs", str(cfg.epochs)]
    if cfg.max_new_tokens is not None:
        args += ["--inference-max-new-tokens", str(cfg.max_new_tokens)]
    args += list(cfg.main_args)
    before = disk_bytes(out)
    pipeline = _run_child(_main_command(cfg) + args, log, env, echo)
    summary["memory_plan"], measured = _stage_resources(run)
    for stage in PIPELINE_STAGES:
        used = measured.get(stage)
        if used is None:
            continue
        row = {"step": stage, **{k: v for k, v in used.items() if k != "notes"}, "returncode": 0,
               "evidence": used.get("notes", [])}
        if (run / stage).exists():
            row["disk_gib"] = disk_bytes(run / stage) / GiB
        steps.append(row)
    record("main command (all stages)", pipeline, None, disk_gib=(disk_bytes(out) - before) / GiB)

    # 5 export the HSFT model and import the export again
    exported, reimported = out / "exported", out / "reimported"
    record("export-sa2va", _run_child(_python("convert.py") + ["export-sa2va", str(run / "hsft" / "model"),
                                                               str(exported)], log, env, echo), exported)
    cmd = _python("convert.py") + ["import-sa2va", str(exported), str(reimported)]
    if sam2_json is not None:
        cmd += ["--sam2-config", str(sam2_json)]
    record("re-import", _run_child(cmd, log, env, echo), reimported)

    # 6 the re-imported export infers the HSFT model's masks
    with measure(device) as usage:
        check = compare_masks(run / "hsft" / "model", reimported, data, device=device)
    summary["round_trip"] = check
    summary["tokens"] = check.pop("tokens")
    record("mask check", {**usage.to_dict(), "returncode": 0})
    summary["passed"] = check["identical_to_release_dtype"]
    if cfg.shares:
        # one DRIVE-sized and one CHASE_DB1-sized image through the HSFT model's uncached step
        by_size = {image["dataset"]: data / image["split"] / "images" / f"{image['id']}.png" for image in images}
        picked = [by_size[name] for name in ("DRIVE", "CHASE_DB1") if name in by_size]
        with measure(device) as usage:
            summary["step_shares"] = step_shares(run / "hsft" / "model", picked, device=device,
                                                 dtype=torch.bfloat16 if cfg.run_precision == "bf16" else torch.float32)
        record("step shares", {**usage.to_dict(), "returncode": 0})
    _save(out, summary)
    (out / "rehearsal.md").write_text(format_markdown(summary), encoding="utf-8")
    echo(format_markdown(summary))
    if not summary["passed"]:
        raise RehearsalError(f"the re-imported export's masks differ from the HSFT model's: {check}")
    return summary


def _stage_resources(run: Path) -> tuple[dict | None, dict]:
    """The memory plan and each finished stage's measured cost, as the main command records them as it
    goes (resources.json; report.json at the end)."""
    for name, key in (("report.json", "resources"), ("resources.json", "stages")):
        path = run / name
        if path.is_file():
            data = json.loads(path.read_text())
            return data.get("memory_plan"), data.get(key) or {}
    return None, {}


def _from_dict(cls, data: dict):
    """A (nested) config dataclass from its asdict() form, as run_config.json holds it."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, kind = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = _from_dict(kind, value)
        elif isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


def replan(run: Path) -> dict:
    """The memory plan of a finished or stopped run, by this code: its run_config.json, its starting model
    and its data (so a plan changed after the run can stand beside the run's measured peaks)."""
    from hsft.config import RunConfig
    from hsft.data import load_splits
    from hsft.engine.ds_config import apply_precision, load_ds_config
    from hsft.memory_plan import plan_for_run

    saved = json.loads((run / "run_config.json").read_text())
    cfg = _from_dict(RunConfig, saved)
    report = json.loads((run / "resources.json").read_text()).get("memory_plan") or {}
    precision, device = report.get("precision", cfg.precision or "fp32"), report.get("device", "cpu")
    ds = apply_precision(load_ds_config(cfg.deepspeed), precision)
    plan = plan_for_run(cfg, ds, device=device, precision=precision, world_size=report.get("world_size", 1),
                        splits=load_splits(cfg.data), start=Path(cfg.start_model) if cfg.start_model else None)
    return plan.to_dict()


def summarise(output_dir: str | Path, *, replanned: bool = False) -> dict:
    """rehearsal.json and rehearsal.md again from what the output directory holds: for a rehearsal stopped
    during the main command, the steps before it and the stages the main command finished; with
    `replanned`, the plan column from this code (replan) instead of the one the run printed."""
    out = Path(output_dir)
    if not (out / "rehearsal.json").is_file():
        raise MissingFile(f"--summarise {out}: no rehearsal.json there (not a rehearsal's output directory)")
    summary = json.loads((out / "rehearsal.json").read_text())
    plan, measured = _stage_resources(out / "run")
    summary["memory_plan"] = replan(out / "run") if replanned else plan
    summary["plan_source"] = "recomputed after the run" if replanned else "printed by the run"
    done = {row["step"] for row in summary["steps"]}
    for stage in PIPELINE_STAGES:
        if stage in measured and stage not in done:
            used = measured[stage]
            row = {"step": stage, **{k: v for k, v in used.items() if k != "notes"}, "returncode": 0,
                   "evidence": used.get("notes", [])}
            if (out / "run" / stage).exists():
                row["disk_gib"] = disk_bytes(out / "run" / stage) / GiB
            summary["steps"].append(row)
    if "round_trip" not in summary:
        summary["stopped"] = f"during the main command, after {len(measured)} of {len(PIPELINE_STAGES)} stages"
    _save(out, summary)
    (out / "rehearsal.md").write_text(format_markdown(summary), encoding="utf-8")
    return summary


def compare_masks(hsft_dir: Path, reimported_dir: Path, data: Path, *, device: torch.device) -> dict:
    """Masks of the HSFT model and of its export re-imported, on every image (the teacher-forced [SEG]
    path, float32). The export stores each tensor in the release's dtype, so the HSFT model is also
    compared with its parameters rounded to the dtypes of the re-imported model: those masks must be
    identical; the unrounded model's differ only where that rounding moves a logit across 0."""
    from hsft.data.imageio import read_rgb
    from hsft.eval.scoring import binary_mask
    from hsft.model import load_model

    paths = sorted((data / "train" / "images").iterdir()) + sorted((data / "test" / "images").iterdir())
    pictures = [read_rgb(p) for p in paths]
    # Every model in float32, loaded as such: a model loaded in bfloat16 and cast would also carry its
    # bfloat16-computed non-persistent buffers (rotary frequencies), which are not the weights' doing.
    trained = load_model(hsft_dir, device=device, dtype="float32")
    again = load_model(reimported_dir, device=device, dtype="float32")
    rounded = load_model(hsft_dir, device=device, dtype="float32")
    stored = getattr(torch, json.loads((Path(reimported_dir) / "hsft_model.json").read_text())["dtype"])
    with torch.no_grad():
        for param in rounded.parameters():
            param.copy_(param.to(stored).float())

    def masks(model) -> list[torch.Tensor]:
        found = []
        with torch.no_grad():
            for picture in pictures:
                images = model.preprocess([picture]).to(device=device, dtype=torch.float32)
                tokens = model.tokenize(1, form="response", tiles=images.num_tiles).to(device)
                logits = model.forward_seg(images, tokens).mask_logits.float()
                found.append(binary_mask(logits[0], picture.shape[:2]).cpu())
        return found

    tokens = {}
    for path, picture in zip(paths, pictures):
        images = trained.preprocess([picture])
        tokens[path.stem] = {"tiles": int(images.num_tiles[0] if images.num_tiles else 1),
                             "tokens": int(trained.tokenize(1, form="response",
                                                            tiles=images.num_tiles).input_ids.shape[1])}
    ours, back, exact = masks(trained), masks(again), masks(rounded)
    pixels = sum(m.numel() for m in ours)
    return {"images": len(pictures), "identical_to_release_dtype": all(torch.equal(a, b) for a, b in zip(exact, back)),
            "pixels_differing_from_hsft_model": int(sum((a != b).sum() for a, b in zip(ours, back))),
            "pixels": pixels, "tokens": tokens}


# ---------------------------------------------------------------------------- where a step's time goes
# The modules a training step runs, by where they sit in the Sa2VA model.
TIMED_PARTS = {
    "vision tower": lambda m: m.vlm.model.vision_tower,
    "LLM": lambda m: m.vlm.model.language_model,
    "SAM2 image encoder": lambda m: m.sam2.vision_encoder,
    "mask decoder": lambda m: m.sam2.mask_decoder,
}


class _PartClock:
    """Forward time of a module, from hooks: CUDA events on a GPU (read after the step's synchronise),
    the wall clock on a CPU."""

    def __init__(self, module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []
        self.handles = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self, *_):
        self.spans.append([self._mark(), None])

    def _stop(self, *_):
        self.spans[-1][1] = self._mark()

    def seconds(self) -> float:
        if self.cuda:
            return sum(a.elapsed_time(b) for a, b in self.spans) / 1e3
        return sum(b - a for a, b in self.spans)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def step_shares(model_dir: Path, images: list[Path], *, device: torch.device, dtype: torch.dtype,
                steps: int = 3) -> list[dict]:
    """Per image: the uncached HSFT training step (the full forward with vision and LLM frozen, Dice +
    0.5 BCE, backward, AdamW) timed over `steps` steps after one warm-up, and the share of it each part's
    forward takes; the rest is the backward pass (through the mask decoder and text_hidden_fcs) and the
    optimizer."""
    from hsft.data.imageio import read_binary, read_rgb
    from hsft.model import load_model
    from hsft.ops import dice_bce_loss

    model = load_model(model_dir, device=device, dtype=dtype)
    model.set_trainable({"text_hidden_fcs", "mask_decoder"})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rows = []
    for path in images:
        picture = read_rgb(path)
        batch = model.preprocess([picture]).to(device=device, dtype=dtype)
        tokens = model.tokenize(1, form="response", tiles=batch.num_tiles).to(device)
        mask = torch.from_numpy(read_binary(path.parent.parent / "masks" / path.name))[None].to(device)

        def step():
            loss = dice_bce_loss(model.forward_seg(batch, tokens).mask_logits.float(), mask, bce_weight=0.5)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up
        clocks = {name: _PartClock(get(model), device) for name, get in TIMED_PARTS.items()}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = (time.perf_counter() - start) / steps
        forward = {name: clock.seconds() / steps for name, clock in clocks.items()}
        for clock in clocks.values():
            clock.close()
        rest = max(0.0, total - sum(forward.values()))
        rows.append({"image": path.stem, "tiles": int(batch.num_tiles[0] if batch.num_tiles else 1),
                     "step_s": total, "samples_per_s": 1.0 / total,
                     "share": {**{k: v / total for k, v in forward.items()},
                               "backward + optimizer + rest": rest / total}})
    return rows


# ---------------------------------------------------------------------------- records
def _save(out: Path, summary: dict) -> None:
    (out / "rehearsal.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def _plan_gib(summary: dict, step: str) -> float | None:
    plan = summary.get("memory_plan") or {}
    stage = (plan.get("stages") or {}).get(step)
    if not stage:
        return None
    key = "gpu_gib" if summary["config"]["device"] == "cuda" else "host_gib"
    return stage.get(key)


def _fmt(value, digits: int = 2) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_markdown(summary: dict) -> str:
    cuda = summary["config"]["device"] == "cuda"
    peak = "peak GPU GiB" if cuda else "peak host GiB"
    lines = [f"# Rehearsal: {summary['shape']} on {summary['machine']}", "",
             *([f"Stopped {summary['stopped']}.", ""] if summary.get("stopped") else []),
             *([f"Plan column: {summary['plan_source']}.", ""] if summary.get("plan_source") else []),
             f"{summary['threads']} threads, {summary['precision']}, {summary['config']['images']} images, "
             f"epochs capped at {summary['config']['epochs']}, {summary['date']}, commit {summary['commit']}", "",
             f"| step | wall s | {peak} | plan GiB | plan / measured | disk written GiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in summary["steps"]:
        measured = row.get("peak_gpu_gib") if cuda and row.get("peak_gpu_gib") is not None else row.get("peak_host_gib")
        plan = _plan_gib(summary, row["step"])
        ratio = plan / measured if plan is not None and measured else None
        lines.append(f"| {row['step']} | {_fmt(row.get('seconds'), 1)} | {_fmt(measured)} | {_fmt(plan)} | "
                     f"{_fmt(ratio)} | {_fmt(row.get('disk_gib'))} |")
    if cuda:
        lines += ["", "Host peaks on the GPU machine: " + ", ".join(
            f"{row['step']} {_fmt(row.get('peak_host_gib'))}" for row in summary["steps"])]
    if summary.get("tokens"):
        by_id = {image["id"]: image for image in summary.get("images", [])}
        lines += ["", "| image | split | size | tiles | tokens per sample |", "|---|---|---|---:|---:|"]
        for stem, value in summary["tokens"].items():
            image = by_id.get(stem, {})
            lines.append(f"| {stem} | {image.get('split', '')} | {image.get('width', '')}x{image.get('height', '')} | "
                         f"{value['tiles']} | {value['tokens']} |")
    evidence = [(row["step"], line) for row in summary["steps"] for line in row.get("evidence", [])]
    if evidence:
        lines += ["", "Evidence lines of the stages:", ""] + [f"- {step}: {line.strip().lstrip('- ')}"
                                                               for step, line in evidence]
    if summary.get("step_shares"):
        parts = list(summary["step_shares"][0]["share"])
        lines += ["", "Uncached HSFT step (micro-batch 1): where the time goes", "",
                  "| image | tiles | step s | samples/s | " + " | ".join(parts) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(parts)]
        for row in summary["step_shares"]:
            lines.append(f"| {row['image']} | {row['tiles']} | {row['step_s']:.3f} | {row['samples_per_s']:.2f} | "
                         + " | ".join(f"{100 * row['share'][k]:.0f} %" for k in parts) + " |")
    check = summary.get("round_trip")
    if check:
        lines += ["", f"Export round trip: the re-imported export's masks on {check['images']} images are "
                  f"{'identical' if check['identical_to_release_dtype'] else 'NOT identical'} to the HSFT model's "
                  f"with its weights in the release's dtypes; against the unrounded HSFT model "
                  f"{check['pixels_differing_from_hsft_model']} of {check['pixels']} pixels differ."]
    return "\n".join(lines) + "\n"
