"""Census of BatchNorm folding over every model type of the installed transformers.

For each ``model_type`` in ``transformers.CONFIG_MAPPING`` whose modelling code uses BatchNorm, build a small random
instance (the config shrunk by ``normswap.discovery.instance.tiny_config``, else the default config with a small
image; fp32, random init), move every BatchNorm's running statistics and affine parameters away from identity, run ``normswap.batchnorm.fold_batchnorms_`` (structure
measured on one probe forward), and record how many BatchNorms folded, which stayed and why, and the relative
max |Δ| of the model's primary output against the unfolded model (target ≤ 1e-5 in fp32). Writes a markdown table:

    python scripts/coverage_batchnorm.py --out docs/coverage_batchnorm.md [--json docs/coverage_batchnorm.json]
    python scripts/coverage_batchnorm.py --only resnet,levit          # a subset, printed
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normswap.batchnorm import NothingToFoldError, fold_batchnorms_
from normswap.batchnorm.perturb import perturb_batchnorms_

TOLERANCE = 1e-5
#: The fallback builds the default config: only when it is small enough for this machine's memory.
MAX_DEFAULT_PARAMS = 300_000_000
#: Auto mappings tried first: a head class includes the head's BatchNorms (LeViT's classifier) and gives logits.
PREFERRED = ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES",
             "MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES", "MODEL_MAPPING_NAMES")
_BN_TEXT = re.compile(r"BatchNorm[123]d|SyncBatchNorm|_BatchNorm")


def _clap_features(config) -> dict:
    audio = getattr(config, "audio_config", config)
    return {"input_features": torch.randn(2, 1, 1001, audio.num_mel_bins, generator=torch.Generator().manual_seed(0))}


#: Inputs the generic probe builder cannot guess (a spectrogram laid out as an image); merged over its probes.
def _image_pair(config) -> dict:
    return {"pixel_values": torch.randn(2, 2, 3, 64, 64, generator=torch.Generator().manual_seed(0))}


def _series(config) -> dict:
    shape = (2, config.context_length, config.num_input_channels)
    return {"past_values": torch.randn(*shape, generator=torch.Generator().manual_seed(0)), "input_ids": None,
            "pixel_values": None}


PROBE_EXTRA = {"clap": _clap_features, "clap_audio_model": _clap_features, "efficientloftr": _image_pair,
               "superglue": _image_pair, "patchtst": _series}


def _no_extra(_config) -> dict:
    return {}


def _probes(model_type: str, model: nn.Module) -> dict:
    from normswap.discovery.instance import probe_inputs

    probes = {**probe_inputs(model), **PROBE_EXTRA.get(model_type, _no_extra)(model.config)}
    return {k: v for k, v in probes.items() if v is not None}


class _Timeout(Exception):
    pass


def uses_batchnorm(model_type: str) -> bool:
    """Cheap pre-filter: the modelling source of this model type mentions a torch BatchNorm class."""
    config_cls = transformers.CONFIG_MAPPING[model_type]
    module = config_cls.__module__.replace(".configuration_", ".modeling_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    return bool(_BN_TEXT.search(Path(spec.origin).read_text(encoding="utf-8", errors="replace")))


def model_class(config) -> type | None:
    from transformers.models.auto import modeling_auto as ma

    for mapping in PREFERRED:
        names = getattr(ma, mapping, {}).get(config.model_type)
        for name in (names,) if isinstance(names, str) else tuple(names or ()):
            cls = getattr(transformers, name, None)
            if cls is not None:
                return cls
    from normswap.discovery.instance import default_model_class

    return default_model_class(config)


def default_sized(config):
    """The default config with a small image and no timm/pretrained backbone: the fallback instance.

    Convolutional configs describe stages as lists (depths, hidden sizes, strides, expand ratios) whose lengths and
    ratios the modelling code cross-checks, so shrinking them generically often breaks the model; their default
    widths are small enough to build on CPU, and only the image size drives the forward's cost.
    """
    config = copy.deepcopy(config)
    for cfg in [config, *(getattr(config, k) for k in ("backbone_config", "vision_config") if hasattr(config, k))]:
        if cfg is None or not hasattr(cfg, "to_dict"):
            continue
        size = getattr(cfg, "image_size", None)
        if isinstance(size, int) and size > 64:
            cfg.image_size = 64
        for key in ("use_timm_backbone", "use_pretrained_backbone"):
            if getattr(cfg, key, None):
                setattr(cfg, key, False)
        if getattr(getattr(cfg, "backbone_config", None), "model_type", None) == "timm_backbone":
            cfg.backbone_config = transformers.ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"])
        if isinstance(getattr(cfg, "num_queries", None), int):
            cfg.num_queries = min(cfg.num_queries, 10)  # detection heads pick top-k of the (few) small-image anchors
    return config


def census_one(model_type: str, seconds: int) -> dict:
    from normswap.discovery.instance import tiny_config

    row: dict = {"model_type": model_type}

    def alarm(*_):
        raise _Timeout(f"took longer than {seconds} s")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        config = transformers.CONFIG_MAPPING[model_type]()
        cls = model_class(config)
        if cls is None:
            return {**row, "status": "skipped", "why": "no model class in transformers"}
        row["class"] = cls.__name__
        try:
            torch.manual_seed(0)  # random init: shifting every weight (as the LayerNorm census does) makes deep
            model = cls._from_config(tiny_config(config), dtype=torch.float32).eval()  # nets ill-conditioned in fp32
            row["instance"] = "shrunk config"
            probes = _probes(model_type, model)
            with torch.no_grad():
                model(**probes)
        except _Timeout:
            raise
        except Exception as exc:  # noqa: BLE001 - the generic shrink does not fit every CNN config: default sizes
            shrink_error = f"{type(exc).__name__}: {next((x for x in str(exc).splitlines() if x.strip()), '')[:80]}"
            config = default_sized(config)
            with torch.device("meta"):
                size = sum(p.numel() for p in cls._from_config(config).parameters())
            if size > MAX_DEFAULT_PARAMS:
                raise ValueError(f"shrunk config failed ({shrink_error}); the default has {size / 1e6:.0f}M "
                                 "parameters, too large for this census") from None
            torch.manual_seed(0)
            model = cls._from_config(config, dtype=torch.float32).eval()
            row["instance"] = "default config, small image"
            probes = _probes(model_type, model)
        model.eval()
        row["batchnorms"] = sum(isinstance(m, _BatchNorm) for m in model.modules())
        frozen = sum(1 for m in model.modules() if "BatchNorm" in type(m).__name__ and not isinstance(m, _BatchNorm))
        row["other_batchnorm_like"] = frozen
        if row["batchnorms"] == 0:
            why = "no torch BatchNorm in this class" + (f" ({frozen} frozen BatchNorm-like modules, not _BatchNorm)"
                                                        if frozen else "")
            return {**row, "status": "no-batchnorm", "why": why}
        perturb_batchnorms_(model)
        report = fold_batchnorms_(model, probes=probes, tolerance=TOLERANCE)
        ver = report.verification
        row.update(original_error=ver.original_error, converted_error=ver.converted_error)
        if not all(math.isfinite(x) for x in (ver.rel_max_abs_diff, ver.original_error) if x is not None):
            return {**row, "status": "error", "why": "the unfolded model's outputs are not finite on the probe"}
        row.update(folded=len(report.folded), instance=row.get("instance"), kept=report.kept, rel=ver.rel_max_abs_diff,
                   into_linear=sum(isinstance(model.get_submodule(p.into), nn.Linear) for p in report.folded),
                   status="pass" if ver.rel_max_abs_diff <= TOLERANCE else "fail")
    except NothingToFoldError as exc:
        row.update(status="nothing-folds", why=str(exc))
    except Exception as exc:  # noqa: BLE001 - a census records every failure and goes on
        import traceback

        where = traceback.extract_tb(exc.__traceback__)[-1]
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        text = first[:160] or f"raised in {Path(where.filename).name}:{where.lineno}"
        row.update(status="error", why=f"{type(exc).__name__}: {text}")
    finally:
        signal.alarm(0)
    return row


def _reason_kind(reason: str) -> str:
    """A short label for a kept BatchNorm's reason, for the summary column."""
    for key, label in (("batch statistics", "batch statistics"), ("not run by the probe", "unused"),
                       ("also read by", "output shared"), ("times per forward", "shared module"),
                       ("pads its input", "before a padded conv"), ("not from a convolution or linear", "input not conv/linear"),
                       ("tied", "tied weight"), ("modified in place", "in-place"),
                       ("transposed convolution", "after a transposed/functional conv")):
        if key in reason:
            return label
    return "other"


