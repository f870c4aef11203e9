"""A discovered adapter and the declared pin for the same model resolve to the same concrete roles.

Compared through :func:`normswap.structure.resolve` (what surgery, streaming and training all use): the same norms
(exactness, re-centring), the same run-time re-centrings and LayerScales, and the same writer *tensors*. Writers are
compared by storage, not name, because a tied table has several names (mBART's ``shared`` is
``encoder.embed_tokens``); a pin may list more only where the extra tensor never takes part in this class's forward
(``mask_token`` of an image classifier, which has no masking input).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import EXACT_ROWS, make
from torch import nn

from normswap.adapters import get_adapter
from normswap.discovery import discover
from normswap.structure import Structure, resolve
from normswap.verify import make_probes


def _tensors(model: nn.Module, s: Structure) -> dict[int, str]:
    """Storage pointer -> a name, for every weight/bias/parameter a writer centres."""
    found = {}
    for w in s.centred_writers:
        if w.is_parameter:
            params = [model.get_parameter(w.name)]
        else:
            module = model.get_submodule(w.name)
            params = [p for p in (getattr(module, "weight", None), getattr(module, "bias", None)) if p is not None]
        for p in params:
            found[p.data_ptr()] = w.name
    return found


def _unused(model: nn.Module, names: set[str]) -> set[str]:
    """Of ``names``, the writers whose parameters get no gradient from the model's output (never used)."""
    model.zero_grad()
    out = model(**make_probes(model, seq_len=8))
    first = out.to_tuple()[0] if hasattr(out, "to_tuple") else out[0]
    first.float().pow(2).mean().backward()
    unused = set()
    for name in names:
        obj = _get(model, name)
        params = [obj] if isinstance(obj, nn.Parameter) else list(obj.parameters(recurse=False))
        if all(p.grad is None or not bool(p.grad.abs().sum()) for p in params):
            unused.add(name)
    return unused


def _get(model: nn.Module, name: str):
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_submodule(name)


@pytest.mark.parametrize("row", sorted(EXACT_ROWS))
def test_discovery_reproduces_the_pin(row):
    model = make(row)
    found = discover(model)
    assert found.adapter is not None, f"discovery found no LayerNorm in {row}"
    pin = resolve(model, get_adapter(model.config.model_type))
    got = resolve(model, found.adapter)

    norms = lambda s: {(n.name, n.exact, n.writes_stream) for n in s.norms}  # noqa: E731
    assert norms(got) == norms(pin)
    assert got.recentered_writers == pin.recentered_writers
    assert set(got.scales) == set(pin.scales)
    theirs, ours = _tensors(model, got), _tensors(model, pin)
    assert set(theirs) <= set(ours), sorted(theirs[k] for k in set(theirs) - set(ours))
    extra = {ours[k] for k in set(ours) - set(theirs)}
    with torch.enable_grad():
        assert extra <= _unused(model.train(False), extra), f"pin-only writers that the model uses: {extra}"
