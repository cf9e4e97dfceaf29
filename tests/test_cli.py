"""The ``onspec`` command line: help texts, a real generation, and bad input as a one-line error with
exit code 2 (never a stack trace).

Help and errors run in a subprocess through the installed entry point (or ``python -m onspec.cli``), as a
user would; the generation runs in-process through ``cli.main`` to skip a second interpreter start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from onspec import cli


def onspec_cmd() -> list[str]:
    script = Path(sys.executable).parent / "onspec"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "onspec.cli"]


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([*onspec_cmd(), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_top_level_help() -> None:
    r = run_cli("--help")
    assert r.returncode == 0
    for sub in ("serve", "generate", "chat", "bench"):
        assert sub in r.stdout


def test_generate_help() -> None:
    r = run_cli("generate", "--help")
    assert r.returncode == 0
    for opt in ("--max-tokens", "--temperature", "--speculation", "--model", "--stop"):
        assert opt in r.stdout


def test_help_shows_every_default_and_no_empty_ones(capsys) -> None:
    import re

    for command, expected in (("serve", ["--port PORT", "(default: 8000)"]),
                              ("generate", ["--max-tokens MAX_TOKENS", "(default: 256)"])):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = re.sub(r"\s+", " ", capsys.readouterr().out)
        assert " ".join(expected) in text, text
        assert "(default: None)" not in text and "(default: )" not in text


def test_version() -> None:
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("onspec ")


def test_no_command_prints_help_and_exits_2() -> None:
    r = run_cli()
    assert r.returncode == 2 and "usage" in r.stdout


BAD_INPUTS = [
    (["generate", ""], "prompt"),
    (["generate", "hi", "--max-tokens", "-1"], "max_tokens"),
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--top-p", "0"], "top_p"),
    (["generate", "hi", "--model", "/nonexistent/model/dir"], "unknown model"),
    (["generate", "hi", "--model", "/nonexistent/model.gguf"], "not found"),
]


def test_bad_input_is_one_line_exit_2_subprocess() -> None:
    r = run_cli("generate", "hi", "--max-tokens", "-1")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["onspec generate: error: max_tokens: must be an integer >= 1"], r.stderr


@pytest.mark.parametrize("args, needle", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2(capsys, args: list[str], needle: str) -> None:
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("onspec generate: error:") and needle in lines[0]


def test_argparse_errors_exit_2() -> None:
    r = run_cli("generate", "hi", "--dtype", "int4")
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("no-such-command")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_generate_default_model(capsys) -> None:
    rc = cli.main(["generate", "What is 2 + 2?", "--max-tokens", "6", "--threads", "1", "--speculation", "off",
                   "--stats"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.strip()  # some text came out
    assert "6 tokens" in err or "tokens" in err


def test_generate_with_speculation_matches_plain(capsys) -> None:
    """Greedy CLI output is the same with speculation (suffix) as without."""
    prompt = "Repeat exactly: one two three four five six seven eight"
    texts = []
    for mode in ("off", "suffix"):
        rc = cli.main(["generate", prompt, "--max-tokens", "16", "--threads", "1", "--speculation", mode,
                       "--dtype", "float32"])
        assert rc == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()


def test_serve_on_a_busy_port_is_one_line_exit_2_before_loading(capsys) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc = cli.main(["serve", "--port", str(port), "--model", "/nonexistent/model"])  # the port is checked first
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "cannot listen" in lines[0] and str(port) in lines[0], err
