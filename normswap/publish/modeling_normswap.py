"""RMSNorm for a checkpoint converted by normswap, loadable with plain transformers (``trust_remote_code=True``).

normswap copies this file into every output folder, followed by a few generated class definitions, and points
``auto_map`` in ``config.json`` at them. It deliberately imports only torch and transformers: people who load a
published checkpoint do not have normswap installed.

Each generated model class subclasses the stock transformers class and, as soon as the stock ``__init__`` has built
the modules (before any weight is loaded), replaces every LayerNorm named in ``config.normswap["swapped_norms"]``
with :class:`RMSNorm`. The replacement keeps the parameter names ``weight`` and ``bias``, so the checkpoint's keys load
unchanged, and the maths is exactly normswap's (same op order, so the logits match ``normswap.load``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
import transformers  # noqa: F401 - the generated classes at the end subclass transformers.<Class>
from torch import nn

logger = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x**2) + eps) * weight + bias`` over the last dim, in float32 for fp16/bf16 inputs.

    Low-precision inputs are normalised in float32 and cast back once, because rounding ``x / rms`` before the gain
    multiply loses accuracy; this mirrors normswap's reference kernel so both give the same numbers.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        y = _rms(x.float(), None, eps)
        if weight is not None:
            y = y * weight.float()
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)
    y = _rms(x, weight, eps)
    return y + bias if bias is not None else y


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    if hasattr(F, "rms_norm"):  # torch >= 2.4
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return y * weight if weight is not None else y


def _eps(norm: nn.Module) -> float:
    """A LayerNorm-like module's epsilon, whatever its class calls it (OlmoLayerNorm hard-codes F.layer_norm's 1e-5)."""
    for attr in ("eps", "variance_epsilon", "epsilon", "layer_norm_eps"):
        value = getattr(norm, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 1e-5


def _is_layernorm(module: nn.Module) -> bool:
    """``nn.LayerNorm`` or a model's own ``*LayerNorm`` class (CohereLayerNorm, OlmoLayerNorm), not an RMSNorm."""
    if isinstance(module, RMSNorm) or "rmsnorm" in type(module).__name__.lower():
        return False
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("LayerNorm")


def _recenter_output(_module, _inputs, output):
    """Forward hook: re-centre a nonlinear writer's output (or a tuple's first element) along the hidden axis."""
    if isinstance(output, torch.Tensor):
        return output - output.mean(dim=-1, keepdim=True)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (output[0] - output[0].mean(dim=-1, keepdim=True), *output[1:])
    return output


def _recenter_input(_module, args, kwargs):
    """Forward pre-hook: re-centre a module's first input (Whisper's first encoder layer after the inline GELU stem)."""
    if args and isinstance(args[0], torch.Tensor):
        return (args[0] - args[0].mean(dim=-1, keepdim=True), *args[1:]), kwargs
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        x = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": x - x.mean(dim=-1, keepdim=True)}
    return None


def install_recentering_(model: nn.Module, recentered: dict) -> int:
    """Re-install the run-time re-centrings the conversion relied on (``{module name: "output"|"input"}``)."""
    count = 0
    for name, kind in (recentered or {}).items():
        found = _resolve(model, name)
        if found is None:
            logger.info("normswap: %s is not part of %s; no re-centring installed", name, type(model).__name__)
            continue
        module = found[1]
        if kind == "output" and _recenter_output not in module._forward_hooks.values():
            module.register_forward_hook(_recenter_output)
            count += 1
        elif kind == "input" and _recenter_input not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_recenter_input, with_kwargs=True)
            count += 1
    return count


class RMSNorm(nn.Module):
    """RMSNorm with an optional bias, holding the parameters of the LayerNorm it replaces (same names, no copy).

    On a zero-mean input it equals that LayerNorm, which is why an exact conversion also loads in the stock class.
    """

    def __init__(self, layernorm: nn.Module) -> None:
        super().__init__()
        weight = getattr(layernorm, "weight", None)
        bias = getattr(layernorm, "bias", None)
        shape = getattr(layernorm, "normalized_shape", None)
        if shape is None:
            shape = tuple(weight.shape)
        self.normalized_shape = (int(shape),) if isinstance(shape, int) else tuple(shape)
        self.eps = _eps(layernorm)
        self.elementwise_affine = isinstance(weight, nn.Parameter)
        self.weight = weight if isinstance(weight, nn.Parameter) else None
        self.bias = bias if isinstance(bias, nn.Parameter) else None
        self.train(layernorm.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, bias={self.bias is not None}"


class CenteredRMSNorm(RMSNorm):
    """RMSNorm whose output is re-centred to zero mean: for a norm that writes into the residual stream.

    Every later RMSNorm needs a zero-mean stream, and ``weight * x_hat + bias`` is not zero-mean (BLOOM's embedding
    norm is the case in point).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y - y.mean(dim=-1, keepdim=True)


def _resolve(model: nn.Module, name: str) -> tuple[str, nn.Module] | None:
    """Find ``name`` (recorded on the saved class) in ``model``, which may be the base model or another head.

    Names carry the saved class's ``base_model_prefix`` (``transformer.h.0.ln_1``); the bare base model lacks it, and a
    head class loading a base-model checkpoint needs it added.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [name]
    if prefix and name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1:])
    elif prefix:
        candidates.append(f"{prefix}.{name}")
    for candidate in candidates:
        try:
            return candidate, model.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def swap_layernorms_(model: nn.Module, names, recentered=()) -> int:
    """Replace the listed LayerNorms of ``model`` by RMSNorm (CenteredRMSNorm for ``recentered``); returns the count.

    A listed norm outside the base model (a head norm) may be absent when the checkpoint is loaded into another head
    class: it is skipped. A norm inside the base model that cannot be found means the metadata does not describe this
    model, and loading it with LayerNorm would be silently wrong, so that raises.
    """
    recentered = set(recentered)
    prefix = getattr(model, "base_model_prefix", "") or ""
    count = 0
    for name in names:
        found = _resolve(model, name)
        if found is None:
            if prefix and name.startswith(prefix + "."):
                raise ValueError(f"normswap metadata lists {name} as an RMSNorm, but {type(model).__name__} has no such module")
            logger.info("normswap: %s is not part of %s; left as is", name, type(model).__name__)
            continue
        full, module = found
        if isinstance(module, RMSNorm):
            continue
        if not _is_layernorm(module):
            raise ValueError(f"normswap metadata lists {full} as a LayerNorm to swap, but it is a {type(module).__name__}")
        cls = CenteredRMSNorm if name in recentered else RMSNorm
        parent_name, _, child = full.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, cls(module))
        count += 1
    return count