def markdown(rows: list[dict], env: str, command: str) -> str:
    with_bn = [r for r in rows if r.get("batchnorms")]
    types = rows
    ran = [r for r in with_bn if r["status"] in ("pass", "fail")]
    passed = [r for r in ran if r["status"] == "pass"]
    nothing = [r for r in rows if r["status"] == "nothing-folds"]
    errors = [r for r in rows if r["status"] in ("error", "skipped")]
    folded = sum(r.get("folded", 0) for r in ran)
    worst = max((r["rel"] for r in with_bn if "rel" in r), default=float("nan"))
    kept_kinds = Counter(_reason_kind(reason) for r in with_bn for reason in (r.get("kept") or {}).values())
    lines = [
        "# BatchNorm folding census (`--to none`)",
        "",
        f"Generated by `{command}` ({env}). Every model type of the installed transformers whose modelling code uses "
        "a torch BatchNorm, built small (shrunk config, fp32, random weights with BatchNorm statistics and affine "
        "parameters moved away from identity), folded by `normswap.batchnorm.fold_batchnorms_` (structure measured on "
        "one probe forward), and compared with the unfolded model on the same probe inputs: relative max |Δ| of the "
        f"primary output (logits, or the last hidden state), target ≤ {TOLERANCE:.0e}. The *vs float64* column is "
        "the same figure for the unfolded fp32 model and for the folded one against the model run in float64: the "
        "fold itself is exact in float64, so the two are rounding of the same size.",
        "",
        f"**Totals:** {len(types)} model types whose modelling code mentions BatchNorm; {len(with_bn)} built with "
        f"torch BatchNorms; of the {len(ran)} whose instance ran and folded, **{len(passed)} within "
        f"{TOLERANCE:.0e}** and {len(ran) - len(passed)} over (worst {worst:.2e}); {folded} of their "
        f"{sum(r['batchnorms'] for r in ran)} BatchNorms folded, kept: "
        + (", ".join(f"{n} {k}" for k, n in kept_kinds.most_common()) or "none") + f". {len(nothing)} have "
        "BatchNorms none of which follows a conv/linear (or that the probe did not reach); "
        f"{len(errors)} could not be built or run by this census (shrunk-config or probe-input gaps of the census "
        "harness, listed with the error; not folding failures).",
        "",
        "| model_type | class | BatchNorms | folded (into Linear) | kept: reason | rel max \\|Δ\\| | vs float64: "
        "original / folded | status |",
        "|---|---|---:|---:|---|---:|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["model_type"]):
        kept = r.get("kept") or {}
        kinds = Counter(_reason_kind(v) for v in kept.values())
        kept_text = ", ".join(f"{n} {k}" for k, n in kinds.most_common()) or "—"
        if r["status"] in ("error", "skipped", "nothing-folds", "no-batchnorm"):
            kept_text = r.get("why", "").replace("|", "\\|")[:200]
        rel = f"{r['rel']:.1e}" if "rel" in r else "—"
        folded = f"{r['folded']} ({r['into_linear']})" if "folded" in r else "—"
        f64 = f"{r['original_error']:.1e} / {r['converted_error']:.1e}" if r.get("converted_error") is not None else "—"
        lines.append(f"| {r['model_type']} | {r.get('class', '—')} | {r.get('batchnorms', '—')} | {folded} | "
                     f"{kept_text} | {rel} | {f64} | {r['status']} |")
    lines += ["", "Statuses: **pass** folded within tolerance; **fail** folded but over tolerance; **nothing-folds** "
              "BatchNorms present, none after a conv/linear; **no-batchnorm** the built class has no torch BatchNorm "
              "(e.g. only frozen BatchNorm-like modules, or BatchNorm only in an optional backbone); **error** the "
              "small instance could not be built or run (the reason is shown).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="markdown output (default: print)")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    p.add_argument("--only", default=None, help="comma-separated model types")
    p.add_argument("--timeout", type=int, default=120, help="seconds per model type")
    p.add_argument("--rows", default=None, help="re-render the markdown from a previous --json file (no models run)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    rows: list[dict] = []
    if args.rows:
        rows, types = json.loads(Path(args.rows).read_text(encoding="utf-8")), []
    else:
        types = args.only.split(",") if args.only else sorted(t for t in transformers.CONFIG_MAPPING if uses_batchnorm(t))
    for mt in types:
        start = time.perf_counter()
        row = census_one(mt, args.timeout)
        row["seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
        print(f"{mt:28s} {row['status']:14s} bn={row.get('batchnorms', '-')} folded={row.get('folded', '-')} "
              f"rel={row.get('rel', '-')} {row.get('why', '')[:100]} ({row['seconds']} s)", file=sys.stderr, flush=True)
    from normswap.evaluate.environment import describe_machine, environment

    command = "python scripts/coverage_batchnorm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.rows:
        command = f"python scripts/coverage_batchnorm.py --out {args.out} --json {args.rows}"  # the run behind the rows
    text = markdown(rows, describe_machine(environment("cpu", torch.float32)), command.strip())
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
