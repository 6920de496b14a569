"""Benchmark of the fused Dice+BCE op against eager PyTorch and torch.compile of the same formula.

Providers: ``eager`` (F.interpolate + sigmoid + BCE + Dice, :func:`hsft.ops.reference.dice_bce_loss`),
``compile`` (torch.compile of that function) and ``ours`` (:func:`hsft.ops.dice_bce_loss`). Modes:
``fwd`` (forward with a graph recorded, as in training), ``bwd`` (backward alone) and ``fwd+bwd``.
Per row: median and spread (min / max) of the wall time over the repeats, and the peak extra
memory of one call.

Peak extra memory, CPU: the process's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs before each call) minus the resident set before the call. glibc keeps
freed blocks resident unless they were mmap'ed, so the memory pass runs after all timings with
glibc's mmap threshold pinned at 64 KiB (mallopt): every buffer of 64 KiB or more then comes
from mmap and leaves the resident set when freed. It counts everything the call allocates, the
kernels' own scratch included. Timings run before that, with the allocator's default behaviour.
CUDA: torch.cuda.max_memory_allocated minus memory_allocated before the call.

CUDA rows separate three times, because host overhead (launches, allocations, Python) is inside
every wall-clock number and is not the kernels' speed:
  - ``median_ms`` (and min / max): the whole op's wall time, perf_counter around the call and a
    synchronize; what a training step pays;
  - ``gpu_ms``: CUDA events recorded on the stream right before and after the call; the device's
    busy span, gaps between launches included;
  - ``kernel_ms``: the sum of the device durations of the kernels (and memsets / copies) the call
    launched, from a torch.profiler trace; ``launches`` is how many there were per call.
``bytes`` is the traffic the op must cause at the least (targets read once, in their dtype; logits
read once; for a backward the gradient written once, in the logits' dtype), and the roofline
fractions are those bytes over the time, as a fraction of the card's peak memory bandwidth (a table
by device name, :data:`PEAK_BANDWIDTH_TBS`, or the measured device-to-device copy bandwidth for
cards not in it): ``roofline_fraction`` by the whole op's time, ``kernel_roofline`` by the kernels'.

"ours" is the compiled kernel or nothing: when the compiled library has no kernel for the device
(not built, or built without CUDA) the benchmark refuses to run rather than time the reference
under that name.
"""

from __future__ import annotations

import csv
import json
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from hsft.errors import UserError
from hsft.ops import library, reference
from hsft.ops.mask_ops import dice_bce_loss

__all__ = ["Shape", "Row", "DEFAULT_SHAPES", "QUICK_SHAPES", "PROVIDERS", "MODES", "PEAK_BANDWIDTH_TBS", "run",
           "peak_bandwidth", "format_table", "write_results", "BenchmarkError", "OursUnavailable", "DTYPES",
           "moved_bytes", "DeviceActivity", "launch_summary", "Targets", "check_targets"]

PROVIDERS = ("eager", "compile", "ours")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = ("fwd", "bwd", "fwd+bwd")
MMAP_THRESHOLD = 65536
# Peak memory bandwidth (TB/s, vendor figures) by a fragment of torch.cuda.get_device_name, first
# match wins (so "H100 PCIe" comes before "H100", whose SXM part reports as "H100 80GB HBM3").
PEAK_BANDWIDTH_TBS = (
    ("H200", 4.8),
    ("H100 PCIe", 2.0),
    ("H100 NVL", 3.9),
    ("H100", 3.35),
    ("A100-SXM4-80GB", 2.039),
    ("A100-SXM4-40GB", 1.555),
    ("A100 80GB PCIe", 1.935),
    ("A100-PCIE-40GB", 1.555),
)


class BenchmarkError(UserError):
    """The benchmark cannot run as asked (one line saying why)."""


class OursUnavailable(BenchmarkError):
    """The compiled kernel for the benchmark's device is missing, so "ours" cannot be measured."""


@dataclass(frozen=True)
class Shape:
    masks: int
    low: int
    high: int

    @property
    def label(self) -> str:
        return f"{self.masks}x{self.low}->{self.high}"

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """A shape from its label, e.g. "16x256->1024"."""
        match = re.fullmatch(r"(\d+)x(\d+)->(\d+)", text.strip())
        if match is None or min(int(v) for v in match.groups()) < 1:
            raise ValueError(f"{text!r} is not a shape such as 16x256->1024 (masks x low side -> high side)")
        return cls(*(int(v) for v in match.groups()))


DEFAULT_SHAPES = (Shape(8, 256, 1024), Shape(16, 256, 1024), Shape(64, 256, 1024))
QUICK_SHAPES = (Shape(8, 64, 256), Shape(8, 256, 1024))


