"""Tests of the fused mask ops (hsft.ops) against the pure-torch reference.

The compiled library is needed for most tests: in an installed checkout (``pip install
--no-build-isolation -e .``) it is ``hsft._C``; in a source tree point HSFT_OPS_LIBRARY at a
built ``_C*.so``. Without it those tests are skipped, unless HSFT_REQUIRE_COMPILED_OPS=1 (CI),
which turns the skip into a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hsft.ops as ops
from hsft.ops import library, reference

from launch_scripts import REPO


COMPILED = ops.library_status().loaded

REQUIRED = os.environ.get("HSFT_REQUIRE_COMPILED_OPS") == "1"
GPU = torch.cuda.is_available()
if REQUIRED and not COMPILED:
    pytest.fail(f"HSFT_REQUIRE_COMPILED_OPS=1 but {ops.library_status().source}", pytrace=False)
# On a GPU machine the compiled ops must hold the CUDA kernels themselves: a CPU-only build would
# silently run the reference on CUDA tensors and the CUDA tests would compare it with itself.
CUDA_KERNELS = COMPILED and GPU and all(library.has_cuda_kernel(name) for name in library.OP_NAMES)
if REQUIRED and GPU and not CUDA_KERNELS:
    pytest.fail(f"HSFT_REQUIRE_COMPILED_OPS=1 on a GPU machine but the hsft ops from {ops.library_status().source} "
                "have no CUDA kernels (a CPU-only build)", pytrace=False)

needs_compiled = pytest.mark.skipif(not COMPILED, reason=f"compiled ops not built: {ops.library_status().source}")
# Skipped only where there is no GPU; with a GPU and no CUDA kernels the tests fail (see require_cuda_kernels).
needs_cuda = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")


def require_cuda_kernels() -> None:
    """Fails unless the compiled library has the CUDA kernel of every hsft op."""
    missing = [name for name in library.OP_NAMES if not (COMPILED and library.has_cuda_kernel(name))]
    assert not missing, (f"the hsft ops {missing} have no CUDA kernel (library: {ops.library_status().source}); "
                         "build the ops with CUDA (launch/build_cuda_ops.sh, or cmake -DHSFT_CUDA=ON)")


def make_inputs(
    n: int, h: int, w: int, big_h: int, big_w: int, *, target: str = "binary", scale: float = 3.0,
    dtype: torch.dtype = torch.float64, seed: int = 0, four_d: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 1, h, w) if four_d else (n, h, w)
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if target == "binary":
        tgt = torch.rand(n, big_h, big_w, generator=gen) < 0.3
    elif target == "empty":
        tgt = torch.zeros(n, big_h, big_w, dtype=torch.bool)
    elif target == "full":
        tgt = torch.ones(n, big_h, big_w, dtype=torch.uint8)
    elif target == "soft":
        tgt = torch.rand(n, big_h, big_w, generator=gen, dtype=torch.float64)
    else:
        raise ValueError(target)
    return logits, tgt


def loss_and_grad(fn, logits: torch.Tensor, target: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.detach().clone().requires_grad_(True)
    per_mask = fn(x, target, reduction="none", **kwargs)
    # Distinct weights per mask exercise the incoming gradient of each mask.
    weights = torch.linspace(0.5, 1.5, per_mask.shape[0], dtype=per_mask.dtype, device=per_mask.device)
    (grad,) = torch.autograd.grad((per_mask * weights).sum(), x)
    return per_mask.detach(), grad


# ---- Dice + BCE -----------------------------------------------------------------------------------

LOSS_CASES = {
    "4x upsampling, N=3": dict(n=3, h=8, w=8, big_h=32, big_w=32),
    "odd, non-integer scale": dict(n=2, h=5, w=7, big_h=23, big_w=17),
    "downsampling": dict(n=2, h=9, w=11, big_h=4, big_w=5),
    "equal size": dict(n=2, h=6, w=5, big_h=6, big_w=5),
    "empty target": dict(n=2, h=7, w=6, big_h=19, big_w=22, target="empty"),
    "all-positive target": dict(n=2, h=7, w=6, big_h=19, big_w=22, target="full"),
    "soft target": dict(n=2, h=6, w=6, big_h=13, big_w=21, target="soft"),
    "(N, 1, h, w) logits": dict(n=2, h=6, w=9, big_h=17, big_w=20, four_d=True),
    "extreme logits": dict(n=2, h=6, w=7, big_h=25, big_w=18, scale=80.0),
}


@needs_compiled
@pytest.mark.parametrize("case", LOSS_CASES.values(), ids=LOSS_CASES.keys())
def test_dice_bce_matches_reference_in_float64(case: dict) -> None:
    logits, target = make_inputs(**case)
    loss, grad = loss_and_grad(ops.dice_bce_loss, logits, target, bce_weight=0.7)
    ref_loss, ref_grad = loss_and_grad(reference.dice_bce_loss, logits, target, bce_weight=0.7)
    assert loss.dtype == torch.float64 and grad.shape == logits.shape
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)


@needs_compiled
def test_float32_matches_float64_reference() -> None:
    logits, target = make_inputs(3, 16, 16, 61, 64, seed=1)
    loss, grad = loss_and_grad(ops.dice_bce_loss, logits.float(), target)
    ref_loss, ref_grad = loss_and_grad(reference.dice_bce_loss, logits.float().double(), target)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-4 * ref_grad.abs().max().item())


@needs_compiled
def test_extreme_logits_stay_finite_in_float32() -> None:
    logits, target = make_inputs(2, 6, 7, 25, 18, scale=200.0, dtype=torch.float32)
    assert logits.abs().max() > 50
    loss, grad = loss_and_grad(ops.dice_bce_loss, logits, target)
    ref_loss, _ = loss_and_grad(reference.dice_bce_loss, logits.double(), target)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)


# Documented tolerance for bfloat16 / float16 logits: the loss is computed in float32 from the
# exactly converted logits (within 1e-5 relative of float64); the gradient is rounded once to
# the logits' dtype (relative error up to 2^-8 for bfloat16, 2^-11 for float16).
@needs_compiled
@pytest.mark.parametrize("dtype,grad_rtol", [(torch.bfloat16, 2**-7), (torch.float16, 2**-10)])
def test_half_precision_logits(dtype: torch.dtype, grad_rtol: float) -> None:
    logits, target = make_inputs(2, 12, 12, 40, 37, dtype=dtype, seed=2)
    loss, grad = loss_and_grad(ops.dice_bce_loss, logits, target)
    ref_loss, ref_grad = loss_and_grad(reference.dice_bce_loss, logits.double(), target)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), ref_grad, rtol=grad_rtol, atol=1e-3 * scale)


@needs_compiled
def test_gradcheck_float64() -> None:
    logits, target = make_inputs(2, 3, 4, 7, 9, seed=3, target="soft")
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: ops.dice_bce_loss(z, target, reduction="none"), (x,))


@needs_compiled
def test_mean_reduction_and_loss_parts() -> None:
    logits, target = make_inputs(3, 5, 6, 14, 15, seed=4)
    per_mask = ops.dice_bce_loss(logits, target, bce_weight=0.5, reduction="none")
    assert per_mask.shape == (3,)
    torch.testing.assert_close(ops.dice_bce_loss(logits, target, bce_weight=0.5), per_mask.mean())
    dice = ops.mask_loss(logits, target, dice_weight=1.0, bce_weight=0.0, reduction="none")
    bce = ops.mask_loss(logits, target, dice_weight=0.0, bce_weight=1.0, reduction="none")
    torch.testing.assert_close(dice + 0.5 * bce, per_mask, rtol=1e-12, atol=1e-12)
    ref_bce = F.binary_cross_entropy_with_logits(
        F.interpolate(logits[:, None], (14, 15), mode="bilinear", align_corners=False)[:, 0],
        target.double(), reduction="none").mean(dim=(1, 2))
    torch.testing.assert_close(bce, ref_bce, rtol=1e-12, atol=1e-12)


@needs_compiled
def test_gradient_is_deterministic_across_thread_counts() -> None:
    logits, target = make_inputs(4, 32, 32, 130, 127, dtype=torch.float32, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        loss_1, grad_1 = loss_and_grad(ops.dice_bce_loss, logits, target)
        torch.set_num_threads(max(2, threads))
        loss_n, grad_n = loss_and_grad(ops.dice_bce_loss, logits, target)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(loss_1, loss_n) and torch.equal(grad_1, grad_n)


@needs_compiled
@pytest.mark.parametrize("mid_size", [None, [14, 15]])
def test_opcheck(mid_size: list[int] | None) -> None:
    logits, target = make_inputs(2, 5, 6, 11, 13, seed=6)
    x = logits.clone().requires_grad_(True)
    fov = torch.rand(2, 11, 13) > 0.2
    grad_loss = torch.tensor([1.0, 0.5], dtype=torch.float64)
    for field in (None, fov):
        torch.library.opcheck(torch.ops.hsft.dice_bce_loss.default, (x, target, field, 1.0, 0.5, 1e-8, mid_size))
        for with_adjoint in (False, True):
            torch.library.opcheck(torch.ops.hsft.dice_bce_loss_forward.default,
                                  (logits, target, field, 1.0, 0.5, 1e-8, mid_size, with_adjoint))
        _, sums, adjoint = torch.ops.hsft.dice_bce_loss_forward(logits, target, field, 1.0, 0.5, 1e-8, mid_size, True)
        torch.library.opcheck(torch.ops.hsft.dice_bce_loss_backward.default,
                              (grad_loss, sums, adjoint, 1.0, 0.5, 1e-8, torch.float64))
    torch.library.opcheck(torch.ops.hsft.upsample_masks.default, (logits, [11, 13], None))
    torch.library.opcheck(torch.ops.hsft.upsample_masks.default, (logits[:, None], [11, 13], 0.25))
    torch.library.opcheck(torch.ops.hsft.mask_stats.default, (logits, target, fov))


@needs_compiled
def test_torch_compile_traces_forward_and_backward() -> None:
    logits, target = make_inputs(2, 6, 6, 20, 21, dtype=torch.float32, seed=7)
    compiled = torch.compile(ops.dice_bce_loss, backend="aot_eager", fullgraph=True)
    x = logits.clone().requires_grad_(True)
    loss = compiled(x, target)
    loss.backward()
    y = logits.clone().requires_grad_(True)
    eager_loss = ops.dice_bce_loss(y, target)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(x.grad, y.grad)


def test_bad_arguments_are_refused_with_their_name() -> None:
    logits, target = make_inputs(2, 4, 4, 8, 8)
    with pytest.raises(ValueError, match="logits must have shape"):
        ops.dice_bce_loss(logits[0], target)
    with pytest.raises(ValueError, match="target has 1 masks but logits have 2"):
        ops.dice_bce_loss(logits, target[:1])
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.dice_bce_loss(logits, target, reduction="sum")
    with pytest.raises(TypeError, match="target must be bool, uint8 or floating point"):
        ops.dice_bce_loss(logits, target.long())
    with pytest.raises(ValueError, match="size must be two positive ints"):
        ops.upsample_masks(logits, (8, 0))
    with pytest.raises(ValueError, match="fov has shape"):
        ops.mask_stats(logits, target, fov=torch.ones(2, 8, 9, dtype=torch.bool))


@needs_compiled
def test_compiled_op_checks_its_arguments() -> None:
    # In a child process: these are the only tests whose errors are C++ exceptions thrown inside the op
    # library (the public API checks arguments in Python first). A library whose exceptions cannot
    # unwind into torch (one H100 build crashed here) then fails this test with the signal instead of
    # ending the whole pytest run.
    devices = ["cpu"] + (["cuda"] if CUDA_KERNELS else [])
    result = run_python(f"""
        import torch
        import hsft.ops  # loads the library
        for device in {devices!r}:
            logits = torch.randn(2, 4, 4, dtype=torch.float64, device=device)
            target = torch.rand(2, 8, 8, device=device) < 0.3
            calls = [
                lambda: torch.ops.hsft.dice_bce_loss(logits[:, None, None], target, None, 1.0, 0.5, 1e-8),
                lambda: torch.ops.hsft.dice_bce_loss(logits.requires_grad_(True)[:, None, None], target, None,
                                                     1.0, 0.5, 1e-8),
                lambda: torch.ops.hsft.dice_bce_loss(logits, target, None, 1.0, 0.5, 1e-8, [2, 2]),
                lambda: torch.ops.hsft.mask_stats(logits, target.int(), None),
            ]
            for call in calls:
                try:
                    call()
                except RuntimeError as error:
                    print(device, str(error).splitlines()[0])
                else:
                    print(device, "no error")
    """)
    assert result.returncode == 0, (
        f"the child process {'was killed by signal ' + str(-result.returncode) if result.returncode < 0 else 'failed'}"
        f":\n{result.stdout}\n{result.stderr[-3000:]}")
    lines = result.stdout.splitlines()
    for device in devices:
        got = [line for line in lines if line.startswith(device + " ")]
        assert len(got) == 4 and "no error" not in " ".join(got), result.stdout
        assert "logits must have shape (N, h, w) or (N, 1, h, w)" in got[0] and "logits must have shape" in got[1]
        assert "mid_size [2, 2] is smaller than the logits" in got[2]
        assert "target must be bool, uint8 or floating point" in got[3]


# ---- upsample_masks / mask_stats ----------------------------------------------------------------------

UPSAMPLE_SIZES = [(8, 8, 32, 32), (5, 7, 23, 17), (9, 11, 4, 5), (6, 5, 6, 5), (1, 1, 7, 9)]


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("h,w,big_h,big_w", UPSAMPLE_SIZES)
def test_upsample_masks_equals_interpolate(dtype: torch.dtype, h: int, w: int, big_h: int, big_w: int) -> None:
    logits, _ = make_inputs(3, h, w, big_h, big_w, dtype=dtype, four_d=True)
    out = ops.upsample_masks(logits, (big_h, big_w))
    expected = F.interpolate(logits, (big_h, big_w), mode="bilinear", align_corners=False)
    assert out.shape == expected.shape and out.dtype == dtype
    # Same formula; PyTorch's vectorised kernels may fuse multiply-adds, so allow last-bit rounding.
    ulp = torch.finfo(dtype).eps * logits.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=0, atol=4 * ulp)
    mask = ops.upsample_masks(logits[:, 0], (big_h, big_w), threshold=0.5)
    assert mask.dtype == torch.bool and mask.shape == (3, big_h, big_w)
    assert torch.equal(mask, out[:, 0] > 0.5)


@needs_compiled
def test_upsample_masks_bfloat16() -> None:
    logits, _ = make_inputs(2, 9, 10, 33, 31, dtype=torch.bfloat16)
    out = ops.upsample_masks(logits, (33, 31))
    assert out.dtype == torch.bfloat16
    # Interpolated in float32 and rounded once; a float32 last-bit difference can move a value
    # across a bfloat16 rounding boundary, so allow one bfloat16 step.
    expected = reference.upsample_masks(logits, (33, 31))
    torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=0)


@needs_compiled
@pytest.mark.parametrize("target_kind", ["binary", "soft"])
@pytest.mark.parametrize("use_fov", [False, True])
def test_mask_stats_matches_reference(target_kind: str, use_fov: bool) -> None:
    logits, target = make_inputs(3, 7, 9, 29, 30, target=target_kind, seed=8)
    fov = (torch.rand(3, 29, 30, generator=torch.Generator().manual_seed(9)) > 0.25) if use_fov else None
    stats = ops.mask_stats(logits, target, fov=fov)
    assert stats.dtype == torch.int64 and stats.shape == (3, 4)
    expected = reference.mask_stats(logits, target, fov=fov)
    # A pixel whose upsampled logit is within rounding of 0 may count differently from PyTorch's
    # kernel (see the upsample test); none are that close here, so the counts must be equal.
    z = F.interpolate(logits[:, None], (29, 30), mode="bilinear", align_corners=False)
    assert z.abs().min() > 1e-9
    assert torch.equal(stats, expected)
    inter, pred, gt, union = stats.unbind(1)
    assert torch.equal(union, pred + gt - inter) and (inter <= torch.minimum(pred, gt)).all()


@needs_compiled
def test_mask_stats_of_exact_prediction() -> None:
    # Logits that are exactly +-1 on a 4x grid upsample to a prediction that equals the target.
    gen = torch.Generator().manual_seed(10)
    low = torch.rand(2, 6, 6, generator=gen) < 0.5
    logits = low.double() * 2 - 1
    target = ops.upsample_masks(logits, (24, 24), threshold=0.0)
    stats = ops.mask_stats(logits.float(), target)
    count = target.sum(dim=(1, 2))
    assert torch.equal(stats, torch.stack([count, count, count, count], dim=1))


# ---- library loading and fallback ------------------------------------------------------------------

def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_fallback_to_reference_warns_once() -> None:
    code = """
        import sys, warnings
        sys.modules["hsft._C"] = None  # as if the extension had not been built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            import hsft.ops as ops
            from hsft.ops import library, reference
            logits = torch.randn(2, 5, 5, dtype=torch.float64)
            target = torch.rand(2, 9, 9) > 0.5
            a = ops.dice_bce_loss(logits, target)
            b = ops.mask_stats(logits, target)
        assert not ops.library_status().loaded
        assert torch.equal(a, reference.dice_bce_loss(logits, target))
        assert torch.equal(b, reference.mask_stats(logits, target))
        messages = [str(w.message) for w in caught if issubclass(w.category, ops.OpsFallbackWarning)]
        assert len(messages) == 1, messages
        assert "pip install --no-build-isolation -e ." in messages[0], messages[0]
    """
    result = run_python(code, HSFT_OPS_LIBRARY="")
    assert result.returncode == 0, result.stderr


def test_library_env_var_with_bad_path_is_an_error() -> None:
    result = run_python("import hsft.ops", HSFT_OPS_LIBRARY="/nonexistent/_C.so")
    assert result.returncode != 0
    assert "HSFT_OPS_LIBRARY='/nonexistent/_C.so' does not name a file" in result.stderr


# ---- field of view -------------------------------------------------------------------------------

def disc_fov(n: int, big_h: int, big_w: int, *, empty_last: bool = False) -> torch.Tensor:
    """A fundus-like field of view: a centred disc per mask; the last one empty when asked."""
    yy = (torch.arange(big_h, dtype=torch.float64) + 0.5) / big_h - 0.5
    xx = (torch.arange(big_w, dtype=torch.float64) + 0.5) / big_w - 0.5
    disc = (yy[:, None] ** 2 + xx[None, :] ** 2) < 0.16
    fov = disc.expand(n, big_h, big_w).clone()
    if empty_last:
        fov[-1] = False
    return fov


def fov_loss_by_indexing(logits: torch.Tensor, target: torch.Tensor, fov: torch.Tensor, bce_weight: float,
                         eps: float = 1e-8) -> torch.Tensor:
    """The definition, one mask at a time: keep the FOV pixels, then Dice + bce_weight * mean BCE."""
    z_all = F.interpolate(logits.reshape(logits.shape[0], 1, *logits.shape[-2:]).double(), target.shape[1:],
                          mode="bilinear", align_corners=False)[:, 0]
    out = []
    for z, g, inside in zip(z_all, reference.target_values(target, torch.float64), fov):
        z, g = z[inside], g[inside]
        p = torch.sigmoid(z)
        dice = 1 - (2 * (p * g).sum() + eps) / (p.sum() + g.sum() + eps)
        bce = F.binary_cross_entropy_with_logits(z, g, reduction="mean") if z.numel() else z.new_zeros(())
        out.append(dice + bce_weight * bce)
    return torch.stack(out)


FOV_CASES = {
    "4x upsampling": dict(n=3, h=8, w=8, big_h=32, big_w=32),
    "odd sizes, width not a multiple of 4": dict(n=2, h=5, w=7, big_h=23, big_w=17),
    "soft target": dict(n=2, h=6, w=6, big_h=13, big_w=21, target="soft"),
    "(N, 1, h, w) logits": dict(n=2, h=6, w=9, big_h=17, big_w=20, four_d=True),
}


def test_reference_fov_loss_is_the_loss_over_the_fov_pixels() -> None:
    logits, target = make_inputs(3, 6, 7, 25, 22, seed=21)
    fov = disc_fov(3, 25, 22, empty_last=True)
    got = reference.dice_bce_loss(logits, target, fov=fov, bce_weight=0.7, reduction="none")
    torch.testing.assert_close(got, fov_loss_by_indexing(logits, target, fov, 0.7), rtol=1e-12, atol=1e-12)
    assert got[-1] == 0  # empty field of view


@needs_compiled
@pytest.mark.parametrize("case", FOV_CASES.values(), ids=FOV_CASES.keys())
@pytest.mark.parametrize("fov_dtype", [torch.bool, torch.uint8])
def test_dice_bce_with_fov_matches_reference_in_float64(case: dict, fov_dtype: torch.dtype) -> None:
    logits, target = make_inputs(**case)
    fov = disc_fov(case["n"], case["big_h"], case["big_w"], empty_last=True)
    if fov_dtype == torch.uint8:
        fov = fov.to(torch.uint8) * 3  # any non-zero byte is inside
    loss, grad = loss_and_grad(ops.dice_bce_loss, logits, target, fov=fov, bce_weight=0.7)
    ref_loss, ref_grad = loss_and_grad(reference.dice_bce_loss, logits, target, fov=fov != 0, bce_weight=0.7)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)
    assert loss[-1] == 0 and torch.count_nonzero(grad[-1]) == 0  # empty field of view
    # float32 logits against the float64 reference
    loss32, grad32 = loss_and_grad(ops.dice_bce_loss, logits.float(), target, fov=fov, bce_weight=0.7)
    torch.testing.assert_close(loss32.double(), ref_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad32.double(), ref_grad, rtol=1e-3, atol=2e-5 * ref_grad.abs().max().item())


@needs_compiled
def test_fov_changes_the_loss_and_none_is_the_whole_image() -> None:
    logits, target = make_inputs(3, 16, 16, 64, 60, dtype=torch.float32, seed=22)
    everywhere = torch.ones(3, 64, 60, dtype=torch.bool)
    plain = loss_and_grad(ops.dice_bce_loss, logits, target)
    ones = loss_and_grad(ops.dice_bce_loss, logits, target, fov=everywhere)
    # FOV=None is the whole image, bit for bit, and it is what the loss was without a FOV argument.
    assert torch.equal(plain[0], ones[0]) and torch.equal(plain[1], ones[1])
    torch.testing.assert_close(plain[0].double(), reference.dice_bce_loss(logits.double(), target, reduction="none"),
                               rtol=2e-5, atol=2e-5)
    disc = loss_and_grad(ops.dice_bce_loss, logits, target, fov=disc_fov(3, 64, 60))
    assert not torch.allclose(disc[0], plain[0])


@needs_compiled
def test_gradcheck_float64_with_fov() -> None:
    logits, target = make_inputs(2, 3, 4, 9, 11, seed=23, target="soft")
    fov = disc_fov(2, 9, 11)
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: ops.dice_bce_loss(z, target, fov=fov, reduction="none"), (x,))


def test_fov_argument_is_checked() -> None:
    logits, target = make_inputs(2, 4, 4, 9, 9)
    with pytest.raises(ValueError, match="fov has shape"):
        ops.dice_bce_loss(logits, target, fov=torch.ones(2, 9, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="fov must be bool or uint8"):
        ops.dice_bce_loss(logits, target, fov=torch.ones(2, 9, 9))


# ---- the gradient computed in the forward pass, half precision read natively ----------------------------

@needs_compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradient_is_the_float32_gradient_rounded_once(dtype: torch.dtype) -> None:
    # The kernels read bfloat16 / float16 logits as stored and write the gradient in that dtype: the
    # same numbers as float32 logits of the same values, rounded once (to nearest even, as .to() does).
    logits, target = make_inputs(3, 13, 11, 41, 30, dtype=dtype, seed=31)
    fov = disc_fov(3, 41, 30, empty_last=True)
    loss_h, grad_h = loss_and_grad(ops.dice_bce_loss, logits, target, fov=fov)
    loss_f, grad_f = loss_and_grad(ops.dice_bce_loss, logits.float(), target, fov=fov)
    assert grad_h.dtype == dtype and loss_h.dtype == torch.float32
    assert torch.equal(loss_h, loss_f)
    assert torch.equal(grad_h, grad_f.to(dtype))


@needs_compiled
def test_forward_without_a_graph_gives_the_same_loss() -> None:
    # Without a graph to record the forward skips the adjoint planes; the sums are the same bits.
    logits, target = make_inputs(2, 19, 9, 50, 31, dtype=torch.float32, seed=32)
    with_graph = ops.dice_bce_loss(logits.clone().requires_grad_(True), target, reduction="none")
    with torch.no_grad():
        without = ops.dice_bce_loss(logits.clone().requires_grad_(True), target, reduction="none")
    assert with_graph.grad_fn is not None and without.grad_fn is None
    assert torch.equal(with_graph.detach(), without)


@needs_compiled
def test_backward_is_one_elementwise_op() -> None:
    logits, target = make_inputs(2, 8, 8, 30, 30, dtype=torch.float32, seed=33)
    x = logits.clone().requires_grad_(True)
    loss = ops.dice_bce_loss(x, target, reduction="none").sum()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    names = [event.name for event in prof.events()]
    assert names.count("hsft::dice_bce_loss_backward") == 1
    assert "hsft::dice_bce_loss_forward" not in names and "aten::_to_copy" not in names


# ---- the release's two-step resize ------------------------------------------------------------------------

TWO_STEP_CASES = {
    "the release's 4x, then to the image": dict(n=2, h=8, w=8, big_h=27, big_w=41, mid=[32, 32]),
    "odd sizes, the second step shrinks": dict(n=3, h=5, w=7, big_h=9, big_w=8, mid=[11, 13]),
    "equal first step, N=1": dict(n=1, h=6, w=5, big_h=17, big_w=12, mid=[6, 5]),
    "(N, 1, h, w) logits, many logit rows": dict(n=2, h=35, w=6, big_h=51, big_w=13, mid=[70, 12], four_d=True),
}


def two_step_inputs(case: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    spec = {k: v for k, v in case.items() if k != "mid"}
    logits, target = make_inputs(**spec, **kwargs)
    return logits, target, case["mid"]


def test_reference_two_step_is_two_interpolations() -> None:
    logits, target = make_inputs(2, 8, 8, 27, 41, seed=34)
    mid = F.interpolate(logits[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(reference.dice_bce_loss(logits, target, mid_size=(32, 32), reduction="none"),
                               reference.dice_bce_loss(mid, target, reduction="none"), rtol=0, atol=0)


@needs_compiled
@pytest.mark.parametrize("case", TWO_STEP_CASES.values(), ids=TWO_STEP_CASES.keys())
@pytest.mark.parametrize("use_fov", [False, True])
def test_two_step_matches_the_eager_two_step(case: dict, use_fov: bool) -> None:
    logits, target, mid = two_step_inputs(case, seed=35)
    fov = disc_fov(case["n"], case["big_h"], case["big_w"], empty_last=case["n"] > 1) if use_fov else None
    loss, grad = loss_and_grad(ops.dice_bce_loss, logits, target, fov=fov, mid_size=mid, bce_weight=0.7)
    ref_loss, ref_grad = loss_and_grad(reference.dice_bce_loss, logits, target, fov=fov, mid_size=mid,
                                       bce_weight=0.7)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)
    # float32 logits: the kernels build the intermediate rows as the first F.interpolate does
    loss32, grad32 = loss_and_grad(ops.dice_bce_loss, logits.float(), target, fov=fov, mid_size=mid, bce_weight=0.7)
    ref32, _ = loss_and_grad(reference.dice_bce_loss, logits.float(), target, fov=fov, mid_size=mid, bce_weight=0.7)
    torch.testing.assert_close(loss32, ref32, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(grad32.double(), ref_grad, rtol=1e-3, atol=2e-5 * ref_grad.abs().max().item())
    # one step is the same loss exactly when the first step is the identity
    one_step = loss_and_grad(ops.dice_bce_loss, logits, target, fov=fov, bce_weight=0.7)[0]
    identity = mid == [case["h"], case["w"]]
    assert torch.equal(loss, one_step) if identity else not torch.allclose(loss, one_step)


@needs_compiled
def test_two_step_gradcheck_float64() -> None:
    logits, target = make_inputs(2, 3, 4, 9, 11, seed=36, target="soft")
    fov = disc_fov(2, 9, 11)
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: ops.dice_bce_loss(z, target, fov=fov, mid_size=(7, 8), reduction="none"), (x,))


def test_mid_size_argument_is_checked() -> None:
    logits, target = make_inputs(2, 8, 8, 20, 20)
    with pytest.raises(ValueError, match="mid_size .* is smaller than the logits"):
        ops.dice_bce_loss(logits, target, mid_size=(4, 16))
    with pytest.raises(ValueError, match="mid_size must be None or two positive ints"):
        ops.dice_bce_loss(logits, target, mid_size=(16,))


# ---- CUDA ---------------------------------------------------------------------------------------------

@needs_cuda
def test_cuda_kernels_are_registered_for_every_op() -> None:
    require_cuda_kernels()
    assert library.has_kernel(torch.device("cuda"))


@needs_cuda
@pytest.mark.parametrize("case", LOSS_CASES.values(), ids=LOSS_CASES.keys())
def test_cuda_dice_bce_matches_reference(case: dict) -> None:
    require_cuda_kernels()
    logits, target = make_inputs(**case)
    ref_loss, ref_grad = loss_and_grad(reference.dice_bce_loss, logits, target)
    for dtype, rtol in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
        loss, grad = loss_and_grad(ops.dice_bce_loss, logits.to("cuda", dtype), target.cuda())
        assert loss.device.type == "cuda" and torch.isfinite(grad).all()
        torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=rtol, atol=rtol)
        torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=rtol, atol=rtol * ref_grad.abs().max().item())


@needs_cuda
@pytest.mark.parametrize("case", FOV_CASES.values(), ids=FOV_CASES.keys())
def test_cuda_dice_bce_with_fov_matches_reference(case: dict) -> None:
    require_cuda_kernels()
    logits, target = make_inputs(**case)
    fov = disc_fov(case["n"], case["big_h"], case["big_w"], empty_last=True)
    ref_loss, ref_grad = loss_and_grad(reference.dice_bce_loss, logits, target, fov=fov)
    for dtype, rtol in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
        loss, grad = loss_and_grad(ops.dice_bce_loss, logits.to("cuda", dtype), target.cuda(), fov=fov.cuda())
        torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=rtol, atol=rtol)
        torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=rtol, atol=rtol * ref_grad.abs().max().item())
        assert loss[-1].item() == 0 and torch.count_nonzero(grad[-1]).item() == 0


@needs_cuda
def test_cuda_gradient_is_deterministic() -> None:
    require_cuda_kernels()
    logits, target = make_inputs(4, 64, 64, 250, 256, dtype=torch.float32, seed=11)
    logits, target = logits.cuda(), target.cuda()
    first = loss_and_grad(ops.dice_bce_loss, logits, target)
    second = loss_and_grad(ops.dice_bce_loss, logits, target)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@needs_cuda
@pytest.mark.parametrize("h,w,big_h,big_w", UPSAMPLE_SIZES)
def test_cuda_upsample_and_stats(h: int, w: int, big_h: int, big_w: int) -> None:
    require_cuda_kernels()
    logits, target = make_inputs(3, h, w, big_h, big_w, dtype=torch.float32, seed=12)
    fov = torch.rand(3, big_h, big_w) > 0.2
    out = ops.upsample_masks(logits.cuda(), (big_h, big_w))
    expected = F.interpolate(logits[:, None], (big_h, big_w), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=4e-7 * logits.abs().max().item())
    mask = ops.upsample_masks(logits.cuda(), (big_h, big_w), threshold=0.0)
    assert torch.equal(mask, out > 0)
    stats = ops.mask_stats(logits.cuda(), target.cuda(), fov=fov.cuda())
    assert torch.equal(stats.cpu(), ops.mask_stats(logits, target, fov=fov))


# A CPU-only build on a GPU machine, simulated by a pytest plugin that makes torch report a GPU: the
# CUDA tests must fail there (not pass by running the reference), and HSFT_REQUIRE_COMPILED_OPS=1
# must stop the whole module.
FAKE_GPU_PLUGIN = "import torch\ntorch.cuda.is_available = lambda: True\n"


def run_tests_on_fake_gpu(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "hsft_fake_gpu.py").write_text(FAKE_GPU_PLUGIN)
    cmd = [sys.executable, "-m", "pytest", "-p", "hsft_fake_gpu", "-p", "no:cacheprovider", "-q",
           str(REPO / "tests" / "test_ops.py"), "-k", "registered_for_every_op"]
    full_env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", **env}
    full_env.pop("HSFT_REQUIRE_COMPILED_OPS", None)
    full_env.update(env)
    return subprocess.run(cmd, env=full_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@needs_compiled
@pytest.mark.skipif(GPU, reason="simulates a GPU machine; this one has a GPU")
def test_cuda_tests_fail_with_a_cpu_only_build_on_a_gpu_machine(tmp_path: Path) -> None:
    if all(library.has_cuda_kernel(name) for name in library.OP_NAMES):
        pytest.skip("the loaded library has CUDA kernels")
    result = run_tests_on_fake_gpu(tmp_path)
    assert result.returncode == 1 and "1 failed" in result.stdout, result.stdout + result.stderr
    assert "have no CUDA kernel" in result.stdout
    required = run_tests_on_fake_gpu(tmp_path, HSFT_REQUIRE_COMPILED_OPS="1")
    assert required.returncode != 0, required.stdout
    assert "have no CUDA kernels (a CPU-only build)" in required.stdout + required.stderr
