"""Totals and the markdown page of the coverage census (``scripts/coverage.py`` writes rows, this turns them into
docs/coverage.json's totals and docs/COVERAGE.md). Kept apart so the census driver stays short."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import subprocess
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Relative |Δ| (fp32) an exact conversion must reach.
EXACT_TOL = 1e-4
#: Types the issue names as must-convert-exactly (targets table).
NAMED_TARGETS = (
    "clip", "clip_text_model", "clip_vision_model", "siglip", "siglip2", "dinov2", "dinov2_with_registers", "whisper",
    "cohere", "olmo", "mpt", "starcoder2", "persimmon", "biogpt", "xglm", "deit", "beit", "data2vec-vision", "swin",
    "vit_mae", "mbart", "m2m_100",
)

#: Refusals that say only "no adapter" name no structure: they do not count as refused *with a reason*.
_NO_ADAPTER = "no adapter for model_type"
_PATH = re.compile(r"\b[A-Za-z_][\w]*(\.[\w]+)+\b")
#: Where helper E1's BatchNorm census may have written its table.
BATCHNORM_TABLES = ("docs/COVERAGE_BATCHNORM.md", "docs/coverage_batchnorm.md", "docs/BATCHNORM_COVERAGE.md")


def structural_refusal(row: dict) -> bool:
    """A refusal that says *why* in terms of the model's structure (names a module path, or post-LN)."""
    reason = row.get("reason") or ""
    return row.get("result") == "refused" and _NO_ADAPTER not in reason and (
        bool(_PATH.search(reason)) or "post-LN" in reason)


def totals(rows: list[dict]) -> dict:
    by_cat = Counter(r.get("category", "(not classified)") for r in rows)
    results: dict[str, Counter] = {}
    for r in rows:
        results.setdefault(r.get("category", "(not classified)"), Counter())[r.get("result", "?")] += 1
    pre = [r for r in rows if r.get("category") == "pre-LN"]
    post = [r for r in rows if r.get("category") == "post-LN"]
    pre_exact = [r for r in pre if r.get("result") == "exact"]
    # A post-LN type verified *exact* (discovery found its norms' inputs centrable) beats the target's approximate.
    post_ok = [r for r in post if r.get("result") in ("approximate", "exact") or structural_refusal(r)]
    disc = [r for r in rows if r.get("discover_seconds") is not None]
    return {
        "types": len(rows),
        "by_category": dict(sorted(by_cat.items())),
        "results_by_category": {k: dict(sorted(v.items())) for k, v in sorted(results.items())},
        "pre_ln": {"total": len(pre), "exact": len(pre_exact),
                   "exact_pct": round(100.0 * len(pre_exact) / len(pre), 1) if pre else None},
        "post_ln": {"total": len(post), "approximate": sum(r.get("result") == "approximate" for r in post),
                    "exact": sum(r.get("result") == "exact" for r in post),
                    "refused_with_reason": sum(structural_refusal(r) for r in post),
                    "ok_pct": round(100.0 * len(post_ok) / len(post), 1) if post else None,
                    "not_ok": sorted(r["model_type"] for r in post if r not in post_ok)},
        "silent": sorted(r["model_type"] for r in rows if r.get("silent")),
        "not_built": sorted(r["model_type"] for r in rows if r.get("result") == "not-built"),
        "unmeasured_with_layernorm": sorted(r["model_type"] for r in rows if "category" not in r
                                            and (r.get("layernorm_classes") or 0) > 0),
        "named_targets": {t: next((r.get("result") for r in rows if r["model_type"] == t), "not run")
                          for t in NAMED_TARGETS},
        "discovery": {"types": len(disc),
                      "max_seconds": max((r["discover_seconds"] for r in disc), default=None),
                      "over_10s": sorted(r["model_type"] for r in disc if r["discover_seconds"] > 10)},
    }


