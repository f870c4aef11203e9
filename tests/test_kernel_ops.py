"""The fused RMSNorm as registered operators (``normswap::rms_norm``, ``normswap::rms_norm_backward``): opcheck,
gradients, and what ``torch.compile`` / ``torch.jit.trace`` record (issue 11 item 12).

Compiles use small backends (a graph recorder, ``aot_autograd`` with the recorder) so the tests stay fast; numbers are
checked against eager and against the float64 formula.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from test_kernels import EPS, grads, max_rel_err, params, reference

from normswap.kernels import _build, rms_norm, rms_norm_composite, selected_backend
from normswap.norm import RMSNorm


@pytest.fixture(scope="module")
def fused_available() -> bool:
    return _build.load() is not None


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(4321)


# ---- the registered operator ---------------------------------------------------------------------------------------


def _op_samples(gen: torch.Generator) -> list[tuple[tuple, dict]]:
    """Inputs for opcheck: every affine mode, low precision, mixed-precision params, grads on some, odd shapes."""
    out = []
    for dtype, shape, affine, grad in [
        (torch.float32, (4, 33), "wb", "xwb"),
        (torch.float32, (2, 3, 64), "w", "x"),
        (torch.bfloat16, (5, 40), "wb", "wb"),
        (torch.float16, (3, 17), "none", "x"),
        (torch.float32, (6, 24), "b", "xb"),
    ]:
        x = torch.randn(shape, generator=gen).to(dtype).requires_grad_("x" in grad)
        weight, bias = params(shape[-1], dtype, affine, gen)
        weight = None if weight is None else weight.requires_grad_("w" in grad)
        bias = None if bias is None else bias.requires_grad_("b" in grad)
        out.append(((x, weight, bias, EPS), {}))
    x = torch.randn(4, 32, generator=gen).to(torch.bfloat16).requires_grad_()
    out.append(((x, torch.randn(32, generator=gen), torch.randn(32, generator=gen).requires_grad_(), EPS), {}))
    return out


def test_operator_passes_opcheck(fused_available: bool, gen: torch.Generator) -> None:
    """Schema, fake kernel, autograd registration and (AOT) dispatch all consistent with the real kernel."""
    if not fused_available:
        pytest.skip(f"fused extension could not be built here: {_build.load_error()}")
    for args, kwargs in _op_samples(gen):
        torch.library.opcheck(torch.ops.normswap.rms_norm.default, args, kwargs)
    x = torch.randn(7, 48, generator=gen)
    weight, _ = params(48, torch.float32, "w", gen)
    y, rstd = torch.ops.normswap.rms_norm(x, weight, None, EPS)
    torch.testing.assert_close(rstd.double(), reference(x, None, None).div(x.double()).mean(-1), rtol=1e-5, atol=0)
    for flags in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        args = (torch.randn(7, 48, generator=gen), x, weight, rstd, *flags)
        torch.library.opcheck(torch.ops.normswap.rms_norm_backward.default, args)


def test_operator_gradients_match_float64(fused_available: bool, gen: torch.Generator) -> None:
    if not fused_available:
        pytest.skip("fused extension unavailable")
    from normswap.kernels.ops import rms_norm_op

    x = torch.randn(64, 96, generator=gen)
    weight, bias = params(96, torch.float32, "wb", gen)
    dy = torch.randn(64, 96, generator=gen)
    got = grads(rms_norm_op, x, weight, bias, dy, "xwb")
    want = grads(rms_norm_composite, x.double(), weight.double(), bias.double(), dy.double(), "xwb")
    for g, w in zip(got, want, strict=True):
        assert max_rel_err(g, w) <= 1e-5


class _GraphRecorder:
    """A torch.compile backend that keeps the FX graphs dynamo hands it and runs them eagerly."""

    def __init__(self, boxed: bool = False) -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        self.boxed = boxed  # aot_autograd calls its compilers' output with one list of arguments

    def __call__(self, gm: torch.fx.GraphModule, _inputs: list) -> Callable:
        from functorch.compile import make_boxed_func

        self.graphs.append(gm)
        return make_boxed_func(gm.forward) if self.boxed else gm.forward

    def targets(self) -> set[str]:
        """Called operators, by name without the overload (``normswap.rms_norm``)."""
        return {str(n.target).removesuffix(".default") for gm in self.graphs for n in gm.graph.nodes
                if n.op == "call_function"}


def test_compiling_uses_composite_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """While dynamo traces, auto dispatch hands inductor plain ops it can fuse with the residual add."""
    monkeypatch.delenv("NORMSWAP_KERNEL", raising=False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert selected_backend(torch.randn(4, 16)) == "composite"


def test_torch_compile_full_graph(monkeypatch: pytest.MonkeyPatch, gen: torch.Generator) -> None:
    """A real dynamo trace of the module (eager backend keeps it fast): no graph break, same numbers."""
    monkeypatch.delenv("NORMSWAP_KERNEL", raising=False)
    torch._dynamo.reset()
    norm = RMSNorm(48)
    compiled = torch.compile(norm, backend="eager", fullgraph=True)
    x = torch.randn(3, 7, 48, generator=gen)
    torch.testing.assert_close(compiled(x), norm(x))
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_compile_records_the_operator(
    monkeypatch: pytest.MonkeyPatch, fused_available: bool, gen: torch.Generator, dtype: torch.dtype
) -> None:
    """NORMSWAP_KERNEL=fused under dynamo: one graph (fullgraph) holding normswap::rms_norm, eager's numbers exactly."""
    if not fused_available:
        pytest.skip("fused extension unavailable")
    monkeypatch.setenv("NORMSWAP_KERNEL", "fused")
    torch._dynamo.reset()
    norm = RMSNorm(48, dtype=dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3, generator=gen)
        norm.bias.normal_(0.0, 0.1, generator=gen)
    recorder = _GraphRecorder()
    compiled = torch.compile(norm, backend=recorder, fullgraph=True)
    x = (2.0 * torch.randn(3, 7, 48, generator=gen) + 0.3).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), norm(x), rtol=0, atol=0)
    assert "normswap.rms_norm" in recorder.targets()
    torch._dynamo.reset()


