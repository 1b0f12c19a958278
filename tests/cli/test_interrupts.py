"""SIGTERM and Ctrl-C: one line, exit 143 / 130, no traceback, finished outputs kept and the folder visibly incomplete.

The signal is sent once the run shows it is working (a log line, a progress
bar), never after a fixed sleep, so a loaded machine changes nothing but the wait.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import CNNDM, REPO

TRAIN = str(CNNDM / "train.jsonl.gz")
PATIENCE_S = 600  # generous: only a hung run ever waits this long


def _start(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "sumcircuit.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(condition, proc: subprocess.Popen[str]) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.communicate()}"
        assert time.monotonic() < deadline, "the run never started working"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=PATIENCE_S)
    return proc.returncode, err


def test_sigterm_during_finetune(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ft"
    proc = _start(["finetune", "--model", str(tiny_model_dirs["llama"]), "--data", TRAIN, "--n-docs", "8",
                   "--max-tokens", "64", "--method", "lora", "--batch-size", "2", "--max-steps", "100000",
                   "--eval-every", "1000000", "--save-every", "1000000", "--no-progress", "--out", str(out)])
    _wait_for(lambda: (out / "train_log.jsonl").is_file(), proc)
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc)
    assert code == 143, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines()[-1] == "sumcircuit finetune: interrupted; finished outputs kept; rerun to resume"
    assert (out / "INCOMPLETE.json").is_file() and (out / "train_log.jsonl").is_file()


def test_ctrl_c_during_attribute(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    llama = str(tiny_model_dirs["llama"])
    proc = _start(["attribute", "--base", llama, "--tuned", llama, "--data", TRAIN, "--n-docs", "2000",
                   "--max-tokens", "128", "--batch-size", "1", "--out", str(tmp_path / "attr")])
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + PATIENCE_S
    while "attribution" not in seen:  # its progress bar: the run is inside the hooked forward passes
        chunk = proc.stderr.read(1)
        assert chunk, f"the run ended before it could be interrupted: {seen}"
        assert time.monotonic() < deadline
        seen += chunk
    proc.send_signal(signal.SIGINT)
    code, err = _finish(proc)
    err = seen + err
    assert code == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines()[-1].endswith("interrupted; finished outputs kept; rerun to resume")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_in_process_main_restores_the_handlers(sig: int, code: int) -> None:
    from sumcircuit.cli import main

    before = signal.getsignal(signal.SIGTERM), sys.unraisablehook
    with pytest.MonkeyPatch.context() as mp:
        def interrupted(args: object) -> int:
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler raises before this ends
            return 0

        from sumcircuit.cli import models as models_cmd

        mp.setattr(models_cmd, "run", interrupted)
        assert main(["models"]) == code
    assert (signal.getsignal(signal.SIGTERM), sys.unraisablehook) == before
