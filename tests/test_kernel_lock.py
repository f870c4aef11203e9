"""A killed kernel build leaves torch's owner-less ``lock`` file behind; normswap must never wait on it forever."""

from __future__ import annotations

import os
import threading
import time

from normswap.kernels import _build


def _lock_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory

    build = _get_build_directory("normswap_lock_probe", verbose=False)
    lock = os.path.join(build, "lock")
    open(lock, "w").close()
    return lock


def test_a_stale_lock_is_removed_with_a_warning(tmp_path, monkeypatch, caplog):
    lock = _lock_path(tmp_path, monkeypatch)
    old = time.time() - 2 * _build.STALE_LOCK_S
    os.utime(lock, (old, old))
    start = time.perf_counter()
    _build._wait_for_lock("normswap_lock_probe")
    assert time.perf_counter() - start < 5
    assert not os.path.exists(lock)
    assert "stale kernel build lock" in caplog.text


def test_a_fresh_lock_is_waited_on_until_its_build_finishes(tmp_path, monkeypatch, caplog):
    lock = _lock_path(tmp_path, monkeypatch)
    threading.Timer(0.6, os.remove, args=(lock,)).start()  # the other process's build ends
    start = time.perf_counter()
    _build._wait_for_lock("normswap_lock_probe", poll=0.05)
    waited = time.perf_counter() - start
    assert 0.5 <= waited < 5
    assert "waiting for another process's build" in caplog.text


def test_a_fresh_lock_that_never_goes_away_turns_stale_instead_of_hanging(tmp_path, monkeypatch):
    lock = _lock_path(tmp_path, monkeypatch)
    start = time.perf_counter()
    _build._wait_for_lock("normswap_lock_probe", stale_after=0.5, poll=0.05)
    assert 0.4 <= time.perf_counter() - start < 5
    assert not os.path.exists(lock)
