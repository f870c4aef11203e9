"""``normswap push OUT REPO_ID``: publish a converted folder on the Hugging Face Hub (``--dry-run`` to preview)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push",
        help="upload a converted folder to the Hugging Face Hub",
        description="Upload a normswap output folder (weights, config, model card, modeling_normswap.py) to the "
        "Hugging Face Hub with huggingface_hub. The token comes from HF_TOKEN or `hf auth login`. Folders that are "
        "not normswap outputs, or whose verification failed, are refused unless --force.",
    )
    p.add_argument("output", metavar="OUT", help="output folder of `normswap convert`")
    p.add_argument("repo_id", metavar="REPO_ID", help="destination repo, e.g. USER/gpt2-rms")
    p.add_argument("--private", action="store_true", help="create the repo as private (an existing repo keeps its visibility)")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing; default: main)")
    p.add_argument("--commit-message", default=None, help="commit message (default: names the model and normswap version)")
    p.add_argument("--dry-run", action="store_true", help="list every file and its size; no network, nothing written")
    p.add_argument("--force", action="store_true", help="push even a folder that failed verification or lacks metadata")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from normswap.publish.hub import ensure_token, format_plan, plan_push, push

    plan = plan_push(args.output, args.repo_id, private=args.private, revision=args.revision,
                     commit_message=args.commit_message, force=args.force)
    if args.dry_run:
        print(format_plan(plan))
        print("dry run: nothing was uploaded or written")
        return 0
    ensure_token()
    for warning in plan.warnings:
        print(f"warning: {warning}")
    print(f"uploading {len(plan.files)} file(s) from {plan.folder} to {plan.repo_id} ...")
    url = push(plan)
    print(f"pushed: {url}")
    return 0
