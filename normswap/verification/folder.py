"""Verify a converted folder against its original folder, holding one module's weights at a time.

Both models are built as skeletons: every parameter is a placeholder with the right shape and no memory (buffers,
which the checkpoint usually does not hold, are built for real by the model's own constructor). The three runs of
:mod:`normswap.verification.engine` then read each module's tensors from the safetensors files just before that
module runs and drop them right after. The LM head is computed in chunks of vocabulary rows and an embedding
table reads only the rows of the probe tokens, so the largest tensor is never held whole. Peak memory is Python,
torch and transformers plus one module's weights in float64, whatever the checkpoint size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn

from normswap.adapters import adapter_for_config
from normswap.errors import CheckpointError, NormswapError
from normswap.streaming.plan import NameMap, loaded_names, loaded_prefix
from normswap.streaming.safetensors_io import TORCH_DTYPES, TensorEntry, read_tensor
from normswap.streaming.source import SourceCheckpoint, open_checkpoint
from normswap.verification.engine import all_writers, is_logits, judge
from normswap.verification.runs import capture, dtype_name
from normswap.verification.structure import resolve_blocks
from normswap.verify import VerificationResult, make_probes

#: Rows of the LM head read at once: bounded in bytes at float64, so the head never exists whole in memory.
HEAD_CHUNK_BYTES = 64 * 2**20


@contextmanager
def _parameters_on_meta():
    """Build modules with their parameters on the meta device and their buffers for real (buffers such as rotary
    frequencies are computed in constructors and are usually not in the checkpoint)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":  # a meta one is a tie: keep the very same object
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def skeleton(config, model_cls: type) -> nn.Module:
    """``model_cls`` built from ``config`` with placeholder parameters: right shapes, one element of memory each."""
    with _parameters_on_meta():
        if isinstance(model_cls, type) and issubclass(model_cls, transformers.PreTrainedModel):
            model = model_cls._from_config(config)
        else:  # an Auto class (a config without ``architectures``), as streaming builds it
            model = model_cls.from_config(config)
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # from_pretrained ties a head the file omits; the skeleton must share it the same way
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in replaced:
                holder = torch.zeros((), dtype=p.dtype).expand(p.shape)
                replaced[id(p)] = nn.Parameter(holder, requires_grad=False)
            module._parameters[name] = replaced[id(p)]
    return model.eval()


