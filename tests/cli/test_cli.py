"""The CLI: help on every command, clean errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sumcircuit.cli import COMMANDS, build_parser, main

from helpers import SHARED_DATA


def test_help_on_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    build_parser()
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        assert f"sumcircuit {name}" in capsys.readouterr().out


def test_models_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "gemma3-270m" in out


@pytest.mark.real  # reads the real data sets of ../shared/data
def test_data_preview_real(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", str(SHARED_DATA / "dialogsum"), "--split", "test", "--n-docs", "10"]) == 0
    out = capsys.readouterr().out
    assert "summary ['summary1', 'summary2', 'summary3']" in out
    assert "10 read, 10 valid, 0 invalid" in out


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sumcircuit.cli", *args],
                          capture_output=True, text=True, timeout=900)


def test_preview_reports_bad_record(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"article": "a", "abstract": "b"}\n{"article": 3, "abstract": "b"}\n')
    proc = _cli("data", str(bad))
    assert proc.returncode == 0
    assert "2 read, 1 valid, 1 invalid" in proc.stdout
    assert f"{bad}:2, field 'article': expected a string" in proc.stdout


def test_unusable_data_is_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"article": "a", "abstract": "b"}\n')
    proc = _cli("data", str(bad), "--text-field", "body")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{bad}:1, field 'body': missing" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