def fold_saved_batchnorms_(model: nn.Module, entries) -> int:
    """Remove each BatchNorm that normswap folded (``config.normswap["batchnorm_folded"]``); returns the count.

    The checkpoint stores them as ``x + c`` per channel so the stock class loads it; here the map ``x·s + t`` (s = 1
    up to rounding) moves into the producing conv/linear (a bias is created if it has none, float64, cast back
    once) and the BatchNorm becomes ``nn.Identity``: the same function, one op fewer. Needs the loaded weights.
    """
    count = 0
    for entry in entries:
        bn_found, layer_found = _resolve(model, entry["batchnorm"]), _resolve(model, entry["into"])
        if bn_found is None and layer_found is None:
            continue  # a head that this class does not have
        if bn_found is None or layer_found is None:
            raise ValueError(f"normswap metadata folds {entry['batchnorm']} into {entry['into']}, but "
                             f"{type(model).__name__} has only one of them")
        (bn_name, bn), (_, layer) = bn_found, layer_found
        if isinstance(bn, nn.Identity):
            continue
        with torch.no_grad():
            s = torch.rsqrt(bn.running_var.double() + bn.eps)
            s = s * bn.weight.double() if bn.weight is not None else s
            t = -bn.running_mean.double() * s + (bn.bias.double() if bn.bias is not None else 0.0)
            w = layer.weight
            bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(s)
            w.copy_((w.double() * s.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
            new_bias = (bias * s + t).to(w.dtype)
            if layer.bias is None:
                layer.bias = nn.Parameter(new_bias, requires_grad=w.requires_grad)
            else:
                layer.bias.copy_(new_bias)
        parent_name, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
        count += 1
    return count


class NormswapMixin:
    """Put before the stock class: ``class NormswapGPT2LMHeadModel(NormswapMixin, transformers.GPT2LMHeadModel)``."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        meta = getattr(config, "normswap", None)
        if isinstance(meta, dict) and meta.get("swapped_norms"):
            swap_layernorms_(self, meta["swapped_norms"], meta.get("recentered_norms") or ())
        if isinstance(meta, dict) and meta.get("recentered_writers"):
            install_recentering_(self, meta["recentered_writers"])

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Folded BatchNorms are removed after the weights are loaded (their values are needed)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        meta = getattr(model.config, "normswap", None)
        if isinstance(meta, dict) and meta.get("batchnorm_folded"):
            fold_saved_batchnorms_(model, meta["batchnorm_folded"])
        return loaded


def share_weight_conversions(stock_model_type: str, classes: dict, custom_model_type: str | None = None) -> None:
    """Let the generated classes load checkpoints saved under legacy key names, as the stock classes do.

    transformers renames legacy keys (e.g. ViT's ``encoder.layer.N.attention.output.dense``) through conversion
    mappings looked up by class name or ``model_type``, and skips that lookup for custom code unless the mapping was
    registered for the custom name. ``classes`` maps each generated class name to its stock class name. Older
    transformers versions have no such registry, and need nothing.
    """
    try:
        from transformers import conversion_mapping
    except ImportError:
        return
    get = getattr(conversion_mapping, "get_checkpoint_conversion_mapping", None)
    register = getattr(conversion_mapping, "register_checkpoint_conversion_mapping", None)
    if get is None or register is None:
        return
    pairs = list(classes.items()) + ([(custom_model_type, stock_model_type)] if custom_model_type else [])
    for custom, stock in pairs:
        mapping = get(stock) or get(stock_model_type)
        if mapping:
            register(custom, mapping, overwrite=True)


# The classes below are generated by normswap for this checkpoint.
