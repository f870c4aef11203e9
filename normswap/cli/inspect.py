"""``normswap inspect SRC``: what a conversion would touch, which norms are exact and why, without converting."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show what would be converted, exactly or not, and why")
    p.add_argument("src", nargs="?", default=None, help="hub id or local folder (default: embedded shakespeare-gpt2)")
    p.add_argument("--revision", default=None)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def describe(plan) -> dict:
    a = plan.adapter
    return {
        "model_type": a.model_type,
        "block_style": a.block_style,
        "norm_position": a.norm_position,
        "exact": not plan.approximate_norms,
        "not_exact_reasons": plan.not_exact_reasons,
        "tied_head": plan.tied_head,
        "writers": [{"name": w.name, "layout": w.layout} for w in plan.writers],
        "norms": [
            {"name": n.name, "exact": n.exact, "recentered": n.spec.writes_stream, "readers": [r for r, _ in n.readers]}
            for n in plan.norms
        ],
        "kept_norms": plan.kept,
        "unaccounted_norms": plan.unaccounted,
        "absent_optional_roles": plan.skipped_optional,
        "notes": a.notes,
    }


def run(args: argparse.Namespace) -> int:
    from normswap.assets import resolve_model
    from normswap.checkpoint import skeleton_model
    from normswap.conversion import plan_conversion

    src = resolve_model(args.src)
    plan = plan_conversion(skeleton_model(src, revision=args.revision), approximate=True)
    info = describe(plan)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{src}: model_type {info['model_type']} ({info['block_style']} blocks, {info['norm_position']}-LN)")
    if info["exact"]:
        print("exact conversion possible: every swapped norm reads a sum of centred writers")
    else:
        print("exact conversion NOT possible: " + "; ".join(info["not_exact_reasons"]))
        print("  -> `normswap convert --approximate` swaps them anyway, measures the damage; heal with `normswap finetune`")
    if info["tied_head"]:
        print("lm_head is tied to the token embedding: it will be untied (the head keeps the original matrix)")
    print(f"writers to centre ({len(info['writers'])}):")
    for w in info["writers"]:
        print(f"  {w['name']}  [{w['layout']}]")
    print(f"norms to swap ({len(info['norms'])}):")
    for n in info["norms"]:
        tag = "exact" if n["exact"] else "approximate"
        if n["recentered"]:
            tag += ", writes the stream: re-centring RMSNorm"
        print(f"  {n['name']}  ({tag})")
    for name in info["kept_norms"]:
        print(f"  keep LayerNorm: {name} (does not read the residual stream)")
    for name in info["unaccounted_norms"]:
        print(f"  keep LayerNorm: {name} (not described by the adapter)")
    if info["notes"]:
        print(f"notes: {info['notes']}")
    return 0
