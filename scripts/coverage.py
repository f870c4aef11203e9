"""Coverage census: every model type of the installed transformers, built small, classified, converted, verified.

    python scripts/coverage.py                       # the whole zoo -> docs/coverage.json + docs/COVERAGE.md
    python scripts/coverage.py --types clip,whisper  # re-run some types and merge them into the committed census
    python scripts/coverage.py --jobs 2 --timeout 60
    python scripts/coverage.py --render              # regenerate docs/COVERAGE.md from docs/coverage.json

Each model type is built from its default config shrunk to a small instance (normswap.discovery.instance), its
norms are classified by what they compute (normswap.discovery.classify), and the public API converts it
(``normswap.convert_``: exact, falling back to ``approximate=True`` when exact is refused), with verification.
Types run in long-lived worker processes with a per-type timeout, so one hang cannot stop the census.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from coverage_report import EXACT_TOL, ROOT, merge_rows, totals, write_markdown  # noqa: E402 - sibling script

JSON_PATH = ROOT / "docs" / "coverage.json"
MD_PATH = ROOT / "docs" / "COVERAGE.md"
#: Config overrides for census rows whose default config is not the structure people run (issue 13).
CONFIG_OVERRIDES: dict[str, dict] = {"wav2vec2": {"do_stable_layer_norm": True, "feat_extract_norm": "layer"}}


def _first_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _cast(probes: dict, dtype) -> dict:
    return {k: v.to(dtype) if hasattr(v, "is_floating_point") and v.is_floating_point() else v
            for k, v in probes.items()}


def _report_fields(report) -> dict:
    ver = report.verification
    out = {
        "mode": report.mode,
        "swapped": len(report.swapped_norms),
        "approximate_norms": len(report.approximate_norms),
        "kept": len(report.kept_norms),
        "unaccounted": report.unaccounted_norms[:20],
        "passed": bool(report.passed),
    }
    if ver is not None:
        out.update(rel_diff=ver.rel_max_abs_diff, kl=ver.kl, cosine_min=ver.cosine_min, output_kind=ver.output_kind,
                   converted_error=getattr(ver, "converted_error", None),
                   original_error=getattr(ver, "original_error", None))
        if not ver.passed:
            out["verification"] = _first_line(getattr(ver, "first_failure", None) or ver.summary(), 300)
    return out


def census_one(model_type: str) -> dict:
    """Build, classify and convert one model type; a row of the census (never raises for the model's sake)."""
    import torch
    import transformers

    import normswap
    from normswap.adapters import all_adapters
    from normswap.discovery.classify import classify
    from normswap.discovery.instance import default_model_class, probe_inputs, tiny_instance
    from normswap.errors import AlreadyRMSNormError, NormswapError, NotExactError

    row: dict = {"model_type": model_type, "seconds": {}}
    t0 = time.perf_counter()
    stage = "config"
    try:
        config = transformers.CONFIG_MAPPING[model_type](**CONFIG_OVERRIDES.get(model_type, {}))
        cls = default_model_class(config)
        if cls is None:
            return {**row, "result": "not-built", "reason": "transformers has no model class for this config"}
        row["model_class"] = cls.__name__
        stage = "build"
        model = tiny_instance(cls, config)
        row["seconds"]["build"] = round(time.perf_counter() - t0, 3)
        stage = "probe"
        probes = _runnable_probes(model, probe_inputs(model), row)
        row["probe"] = sorted(probes)
        stage = "classify"
        t1 = time.perf_counter()
        cls_result = classify(model, probes)
        row["seconds"]["classify"] = round(time.perf_counter() - t1, 3)
        row.update(category=cls_result.category, ln_position=cls_result.ln_position,
                   norms={k: len(cls_result.names(k)) for k in sorted({n.kind for n in cls_result.norms})},
                   notes=row.get("notes", []) + cls_result.notes)
        declared = model_type in all_adapters()
        row["adapter"] = "declared" if declared else None
        if not declared and cls_result.has_layernorm:
            stage = "discover"
            row.update(_time_discovery(model.config, cls))
        stage = "convert"
        t2 = time.perf_counter()
        row.update(_convert(normswap, model.float(), _cast(probes, torch.float32), NotExactError,
                            AlreadyRMSNormError, NormswapError))
        row["seconds"]["convert"] = round(time.perf_counter() - t2, 3)
        row["silent"] = bool(cls_result.has_layernorm and row["result"] == "nothing-to-convert")
    except TimeoutError:
        row.update(result="timeout", reason=f"timed out during {stage}")
    except Exception as exc:  # noqa: BLE001 - the census records every failure instead of stopping
        result = {"config": "not-built", "build": "not-built", "probe": "probe-failed"}.get(stage, "error")
        row.update(result=result, reason=_first_line(f"{stage}: {type(exc).__name__}: {exc}"))
        if stage in ("build", "probe"):
            row["layernorm_classes"] = _layernorm_classes(locals().get("model"), locals().get("config"),
                                                          locals().get("cls"))
    row["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    return row


def _layernorm_classes(model, config, cls) -> int | None:
    """How many LayerNorm-class modules a model that could not be run holds (unmeasured, by class only): built on
    the meta device from the default config when the small instance could not be built."""
    import torch
    from torch import nn

    if model is None and config is not None and cls is not None:
        try:
            with torch.device("meta"):
                model = cls._from_config(config)
        except Exception:  # noqa: BLE001
            return None
    if model is None:
        return None
    return sum(isinstance(m, nn.LayerNorm) or (type(m).__name__.endswith("LayerNorm")
                                               and "rms" not in type(m).__name__.lower()) for m in model.modules())


_IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes", "image_grid_thw", "mm_token_type_ids")


def _runnable_probes(model, probes: dict, row: dict) -> dict:
    """The probes, or text-only probes when a composite rejects its image prompt (its tower is then not run, and
    the classification lists the tower's LayerNorms as not run rather than dropping them)."""
    import torch

    def run(p: dict) -> None:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # some modelling code builds float constants at the default dtype
        try:
            with torch.no_grad():
                model(**p)
        finally:
            torch.set_default_dtype(previous)

    try:
        run(probes)
        return probes
    except Exception as exc:
        text = {k: v for k, v in probes.items() if k not in _IMAGE_KEYS}
        if "input_ids" not in text or len(text) == len(probes):
            raise
        try:
            run(text)
        except Exception:  # noqa: BLE001 - the full prompt's error is the one that says what is wrong
            raise exc from None
        row.setdefault("notes", []).append("the image prompt failed; probed with text only")
        return text


def _time_discovery(config, cls) -> dict:
    """Discovery from the config, as a user's conversion runs it, timed: the ≤ 10 s target. It is given the small
    instance's config (shrinking is idempotent, so the work is the same as from the full-size one), which lets the
    conversion right after reuse the cached result instead of discovering twice."""
    try:
        from normswap.discovery import discover_from_config
    except ImportError:
        return {}
    t = time.perf_counter()
    try:
        found = discover_from_config(config, cls)
        out: dict = {"discovered": found.adapter is not None}
    except Exception as exc:  # noqa: BLE001
        out = {"discovered": False, "discovery_error": _first_line(f"{type(exc).__name__}: {exc}", 300)}
    out["discover_seconds"] = round(time.perf_counter() - t, 3)
    return out


def _convert(normswap, model, probes, not_exact, already_rms, normswap_error) -> dict:
    """Exact first; when exact is refused, approximate (post-LN); every refusal's reason kept."""
    try:
        report = normswap.convert_(model, probes=probes)
    except not_exact as exc:
        reason = _first_line(str(exc))
        try:
            report = normswap.convert_(model, approximate=True, probes=probes)
        except normswap_error as exc2:
            return {"result": "refused", "reason": reason + " | approximate: " + _first_line(str(exc2))}
        return {"result": "approximate", "reason": reason, **_report_fields(report), **_origin(model)}
    except already_rms as exc:
        return {"result": "nothing-to-convert", "reason": _first_line(str(exc))}
    except normswap_error as exc:
        return {"result": "refused", "reason": _first_line(str(exc)), **_origin(model)}
    except Exception as exc:  # noqa: BLE001 - a crash inside normswap is a bug: recorded as such
        return {"result": "error", "reason": _first_line(f"convert: {type(exc).__name__}: {exc}")}
    fields = _report_fields(report)
    if report.mode == "approximate":
        result = "approximate"
    elif report.passed and (fields.get("rel_diff") or 0.0) <= EXACT_TOL:
        result = "exact"
    else:
        result = "exact-failed-verification"
        fields["reason"] = fields.get("verification") or f"relative max |Δ| {fields.get('rel_diff')} > {EXACT_TOL}"
    return {"result": result, **fields, **_origin(model)}


def _origin(model) -> dict:
    meta = getattr(model.config, "normswap", None) or {}
    origin = meta.get("adapter_origin") or meta.get("origin") if isinstance(meta, dict) else None
    return {"adapter_origin": origin} if origin else {}


# --- worker pool ---------------------------------------------------------------------------------------------------

def worker_main(timeout: float) -> None:
    """Read model types from stdin, write one JSON row per line on the original stdout (anything printed by the
    libraries goes to stderr instead, so it cannot corrupt the protocol)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import warnings

    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")

    def alarm(_sig, _frame):
        raise TimeoutError

    signal.signal(signal.SIGALRM, alarm)
    for line in sys.stdin:
        model_type = line.strip()
        if not model_type:
            continue
        signal.alarm(max(1, int(timeout)))
        try:
            row = census_one(model_type)
        except TimeoutError:
            row = {"model_type": model_type, "result": "timeout", "reason": "timed out"}
        finally:
            signal.alarm(0)
        out.write(json.dumps(row, default=str) + "\n")


class _Slot:
    """One worker process; restarted after a hard timeout or every ``recycle`` types (bounded memory)."""

    def __init__(self, timeout: float, log) -> None:
        self.timeout, self.log, self.proc, self.done = timeout, log, None, 0

    def start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", "--timeout", str(self.timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=str(ROOT))
        self.done = 0

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, model_type: str) -> dict:
        if self.proc is None or self.proc.poll() is not None or self.done >= 200:
            self.stop()
            self.start()
        self.done += 1
        self.proc.stdin.write(model_type + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + self.timeout + 30  # the worker's own alarm fires first
        while True:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, remaining))
            if ready:
                line = self.proc.stdout.readline()
                if line:
                    return json.loads(line)
                self.stop()
                return {"model_type": model_type, "result": "error", "reason": "worker process died (crash)"}
            if remaining <= 0:
                self.stop()
                return {"model_type": model_type, "result": "timeout",
                        "reason": f"no answer within {self.timeout + 30:.0f} s (worker killed)"}


def run_census(types: list[str], jobs: int, timeout: float, log_path: Path | None,
               partial: Path | None = None) -> list[dict]:
    """Run ``types`` on ``jobs`` workers; each row is also appended to ``partial`` (JSON lines) as it arrives, so an
    interrupted census keeps what it measured."""
    tasks: queue.Queue = queue.Queue()
    for t in types:
        tasks.put(t)
    rows: list[dict] = []
    lock = threading.Lock()
    log = open(log_path, "a") if log_path else subprocess.DEVNULL  # noqa: SIM115 - shared by the workers

    def loop() -> None:
        slot = _Slot(timeout, log)
        try:
            while True:
                try:
                    t = tasks.get_nowait()
                except queue.Empty:
                    return
                row = slot.run(t)
                with lock:
                    rows.append(row)
                    if partial is not None:
                        with open(partial, "a") as f:
                            f.write(json.dumps(row, default=str) + "\n")
                    print(f"[{len(rows)}/{len(types)}] {t}: {row.get('category', '-')} -> {row.get('result')} "
                          f"({row.get('seconds', {}).get('total', '?')} s)", file=sys.stderr, flush=True)
        finally:
            slot.stop()

    threads = [threading.Thread(target=loop) for _ in range(max(1, jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if log_path:
        log.close()
    order = {t: i for i, t in enumerate(types)}
    return sorted(rows, key=lambda r: order.get(r["model_type"], 0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", help="comma-separated model types (merged into the existing census)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per model type")
    ap.add_argument("--json", type=Path, default=JSON_PATH)
    ap.add_argument("--md", type=Path, default=MD_PATH)
    ap.add_argument("--log", type=Path, default=None, help="append the workers' stderr here")
    ap.add_argument("--no-write", action="store_true", help="print rows, write nothing")
    ap.add_argument("--render", action="store_true", help="only regenerate the markdown from the JSON")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.timeout)
        return 0
    if args.render:
        data = json.loads(args.json.read_text())
        data["totals"] = totals(data["rows"])
        args.json.write_text(json.dumps(data, indent=1, default=str) + "\n")
        write_markdown(data, args.md)
        return 0
    import transformers

    all_types = sorted(transformers.CONFIG_MAPPING.keys())
    types = [t.strip() for t in args.types.split(",") if t.strip()] if args.types else all_types
    unknown = [t for t in types if t not in transformers.CONFIG_MAPPING]
    if unknown:
        print(f"coverage: error: unknown model types: {', '.join(unknown)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    partial = None if args.no_write else args.json.with_suffix(".partial.jsonl")
    rows = run_census(types, args.jobs, args.timeout, args.log, partial)
    wall = time.perf_counter() - t0
    if args.no_write:
        for r in rows:
            print(json.dumps(r, default=str))
        return 0
    data = merge_rows(args.json, rows, full=args.types is None, wall=wall, jobs=args.jobs, all_types=all_types)
    args.json.write_text(json.dumps(data, indent=1, default=str) + "\n")
    write_markdown(data, args.md)
    if partial is not None and partial.exists():
        partial.unlink()
    print(f"wrote {args.json} and {args.md} ({len(rows)} types in {wall:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