@dataclass
class Row:
    device: str
    shape: str
    provider: str
    mode: str
    median_ms: float  # whole op, wall clock
    min_ms: float
    max_ms: float
    repeats: int
    peak_extra_mib: float
    dtype: str = "float32"
    bandwidth_gbs: float | None = None  # bytes over the whole op's median time
    roofline_fraction: float | None = None  # of the peak (or measured copy) memory bandwidth
    gpu_ms: float | None = None  # CUDA events around the call (median)
    kernel_ms: float | None = None  # device time of the kernels the call launched (profiler, per call)
    launches: float | None = None  # kernels + memsets + copies per call (profiler)
    kernel_roofline: float | None = None  # bytes over kernel_ms, of the peak bandwidth
    bytes: int | None = None  # the least traffic the op must cause


def _pin_malloc_mmap_threshold() -> None:
    """Makes glibc serve buffers of 64 KiB or more by mmap from now on (see the module docstring)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_mmap_threshold = -3
    if libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD) != 1:
        raise RuntimeError("benchmark: mallopt(M_MMAP_THRESHOLD) failed; cannot measure CPU peak memory")
    libc.malloc_trim(0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line")
    return int(match.group(1)) * 1024


def _peak_extra_bytes(call: Callable[[], None], device: torch.device) -> int:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set
    base = _rss_bytes("VmRSS")
    call()
    return max(0, _rss_bytes("VmHWM") - base)


def _providers(names: Sequence[str]) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    table: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
    for name in names:
        if name == "eager":
            table[name] = reference.dice_bce_loss
        elif name == "compile":
            table[name] = torch.compile(reference.dice_bce_loss, dynamic=False)
        elif name == "ours":
            table[name] = dice_bce_loss
        else:
            raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")
    return table


def _time_mode(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor, target: torch.Tensor,
    mode: str, repeats: int, warmup: int,
) -> tuple[list[float], Callable[[], Callable[[], None]]]:
    device = logits.device

    def forward() -> torch.Tensor:
        return fn(logits, target)

    def one(timed: bool) -> float:
        if mode == "bwd":
            loss = forward()
            _sync(device)
            start = time.perf_counter()
            loss.backward()
        else:
            start = time.perf_counter()
            loss = forward()
            if mode == "fwd+bwd":
                loss.backward()
        _sync(device)
        elapsed = time.perf_counter() - start
        logits.grad = None
        return elapsed

    for _ in range(warmup):
        one(False)
    times = [one(True) for _ in range(repeats)]

    def prepare_call() -> Callable[[], None]:
        # For "bwd" the forward runs before the measurement starts: the peak is the backward's.
        if mode == "bwd":
            loss = forward()
            _sync(device)
            return loss.backward
        if mode == "fwd":
            return lambda: forward() and None
        return lambda: forward().backward()

    return times, prepare_call


def moved_bytes(shape: Shape, mode: str, dtype: torch.dtype) -> int:
    """The least traffic of one call: a bool target read once (1 byte a pixel) and the logits read
    once; a backward also writes the gradient once, in the logits' dtype. (A backward that recomputes
    the forward reads both again; an op that computes the gradient in the forward does not.)"""
    pixels = shape.masks * shape.high * shape.high
    low = shape.masks * shape.low * shape.low * torch.empty((), dtype=dtype).element_size()
    return {"fwd": pixels + low, "bwd": low, "fwd+bwd": pixels + 2 * low}[mode]


@dataclass(frozen=True)
class DeviceActivity:
    """One device-side event of a profiler trace: a kernel, memset or copy."""

    name: str
    device_us: float


def launch_summary(activities: Sequence[DeviceActivity], calls: int) -> tuple[float, float]:
    """(launches per call, device milliseconds per call) of the activities `calls` calls caused."""
    if calls < 1:
        raise ValueError("launch_summary: calls must be >= 1")
    return len(activities) / calls, sum(a.device_us for a in activities) / 1e3 / calls


def _device_activities(profile: torch.profiler.profile) -> list[DeviceActivity]:
    """The CUDA-side events (kernels, memsets, copies) of a trace."""
    out = []
    for event in profile.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        duration = getattr(event, "device_time", None)
        if duration is None:
            duration = event.cuda_time
        out.append(DeviceActivity(event.name, float(duration)))
    return out


def _cuda_breakdown(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor, target: torch.Tensor,
    mode: str, repeats: int,
) -> tuple[float, float, float]:
    """(median CUDA-event ms, kernel ms per call, launches per call) of `mode` on CUDA."""
    device = logits.device

    def prepared() -> tuple[Callable[[], None], torch.Tensor | None]:
        if mode == "bwd":
            loss = fn(logits, target)
            _sync(device)
            return loss.backward, loss
        if mode == "fwd":
            return lambda: fn(logits, target) and None, None
        return lambda: fn(logits, target).backward(), None

    spans = []
    for _ in range(repeats):
        call, _keep = prepared()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        spans.append(start.elapsed_time(end))
        logits.grad = None
    calls = []
    for _ in range(repeats):
        calls.append(prepared())
    _sync(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for call, _keep in calls:
            call()
            logits.grad = None
        _sync(device)
    launches, kernel_ms = launch_summary(_device_activities(profile), repeats)
    return statistics.median(spans), kernel_ms, launches


def peak_bandwidth(device: torch.device) -> tuple[float, str]:
    """(bytes/s, where the figure comes from) of the CUDA device's memory: the table, else a copy."""
    name = torch.cuda.get_device_name(device)
    for fragment, tbs in PEAK_BANDWIDTH_TBS:
        if fragment in name:
            return tbs * 1e12, f"{name}: vendor peak {tbs} TB/s"
    measured = _copy_bandwidth(device)
    return measured, f"{name}: measured device-to-device copy {measured / 1e12:.2f} TB/s (not in the table)"