def test_torch_compile_trains_through_the_fused_backward(
    monkeypatch: pytest.MonkeyPatch, fused_available: bool, gen: torch.Generator
) -> None:
    """aot_autograd splits forward and backward: the backward graph must call the fused backward op."""
    if not fused_available:
        pytest.skip("fused extension unavailable")
    from torch._dynamo.backends.common import aot_autograd

    monkeypatch.setenv("NORMSWAP_KERNEL", "fused")
    torch._dynamo.reset()
    recorder = _GraphRecorder(boxed=True)
    backend = aot_autograd(fw_compiler=recorder, bw_compiler=recorder)
    x = torch.randn(16, 40, generator=gen)
    weight, bias = params(40, torch.float32, "wb", gen)
    dy = torch.randn(16, 40, generator=gen)
    compiled = torch.compile(rms_norm, backend=backend, fullgraph=True)
    got = grads(compiled, x, weight, bias, dy, "xwb")
    want = grads(rms_norm_composite, x.double(), weight.double(), bias.double(), dy.double(), "xwb")
    for g, w in zip(got, want, strict=True):
        assert max_rel_err(g, w) <= 1e-5
    assert {"normswap.rms_norm", "normswap.rms_norm_backward"} <= recorder.targets()
    torch._dynamo.reset()


@pytest.mark.parametrize("forced", ["composite", "auto"])
def test_torch_compile_composite(monkeypatch: pytest.MonkeyPatch, gen: torch.Generator, forced: str) -> None:
    """By default (and when forced) the compiler gets plain ops, for inductor to fuse with their neighbours."""
    monkeypatch.setenv("NORMSWAP_KERNEL", forced)
    torch._dynamo.reset()
    norm = RMSNorm(48)
    recorder = _GraphRecorder()
    compiled = torch.compile(norm, backend=recorder, fullgraph=True)
    x = torch.randn(3, 7, 48, generator=gen)
    torch.testing.assert_close(compiled(x), norm(x))
    assert not any(t.startswith("normswap.") for t in recorder.targets())
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
@pytest.mark.parametrize("forced", ["auto", "fused"])
def test_jit_trace_records_real_ops(
    monkeypatch: pytest.MonkeyPatch, gen: torch.Generator, fused_available: bool, forced: str
) -> None:
    """torch.jit.trace must not freeze the first output as a constant (what tracing an extension call does): by
    default it records stock ops (a portable TorchScript artifact), with NORMSWAP_KERNEL=fused the operator."""
    monkeypatch.setenv("NORMSWAP_KERNEL", forced)
    norm = RMSNorm(24).eval()
    with torch.no_grad():
        traced = torch.jit.trace(norm, torch.randn(2, 24, generator=gen))
        other = torch.randn(2, 24, generator=gen)
        torch.testing.assert_close(traced(other), norm(other))
    recorded = "normswap::rms_norm" in str(traced.graph)
    assert recorded == (forced == "fused" and fused_available)