def merge_rows(json_path: Path, rows: list[dict], *, full: bool, wall: float, jobs: int, all_types: list[str]) -> dict:
    """A new census (full run) or the committed one with ``rows`` replaced (``--types`` re-run)."""
    import torch
    import transformers

    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    run = {"date": now, "types": len(rows), "wall_seconds": round(wall, 1), "jobs": jobs, "commit": commit_of(ROOT)}
    if not full and json_path.exists():
        data = json.loads(json_path.read_text())
        new = {r["model_type"]: r for r in rows}
        data["rows"] = [new.pop(r["model_type"], r) for r in data["rows"]] + list(new.values())
        data["rows"].sort(key=lambda r: r["model_type"])
        data["meta"].setdefault("reruns", []).append({**run, "which": sorted(r["model_type"] for r in rows)})
    else:
        data = {"meta": {"transformers": transformers.__version__, "torch": torch.__version__,
                         "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
                         "zoo_size": len(all_types), "full_run": {**run, "full": full}},
                "rows": sorted(rows, key=lambda r: r["model_type"])}
    data["totals"] = totals(data["rows"])
    return data


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.1e}"


def _cell(text: str, limit: int = 220) -> str:
    text = " ".join(str(text or "").split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _why(r: dict) -> str:
    bits = []
    if r.get("result") not in ("exact",) and r.get("reason"):
        bits.append(r["reason"])
    if r.get("unaccounted"):
        bits.append(f"left as LayerNorm: {', '.join(r['unaccounted'][:4])}")
    if r.get("silent"):
        bits.insert(0, "SILENT ANSWER: " + "; ".join(r.get("notes") or ["LayerNorm-like norms present"]))
    if r.get("discovery_error"):
        bits.append(f"discovery: {r['discovery_error']}")
    if r.get("result") == "approximate" and r.get("cosine_min") is not None:
        bits.append(f"min cosine {r['cosine_min']:.4f}")
    if r.get("result") == "approximate" and r.get("kl") is not None:
        bits.append(f"KL {r['kl']:.2e}")
    return _cell("; ".join(bits))


def write_markdown(data: dict, path: Path) -> None:
    tot, meta = data["totals"], data["meta"]
    full = meta.get("full_run", {})
    pre, post = tot["pre_ln"], tot["post_ln"]
    lines = [
        "# Coverage census: every model type of the installed transformers",
        "",
        f"Generated by `python scripts/coverage.py` (normswap {full.get('commit')}, transformers "
        f"{meta.get('transformers')}, torch {meta.get('torch')}, {full.get('date')}, {full.get('jobs')} worker(s) "
        f"on a shared 2-core machine, {full.get('wall_seconds')} s for {full.get('types')} types); rows re-run "
        "since: " + (", ".join(f"{r['date']} at {r.get('commit')} ({len(r['which'])} types)"
                               for r in meta.get("reruns", [])) or "none") + ".",
        "Each type is built from its default config, shrunk to a small instance of the same structure (2 layers, "
        "hidden 64, float64, perturbed: `normswap.discovery.instance`), classified by what its norms compute and how "
        "they are wired (`normswap.discovery.classify`: LayerNorm-like = invariant to adding c·1 and to rescaling; "
        "RMSNorm-like = rescaling only; pre-LN vs post-LN from whether a norm's input minus the previous norm's input "
        "(pre) or output (post) is a sum of the module outputs in between), then converted through the public API "
        f"(`normswap.convert_` in fp32: exact, else `approximate=True`) with verification (exact = verified and "
        f"relative max |Δ| ≤ {EXACT_TOL:g}). `python scripts/coverage.py --types a,b` re-runs rows; "
        "tests/test_coverage_subset.py re-checks a fixed subset against this table.",
        "",
        "## Targets (issue 13)",
        "",
        "| target | measured |",
        "|---|---|",
        f"| ≥ 75% of pre-LN LayerNorm types convert exactly | {pre['exact']}/{pre['total']} = {pre['exact_pct']}% |",
        f"| 100% of post-LN types: approximate, or refused with a structural reason | approximate {post['approximate']}"
        f" + refused with reason {post['refused_with_reason']} + verified exact {post.get('exact', 0)} of "
        f"{post['total']} = {post['ok_pct']}%"
        + (f" (not yet: {', '.join(post['not_ok'][:12])}{' …' if len(post['not_ok']) > 12 else ''})"
           if post["not_ok"] else "") + " |",
        f"| zero silent answers (a LayerNorm-like norm reported as nothing to convert) | {len(tot['silent'])}"
        + (f": {', '.join(tot['silent'])}" if tot["silent"] else "") + " |",
        f"| discovery ≤ 10 s per type | max {tot['discovery']['max_seconds']} s over {tot['discovery']['types']} "
        f"discovered types" + (f"; over 10 s: {', '.join(tot['discovery']['over_10s'])}"
                               if tot["discovery"]["over_10s"] else "") + " |",
        f"| whole census ≤ 60 min on 2 cores | {full.get('wall_seconds')} s with {full.get('jobs')} worker(s) |",
        "",
        "Named types (must convert exactly): "
        + ", ".join(f"{t} **{res}**" if res == "exact" else f"{t} {res}" for t, res in tot["named_targets"].items())
        + ".",
        "",
        "## Totals",
        "",
        "| category | types | results |",
        "|---|---:|---|",
    ]
    for cat, n in tot["by_category"].items():
        res = tot["results_by_category"].get(cat, {})
        lines.append(f"| {cat} | {n} | " + ", ".join(f"{k} {v}" for k, v in res.items()) + " |")
    unmeasured = tot.get("unmeasured_with_layernorm", [])
    lines += [
        "",
        f"Not built ({len(tot['not_built'])}; the reason is in each row): {', '.join(tot['not_built']) or 'none'}.",
        "",
        f"Not classified but holding LayerNorm classes ({len(unmeasured)}; counted by class on the instance or on "
        "the meta device, not measured, so not in the percentages above): " + (", ".join(unmeasured) or "none") + ".",
        "",
        "Results: `exact` (verified), `approximate` (post-LN or a partly inexact model: `convert_(approximate=True)`, "
        "damage in the row), `refused` (the reason names what blocks it; a composite whose LayerNorm tower the probe "
        "inputs never run is refused naming those modules, since their stream cannot be measured), "
        "`nothing-to-convert` (no LayerNorm-like norm: correct for RMSNorm-only models, and BatchNorm/GroupNorm-only "
        "ones whose reason lists their norms; a *silent answer* otherwise), `exact-failed-verification` "
        "(a conversion bug caught by verification), `error` (a crash inside normswap), `probe-failed`/`not-built` "
        "(the small instance could not be run/built offline), `timeout`.",
        "",
        "## BatchNorm models",
        "",
    ]
    lines += _batchnorm_section()
    lines += [
        "",
        "## Per model type",
        "",
        "| model type | class | category | result | max rel \\|Δ\\| | adapter | s | reason / notes |",
        "|---|---|---|---|---:|---|---:|---|",
    ]
    for r in data["rows"]:
        adapter = r.get("adapter") or r.get("adapter_origin") or ("discovered" if r.get("discovered") else "–")
        secs = r.get("seconds", {})
        t = (secs.get("total") or 0) - (secs.get("build") or 0) if secs.get("build") is not None else secs.get("total")
        lines.append(
            f"| {r['model_type']} | {r.get('model_class', '–')} | {r.get('category', '–')} | {r.get('result')}"
            f"{' **(silent)**' if r.get('silent') else ''} | "
            f"{_fmt(r.get('rel_diff'))} | {adapter} | {'–' if t is None else f'{t:.1f}'} | {_why(r)} |")
    lines.append("")
    path.write_text("\n".join(lines))


def _batchnorm_section() -> list[str]:
    """Helper E1's BatchNorm census (``scripts/coverage_batchnorm.py``) next to this one: its totals and a link."""
    for rel in BATCHNORM_TABLES:
        p = ROOT / rel
        if p.exists():
            text = p.read_text().splitlines()
            summary = [ln for ln in text if ln.startswith("**Totals")]
            return [f"BatchNorm models are folded, not swapped (`normswap convert --to none`); their census is "
                    f"`scripts/coverage_batchnorm.py`, table in [{Path(rel).name}]({Path(rel).name}).", "", *summary]
    return ["The BatchNorm census (`scripts/coverage_batchnorm.py`, folding BatchNorms into their neighbours: see "
            "[BATCHNORM.md](BATCHNORM.md)) is kept by its own script; its table was not present when this page was "
            "generated."]


def commit_of(root: Path) -> str | None:
    """The normswap commit the census ran (a COMMIT file in an exported snapshot, else git)."""
    marker = root / "COMMIT"
    if marker.exists():
        return marker.read_text().strip()
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
