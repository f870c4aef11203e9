"""The before/after report of a conversion: one dict, rendered as JSON, Markdown and a PNG plot.

The dict is the source of truth (``normswap_report.json``); the Markdown table (:func:`markdown_table`) is what the
README, the model card and ``normswap_report.md`` show, so it always carries the machine and the command.
"""

from __future__ import annotations

import io
import json

from normswap.evaluate.environment import describe_machine

REPORT_JSON = "normswap_report.json"
REPORT_MD = "normswap_report.md"
REPORT_PNG = "normswap_report.png"


def relative_change(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or before == 0:
        return None
    return (after - before) / before


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}%"


def _rel(value: float | None) -> str:
    """Relative change in scientific notation: exact conversions are judged against 1e-4, percentages hide that."""
    return "–" if value is None else f"{value:+.1e}"


def _ratio(before: float | None, after: float | None) -> str:
    return "–" if not before or after is None else f"×{after / before:.3f}"


def _perplexity_rows(ppl: dict) -> list[str]:
    before, after = ppl.get("before") or {}, ppl.get("after") or {}
    rows = []
    desc = (f"{before.get('protocol')}, window {before.get('max_length')}, stride {before.get('stride')}, "
            f"{before.get('tokens')} tokens")
    for key, label in (("perplexity", f"Perplexity ({desc})"), ("bits_per_byte", "Bits per byte"),
                       ("byte_perplexity", "Byte perplexity"), ("word_perplexity", "Word perplexity")):
        b, a = before.get(key), after.get(key)
        rows.append(f"| {label} | {_fmt(b)} | {_fmt(a)} | {_rel(relative_change(b, a))} |")
    return rows


def _throughput_rows(tp: dict) -> list[str]:
    fb, fa = tp.get("before") or {}, tp.get("after") or {}
    settings = tp.get("settings", {})
    repeats = settings.get("repeats")
    how = "interleaved" if tp.get("interleaved") else "sequential"
    rows = []
    images = fb.get("unit") == "images"
    for metric, what in (("prefill_tokens_per_s", "one forward" if images else f"{settings.get('prompt_len')}-token prompt"),
                         ("decode_tokens_per_s", f"{settings.get('new_tokens')} new tokens")):
        label = "Images/s" if images else metric.split("_")[0].capitalize() + " tokens/s"
        for bs in (fb.get(metric) or {}):
            b, a = fb[metric].get(bs), (fa.get(metric) or {}).get(bs)
            rows.append(f"| {label} (batch {bs}, {what}, median of {repeats}, {how}) | {_fmt(b, 1)} | "
                        f"{_fmt(a, 1)} | {_ratio(b, a)} |")
    for bs, mem in (fb.get("peak_memory") or {}).items():
        after_mem = (fa.get("peak_memory") or {}).get(bs) or {}
        if mem and mem.get("peak_mb") is not None:
            b, a = mem["peak_mb"], after_mem.get("peak_mb")
            rows.append(f"| Peak memory MB (batch {bs}) | {_fmt(b, 1)} | {_fmt(a, 1)} | {_ratio(b, a)} |")
    share = tp.get("norm_share") or {}
    sb, sa = share.get("before") or {}, share.get("after") or {}
    for metric in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        label = metric.split("_")[0]
        for bs, value in (sb.get(metric) or {}).items():
            after_value = (sa.get(metric) or {}).get(bs)
            rows.append(f"| Norms' share of {label} time, batch {bs} (upper bound: norms → identity) | "
                        f"{_pct(value)} | {_pct(after_value)} | |")
    return rows


#: Column titles by conversion target: what the "before" model normalises with and what the "after" one runs.
_COLUMNS = {
    "rmsnorm": ("Before (LayerNorm)", "After (RMSNorm)"),
    "dyt": ("Before (LayerNorm)", "After (DyT)"),
    "none": ("Before (LayerNorm)", "After (no LayerNorm)"),
    "batchnorm": ("Before (BatchNorm)", "After (BatchNorm folded)"),
}


def _columns(report: dict) -> tuple[str, str]:
    """The before/after column titles; a BatchNorm fold is told apart from LayerNorm removal by its folds."""
    conv = report.get("conversion") or {}
    target = conv.get("target") or "rmsnorm"
    if target == "none" and "batchnorm_folded" in (conv.get("folds") or {}):
        target = "batchnorm"
    return _COLUMNS.get(target, _COLUMNS["rmsnorm"])


def markdown_table(report: dict) -> str:
    """The before/after table with the corpus, machine and command under it (for README, model card, report.md)."""
    before, after = _columns(report)
    lines = [f"| Metric | {before} | {after} | Change |", "|---|---:|---:|---:|"]
    ppl = report.get("perplexity")
    if ppl:
        lines += _perplexity_rows(ppl)
    fid = report.get("fidelity")
    if fid:
        lines.append(f"| Cosine to the original, mean ({fid.get('samples')} {fid.get('input')}) | 1 | "
                     f"{fid['cosine_mean']:.8f} | |")
        lines.append(f"| Cosine to the original, min | 1 | {fid['cosine_min']:.8f} | |")
    if report.get("throughput"):
        lines += _throughput_rows(report["throughput"])
    ver = report.get("verification") or {}
    if ver and ver.get("reference") == "float64":
        dt = ver.get("dtype") or "saved dtype"
        verdict = "approximate" if ver.get("mode") == "approximate" and ver.get("passed") else \
            ("passed" if ver.get("passed") else "FAILED")
        lines.append(f"| Verification: relative max Δ{ver.get('output_kind', 'logit')} from the float64 original, "
                     f"both in {dt} | {ver.get('original_error', 0):.1e} | {ver.get('converted_error', 0):.1e} | "
                     f"{verdict} |")
    elif ver:
        lines.append(f"| Verification: max relative Δ{ver.get('output_kind', 'logit')} (tolerance "
                     f"{ver.get('tolerance', 0):.0e}) | | {ver.get('rel_max_abs_diff', 0):.2e} | "
                     f"{'passed' if ver.get('passed') else 'FAILED'} |")
    notes = []
    if ppl and ppl.get("before"):
        notes.append(f"Corpus: {ppl['before'].get('corpus')}.")
    if report.get("machine"):
        notes.append(f"Machine: {describe_machine(report['machine'])}.")
    if report.get("command"):
        notes.append(f"Command: `{report['command']}`.")
    return "\n".join(lines) + ("\n\n" + " ".join(notes) if notes else "") + "\n"


