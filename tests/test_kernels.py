"""Correctness of every RMSNorm backend against the float64 formula, plus dispatch and build-failure fallback.

No timing assertions here (the machine is shared and noisy): speed is measured by ``scripts/bench_norms.py`` and
recorded in ``docs/PERFORMANCE.md``. The fused extension is compiled at most once per session (then cached on disk).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import normswap.kernels as kernels
from normswap.kernels import _build, rms_norm, rms_norm_composite, selected_backend
from normswap.kernels.fused import rms_norm_fused
from normswap.norm import RMSNorm

EPS = 1e-5
LOW_PRECISION = (torch.bfloat16, torch.float16)


# ---- helpers ------------------------------------------------------------------------------------------------------


def reference(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = EPS
) -> torch.Tensor:
    """The formula in float64: the yardstick every backend is measured against."""
    xd = x.double()
    y = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error relative to the largest reference magnitude (robust to outputs that cross zero)."""
    return ((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def params(
    hidden: int, dtype: torch.dtype, affine: str, generator: torch.Generator
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Weight/bias for an ``affine`` mode: ``wb`` (both), ``w`` (no bias), ``none``, ``b`` (bias only)."""
    weight = (1.0 + 0.5 * torch.randn(hidden, generator=generator)).to(dtype) if "w" in affine else None
    bias = (0.1 * torch.randn(hidden, generator=generator)).to(dtype) if "b" in affine else None
    return weight, bias


def baseline_err(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> float:
    """Error of plain ``F.rms_norm`` in the input's own dtype: the bar a low-precision backend must not exceed."""
    y = F.rms_norm(x, (x.shape[-1],), weight, EPS)
    if bias is not None:
        y = y + bias
    return max_rel_err(y, reference(x, weight, bias))


def tolerance(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> float:
    if x.dtype == torch.float32:
        return 1e-5
    # One rounding of the fp32 result to the output dtype is the floor; F.rms_norm in bf16/fp16 rounds more often.
    return baseline_err(x, weight, bias) * 1.0001


@pytest.fixture(scope="session")
def fused_available() -> bool:
    """Build (or load from cache) the extension once per session; later tests only look it up."""
    return _build.load() is not None


@pytest.fixture(params=["composite", "fused"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, fused_available: bool) -> str:
    """Run a test once per backend, forced through the public ``NORMSWAP_KERNEL`` switch."""
    if request.param == "fused" and not fused_available:
        pytest.skip(f"fused extension could not be built here: {_build.load_error()}")
    monkeypatch.setenv("NORMSWAP_KERNEL", request.param)
    return request.param


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# ---- forward ------------------------------------------------------------------------------------------------------

SHAPES = [(8, 768), (4, 37), (2, 3, 769), (3, 1, 1), (64,), (513, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("affine", ["wb", "w", "none", "b"])
def test_forward_matches_float64(
    backend: str, dtype: torch.dtype, shape: tuple[int, ...], affine: str, gen: torch.Generator
) -> None:
    x = (3.0 * torch.randn(shape, generator=gen) + 0.5).to(dtype)
    weight, bias = params(shape[-1], dtype, affine, gen)
    assert selected_backend(x, weight, bias) == backend
    y = rms_norm(x, weight, bias, EPS)
    assert y.dtype == dtype and y.shape == x.shape
    assert max_rel_err(y, reference(x, weight, bias)) <= tolerance(x, weight, bias)


def test_large_input_uses_every_thread_and_stays_exact(backend: str, gen: torch.Generator) -> None:
    """Big enough that the fused kernel splits rows across threads; fp32 and bf16 in one go to keep it quick."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2048, 1024, generator=gen).to(dtype)
        weight, bias = params(1024, dtype, "wb", gen)
        y = rms_norm(x, weight, bias, EPS)
        assert max_rel_err(y, reference(x, weight, bias)) <= tolerance(x, weight, bias)


NON_CONTIGUOUS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "column-slice": lambda t: t[:, :, :96],  # row stride > hidden: normalised in place, no copy
    "row-step": lambda t: t[:, ::2, :96],  # leading dims still collapse to one row stride
    "transposed": lambda t: t[:, :, :96].transpose(0, 1),  # leading dims do not collapse: copied first
    "strided-hidden": lambda t: t[:, :, ::2],  # hidden dim itself strided
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("view", list(NON_CONTIGUOUS), ids=str)
def test_non_contiguous_inputs(backend: str, dtype: torch.dtype, view: str, gen: torch.Generator) -> None:
    base = torch.randn(4, 6, 192, generator=gen).to(dtype)
    x = NON_CONTIGUOUS[view](base)
    assert not x.is_contiguous()
    weight, bias = params(x.shape[-1], dtype, "wb", gen)
    y = rms_norm(x, weight, bias, EPS)
    assert y.shape == x.shape
    assert max_rel_err(y, reference(x, weight, bias)) <= tolerance(x, weight, bias)
    assert torch.equal(y, rms_norm(x.contiguous(), weight, bias, EPS))


def test_empty_input(backend: str) -> None:
    x = torch.randn(0, 3, 768)
    assert rms_norm(x, torch.ones(768), torch.zeros(768), EPS).shape == x.shape


@pytest.mark.parametrize(
    ("x_dtype", "w_dtype", "b_dtype"),
    [
        (torch.bfloat16, torch.float32, torch.float32),  # autocast-style fp32 master weights
        (torch.float16, torch.bfloat16, torch.float32),  # nothing matches: everything via fp32
        (torch.bfloat16, torch.bfloat16, torch.float32),  # weight native, bias not
    ],
    ids=str,
)
def test_mixed_precision_params(
    backend: str, x_dtype: torch.dtype, w_dtype: torch.dtype, b_dtype: torch.dtype, gen: torch.Generator
) -> None:
    """Parameters in another dtype than the activations: output keeps the activation dtype, rounded once."""
    x = torch.randn(16, 300, generator=gen).to(x_dtype)
    weight, _ = params(300, w_dtype, "w", gen)
    _, bias = params(300, b_dtype, "b", gen)
    y = rms_norm(x, weight, bias, EPS)
    assert y.dtype == x_dtype
    ref = reference(x, weight, bias)
    assert max_rel_err(y, ref) <= max_rel_err(ref.to(x_dtype), ref) * 1.0001 + 1e-12


# ---- backward -----------------------------------------------------------------------------------------------------


def grads(
    fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    dy: torch.Tensor,
    wanted: str,
) -> list[torch.Tensor | None]:
    """Gradients of ``sum(fn(x, w, b) * dy)`` w.r.t. the inputs named in ``wanted`` (x/w/b), None for the rest."""
    leaves = {
        "x": x.detach().clone().requires_grad_("x" in wanted),
        "w": None if weight is None else weight.detach().clone().requires_grad_("w" in wanted),
        "b": None if bias is None else bias.detach().clone().requires_grad_("b" in wanted),
    }
    y = fn(leaves["x"], leaves["w"], leaves["b"], EPS)
    inputs = [t for t in leaves.values() if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(y, inputs, dy))
    return [next(got) if (t is not None and t.requires_grad) else None for t in leaves.values()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(300, 768), (2, 5, 37), (3, 769)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("affine", ["wb", "w", "none"])
def test_backward_matches_float64(
    backend: str, dtype: torch.dtype, shape: tuple[int, ...], affine: str, gen: torch.Generator
) -> None:
    x = (2.0 * torch.randn(shape, generator=gen)).to(dtype)
    weight, bias = params(shape[-1], dtype, affine, gen)
    dy = torch.randn(shape, generator=gen).to(dtype)
    got = grads(rms_norm, x, weight, bias, dy, "xwb")
    want = grads(
        rms_norm_composite, x.double(), *(None if p is None else p.double() for p in (weight, bias)), dy.double(), "xwb"
    )
    if dtype == torch.float32:
        tol = [1e-5] * 3
    else:  # the bar: the stock composite's own gradients in this dtype
        stock = grads(rms_norm_composite, x, weight, bias, dy, "xwb")
        tol = [None if s is None else max_rel_err(s, w) * 1.5 + 1e-6 for s, w in zip(stock, want, strict=True)]
    for name, g, w, t in zip("xwb", got, want, tol, strict=True):
        assert (g is None) == (w is None), name
        if g is not None:
            assert g.dtype == dtype, name
            assert max_rel_err(g, w) <= t, f"d{name}: {max_rel_err(g, w):.3g} > {t:.3g}"


@pytest.mark.parametrize("wanted", ["x", "wb", "w", "b"])
def test_backward_partial_requires_grad(backend: str, wanted: str, gen: torch.Generator) -> None:
    """Frozen input (adapter-style fine-tuning) or frozen params: only the requested gradients, each correct."""
    x = torch.randn(130, 200, generator=gen)
    weight, bias = params(200, torch.float32, "wb", gen)
    dy = torch.randn(130, 200, generator=gen)
    got = grads(rms_norm, x, weight, bias, dy, wanted)
    want = grads(rms_norm_composite, x.double(), weight.double(), bias.double(), dy.double(), wanted)
    for name, g, w in zip("xwb", got, want, strict=True):
        assert (g is None) == (name not in wanted)
        if g is not None:
            assert max_rel_err(g, w) <= 1e-5, name


def test_module_trains(backend: str, gen: torch.Generator) -> None:
    """normswap.norm.RMSNorm end to end: a few SGD steps reduce the loss under either backend."""
    torch.manual_seed(0)
    norm = RMSNorm(64)
    x = torch.randn(32, 10, 64, generator=gen)
    target = torch.randn(32, 10, 64, generator=gen)
    opt = torch.optim.SGD(norm.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(norm(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert norm.weight.grad is not None and norm.bias.grad is not None


def test_fused_and_composite_gradients_agree_in_fp32(fused_available: bool, gen: torch.Generator) -> None:
    if not fused_available:
        pytest.skip("fused extension unavailable")
    x = torch.randn(257, 129, generator=gen)
    weight, bias = params(129, torch.float32, "wb", gen)
    dy = torch.randn(257, 129, generator=gen)
    for g, c in zip(
        grads(rms_norm_fused, x, weight, bias, dy, "xwb"),
        grads(rms_norm_composite, x, weight, bias, dy, "xwb"),
        strict=True,
    ):
        torch.testing.assert_close(g, c, rtol=1e-5, atol=1e-5)


# ---- dispatch -----------------------------------------------------------------------------------------------------


def test_default_dispatch_on_cpu(monkeypatch: pytest.MonkeyPatch, fused_available: bool) -> None:
    monkeypatch.delenv("NORMSWAP_KERNEL", raising=False)
    expected = "fused" if fused_available else "composite"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert selected_backend(torch.ones(2, 8, dtype=dtype)) == expected
    x = torch.ones(2, 8, requires_grad=True)
    assert selected_backend(x) == expected  # training uses the fused backward too
    assert selected_backend(torch.ones(2, 8, dtype=torch.float64)) == "composite"  # no fp64 kernel


def test_env_var_forces_backend(monkeypatch: pytest.MonkeyPatch, fused_available: bool) -> None:
    x = torch.randn(4, 16)
    monkeypatch.setenv("NORMSWAP_KERNEL", "composite")
    assert selected_backend(x) == "composite"
    monkeypatch.setenv("NORMSWAP_KERNEL", " Fused ")
    assert selected_backend(x) == ("fused" if fused_available else "composite")
    monkeypatch.setenv("NORMSWAP_KERNEL", "auto")
    assert selected_backend(x) == ("fused" if fused_available else "composite")
    monkeypatch.setenv("NORMSWAP_KERNEL", "triton")
    with pytest.raises(ValueError, match="NORMSWAP_KERNEL"):
        rms_norm(x, None, None, EPS)


# ---- build failure fallback ---------------------------------------------------------------------------------------


@pytest.fixture
def broken_build(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Simulate a machine where the extension cannot compile; module state is restored afterwards."""

    def fail() -> None:
        raise OSError("simulated: no C++ compiler")

    monkeypatch.setattr(_build, "_module", None)
    monkeypatch.setattr(_build, "_error", None)
    monkeypatch.setattr(_build, "_compile", fail)
    monkeypatch.delenv("NORMSWAP_KERNEL", raising=False)
    monkeypatch.delenv(_build.REQUIRE_ENV, raising=False)  # the fallback itself is under test (CI sets it)
    yield


@pytest.mark.usefixtures("broken_build")
def test_build_failure_warns_once_and_falls_back(gen: torch.Generator) -> None:
    x = torch.randn(10, 33, generator=gen)
    weight, bias = params(33, torch.float32, "wb", gen)
    with pytest.warns(RuntimeWarning, match="simulated: no C\\+\\+ compiler"):
        y = rms_norm(x, weight, bias, EPS)
    assert max_rel_err(y, reference(x, weight, bias)) <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any second warning fails the test
        for _ in range(3):
            y = rms_norm(x, weight, bias, EPS)
        assert selected_backend(x) == "composite"
    assert _build.load_error() is not None and "simulated" in _build.load_error()
    with pytest.raises(RuntimeError, match="unavailable"):
        rms_norm_fused(x, weight, bias, EPS)


@pytest.mark.usefixtures("broken_build")
def test_build_failure_with_forced_fused_still_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMSWAP_KERNEL", "fused")
    x = torch.randn(5, 16)
    with pytest.warns(RuntimeWarning):
        assert kernels.selected_backend(x) == "composite"
    torch.testing.assert_close(rms_norm(x, None, None, EPS), reference(x, None, None).float())


# ---- NORMSWAP_REQUIRE_KERNEL (CI) and the first-build message ------------------------------------------------------


@pytest.mark.usefixtures("broken_build")
def test_required_kernel_makes_a_failed_build_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """What .ci/run sets: a kernel that does not compile fails the tests instead of skipping them."""
    monkeypatch.setenv(_build.REQUIRE_ENV, "1")
    x = torch.randn(5, 16)
    with pytest.raises(_build.KernelBuildError, match="NORMSWAP_REQUIRE_KERNEL.*simulated: no C\\+\\+ compiler"):
        rms_norm(x, None, None, EPS)
    with pytest.raises(_build.KernelBuildError):  # and it stays an error, not a silent fallback on the next call
        selected_backend(x)
    monkeypatch.setenv(_build.REQUIRE_ENV, "0")
    assert selected_backend(x) == "composite"


def test_ci_requires_the_kernel() -> None:
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert f"export {_build.REQUIRE_ENV}=1" in ci


def test_first_build_is_announced(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import torch.utils.cpp_extension as cpp_extension

    fake = types.ModuleType("fake_ext")
    monkeypatch.setattr(cpp_extension, "load", lambda **_kw: fake)
    monkeypatch.setattr(_build, "_module", None)
    monkeypatch.setattr(_build, "_error", None)
    monkeypatch.setattr(_build, "_cached", lambda _name: False)
    with caplog.at_level(logging.INFO, logger="normswap.kernels"):
        assert _build.load() is fake
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "normswap.kernels"]
    assert messages[0][0] == logging.WARNING and "building the fused RMSNorm kernel (once" in messages[0][1]
    caplog.clear()
    monkeypatch.setattr(_build, "_module", None)
    monkeypatch.setattr(_build, "_cached", lambda _name: True)
    with caplog.at_level(logging.INFO, logger="normswap.kernels"):
        assert _build.load() is fake
    assert not [r for r in caplog.records if r.name == "normswap.kernels"], "a cached build loads silently"


def test_cli_shows_the_build_message(tmp_path: Path) -> None:
    """The CLI's own logging set-up prints it (on stderr), with nothing below the CLI printing."""
    code = (
        "import types, torch.utils.cpp_extension as c\n"
        "from normswap.cli import _configure_logging\n"
        "from normswap.kernels import _build\n"
        "_configure_logging(False)\n"
        "c.load = lambda **kw: types.ModuleType('fake')\n"
        "_build._cached = lambda name: False\n"
        "_build.load()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "building the fused RMSNorm kernel (once" in proc.stderr and proc.stdout == ""
