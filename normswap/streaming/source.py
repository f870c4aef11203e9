"""Finding and validating a checkpoint's safetensors files before anything is written.

Every check that can fail on the source (missing shard, truncated file, index and shards disagreeing, pickle-only
checkpoint) runs here, so a bad source is refused before an output folder exists.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from normswap.errors import CheckpointError
from normswap.streaming.safetensors_io import ITEMSIZE, TensorEntry, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class SourceCheckpoint:
    """A local checkpoint folder and the location of every tensor in it, in file order."""

    folder: Path
    files: list[Path]
    tensors: dict[str, TensorEntry] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())

    @property
    def fp32_bytes(self) -> int:
        """Size once loaded in float32, which is what the in-memory path does (floats widened, others as is)."""
        return sum(e.numel * 4 if e.dtype in ("F16", "BF16", "F32") else e.nbytes for e in self.tensors.values())

    @property
    def largest_tensor(self) -> TensorEntry:
        return max(self.tensors.values(), key=lambda e: e.nbytes)


def _pickle_error(folder: Path) -> CheckpointError:
    return CheckpointError(
        f"{folder} holds a pickle checkpoint (pytorch_model*.bin); streaming conversion reads only safetensors and "
        "never unpickles a file (unpickling runs arbitrary code). Convert it to safetensors first, e.g. "
        "`transformers.AutoModel.from_pretrained(folder).save_pretrained(new_folder)` on a machine with enough RAM, "
        "or with the `safetensors` convert script, then stream the new folder."
    )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of ``folder`` in index order; raises a readable error for anything else."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; streaming conversion needs a local save_pretrained folder")
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc}); re-download it") from exc
        names = sorted(set(weight_map.values()))  # numbered shard names: sorted = the order they were written
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{index.name} points at shard(s) missing from {folder}: {', '.join(missing)}. The download is "
                "incomplete; fetch the missing file(s) and run again"
            )
        return [folder / n for n in names]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    if any((folder / p).is_file() for p in PICKLE_FILES) or any(folder.glob("pytorch_model-*.bin")):
        raise _pickle_error(folder)
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}; is it a save_pretrained output?")


def open_checkpoint(folder: str | os.PathLike) -> SourceCheckpoint:
    """Read every header (not the data) and check that index, files and headers agree."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json; streaming conversion needs a save_pretrained folder")
    files = weight_files(folder)
    source = SourceCheckpoint(folder, files)
    for path in files:
        _, entries = read_header(path)
        for e in entries:
            if e.dtype not in ITEMSIZE:
                raise CheckpointError(f"{path.name}: tensor {e.name} has unknown dtype {e.dtype}")
            if e.name in source.tensors:
                raise CheckpointError(f"tensor {e.name} appears in both {source.tensors[e.name].file.name} and "
                                      f"{path.name}; the checkpoint is inconsistent")
            source.tensors[e.name] = e
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        absent = [k for k, f in weight_map.items() if k not in source.tensors or source.tensors[k].file.name != f]
        if absent:
            raise CheckpointError(
                f"{INDEX_FILE} lists {len(absent)} tensor(s) that are not in the shard it names (first: {absent[0]} -> "
                f"{weight_map[absent[0]]}); the index and the shards come from different saves"
            )
    if not source.tensors:
        raise CheckpointError(f"{folder} holds no tensors")
    return source


def available_ram() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), or total RAM where that is unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
