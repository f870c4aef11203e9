"""README doctest: every fenced ```bash block of README.md runs as written (issue 11 item 8).

Each block runs in ``bash -euo pipefail``, in README order, in one scratch folder that mirrors the checkout (symlinks
to its top-level entries), so commands may use relative repository paths (``normswap/assets/macbeth.txt``) and what
one block writes (``shakespeare-gpt2-rms``) is there for the next, as for a reader going down the page; nothing is
written into the checkout. The blocks are found generically: a block added to README.md is a new test.

What the test changes, and only this:

* ``pip install ...`` steps of a ``&&`` chain are dropped (the package under test is already installed), and a
  ``pytest`` command only collects (``--collect-only``): this test is part of that suite, it must not recurse.
* A line whose comment starts with ``# network`` needs the Hugging Face Hub (e.g. a real ``normswap push``); it is
  not run, and the test reports it with a warning. Everything else must run offline.
* ``NORMSWAP_README_FAST`` (default ``1``) shortens the slow commands without skipping them: ``normswap convert``
  measures perplexity on 256 tokens and throughput once at batch 1, ``normswap bench`` times one short run,
  ``normswap eval`` reads 256 tokens, ``normswap finetune`` trains 2 small steps
  (a progressive LayerNorm removal takes every norm away at step 0). ``NORMSWAP_README_FAST=0`` runs
  every command exactly as written (minutes: the MiniLM healing alone is ~3 min on 2 cores). A block with a line
  marked ``# slow`` carries the ``slow`` pytest marker.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FAST = os.environ.get("NORMSWAP_README_FAST", "1").strip() not in ("0", "", "false", "no")

#: Flags appended to a ``normswap <command>`` in fast mode (argparse: a repeated flag's last value wins).
FAST_FLAGS: dict[str, list[str]] = {
    "convert": ["--eval-limit", "256", "--bench-prompt-len", "16", "--bench-new-tokens", "4",
                "--bench-batch-sizes", "1", "--bench-repeats", "1", "--bench-warmup", "0"],
    "eval": ["--limit", "256", "--samples", "16"],
    "bench": ["--prompt-len", "16", "--new-tokens", "4", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0"],
    "finetune": ["--set", "steps=2", "--set", "removal.start_step=0", "--set", "removal.gap_steps=0",
                 "--set", "removal.ramp_steps=1", "--set", "batch_size=4", "--set", "gradient_accumulation=1",
                 "--set", "schedule.warmup_steps=0", "--set", "data.eval_examples=8", "--set", "data.seq_len=32",
                 "--no-progress"],
}


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence in README.md
    text: str

    @property
    def slow(self) -> bool:
        return bool(re.search(r"#.*\bslow\b", self.text))


def bash_blocks(markdown: str) -> list[Block]:
    """Every fenced block whose info string is ``bash`` (or ``sh``/``shell``); transcripts and Python are not run."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(markdown.splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w+-]*)", line)
        if current is None:
            if fence and fence.group(1).lower() in ("bash", "sh", "shell"):
                current, start = [], number
        elif fence and not fence.group(1):
            blocks.append(Block(start, "\n".join(current)))
            current = None
        else:
            current.append(line)
    return blocks


def _split_comment(segment: str) -> tuple[str, str]:
    """``(command, comment)``: a ``#`` that starts a word and is not inside quotes begins a comment."""
    quote = None
    for i, ch in enumerate(segment):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or segment[i - 1].isspace()):
            return segment[:i].rstrip(), segment[i:]
    return segment.rstrip(), ""


def _fast(command: str) -> str:
    words = command.split()
    if len(words) >= 2 and words[0] == "normswap" and words[1] in FAST_FLAGS and "--help" not in words:
        return command + " " + " ".join(shlex.quote(w) for w in FAST_FLAGS[words[1]])
    return command


def rewrite(block: Block) -> tuple[str, list[str]]:
    """The script to run for ``block`` and the lines it leaves out because they need the network."""
    script, network = [], []
    for line in block.text.splitlines():
        command, comment = _split_comment(line)
        if re.match(r"#\s*network\b", comment):
            network.append(line.strip())
            continue
        parts = []
        for part in command.split("&&"):
            words = part.split()
            if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
                continue
            if "pytest" in words[:3]:
                part = part.rstrip() + " --collect-only -q"
            parts.append(_fast(part.strip()) if FAST else part.strip())
        if any(parts):
            script.append(" && ".join(p for p in parts if p))
    return "\n".join(script), network


BLOCKS = bash_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_bash_blocks() -> None:
    assert len(BLOCKS) >= 4, "README.md lost its command blocks (or this parser lost them)"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch folder that looks like the checkout (symlinks), so relative repository paths resolve."""
    work = tmp_path_factory.mktemp("readme")
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name in ("build", "dist") or entry.name.endswith(".egg-info"):
            continue
        (work / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return work


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@pytest.mark.parametrize(
    "block", [pytest.param(b, id=f"line{b.line}", marks=[pytest.mark.slow] if b.slow else []) for b in BLOCKS]
)
def test_readme_block_runs(block: Block, workdir: Path) -> None:
    script, network = rewrite(block)
    for line in network:
        warnings.warn(f"README.md block at line {block.line}: needs the network, not run: {line}", stacklevel=1)
    if not script.strip():
        return
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=workdir, env=_env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, (
        f"README.md block at line {block.line} failed (exit {proc.returncode}).\nscript:\n{script}\n"
        f"stdout (tail):\n{proc.stdout[-3000:]}\nstderr (tail):\n{proc.stderr[-3000:]}"
    )
    assert "Traceback (most recent call last)" not in proc.stderr


def test_rewrite_rules() -> None:
    """The rewriting itself, on a made-up block: what is dropped, collected only, shortened, and reported."""
    block = Block(1, "\n".join([
        "pip install torch==2.13.0 && pip install -e '.[dev]' && normswap convert -o out   # offline demo",
        "pip install -e '.[dev]' && python -m pytest -q tests      # tests",
        'normswap push out you/out --commit-message "a # in quotes"   # network: needs a Hub token',
        "MINILM=$(python -c 'print(1)')   # define it; no network needed",
        "normswap finetune a --teacher b --recipe minilm --text-file t -o c   # slow",
    ]))
    script, network = rewrite(block)
    lines = script.splitlines()
    assert lines[0].startswith("normswap convert -o out") and "pip" not in script
    assert lines[1] == "python -m pytest -q tests --collect-only -q"
    assert network == ['normswap push out you/out --commit-message "a # in quotes"   # network: needs a Hub token']
    assert lines[2] == "MINILM=$(python -c 'print(1)')"
    assert block.slow and lines[3].startswith("normswap finetune a --teacher b")
    if FAST:
        assert "--set steps=2" in lines[3] and "--eval-limit 256" in lines[0]


def test_blocks_use_nothing_outside_the_clone() -> None:
    """Paths above the checkout (``../shared/...``) exist only on the machine the README was written on."""
    for block in BLOCKS:
        assert "../" not in block.text, f"README.md block at line {block.line} reads outside the clone"
