"""Upload an output folder to the Hugging Face Hub (``normswap push``).

Split in two so the dry run shares every decision with the real upload: :func:`plan_push` checks the folder and
lists exactly what would be uploaded (no network, no writes); :func:`push` writes the refreshed model card and the
remote code (only where they are missing or generated) and uploads that same file list with ``huggingface_hub``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from normswap.errors import NormswapError
from normswap.publish.card import CARD_FILE, is_generated_card, read_front_matter, render_model_card
from normswap.publish.remote_code import MODELING_FILE, patch_config, stock_identity

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


@dataclass
class PushPlan:
    """What ``normswap push`` would do: checked folder, destination, and the exact files with their sizes."""

    folder: Path
    repo_id: str
    private: bool
    revision: str | None
    commit_message: str
    #: relative posix path -> size in bytes, as uploaded (generated files at their new size)
    files: dict[str, int]
    #: files push writes into the folder before uploading: relative path -> content
    generated: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def list_folder_files(folder: Path) -> dict[str, int]:
    """Every regular file under ``folder`` except hidden ones and Python caches (never meant for the Hub)."""
    found = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            if name.startswith(".") or name.endswith(".pyc"):
                continue
            path = Path(root) / name
            if path.is_file():  # follows links: the linked file's bytes are what gets uploaded
                found[path.relative_to(folder).as_posix()] = path.stat().st_size
    return dict(sorted(found.items()))


def _read_config(folder: Path) -> dict | None:
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def check_output_folder(folder: Path, files: dict[str, int], force: bool = False) -> tuple[dict | None, list[str]]:
    """The folder's config if it is a publishable normswap output; refusals raise, ``force`` turns them into warnings.

    ``files`` is the folder's listing (:func:`list_folder_files`).
    """
    config = _read_config(folder)
    problems: list[str] = []
    meta = (config or {}).get("normswap")
    if config is None:
        problems.append(f"{folder} is not a normswap output: it has no readable config.json")
    elif not isinstance(meta, dict) or "swapped_norms" not in meta:
        problems.append(f"{folder} is not a normswap output: config.json has no 'normswap' metadata "
                        "(convert it with `normswap convert` first)")
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        problems.append(f"{folder} holds no weights (*.safetensors / *.bin)")
    verification = meta.get("verification") if isinstance(meta, dict) else None
    if isinstance(verification, dict) and not verification.get("passed", True):
        rel, tol = verification.get("rel_max_abs_diff"), verification.get("tolerance")
        figures = f" (relative max |Δ| {rel:.3e}, tolerance {tol:.0e})" if rel is not None and tol is not None else ""
        problems.append(f"{folder} failed verification when it was converted{figures}; "
                        "publishing it would spread a broken model")
    if problems and not force:
        raise NormswapError("refusing to push: " + "; ".join(problems) + ". Pass --force to push anyway.")
    return (config if isinstance(meta, dict) else None), [f"--force: {p}" for p in problems]


def _generated_files(folder: Path, config: dict, repo_id: str) -> dict[str, str]:
    """Files to (re)write before upload: remote code when it is missing, and the model card unless it is foreign.

    The card is regenerated so that it names the repo in its loading snippets and includes a report added after save.
    """
    from normswap._version import __version__

    generated: dict[str, str] = {}
    auto_map = config.get("auto_map") or {}
    module = MODELING_FILE.removesuffix(".py") + "."
    if not (folder / MODELING_FILE).is_file() or not any(str(v).startswith(module) for v in auto_map.values()):
        config, generated[MODELING_FILE] = patch_config(config, __version__)
        generated["config.json"] = json.dumps(config, indent=2, sort_keys=True) + "\n"
    card = folder / CARD_FILE
    if not card.exists() or is_generated_card(card):
        license_ = read_front_matter(card.read_text(encoding="utf-8")).get("license") if card.exists() else None
        generated[CARD_FILE] = render_model_card(folder, repo_id=repo_id, license=license_, config=config)
    return generated


def validate_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as _validate

    try:
        _validate(repo_id)
    except HFValidationError as exc:
        raise NormswapError(f"invalid repo id {repo_id!r}: {exc}") from None
    if "/" not in repo_id:
        raise NormswapError(f"repo id {repo_id!r} needs a namespace: use USER/NAME or ORG/NAME")


def plan_push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    force: bool = False,
) -> PushPlan:
    """Check ``folder`` and decide exactly what would be uploaded; touches neither the network nor the folder."""
    folder = Path(folder).resolve()
    validate_repo_id(repo_id)
    if not folder.is_dir():
        raise NormswapError(f"{folder} is not a folder; pass the output folder of `normswap convert`")
    files = list_folder_files(folder)
    config, warnings = check_output_folder(folder, files, force=force)
    generated = _generated_files(folder, config, repo_id) if config is not None else {}
    for name, content in generated.items():
        files[name] = len(content.encode("utf-8"))
    if config is not None and not commit_message:
        from normswap._version import __version__

        model_type, _ = stock_identity(config)
        mode = config["normswap"].get("mode", "exact")
        commit_message = f"Upload {model_type} converted to RMSNorm ({mode}) with normswap {__version__}"
    return PushPlan(folder, repo_id, private, revision, commit_message or "Upload with normswap",
                    dict(sorted(files.items())), generated, warnings)


def format_plan(plan: PushPlan) -> str:
    """The dry-run listing: every file and its size, then where it would go."""
    width = max((len(n) for n in plan.files), default=0)
    lines = [f"would upload {len(plan.files)} file(s) from {plan.folder}:"]
    for name, size in plan.files.items():
        note = "  (written by push)" if name in plan.generated else ""
        lines.append(f"  {name:<{width}}  {size:>12,} bytes  {human_size(size):>10}{note}")
    lines.append(f"  total {plan.total_bytes:,} bytes ({human_size(plan.total_bytes)})")
    where = f"to https://huggingface.co/{plan.repo_id}" + (f" (branch {plan.revision})" if plan.revision else "")
    lines.append(where + (", private" if plan.private else "") + f"; commit message: {plan.commit_message!r}")
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def _escape_pattern(name: str) -> str:
    """``upload_folder`` matches allow_patterns with fnmatch: make each path match only itself."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)


def ensure_token() -> None:
    """Fail before any network call when no token is configured (huggingface_hub would fail later, less clearly)."""
    import huggingface_hub

    if not huggingface_hub.get_token():
        raise NormswapError("no Hugging Face token found: set HF_TOKEN or run `hf auth login`, then retry")


def push(plan: PushPlan, api=None) -> str:
    """Write the generated files, then create the repo (and branch) and upload the planned files; returns the URL."""
    import huggingface_hub

    if api is None:
        ensure_token()
        api = huggingface_hub.HfApi()
    for name, content in plan.generated.items():
        (plan.folder / name).write_text(content, encoding="utf-8")
    try:
        api.create_repo(plan.repo_id, repo_type="model", private=plan.private, exist_ok=True)
        if plan.revision:
            api.create_branch(plan.repo_id, branch=plan.revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=plan.repo_id, folder_path=str(plan.folder), repo_type="model", revision=plan.revision,
            commit_message=plan.commit_message, allow_patterns=[_escape_pattern(n) for n in plan.files],
        )
    except NormswapError:
        raise
    except Exception as exc:  # noqa: BLE001 - network/auth failures become one readable line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise NormswapError(f"upload to {plan.repo_id} failed ({type(exc).__name__}: {first}); check your network, "
                            "your token's write access (`hf auth whoami`) and the repo id") from exc
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{plan.repo_id}"
