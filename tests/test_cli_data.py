"""The command line's data commands and its error handling (one line, exit 2, no traceback)."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_broken_files, write_image

from ensemble.cli import cli, main

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["demo", "data", "fit-stage1", "fit-flat", "fit-experts", "predict", "compare", "export"]


@pytest.fixture(autouse=True)
def _restore_showwarning(monkeypatch):
    # main() routes warnings to one-line stderr messages; keep that from leaking into other tests
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)


def run_main(argv):
    """main(argv) -> exit code (0 when it returns normally)."""
    try:
        main(argv)
    except SystemExit as exc:
        return exc.code
    return 0


def test_help_lists_commands(capsys):
    assert run_main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name} " in out, name


def test_help_via_click_runner():
    result = CliRunner().invoke(cli, ["data", "summary", "--help"])
    assert result.exit_code == 0
    for opt in ("--format", "--root", "--json", "--no-verify", "--config", "--set"):
        assert opt in result.output


def _tree(root: Path) -> Path:
    write_image(root / "train" / "happy" / "h1.png", seed=1)
    write_image(root / "train" / "happy" / "h2.jpg", seed=2)
    write_image(root / "train" / "sad" / "s1.png", seed=3)
    write_image(root / "test" / "fear" / "f1.png", seed=4)
    write_broken_files(root / "train" / "anger")  # empty.jpg, text.jpg, truncated.png
    (root / "train" / "happy" / "readme.md").write_text("notes")
    return root


def test_data_summary_json(tmp_path, capsys):
    root = _tree(tmp_path / "faces")
    code = run_main(
        ["data", "summary", "--format", "folder", "--root", str(root), "--json", "--set", "data.val_fraction=0"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["format"] == "folder" and result["root"] == str(root)
    assert list(result["splits"]) == ["train", "test"]
    train = result["splits"]["train"]
    assert train["counts"]["happy"] == 2 and train["counts"]["sad"] == 1
    assert train["counts"]["anger"] == 0  # all three anger files are broken
    assert train["n"] == 3
    assert result["splits"]["test"]["counts"]["fear"] == 1
    assert train["va"]["happy"]["valence_mean"] == pytest.approx(0.8)  # derived from the label
    assert train["va_source"] == ["derived"]
    assert result["dropped"] == {"not an image file name": 1, "unreadable image (cannot decode image)": 3}
    assert result["n_dropped"] == 4
    assert "Traceback" not in captured.err


def test_data_summary_table(tmp_path, capsys):
    root = _tree(tmp_path / "faces")
    code = run_main(["data", "summary", "--format", "folder", "--root", str(root), "--set", "data.val_fraction=0"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    happy = next(line for line in lines if line.startswith("happy"))
    assert happy.split() == ["happy", "2", "0"]
    assert "dropped: 4" in out


def test_data_summary_no_verify(tmp_path, capsys):
    root = _tree(tmp_path / "faces")
    code = run_main(
        [
            "data",
            "summary",
            "--format",
            "folder",
            "--root",
            str(root),
            "--json",
            "--no-verify",
            "--set",
            "data.val_fraction=0",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["splits"]["train"]["counts"]["anger"] == 3  # broken files not opened
    assert result["n_dropped"] == 1


def test_data_summary_with_config_file(tmp_path, capsys):
    root = _tree(tmp_path / "faces")
    cfg = tmp_path / "exp.toml"
    cfg.write_text(f'[data]\nformat = "folder"\nroot = {json.dumps(str(root))}\nval_fraction = 0.0\n')
    assert run_main(["data", "summary", "--config", str(cfg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["n"] == 3


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    return lines[0]


def test_unknown_format_is_one_error_line(tmp_path, capsys):
    code = run_main(["data", "summary", "--format", "pictures", "--root", str(tmp_path)])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "pictures" in line and "folder" in line  # names the bad value and the known ones


def test_missing_root_is_one_error_line(tmp_path, capsys):
    code = run_main(["data", "summary", "--format", "folder", "--root", str(tmp_path / "nope")])
    assert code == 2
    assert "not found" in _one_error_line(capsys.readouterr().err)


def test_config_typo_names_key(tmp_path, capsys):
    code = run_main(["data", "summary", "--set", "data.formt=folder"])
    assert code == 2
    assert "data.formt" in _one_error_line(capsys.readouterr().err)


def test_config_file_typo_names_key(tmp_path, capsys):
    cfg = tmp_path / "exp.toml"
    cfg.write_text("[data]\nimage_sise = 32\n")
    code = run_main(["data", "summary", "--config", str(cfg)])
    assert code == 2
    assert "data.image_sise" in _one_error_line(capsys.readouterr().err)


def test_usage_error_exit_code(capsys):
    code = run_main(["no-such-command"])
    assert code == 2
    assert "no-such-command" in capsys.readouterr().err


def test_python_m_ensemble_help():
    proc = subprocess.run(
        [sys.executable, "-m", "ensemble", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    for name in COMMANDS:
        assert name in proc.stdout
    assert proc.stderr == ""


def _entry(body: str) -> subprocess.CompletedProcess:
    """Run ensemble.cli.entry() in a fresh process with ``main`` replaced by ``body`` (torch imported,
    so the quick exit is taken)."""
    code = (
        "import atexit, sys, torch\n"
        "import ensemble.cli as c\n"
        "atexit.register(lambda: print('exit handler ran', file=sys.stderr))\n"
        f"def fake():\n    {body}\n"
        "c.main = fake\n"
        "c.entry()\n"
        "print('not reached')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize(
    "body, code, out, err",
    [
        ("print('answer', end='')", 0, "answer", ""),  # unflushed output still comes out
        ("sys.exit(2)", 2, "", ""),
        ("sys.exit(None)", 0, "", ""),
        ("sys.exit('bad input')", 1, "", "bad input"),
    ],
)
def test_entry_exits_quickly_with_mains_status_output_and_exit_handlers(body, code, out, err):
    proc = _entry(body)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == out
    assert err in proc.stderr and "exit handler ran" in proc.stderr


def test_entry_waits_for_a_running_thread_as_python_does():
    proc = _entry(
        "import threading, time; threading.Thread(target=lambda: (time.sleep(0.5), print('thread done'))).start()"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "thread done" and "exit handler ran" in proc.stderr


def test_entry_lets_an_unexpected_exception_through_with_its_traceback():
    proc = _entry("raise RuntimeError('a bug')")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: a bug" in proc.stderr


def test_python_m_ensemble_predict_error_status_through_entry(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ensemble", "predict", str(tmp_path / "missing.jpg")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "missing.jpg" in proc.stderr and "Traceback" not in proc.stderr


def test_data_summary_drops_per_split_and_names_each_unreadable_file(tmp_path, capsys):
    root = _tree(tmp_path / "faces")
    write_broken_files(root / "test" / "sad")
    code = run_main(
        ["data", "summary", "--format", "folder", "--root", str(root), "--json", "--set", "data.val_fraction=0"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["splits"]["train"]["n_dropped"] == 4 and result["splits"]["test"]["n_dropped"] == 3
    assert result["dropped_by_split"]["test"] == {"unreadable image (cannot decode image)": 3}
    unreadable = [line for line in captured.err.splitlines() if line.startswith("warning: unreadable image")]
    assert len(unreadable) == 6  # one line per bad file, each naming it
    for name in ("empty.jpg", "text.jpg", "truncated.png"):
        assert sum(name in line for line in unreadable) == 2


def test_data_summary_strict_refuses_an_unreadable_image(tmp_path, capsys):
    root = tmp_path / "faces"
    write_image(root / "happy" / "h1.png", seed=1)
    write_broken_files(root / "sad")
    code = run_main(
        ["data", "summary", "--format", "folder", "--root", str(root), "--strict", "--set", "data.val_fraction=0"]
    )  # one happy face: no validation face to warn about
    err = capsys.readouterr().err
    assert code == 2 and "unreadable image" in _one_error_line(err) and "data.strict" in err


def test_usage_errors_are_one_line_naming_where_to_look(capsys):
    from conftest import run_cli

    for argv in (
        ["predict", "a.jpg", "--detector", "bogus"],
        ["predict", "a.jpg", "--min-confidence", "2"],
        ["predict"],
        ["predict", "a.jpg", "--bogus"],
        ["bogus"],
    ):
        code, out, err = run_cli(argv, capsys)
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, (argv, err)
        assert "--help)" in err, err
    code, out, err = run_cli([], capsys)  # bare `ensemble`: the help, and no error
    assert code == 0 and out.startswith("Usage: ensemble") and not err
