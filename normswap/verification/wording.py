"""The verification figures in words, for the model card (and any other Markdown that shows them).

Issue 12: the figures say what they compare: "converted: 6.9e-7 from the float64 original; the original in fp32:
8.5e-5". Outputs converted before it (no ``reference`` key) keep their old wording.
"""

from __future__ import annotations


def _num(x: float | None, fmt: str = ".3e") -> str:
    return "n/a" if x is None else format(x, fmt)


def verification_section(meta: dict) -> list[str]:
    """The card's ``## Verification`` section from the ``normswap`` metadata."""
    ver = meta.get("verification")
    lines = ["## Verification", ""]
    if not ver:
        return lines + ["Verification was skipped for this conversion: no figures were recorded."]
    if ver.get("reference") == "float64":
        return lines + _truth_verification(ver)
    status = "PASSED" if ver.get("passed", True) else "FAILED"
    kind = ver.get("output_kind") or "output"
    lines += [
        f"**{status}**: the converted model was run on the same probe inputs as the original "
        f"({ver.get('probe') or 'probe inputs'}) and their {kind}s compared.",
        "",
        "| Metric | Value |",
        "|---|---|",
        f"| max \\|Δ{kind}\\| | {_num(ver.get('max_abs_diff'))} (max \\|{kind}\\| = {_num(ver.get('max_abs_reference'))}) |",
        f"| relative max \\|Δ{kind}\\| | {_num(ver.get('rel_max_abs_diff'))} (tolerance {_num(ver.get('tolerance'), '.0e')}) |",
    ]
    lines += _distribution_rows(ver)
    return lines + _verification_warnings(ver, status)


def _distribution_rows(ver: dict) -> list[str]:
    rows = []
    if ver.get("kl") is not None:
        rows.append(f"| KL(reference ‖ converted) | {_num(ver['kl'])} |")
    if ver.get("top1_agreement") is not None:
        rows.append(f"| top-1 agreement | {100 * ver['top1_agreement']:.2f}% |")
    if ver.get("cosine_min") is not None:
        rows.append(f"| min cosine similarity | {ver['cosine_min']:.6f} |")
    if ver.get("cosine_mean") is not None:
        rows.append(f"| mean cosine similarity | {ver['cosine_mean']:.6f} |")
    return rows


def _verification_warnings(ver: dict, status: str) -> list[str]:
    lines = []
    uncentred = ver.get("uncentered_exact_norms") or []
    if uncentred:
        lines += ["", "Norm inputs that were expected to be zero-mean but are not: " + ", ".join(f"`{n}`" for n in uncentred)]
    if ver.get("first_failure"):
        lines += ["", f"First failure: {ver['first_failure']}."]
    if status == "FAILED":
        lines += ["", "> **Warning:** verification failed; this folder was saved with `--force`. Do not rely on it."]
    return lines


def _truth_verification(ver: dict) -> list[str]:
    """Figures against the original run in float64 (issue 12): both models at the saved dtype, side by side."""
    kind = ver.get("output_kind") or "output"
    dt = ver.get("dtype") or "the saved dtype"
    approximate = ver.get("mode") == "approximate"
    conv, orig = _num(ver.get("converted_error"), ".1e"), _num(ver.get("original_error"), ".1e")
    probe = ver.get("probe") or "probe inputs"
    if approximate:
        status = "FAILED" if not ver.get("passed", True) else None
        intro = (f"**Approximate conversion**: damage {conv} (relative max \\|Δ{kind}\\|) from the float64 original; "
                 f"the original in {dt}: {orig}. Both models ran on the same probe inputs ({probe}); no bound applies "
                 "to an approximate swap, these figures measure what it changed.")
    else:
        status = "PASSED" if ver.get("passed", True) else "FAILED"
        intro = (f"**{status}**: converted: {conv} from the float64 original; the original in {dt}: {orig}. Both "
                 f"models ran at {dt} on the same probe inputs ({probe}) and were compared with the original run in "
                 "float64, the reference; an exact conversion must be no further from it than the original itself "
                 "(×1.5, or a few ulps).")
    ratio = ver.get("ratio")
    rows = [
        "| Metric | Value |",
        "|---|---|",
        f"| converted ({dt}) vs the float64 original, relative max \\|Δ{kind}\\| | {conv} |",
        f"| the original in {dt} vs the float64 original | {orig} |",
        f"| ratio converted / original | {ratio:.3g} |" if ratio is not None else "| ratio converted / original | n/a |",
    ]
    if not approximate:
        rows.append(f"| bound the converted error was held to | {_num(ver.get('tolerance'), '.1e')} |")
    rows += _distribution_rows(ver)
    rows.append(f"| converted vs the original in {dt}: max \\|Δ{kind}\\| | {_num(ver.get('max_abs_diff'))} (relative "
                f"{_num(ver.get('rel_max_abs_diff'))}) |")
    for name, f in (ver.get("outputs") or {}).items():
        note = ", mean removed" if f.get("mean_removed") else ""
        rows.append(f"| output `{name}`{note}: converted / the original in {dt} vs the float64 original | "
                    f"{_num(f.get('converted_error'), '.1e')} / {_num(f.get('original_error'), '.1e')} |")
    if ver.get("blocks_checked"):
        rows.append(f"| blocks checked | {ver['blocks_checked']} (each block's stream, writer outputs and norm inputs) |")
    raw = ver.get("raw_stream_outputs") or []
    if raw:
        rows += ["", f"{', '.join(f'`{n}`' for n in raw)} {'is' if len(raw) == 1 else 'are'} the raw residual stream: "
                 "the converted model returns it mean-removed (x − mean(x) per token) by design, so it was compared "
                 "with the original after removing each token's mean; every other output is unchanged."]
    return [intro, "", *rows, *_verification_warnings(ver, status or "")]
