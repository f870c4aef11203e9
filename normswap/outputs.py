"""Output folders: where they may go, and how they are written so that nothing is lost or half-written.

Every command that writes a model folder goes through :func:`atomic_output_dir` (or the streaming variant built on
:func:`replace_target`): the work happens in a temporary folder beside the target, which is renamed into place only
when complete. :func:`check_output_not_source` keeps the source out of harm's way, :func:`disk_error` turns a full
disk into one readable line, and :func:`carry_over_files` keeps the files of the source the conversion does not
replace (sentence-transformers modules, processors, ...).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from normswap.errors import DiskFullError, NormswapError, OutputExistsError, OutputPathError


def check_output_target(target: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output unless ``overwrite``: checked before any work starts."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        if not overwrite:
            raise OutputExistsError(
                f"output folder {target} exists and is not empty; choose another path or pass --force to replace it"
            )


def _spellings(path: str | os.PathLike) -> set[Path]:
    """The path as typed (absolute) and with every symlink resolved: a clash under either spelling is a clash."""
    p = Path(path).expanduser()
    return {Path(os.path.abspath(p)), p.resolve()}


def check_output_not_source(
    target: str | os.PathLike, *sources: str | os.PathLike | None, role: str = "source", what: str = "output folder",
) -> None:
    """Refuse an output that is a source folder, contains one, or lies inside one (under any symlink spelling).

    Replacing an output renames it aside and deletes it, so an output that *contains* the source would delete the
    source, and one inside it would write into it: both break the promise that the source is never modified.
    """
    for source in sources:
        if source is None or not Path(source).expanduser().exists():
            continue  # a hub id: the output cannot clash with a folder that is not there
        for out in _spellings(target):
            for src in _spellings(source):
                if out == src:
                    why = f"the {what} is the {role} folder ({src})"
                elif out in src.parents:
                    why = f"the {what} {out} contains the {role} folder {src}, so replacing it would delete it"
                elif src in out.parents:
                    why = f"the {what} {out} is inside the {role} folder {src}"
                else:
                    continue
                article = "an" if what[:1] in "aeiou" else "a"
                raise OutputPathError(f"{why}; normswap never modifies the source: choose {article} {what} outside it")


def disk_error(exc: BaseException, where: str | os.PathLike | None = None) -> NormswapError | None:
    """A one-line error for a write that ran out of disk, quota or file-size limit (``ulimit -f``); else ``None``.

    safetensors reports these as its own ``SafetensorError`` with the OS error inside the text, so the text counts too.
    """
    code = getattr(exc, "errno", None)
    text = str(exc)
    place = f" while writing {where}" if where else ""
    if code == errno.EFBIG or "File too large" in text or "FileTooLarge" in text:
        return DiskFullError(f"a file grew past the file size limit{place} (`ulimit -f`, or the file system's "
                             "largest file); nothing was saved. Raise the limit or write to another file system")
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "StorageFull" in text or "quota" in text:
        return DiskFullError(f"the disk is full (or over quota){place}; nothing was saved. Free some space or write "
                             "to another disk")
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give a finished output the permissions a plain ``mkdir``/``open`` would (755/644 under umask 022).

    ``mkdtemp`` makes its folder private (700) and safetensors writes its file 600; an output is meant to be shared.
    """
    mask = _umask()
    for root, _dirs, files in os.walk(folder):  # symlinked folders are not followed
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = Path(root, name)
            if not path.is_symlink():
                os.chmod(path, (0o777 if path.stat().st_mode & 0o100 else 0o666) & ~mask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def replace_target(finished: Path, target: Path) -> None:
    """Move a finished folder into place; an existing target (folder, file or link) is moved aside first and removed
    only afterwards, and put back if the final rename fails. The finished folder first gets umask permissions."""
    apply_umask(finished)
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.normswap-old-{os.getpid()}")
        target.rename(old)
    try:
        finished.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        _remove(old)


def _cannot_create(target: Path, exc: OSError) -> NormswapError:
    full = disk_error(exc, target)
    if full is not None:
        return full
    return OutputPathError(f"cannot create the output folder {target}: {exc.strerror or exc}; choose a folder you "
                           "can write to")


def probe_output_location(target: str | os.PathLike) -> None:
    """Fail in a second, not after minutes of converting, when the output folder cannot be created there.

    Creates and removes an empty hidden folder in the nearest existing ancestor: the only test that also holds for
    root, read-only mounts and pseudo file systems (``/proc``), where permission bits say nothing.
    """
    target = Path(target).expanduser().absolute()
    parent = next(p for p in (target.parent, *target.parent.parents) if p.exists() or p == p.parent)
    if not parent.is_dir():
        raise OutputPathError(f"cannot create the output folder {target}: {parent} is a file, not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=".normswap-probe-", dir=parent)).rmdir()
    except OSError as exc:
        raise _cannot_create(target, exc) from exc


def _make_temp_dir(target: Path) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.normswap-tmp-", dir=target.parent))
    except OSError as exc:
        raise _cannot_create(target, exc) from exc


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside ``path``; rename it into place only if the block finishes.

    A crash or Ctrl-C leaves the target untouched (no half-written output); an existing non-empty target is refused
    unless ``overwrite``. The finished folder gets umask permissions, like any folder the user makes (in
    :func:`replace_target`, which the streaming path shares).
    """
    target = Path(path).resolve()
    check_output_target(target, overwrite)
    tmp = _make_temp_dir(target)
    try:
        try:
            yield tmp
        except Exception as exc:
            full = disk_error(exc, target)
            if full is not None:
                raise full from exc
            raise
        replace_target(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


#: Weights in any format: the conversion replaces them, and a stale copy (ONNX, TF, GGUF...) would hold the original.
WEIGHT_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.h5", "*.msgpack", "*.onnx",
    "*.onnx_data", "*.ot", "*.gguf", "*.pt", "*.pth", "*.ckpt", "*.tflite", "*.mlmodel", "*.mlpackage", "*.xml",
    "*.tar", "*.zip",
)
#: Files normswap writes about *this* output; a source's copies describe another model.
GENERATED_PATTERNS = ("README.md", "normswap_report.*", "finetune_report.json", "modeling_normswap.py")


def _carried(rel: Path) -> bool:
    if any(part.startswith(".") for part in rel.parts):  # .git, .cache, normswap's own temporary folders
        return False
    if any(rel.match(p) for p in WEIGHT_PATTERNS):
        return False
    return len(rel.parts) > 1 or not any(rel.match(p) for p in GENERATED_PATTERNS)


def carry_over_files(src_dir: Path | None, dst: Path) -> list[str]:
    """Copy every file of the source folder that the output lacks, keeping sub-folders (returns what was copied).

    A model is more than its weights: sentence-transformers keeps ``modules.json``, ``1_Pooling/``,
    ``2_Normalize/``; processors and generation settings keep their own files. Whatever the conversion wrote wins;
    weights in other formats and normswap's own report files are left behind (they would describe the original).
    """
    copied: list[str] = []
    if src_dir is None or not Path(src_dir).is_dir():
        return copied
    src_dir = Path(src_dir)
    for root, dirs, files in os.walk(src_dir):
        here = Path(root).relative_to(src_dir)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if here.parts and not dirs and not files:
            (dst / here).mkdir(parents=True, exist_ok=True)  # an empty module folder (sentence-transformers' Normalize)
        for name in sorted(files):
            rel = here / name
            if _carried(rel) and not (dst / rel).exists():
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src_dir / rel, dst / rel)
                copied.append(rel.as_posix())
    return copied