def to_markdown(report: dict, plot: str | None = None) -> str:
    """The whole ``normswap_report.md``; ``plot`` names a PNG beside it to embed."""
    conv = report.get("conversion") or {}
    head = [
        "# normswap conversion report",
        "",
        f"Source `{report.get('source')}` → `{report.get('output')}`: {conv.get('model_type')}, "
        f"{conv.get('mode')} conversion, normswap {report.get('normswap_version')}.",
        "",
        markdown_table(report),
    ]
    for note in report.get("notes") or []:
        head.append(f"- {note}")
    head += [
        "",
        "Perplexity follows the transformers guide's sliding-window protocol (`hf-stride`); bits per byte, byte and "
        "word perplexity use lm-evaluation-harness definitions. Throughput follows optimum-benchmark: prefill = "
        "`generate(max_new_tokens=1)`, decode tokens/s = batch × (new tokens − 1) / (generate − prefill time). "
        "Change is (after − before) / before for quality and after ÷ before for speed. The norms' share is "
        "1 − tokens/s ÷ tokens/s of the same model with every norm replaced by identity: the most any norm change "
        "could save on this machine. For a longer benchmark run `normswap bench CONVERTED --against ORIGINAL`.",
        "",
        f"Full figures: `{REPORT_JSON}`.",
        "",
    ]
    if plot:
        head += [f"![before/after]({plot})", ""]
    return "\n".join(head)


def _whiskers(figures: dict, metric: str, keys: list[str]) -> list[list[float]] | None:
    """Matplotlib ``yerr`` (distance below, above) from the min/max of the repeats."""
    stats = (figures.get("stats") or {}).get(metric) or {}
    if not all(stats.get(k) for k in keys):
        return None
    return [[stats[k]["median"] - stats[k]["min"] for k in keys], [stats[k]["max"] - stats[k]["median"] for k in keys]]


def plot_png(report: dict) -> bytes | None:
    """Bars for perplexity and tokens/s before/after; ``None`` when matplotlib is not installed (``[plot]`` extra)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    panels = []  # (title, group labels, before values, after values, before errors, after errors)
    ppl = report.get("perplexity")
    if ppl and ppl.get("before") and ppl.get("after"):
        panels.append(("Perplexity (lower is better)", ["perplexity"], [ppl["before"]["perplexity"]],
                       [ppl["after"]["perplexity"]], None, None))
    fid = report.get("fidelity")
    if fid:
        panels.append(("Cosine to original", ["mean", "min"], [1.0, 1.0], [fid["cosine_mean"], fid["cosine_min"]],
                       None, None))
    tp = report.get("throughput") or {}
    fb, fa = tp.get("before") or {}, tp.get("after") or {}
    for metric, title in (("prefill_tokens_per_s", "Prefill tokens/s"), ("decode_tokens_per_s", "Decode tokens/s")):
        b, a = fb.get(metric) or {}, fa.get(metric) or {}
        keys = [k for k in b if b[k] is not None and a.get(k) is not None]
        if keys:
            panels.append((f"{title} (higher is better;\nbars: median, whiskers: min–max)",
                           [f"batch {k}" for k in keys], [b[k] for k in keys], [a[k] for k in keys],
                           _whiskers(fb, metric, keys), _whiskers(fa, metric, keys)))
    if not panels:
        return None
    fig = Figure(figsize=(3.6 * len(panels), 3.8))
    FigureCanvasAgg(fig)
    width = 0.35
    for i, (title, labels, before, after, err_b, err_a) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), i)
        xs = list(range(len(labels)))
        bars_b = ax.bar([x - width / 2 for x in xs], before, width, yerr=err_b, capsize=3, label="before (LayerNorm)",
                        color="#8c8c8c")
        bars_a = ax.bar([x + width / 2 for x in xs], after, width, yerr=err_a, capsize=3, label="after (RMSNorm)",
                        color="#2a7ab9")
        for bars in (bars_b, bars_a):
            ax.bar_label(bars, fmt="%.4g", fontsize=7, label_type="center", color="white")
        ax.set_xticks(xs, labels)
        ax.set_xlim(-0.8, len(labels) - 0.2)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=8)
    handles, names = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=8, frameon=False)
    machine = report.get("machine")
    if machine:
        fig.suptitle(describe_machine(machine), fontsize=7)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def report_files(report: dict) -> dict[str, str | bytes]:
    """``{file name: content}`` for ``normswap.save(..., extra_files=...)``: written atomically with the model."""
    png = plot_png(report)
    files: dict[str, str | bytes] = {
        REPORT_JSON: json.dumps(report, indent=2, default=str) + "\n",
        REPORT_MD: to_markdown(report, plot=REPORT_PNG if png is not None else None),
    }
    if png is not None:
        files[REPORT_PNG] = png
    return files
