"""One writer per run folder: a second command on a RUN another process writes is refused in one line."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ensemble.cli import main
from ensemble.errors import UserError
from ensemble.locks import lock_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def held(tmp_path):
    """Another process holding ``tmp_path / 'run'`` (as a training command would), and its pid."""
    run = tmp_path / "run"
    code = f"import sys, time; from ensemble.locks import lock_run; lock_run({str(run)!r}); print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield run, proc.pid
    proc.kill()
    proc.wait()


def test_second_writer_is_refused_naming_the_other_process(held):
    run, pid = held
    with pytest.raises(UserError, match=rf"{run} is being written by pid {pid} .*another --out"):
        lock_run(run)


def test_a_training_command_on_a_held_run_exits_with_one_line(held, capsys):
    run, pid = held
    with pytest.raises(SystemExit) as exc:
        main(["fit-flat", "--out", str(run), "--set", "data.n_synthetic=80", "--set", "train.epochs=1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"pid {pid}" in lines[0], err
    assert not (run / "flat").exists()


def test_the_lock_goes_with_the_process(tmp_path):
    run = tmp_path / "run"
    code = f"from ensemble.locks import lock_run; lock_run({str(run)!r})"  # exits holding it
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    t = time.time()
    lock_run(run)  # free again at once: no stale lock after the writer is gone
    assert time.time() - t < 5
    lock_run(run)  # and this process may reopen its own run
