"""The CLI contract, for every subcommand the parser has (issue 11).

Bad input exits 2 with exactly one stderr line starting ``normswap: error:`` and no traceback; no output folder and
no temporary folder is left; the source's bytes do not change. Plus ``--help`` for every command, ``-v`` after the
subcommand, pure ``--json``, Ctrl-C at start-up, a closed pipe, a full disk, an unwritable output and umask
permissions. Commands run in-process through ``normswap.cli.main`` (fast); a subprocess only where a signal, a
resource limit or a real pipe is the point.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers as T
from tiny_models import make

from normswap.assets import DEFAULT_MODEL
from normswap.cli import build_parser, main, subcommands

COMMANDS = sorted(subcommands(build_parser()))
REPO = Path(__file__).resolve().parents[1]


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def temp_leftovers(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if ".normswap" in p.name
                  or "normswap-tmp" in p.name or "normswap-old" in p.name or "normswap-probe" in p.name)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse (--help, argument errors)
        code = exc.code if isinstance(exc.code, int) else 2
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, err: str, expect: str = "") -> str:
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("normswap: error:"), err
    assert expect.lower() in lines[0].lower(), (expect, lines[0])
    return lines[0]


# ---- fixtures: tiny models saved once per module --------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract")
    make("gpt2").save_pretrained(root / "gpt2")
    T.BertModel(T.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64)).save_pretrained(root / "bert")
    assert main(["convert", str(root / "gpt2"), "-o", str(root / "gpt2-rms"), "--no-eval"]) == 0
    (root / "corrupt").mkdir()
    (root / "corrupt" / "config.json").write_text("{ not json")
    (root / "empty.txt").write_text("   \n")
    (root / "short.txt").write_text("Hello")
    (root / "train.txt").write_text("To be, or not to be, that is the question.\n" * 50)
    (root / "afile").write_text("a file")
    paths = {p.name.replace(".txt", "_txt"): p for p in root.iterdir()}
    return {**paths, "root": root}


#: (command, case name) -> argv template; {name} is a path in `world`, {out} the output path of the case.
CASES: dict[tuple[str, str], list[str]] = {
    ("convert", "missing source"): ["convert", "./does-not-exist", "-o", "{out}"],
    ("convert", "mistyped folder"): ["convert", "{gpt2}-typo", "-o", "{out}"],
    ("convert", "hub id, offline, not cached"): ["convert", "nosuch-org/nosuch-model", "-o", "{out}"],
    ("convert", "source is a file"): ["convert", "{afile}", "-o", "{out}"],
    ("convert", "not a model folder"): ["convert", "{corrupt}", "-o", "{out}", "--no-eval"],
    ("convert", "existing output"): ["convert", "{gpt2}", "-o", "{gpt2-rms}", "--no-eval"],
    ("convert", "output is the source"): ["convert", "{gpt2}", "-o", "{gpt2}", "--force", "--no-eval"],
    ("convert", "output contains the source"): ["convert", "{gpt2}", "-o", "{root}", "--force", "--no-eval"],
    ("convert", "output inside the source"): ["convert", "{gpt2}", "-o", "{gpt2}/rms", "--force", "--no-eval"],
    ("convert", "streaming output contains the source"): ["convert", "{gpt2}", "-o", "{root}", "--force",
                                                           "--streaming"],
    ("convert", "output cannot be created"): ["convert", "{gpt2}", "-o", "/proc/normswap-out", "--no-eval"],
    ("convert", "output under a file"): ["convert", "{gpt2}", "-o", "{afile}/out", "--no-eval"],
    ("convert", "post-LN without --approximate"): ["convert", "{bert}", "-o", "{out}", "--no-eval"],
    ("convert", "unknown dtype"): ["convert", "{gpt2}", "-o", "{out}", "--dtype", "float7", "--no-eval"],
    ("convert", "streaming with --approximate"): ["convert", "{bert}", "-o", "{out}", "--streaming", "--approximate"],
    ("convert", "failed verification"): ["convert", "{gpt2}", "-o", "{out}", "--tolerance", "1e-30", "--no-eval"],
    ("convert", "bad shard size"): ["convert", "{gpt2}", "-o", "{out}", "--max-shard-size", "lots"],
    ("convert", "missing eval text"): ["convert", "{gpt2}", "-o", "{out}", "--eval-text", "{root}/nope.txt"],
    ("convert", "unknown flag"): ["convert", "{gpt2}", "-o", "{out}", "--frobnicate"],
    ("inspect", "missing source"): ["inspect", "./does-not-exist"],
    ("inspect", "not a model folder"): ["inspect", "{corrupt}"],
    ("eval", "missing model"): ["eval", "./does-not-exist"],
    ("eval", "missing text file"): ["eval", "--text-file", "{root}/nope.txt"],
    ("eval", "empty text file"): ["eval", "--text-file", "{empty_txt}"],
    ("eval", "encoder without --against"): ["eval", "{bert}"],
    ("eval", "no tokenizer"): ["eval", "{gpt2}"],
    ("eval", "window too long"): ["eval", "--max-length", "100000", "--limit", "50"],
    ("eval", "bad batch size"): ["eval", "--batch-size", "0"],
    ("bench", "missing model"): ["bench", "./does-not-exist"],
    ("bench", "bad batch sizes"): ["bench", "--batch-sizes", "1,zero"],
    ("bench", "prompt longer than the context"): ["bench", "{gpt2}", "--prompt-len", "100", "--new-tokens", "2",
                                                  "--repeats", "1", "--warmup", "0"],
    ("finetune", "missing student"): ["finetune", "./does-not-exist", "--teacher", "{gpt2}", "--recipe", "causal-lm",
                                      "-o", "{out}"],
    ("finetune", "unknown recipe"): ["finetune", "{gpt2-rms}", "--teacher", "{gpt2}", "--recipe", "no-such-recipe",
                                     "-o", "{out}"],
    ("finetune", "output contains the teacher"): ["finetune", "{gpt2-rms}", "--teacher", "{gpt2}", "--recipe",
                                                  "causal-lm", "-o", "{root}", "--force"],
    ("finetune", "missing text file"): ["finetune", "{gpt2-rms}", "--teacher", "{gpt2}", "--recipe", "causal-lm",
                                        "--text-file", "{root}/nope.txt", "-o", "{out}"],
    ("finetune", "missing required flags"): ["finetune", "{gpt2-rms}"],
    ("push", "not a normswap output"): ["push", "{gpt2}", "user/gpt2-rms", "--dry-run"],
    ("push", "invalid repo id"): ["push", "{gpt2-rms}", "not a repo id!", "--dry-run"],
    ("push", "missing folder"): ["push", "./does-not-exist", "user/x", "--dry-run"],
}

#: Every command also gets these, so a new subcommand is held to the contract the day it is registered.
GENERIC = {"unknown flag": ["{command}", "--no-such-flag-anywhere"],
           "missing path": ["{command}", "./does-not-exist-anywhere"]}


def all_cases() -> list[tuple[str, str, list[str]]]:
    cases = [(cmd, name, argv) for (cmd, name), argv in CASES.items()]
    cases += [(cmd, f"generic: {name}", [a.format(command=cmd) for a in argv])
              for cmd in COMMANDS for name, argv in GENERIC.items()]
    return cases


def test_every_registered_command_has_specific_bad_input_cases():
    covered = {cmd for cmd, _ in CASES}
    assert {"convert", "inspect", "eval", "bench", "finetune", "push"} <= set(COMMANDS)
    assert {"convert", "inspect", "eval", "bench", "finetune", "push"} <= covered


@pytest.mark.parametrize("command,case,template", all_cases(), ids=[f"{c}: {n}" for c, n, _ in all_cases()])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(world, tmp_path, command, case, template, capsys):
    out = tmp_path / "out"
    argv = [a.format(out=out, **{name: str(p) for name, p in world.items()}) for a in template]
    before = tree_digest(world["root"])
    embedded_before = tree_digest(DEFAULT_MODEL)
    code, _, err = run_cli(argv, capsys)
    assert_one_error_line(code, err)
    assert not out.exists(), "no output folder"
    assert temp_leftovers(tmp_path) == [] and temp_leftovers(world["root"]) == []
    assert tree_digest(world["root"]) == before, "sources unchanged"
    assert tree_digest(DEFAULT_MODEL) == embedded_before


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_of_every_command_exits_0(command, capsys):
    code, out, err = run_cli([command, "--help"] if command else ["--help"], capsys)
    assert code == 0 and "usage: normswap" in out and "Traceback" not in err


def test_verbose_flag_works_before_and_after_the_subcommand():
    parser = build_parser()
    for command, subparser in subcommands(parser).items():
        assert {"-v", "--verbose"} <= set(subparser._option_string_actions), command
    for argv in (["inspect", "x"], ["eval"], ["bench", "x"], ["push", "x", "y"], ["convert", "x", "-o", "y"],
                 ["finetune", "x", "--teacher", "t", "--recipe", "r", "-o", "o"]):
        assert parser.parse_args(argv).verbose is False
        assert parser.parse_args(["-v", *argv]).verbose is True
        assert parser.parse_args([*argv, "-v"]).verbose is True
        assert parser.parse_args([argv[0], "--verbose", *argv[1:]]).verbose is True


# ---- messages that say what happened ------------------------------------------------------------------------------

def test_mistyped_paths_say_no_such_folder_not_hub(world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(world["root"])
    for typo in ("./does-not-exist", "../nope-normswap", "gpt2/sub/typo", "gpt2/typo", "~/normswap-no-such-dir"):
        code, _, err = run_cli(["convert", typo, "-o", str(tmp_path / "out")], capsys)
        line = assert_one_error_line(code, err, "no such folder")
        assert "hub" not in line.lower()


def test_unreachable_hub_fails_fast_with_one_message(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused at once
    for key in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    started = time.perf_counter()
    code, _, err = run_cli(["convert", "nosuch-org/nosuch-model", "-o", str(tmp_path / "out")], capsys)
    assert time.perf_counter() - started < 10
    assert_one_error_line(code, err, "unreachable")


def test_no_tokenizer_is_reported_as_such(world, tmp_path, capsys):
    """An "empty" tokenizer (special tokens only, no vocabulary) is no tokenizer, not a text shorter than 2 tokens."""
    from tokenizers import Tokenizer, models

    from normswap.checkpoint import load_source

    folder = tmp_path / "src"
    make("gpt2").save_pretrained(folder)
    backend = Tokenizer(models.BPE())
    backend.add_special_tokens(["<s>", "</s>", "<pad>"])
    T.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                              pad_token="<pad>").save_pretrained(folder)
    assert load_source(folder).tokenizer is None
    code, _, err = run_cli(["eval", str(folder)], capsys)
    line = assert_one_error_line(code, err, "no tokenizer")
    assert "shorter" not in line
    code, out, _ = run_cli(["convert", str(folder), "-o", str(tmp_path / "out"), "--no-bench"], capsys)
    assert code == 0 and "no tokenizer" in out and "shorter" not in out


def test_a_very_short_text_gets_a_perplexity_with_a_warning(world, capsys):
    code, out, err = run_cli(["eval", "--text-file", str(world["short_txt"]), "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["tokens"] < 64 and result["warnings"] and "noise" in result["warnings"][0]
    assert "normswap: warning:" in err and "Traceback" not in err


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_convert_json_prints_pure_json_on_stdout(world, tmp_path, streaming, capsys):
    argv = ["convert", str(world["gpt2"]), "-o", str(tmp_path / "out"), "--no-eval", "--json"]
    code, out, err = run_cli(argv + (["--streaming"] if streaming else []), capsys)
    assert code == 0
    payload = json.loads(out)  # nothing but the JSON object
    assert payload["verification"]["passed"] and payload["output"] == str((tmp_path / "out").resolve())
    assert "saved" in err  # the summary lines went to stderr


# ---- signals, pipes, disks, permissions ---------------------------------------------------------------------------

def test_importing_the_cli_does_not_import_torch():
    """So Ctrl-C during the slow imports lands inside main's handler, not in a bare traceback."""
    code = "import sys, normswap.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_ctrl_c_during_startup_is_one_line_and_exit_130(monkeypatch, capsys):
    import normswap.cli as cli

    def interrupted(name, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    code, out, err = run_cli(["inspect"], capsys)
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines() == ["normswap: interrupted; no output was written."]


def test_ctrl_c_inside_a_lazy_library_import_is_still_an_interrupt(monkeypatch, capsys):
    """transformers re-raises an interrupted lazy import as ModuleNotFoundError; the KeyboardInterrupt is its cause."""
    import normswap.cli.inspect as inspect_cli

    def lazy_import_interrupted(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise ModuleNotFoundError("Could not import module 'GPT2LMHeadModel'") from exc

    monkeypatch.setattr(inspect_cli, "run", lazy_import_interrupted)
    code, _, err = run_cli(["inspect"], capsys)
    assert code == 130 and err.strip().splitlines() == ["normswap: interrupted; no output was written."]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("swallowed_as", ["nothing", "recursion"])
def test_a_real_sigint_that_a_library_swallows_is_still_an_interrupt(monkeypatch, capsys, swallowed_as):
    """An import cut short by Ctrl-C can be swallowed (``except ImportError: pass``) or leave a half-initialised
    module whose later error no longer carries the KeyboardInterrupt: both seen under load. Exit 130 all the same."""
    import normswap.cli.inspect as inspect_cli

    def swallowing_import(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # the real signal, through the handler main installs
            time.sleep(1)
        except KeyboardInterrupt:
            if swallowed_as == "recursion":
                raise RecursionError("maximum recursion depth exceeded") from None
        return 0

    monkeypatch.setattr(inspect_cli, "run", swallowing_import)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, whatever this run inherited
    try:
        code, _, err = run_cli(["inspect"], capsys)
        handler_after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "interrupted" in err
    assert handler_after is signal.default_int_handler  # main put the default handler back


@pytest.mark.parametrize("delay", [0.3, 1.5])
def test_a_real_sigint_during_startup_leaves_no_traceback(delay):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = ("import sys, normswap.cli; print('ready', flush=True); "
              "sys.exit(normswap.cli.main(['inspect']))")
    # The child starts with Ctrl-C's default action even when this run inherited SIGINT ignored (a background job
    # of a non-interactive shell does): Python then installs its KeyboardInterrupt handler, as at a terminal.
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            preexec_fn=_default_sigint,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(delay)  # inside main now, which spends seconds importing torch and transformers
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert proc.returncode == 130 and "interrupted" in err


def test_closed_pipe_exits_quietly(monkeypatch, capsys):
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code = main(["inspect", "--json"])
    assert code == 141
    assert capsys.readouterr().err == ""


def test_inspect_json_into_head_has_no_traceback():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "-c", f"{sys.executable} -m normswap inspect --json | head -c 10"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout == '{\n  "model_'[:10] and proc.stderr == "", proc.stderr


def test_file_size_limit_while_saving_is_one_line_and_leaves_nothing(world, tmp_path):
    """`ulimit -f` (safetensors says "File too large"): a readable error, no output, no temporary folder."""
    import resource

    weights = (world["gpt2"] / "model.safetensors").stat().st_size
    cap = 128 << 10  # above every small file (config, card, remote code), below the weights
    assert weights > cap
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))

    proc = subprocess.run([sys.executable, "-m", "normswap", "convert", str(world["gpt2"]), "-o", str(out),
                           "--no-eval"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit)
    assert_one_error_line(proc.returncode, proc.stderr, "file size limit")
    assert not out.exists() and temp_leftovers(tmp_path) == []


def test_disk_full_while_saving_is_one_line_and_leaves_nothing(world, tmp_path, capsys, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(T.PreTrainedModel, "save_pretrained", full)
    code, _, err = run_cli(["convert", str(world["gpt2"]), "-o", str(tmp_path / "out"), "--no-eval"], capsys)
    assert_one_error_line(code, err, "disk is full")
    assert not (tmp_path / "out").exists() and temp_leftovers(tmp_path) == []


def test_disk_full_while_streaming_is_one_line_that_says_how_to_resume(world, tmp_path, capsys, monkeypatch):
    import normswap.streaming.converter as converter

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(converter, "write_shards", full)
    code, _, err = run_cli(["convert", str(world["gpt2"]), "-o", str(tmp_path / "out"), "--streaming"], capsys)
    assert_one_error_line(code, err, "disk is full")
    assert "resume" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("mask,dirs,files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_outputs_respect_the_umask(world, tmp_path, mask, dirs, files, streaming):
    old = os.umask(mask)
    try:
        out = tmp_path / "out"
        assert main(["convert", str(world["gpt2"]), "-o", str(out), "--no-eval"]
                    + (["--streaming"] if streaming else [])) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == dirs
    for p in out.rglob("*"):
        assert p.stat().st_mode & 0o777 == (dirs if p.is_dir() else files), p.name


def test_library_warnings_are_printed_once():
    """huggingface_hub logs through its own handler *and* propagates: with the CLI's root handler, twice."""
    script = ("import logging, huggingface_hub, normswap.cli as cli; cli._configure_logging(False); "
              "logging.getLogger('huggingface_hub.utils._http').warning('hub-warning-probe')")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr.count("hub-warning-probe") == 1, proc.stderr


def test_python_m_normswap_training_keeps_the_contract(capsys):
    from normswap.cli.finetune import main as training_main

    code = None
    try:
        training_main(["student-only"])
    except SystemExit as exc:
        code = exc.code
    assert_one_error_line(code, capsys.readouterr().err, "required")
