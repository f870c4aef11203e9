"""A write that fails half-way through a streamed shard (``ulimit -f``, a full disk) is reported as that error.

Found by trying `ulimit -f 100; normswap convert MODEL --streaming`: the failed chunk's buffer was closed twice on
the abort path, so an ``AttributeError`` traceback replaced the one-line "file size limit" message.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from normswap.assets import DEFAULT_MODEL
from normswap.streaming.direct_io import ALIGN, AlignedBuffer, ShardAppender

REPO = Path(__file__).resolve().parents[1]


def test_aligned_buffer_close_twice_is_harmless():
    buf = AlignedBuffer(ALIGN)
    buf.close()
    buf.close()


def test_failed_chunk_write_surfaces_the_os_error_not_a_cleanup_error(tmp_path, monkeypatch):
    def too_large(self, data, offset):
        raise OSError(errno.EFBIG, "File too large")

    with ThreadPoolExecutor(1) as pool:
        out = ShardAppender(tmp_path / "shard.safetensors", 8 * ALIGN, pool, chunk=ALIGN, depth=1)
        monkeypatch.setattr(type(out.file), "pwrite_all", too_large)
        with pytest.raises(OSError) as caught:
            try:
                out.append(torch.zeros(8 * ALIGN, dtype=torch.uint8))
            except BaseException:
                out.close(abort=True)  # what StreamWriter.write_shard does before re-raising
                raise
    assert caught.value.errno == errno.EFBIG


def test_streaming_under_a_file_size_limit_is_one_line(tmp_path):
    import resource

    cap = 100 << 10  # below the shipped model's weights, above its small files

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "normswap", "convert", str(DEFAULT_MODEL), "-o",
                           str(tmp_path / "out"), "--streaming", "--no-eval"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=limit)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and lines[-1].startswith("normswap: error:"), proc.stderr
    assert "file size limit" in lines[-1], lines[-1]
    assert not (tmp_path / "out").exists()
