"""Resuming an interrupted streaming conversion, one finished shard at a time.

A 140 GB conversion killed at 90% should not start from zero. The streaming converter therefore works in a
deterministic folder beside the output (``.NAME.normswap-partial``) instead of a random temporary one, and records
each output shard there once it is complete *and* fsync'd. Re-running the same command finds the folder, checks that
it was made from the same source files (names, sizes, modification times), the same options and the same normswap
version, re-checks every recorded shard's size and header, and writes only the shards that are missing. Anything
that does not match is discarded, never trusted, so a resumed output is byte-for-byte what a fresh run writes.

Granularity is one output shard (``--max-shard-size``): at most one shard's worth of work is redone. A lock on the
folder stops two runs writing the same output at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from normswap.errors import NormswapError
from normswap.streaming.direct_io import fsync_path
from normswap.streaming.output import OutputShard
from normswap.streaming.source import SourceCheckpoint

logger = logging.getLogger(__name__)

STATE_FILE = "normswap_stream_state.json"
LOCK_FILE = ".normswap.lock"
STATE_VERSION = 1


def partial_folder(target: Path) -> Path:
    """Where an interrupted conversion into ``target`` keeps its finished shards."""
    return target.with_name(f".{target.name}.normswap-partial")


def fingerprint(source: SourceCheckpoint, shards: list[OutputShard], options: dict) -> dict:
    """Everything a finished shard depends on. Two runs with equal fingerprints write identical bytes."""
    from normswap._version import __version__

    return {
        "state_version": STATE_VERSION,
        "normswap": __version__,
        "source": str(source.folder.resolve()),
        "files": [{"name": f.name, "size": (st := f.stat()).st_size, "mtime_ns": st.st_mtime_ns} for f in source.files],
        "options": options,
        "shards": [{"name": s.name, "size": s.size, "header_sha256": hashlib.sha256(s.header).hexdigest()}
                   for s in shards],
    }


def _write_json_durably(path: Path, payload: dict) -> None:
    """Replace ``path`` so that a crash leaves either the old or the new content, never a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _shard_intact(path: Path, shard: OutputShard) -> bool:
    """Size and header as planned: catches a shard truncated or rewritten behind our back."""
    try:
        if path.stat().st_size != shard.size:
            return False
        with open(path, "rb") as fh:
            return fh.read(len(shard.header)) == shard.header
    except OSError:
        return False


@dataclass
class ResumeState:
    """The partial folder's record of finished shards; :meth:`mark_done` is called by the writer's I/O thread."""

    folder: Path
    fingerprint: dict
    done: set[str] = field(default_factory=set)
    resumed: set[str] = field(default_factory=set)  # finished by an earlier run, skipped by this one

    def mark_done(self, shard_name: str) -> None:
        self.done.add(shard_name)
        _write_json_durably(self.folder / STATE_FILE, {**self.fingerprint, "done": sorted(self.done)})


def _load_previous(folder: Path, expected: dict, shards: list[OutputShard]) -> set[str] | None:
    """Names of the shards an earlier run finished, or None when its work cannot be reused (and why is logged)."""
    try:
        saved = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        logger.warning("discarding %s: it has no readable record of finished shards", folder)
        return None
    done = saved.pop("done", [])
    if saved != expected:
        changed = sorted(k for k in expected if saved.get(k) != expected[k])
        logger.warning("discarding the partial conversion in %s: its %s differ from this run's", folder,
                       ", ".join(changed))
        return None
    by_name = {s.name: s for s in shards}
    return {name for name in done if name in by_name and _shard_intact(folder / name, by_name[name])}


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise NormswapError(
                f"another normswap run is writing {folder} right now; wait for it to finish, or write to another "
                "output folder") from None
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def resumable_output_dir(target: Path, *, expected: dict, shards: list[OutputShard], overwrite: bool,
                         resume: bool = True) -> Iterator[ResumeState]:
    """Like :func:`normswap.checkpoint.atomic_output_dir`, but the work folder survives an interruption.

    Yields the state (with the shards already finished by an earlier run in ``resumed``); on success the folder is
    renamed into ``target``. A :class:`NormswapError` inside the block (bad input, failed verification: rerunning
    would fail the same way) removes the folder; anything else (Ctrl-C, disk full, a crash) keeps it for the next run.
    """
    from normswap.checkpoint import check_output_target, replace_target

    check_output_target(target, overwrite)
    folder = partial_folder(target)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists() and not folder.is_dir():
        raise NormswapError(f"{folder} exists and is not a folder; remove it and run again")
    folder.mkdir(exist_ok=True)
    with _locked(folder):
        previous = _load_previous(folder, expected, shards) if resume and (folder / STATE_FILE).exists() else None
        keep = previous or set()
        for path in folder.iterdir():  # a fresh start, or whatever a previous run left unfinished
            if path.name != LOCK_FILE and path.name not in keep:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        state = ResumeState(folder, expected, done=set(keep), resumed=set(keep))
        _write_json_durably(folder / STATE_FILE, {**expected, "done": sorted(keep)})
        if keep:
            logger.warning("resuming the interrupted conversion in %s: %d of %d shard(s) already done", folder,
                           len(keep), len(shards))
        try:
            yield state
        except NormswapError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        except BaseException:
            logger.warning("conversion interrupted; finished shards are kept in %s: run the same command again to "
                           "resume, or delete that folder", folder)
            raise
        (folder / STATE_FILE).unlink()
        (folder / LOCK_FILE).unlink()
        replace_target(folder, target)