def _copy_bandwidth(device: torch.device) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write)."""
    buffer = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    for _ in range(3):
        buffer.clone()
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        buffer.clone()
    _sync(device)
    return 2 * buffer.numel() * 10 / (time.perf_counter() - start)


def run(
    *, device: str = "cpu", shapes: Sequence[Shape] = DEFAULT_SHAPES, providers: Sequence[str] = PROVIDERS,
    modes: Sequence[str] = MODES, repeats: int = 7, warmup: int = 2, seed: int = 0,
    log: Callable[[str], None] = print, dtype: torch.dtype = torch.float32,
) -> list[Row]:
    """Times every provider, mode and shape (logits in `dtype`); returns one Row each."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("benchmark: --device cuda asked for but no CUDA device is available")
    if "ours" in providers and not library.has_kernel(dev):
        raise OursUnavailable(
            f"benchmark: no compiled hsft kernel for {dev.type} ({library.status().source}), so 'ours' would "
            f"time the pure-torch reference; build the ops for {dev.type} or leave 'ours' out (--providers)")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    table = _providers(providers)
    peak_bw = None
    if dev.type == "cuda":
        peak_bw, source = peak_bandwidth(dev)
        log(f"memory roofline: {source}")

    def inputs(shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(shape.masks, shape.low, shape.low, generator=gen).to(dev, dtype).requires_grad_(True)
        target = (torch.rand(shape.masks, shape.high, shape.high, generator=gen) < 0.2).to(dev)
        return logits, target

    rows: list[Row] = []
    for shape in shapes:
        logits, target = inputs(shape)
        for provider, fn in table.items():
            for mode in modes:
                times, _ = _time_mode(fn, logits, target, mode, repeats, warmup)
                median = statistics.median(times)
                row = Row(dev.type, shape.label, provider, mode, median * 1e3, min(times) * 1e3, max(times) * 1e3,
                          repeats, float("nan"), dtype=str(dtype).removeprefix("torch."))
                row.bytes = moved_bytes(shape, mode, dtype)
                detail = ""
                if peak_bw is not None:
                    row.bandwidth_gbs = row.bytes / median / 1e9
                    row.roofline_fraction = row.bytes / peak_bw / median
                    row.gpu_ms, row.kernel_ms, row.launches = _cuda_breakdown(fn, logits, target, mode, repeats)
                    row.kernel_roofline = row.bytes / peak_bw / (row.kernel_ms / 1e3) if row.kernel_ms else None
                    detail = (f"; events {row.gpu_ms:.3f} ms, kernels {row.kernel_ms:.3f} ms in "
                              f"{row.launches:.1f} launches")
                rows.append(row)
                log(f"  {shape.label:>14} {provider:>8} {mode:>8}: {row.median_ms:9.3f} ms "
                    f"[{row.min_ms:.3f}, {row.max_ms:.3f}]{detail}")
        del logits, target

    # Memory pass, after all timings (it changes the allocator's behaviour on CPU).
    if dev.type == "cpu":
        _pin_malloc_mmap_threshold()
    by_key = {(r.shape, r.provider, r.mode): r for r in rows}
    for shape in shapes:
        logits, target = inputs(shape)
        for provider, fn in table.items():
            for mode in modes:
                _, prepare_call = _time_mode(fn, logits, target, mode, repeats=1, warmup=0)
                row = by_key[(shape.label, provider, mode)]
                row.peak_extra_mib = _peak_extra_bytes(prepare_call(), dev) / 2**20
                logits.grad = None
                log(f"  {shape.label:>14} {provider:>8} {mode:>8}: peak +{row.peak_extra_mib:.1f} MiB")
        del logits, target
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """Markdown table with the speed-up and memory ratio of every provider against eager (and, on CUDA,
    against torch.compile, with the event, kernel and launch breakdown and the roofline fractions)."""
    eager = {(r.device, r.dtype, r.shape, r.mode): r for r in rows if r.provider == "eager"}
    compiled = {(r.device, r.dtype, r.shape, r.mode): r for r in rows if r.provider == "compile"}
    cuda = any(r.device == "cuda" for r in rows)
    header = ("| device | dtype | shape | provider | mode | median ms (whole op) | min-max ms | peak extra MiB |"
              " vs eager time | vs compile time | vs eager memory |")
    rule = "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"
    if cuda:
        header += " events ms | kernels ms | launches | MB | roofline (op) | roofline (kernels) |"
        rule += "---:|---:|---:|---:|---:|---:|"
    lines = [header, rule]

    def ratio(base: Row | None, r: Row) -> str:
        return f"{base.median_ms / r.median_ms:.2f}x" if base else "-"

    def fmt(value: float | None, spec: str) -> str:
        return format(value, spec) if value is not None else "-"

    for r in rows:
        key = (r.device, r.dtype, r.shape, r.mode)
        base = eager.get(key)
        memory = f"{r.peak_extra_mib / base.peak_extra_mib:.3f}" if base and base.peak_extra_mib > 0 else "-"
        line = (f"| {r.device} | {r.dtype} | {r.shape} | {r.provider} | {r.mode} | {r.median_ms:.3f} | "
                f"{r.min_ms:.3f}-{r.max_ms:.3f} | {r.peak_extra_mib:.1f} | {ratio(base, r)} | "
                f"{ratio(compiled.get(key), r)} | {memory} |")
        if cuda:
            megabytes = r.bytes / 1e6 if r.bytes is not None else None
            line += (f" {fmt(r.gpu_ms, '.3f')} | {fmt(r.kernel_ms, '.3f')} | {fmt(r.launches, '.1f')} | "
                     f"{fmt(megabytes, '.1f')} | {fmt(r.roofline_fraction, '.0%')} | {fmt(r.kernel_roofline, '.0%')} |")
        lines.append(line)
    return "\n".join(lines)


@dataclass(frozen=True)
class Targets:
    """What "ours" must reach, per dtype, shape and mode (fwd+bwd on CUDA is what the goals are about)."""

    vs_eager: float = 5.0
    vs_compile: float = 1.5
    roofline: float = 0.4  # of the peak memory bandwidth, by the whole op's time


def check_targets(rows: Sequence[Row], targets: Targets = Targets(), mode: str = "fwd+bwd") -> list[tuple[str, bool]]:
    """One (line, met) per "ours" row of `mode`: its speed-ups against eager and torch.compile and its
    roofline fraction against the targets (a missing baseline or a CPU row has no roofline: not met)."""
    by_key = {(r.device, r.dtype, r.shape, r.mode, r.provider): r for r in rows}
    verdicts = []
    for r in rows:
        if r.provider != "ours" or r.mode != mode:
            continue
        eager = by_key.get((r.device, r.dtype, r.shape, r.mode, "eager"))
        compiled = by_key.get((r.device, r.dtype, r.shape, r.mode, "compile"))
        vs_eager = eager.median_ms / r.median_ms if eager else None
        vs_compile = compiled.median_ms / r.median_ms if compiled else None
        checks = [("vs eager", vs_eager, targets.vs_eager, "x"), ("vs compile", vs_compile, targets.vs_compile, "x"),
                  ("roofline", r.roofline_fraction, targets.roofline, "")]
        parts, met = [], True
        for label, value, goal, unit in checks:
            ok = value is not None and value >= goal
            met = met and ok
            shown = "n/a" if value is None else (f"{value:.2f}{unit}" if unit else f"{value:.0%}")
            goal_shown = f"{goal:g}{unit}" if unit else f"{goal:.0%}"
            parts.append(f"{label} {shown} (target >= {goal_shown}) {'ok' if ok else 'MISSED'}")
        verdicts.append((f"{r.device} {r.dtype} {r.shape} {r.mode}: " + "; ".join(parts), met))
    return verdicts


def machine_description() -> dict[str, str | int]:
    info: dict[str, str | int] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "compiled_ops": library.status().source,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["memory_roofline"] = peak_bandwidth(torch.device("cuda"))[1]
    return info


def write_results(rows: Sequence[Row], out_dir: Path, *, command: str) -> tuple[Path, Path]:
    """Writes bench_kernels_<UTC time>.json (rows + machine + command) and the same rows as CSV."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    json_path = out_dir / f"bench_kernels_{stamp}.json"
    csv_path = out_dir / f"bench_kernels_{stamp}.csv"
    payload = {"date": stamp, "command": command, "machine": machine_description(),
               "rows": [asdict(r) for r in rows]}
    json_path.write_text(json.dumps(payload, indent=2))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0]).keys()) if rows else ["device"])
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    return json_path, csv_path