@dataclass
class FileWeights:
    """The tensors of one checkpoint folder, looked up by loaded-model name and read on demand."""

    checkpoint: SourceCheckpoint
    names: NameMap
    #: loaded parameter name -> every loaded name of the same (tied) parameter
    aliases: dict[str, list[str]]
    fds: dict[Path, int] = field(default_factory=dict)

    def entry(self, name: str) -> TensorEntry | None:
        for alias in self.aliases.get(name, [name]):
            key = self.names.find(alias)
            if key is not None:
                return self.checkpoint.tensors[key]
        return None

    def read(self, entry: TensorEntry, start: int = 0, count: int | None = None) -> torch.Tensor:
        if entry.file not in self.fds:
            self.fds[entry.file] = os.open(entry.file, os.O_RDONLY)
        return read_tensor(self.fds[entry.file], entry, start, count)

    def provider(self) -> Callable:
        def provide(name: str, current: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            entry = self.entry(name)
            is_param = name in self.aliases
            if entry is None or (not is_param and tuple(entry.shape) != tuple(current.shape)):
                if is_param:  # a parameter must come from the file
                    raise CheckpointError(f"{self.checkpoint.folder} holds no tensor for {name} (looked for "
                                          f"{', '.join(self.names.candidates(name))})")
                return current.to(dtype)  # a buffer the constructor built (a legacy mask buffer is ignored)
            if tuple(entry.shape) != tuple(current.shape):
                raise CheckpointError(f"{entry.name} in {self.checkpoint.folder} has shape {list(entry.shape)}, but "
                                      f"the config makes {name} {list(current.shape)}")
            return self.read(entry).to(dtype)
        return provide

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _file_weights(folder: Path, model: nn.Module, adapter) -> FileWeights:
    checkpoint = open_checkpoint(folder)
    names = NameMap(adapter, loaded_prefix(type(model), model.config), set(checkpoint.tensors))
    # transformers' own renaming of the file's keys (BEiT's lambda_1, legacy spellings), as streaming uses it
    names.renamed = loaded_names(model, set(checkpoint.tensors))
    by_param: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
    aliases = {n: group for group in by_param.values() for n in group}
    return FileWeights(checkpoint, names, aliases)


def _overrides(model: nn.Module, weights: FileWeights, dtype_box: list) -> Callable:
    """Chunked forwards for the LM head (rows by rows) and embedding tables (the probe tokens' rows only)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}

    def override(name: str, module: nn.Module):
        if module is head and type(module) is nn.Linear:
            entry = weights.entry(f"{name}.weight")
            bias_entry = weights.entry(f"{name}.bias") if module.bias is not None else None

            def head_forward(x: torch.Tensor) -> torch.Tensor:
                dtype = dtype_box[0]
                x = x.to(dtype)
                rows, hidden = entry.shape
                step = max(1, HEAD_CHUNK_BYTES // (hidden * 8))
                bias = weights.read(bias_entry).to(dtype) if bias_entry is not None else None
                parts = []
                for r0 in range(0, rows, step):
                    n = min(step, rows - r0)
                    w = weights.read(entry, r0 * hidden, n * hidden).view(n, hidden).to(dtype)
                    parts.append(nn.functional.linear(x, w, None if bias is None else bias[r0:r0 + n]))
                return torch.cat(parts, -1)
            return head_forward if entry is not None else None
        if type(module) is nn.Embedding and module.max_norm is None and names.get(id(module)) is not None:
            entry = weights.entry(f"{name}.weight")
            if entry is None:
                return None

            def embed_forward(ids: torch.Tensor) -> torch.Tensor:
                unique, inverse = torch.unique(ids, return_inverse=True)
                hidden = entry.shape[1]
                rows = [weights.read(entry, int(i) * hidden, hidden) for i in unique]
                table = torch.stack(rows).to(dtype_box[0])
                return nn.functional.embedding(inverse, table)
            return embed_forward
        return None
    return override


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise NormswapError(f"{folder} has no readable config.json ({type(exc).__name__}); pass a model folder") from exc


def _check_inputs(converted: Path, original: Path) -> tuple[dict, dict]:
    for folder, what in ((converted, "converted"), (original, "original")):
        if not folder.is_dir():
            raise NormswapError(f"the {what} folder {folder} does not exist or is not a folder")
    out_cfg, src_cfg = _read_config(converted), _read_config(original)
    meta = out_cfg.get("normswap")
    if not isinstance(meta, dict) or "swapped_norms" not in meta:
        raise NormswapError(f"{converted} is not a normswap output: its config.json has no 'normswap' metadata")
    if isinstance(src_cfg.get("normswap"), dict):
        raise NormswapError(f"{original} is itself a normswap output; pass the original (LayerNorm) model with --against")
    from normswap.publish.remote_code import stock_identity  # outputs only right with RMSNorm carry normswap_ names

    (a, arch_a), (b, arch_b) = stock_identity(out_cfg), stock_identity(src_cfg)
    if a != b or (arch_a and arch_b and arch_a != arch_b):  # a config without architectures loads as AutoModel
        raise NormswapError(f"the architectures do not match: {converted} is {a} {arch_a}, {original} is {b} {arch_b}")
    return out_cfg, meta


def _dominant_dtype(checkpoint: SourceCheckpoint) -> torch.dtype:
    sizes: dict[str, int] = {}
    for e in checkpoint.tensors.values():
        if e.dtype in TORCH_DTYPES and TORCH_DTYPES[e.dtype].is_floating_point:
            sizes[e.dtype] = sizes.get(e.dtype, 0) + e.nbytes
    return TORCH_DTYPES[max(sizes, key=sizes.get)] if sizes else torch.float32


def _tokenizer(folder: Path):
    """The tokenizer ``normswap convert`` would have used for the probes (same rule as ``load_source``)."""
    from normswap.checkpoint import usable_tokenizer

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception:  # noqa: BLE001 - no tokenizer: random ids
        return None
    return tokenizer if usable_tokenizer(tokenizer) else None


def verify_folder(converted: str | os.PathLike, original: str | os.PathLike, *, dtype: torch.dtype | None = None,
                  tolerance: float | None = None) -> VerificationResult:
    """The block-by-block certificate of ``converted`` against ``original`` (both local save_pretrained folders).

    Raises :class:`NormswapError` for input that cannot be verified (missing folder, not a normswap output,
    different architectures, an original that is not finite in float64); returns the result otherwise.
    """
    from normswap.checkpoint import checkpoint_keys, model_class_for
    from normswap.publish import load_output_config
    from normswap.surgery import swap_named_norms_

    converted, original = Path(converted), Path(original)
    _, meta = _check_inputs(converted, original)
    try:
        src_config = transformers.AutoConfig.from_pretrained(str(original))
        out_config = load_output_config(str(converted))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"could not read the configs: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    src_cls = model_class_for(src_config, checkpoint_keys(original))  # no `architectures`: the class using them all
    adapter = adapter_for_config(src_config, src_cls)  # declared, else discovered
    src_model = skeleton(src_config, src_cls)
    out_model = skeleton(out_config, model_class_for(out_config, checkpoint_keys(converted)))
    try:
        swap_named_norms_(out_model, meta["swapped_norms"], meta.get("recentered_norms", ()))
    except Exception as exc:  # noqa: BLE001 - metadata naming modules this model does not have
        raise NormswapError(f"{converted}: its normswap metadata does not fit its architecture ({exc})") from exc
    with ExitStack() as stack:
        src_w = _file_weights(original, src_model, adapter)
        stack.callback(src_w.close)
        out_w = _file_weights(converted, out_model, adapter)
        stack.callback(out_w.close)
        dtype = dtype or _dominant_dtype(out_w.checkpoint)
        tokenizer = _tokenizer(original)
        probes = make_probes(src_model, tokenizer)
        src_blocks, out_blocks = resolve_blocks(src_model, adapter), resolve_blocks(out_model, adapter)
        box: list = [torch.float64]
        src_override = _overrides(src_model, src_w, box)
        truth = capture(src_model, probes, torch.float64, src_blocks, provider=src_w.provider(),
                        override=src_override, what="the original")
        box[0] = dtype
        orig = capture(src_model, probes, dtype, src_blocks, provider=src_w.provider(), override=src_override,
                       what="the original")
        approximate = set(meta.get("approximate_norms") or [])
        norms = {n: n not in approximate for n in meta["swapped_norms"]}
        conv = capture(out_model, probes, dtype, out_blocks, provider=out_w.provider(),
                       override=_overrides(out_model, out_w, box), writers=all_writers(out_model, adapter, out_blocks),
                       norms=list(norms), what="the converted model")
    desc = "tokenizer text + random ids" if tokenizer is not None else "random inputs"
    scope = (f"every block of {converted.name} against {original.name}, weights read module by module from the "
             f"files, in float64 and {dtype_name(dtype)}")
    return judge(truth, orig, conv, blocks=out_blocks, norms=norms, mode=meta.get("mode", "exact"),
                 logits=is_logits(out_model, conv.output), tolerance=tolerance, probe=desc, scope=scope,
                 raw_outputs=adapter.raw_stream_outputs, stream_axis=adapter.stream_axis)
