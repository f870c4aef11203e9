"""``normswap inspect SRC``: what a conversion would touch, which norms are exact and why, without converting."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show what would be converted, exactly or not, and why")
    p.add_argument("src", nargs="?", default=None, help="hub id or local folder (default: embedded shakespeare-gpt2)")
    p.add_argument("--revision", default=None)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--discover", action="store_true",
                   help="measure the structure on a small instance (even when an adapter is declared) and print it as "
                   "the register(Adapter(...)) entry to paste into normswap/adapters/architectures.py")
    p.set_defaults(func=run)


def describe(plan) -> dict:
    a = plan.adapter
    return {
        "model_type": a.model_type,
        "origin": a.origin,
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
    if args.discover:
        return run_discover(src, args)
    plan = plan_conversion(skeleton_model(src, revision=args.revision), approximate=True)
    info = describe(plan)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{src}: model_type {info['model_type']} ({info['block_style']} blocks, {info['norm_position']}-LN)")
    if info["origin"] == "discovered":
        print("no declared adapter: structure discovered by measurement (`--discover` prints it as Python)")
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


def discovery_info(found) -> dict:
    """The JSON form of a discovery: the adapter as code, and every norm with its status and reason."""
    from normswap.discovery import render_adapter

    return {
        "model_type": found.model_type,
        "adapter": render_adapter(found.adapter) if found.adapter is not None else None,
        "norms": [{"name": n.name, "status": n.status, "reason": n.reason, "writes_stream": n.writes_stream,
                   "readers": n.readers, "mean_over_rms": n.mean_ratio} for n in found.norms],
        "writers": [{"name": w.name, "layout": w.layout, "scale": w.scale} for w in found.writers],
        "rms_norms": found.rms_norms,
        "raw_readers": found.raw_readers,
        "raw_stream_outputs": found.raw_stream_outputs,
        "seconds": round(found.seconds, 3),
        "notes": found.notes,
        "unrun_norms": found.unrun_norms,
        "other_norms": found.other_norms,
    }


def run_discover(src: str, args: argparse.Namespace) -> int:
    """``inspect --discover``: discovery from the config alone (a small instance; no weights are read)."""
    import transformers

    from normswap.checkpoint import model_class_for
    from normswap.discovery import discover_from_config
    from normswap.errors import CheckpointError

    kwargs = {"revision": args.revision} if args.revision else {}
    try:
        config = transformers.AutoConfig.from_pretrained(src, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"could not read the config of {src}: {type(exc).__name__}: {exc}") from exc
    found = discover_from_config(config, model_class_for(config))
    if found.adapter is None and found.unrun_norms:  # LayerNorms the probe never reached: never "nothing to convert"
        from normswap.adapters.registry import unrun_message
        from normswap.errors import UnsupportedArchitectureError

        raise UnsupportedArchitectureError(unrun_message(found.model_type, found.unrun_norms))
    info = discovery_info(found)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    kinds = {s: sum(n["status"] == s for n in info["norms"]) for s in ("exact", "approximate", "kept")}
    print(f"# {src}: model_type {found.model_type}, discovered in {info['seconds']:.1f} s on a small instance: "
          f"{kinds['exact']} exact, {kinds['approximate']} approximate, {kinds['kept']} kept LayerNorm(s), "
          f"{len(found.rms_norms)} RMSNorm(s)")
    if found.adapter is None:
        from normswap.adapters.registry import no_layernorm_message

        print("# " + (f"already RMSNorm ({len(found.rms_norms)} scale-only norm(s)): nothing to convert"
                      if found.rms_norms else no_layernorm_message(found.model_type, found.other_norms)))
        return 0
    print(info["adapter"])
    for n in found.norms:
        if n.status != "exact":
            print(f"# {'keep LayerNorm' if n.status == 'kept' else 'approximate'}: {n.name}: {n.reason}")
    for reader, why in found.raw_readers.items():
        print(f"# raw reader: {reader} {why}")
    if found.raw_stream_outputs:
        print(f"# outputs that are the residual stream (mean-removed after conversion): "
              f"{', '.join(found.raw_stream_outputs)}")
    for note in found.notes:
        print(f"# note: {note}")
    return 0
