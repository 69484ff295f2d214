"""``ensemble demo --quick`` end to end: synthetic faces, every stage, the comparison table."""

import re

import pytest

from ensemble.cli import main

pytestmark = pytest.mark.slow


def test_demo_quick(tmp_path, capsys, one_thread, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo's data.cache_dir is relative: keep it out of the repository
    out = tmp_path / "demo"
    # --quick, made smaller still through --set (applied after --quick's own settings): the
    # wiring of every stage is what is tested here, not what the quick demo learns
    smaller = ["data.n_synthetic=800", "train.epochs=2", "stage1.train.epochs=2", "experts.train.epochs=2"]
    main(["demo", "--quick", "--out", str(out)] + [arg for s in smaller for arg in ("--set", s)])
    text, err = capsys.readouterr()
    assert "Traceback" not in text + err
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^(flat|hard|soft|oracle)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", line)
        if m:
            rows[m.group(1)] = [float(v) for v in m.groups()[1:]]
    assert list(rows) == ["flat", "hard", "soft", "oracle"], text[-3000:]
    for name, (acc, bal, f1) in rows.items():
        assert 0 <= acc <= 100 and 0 <= bal <= 100 and 0 <= f1 <= 100, name
    for step in ("[1/6]", "[2/6] fit-flat", "[3/6] fit-stage1", "[4/6] fit-experts", "[5/6] compare", "[6/6]"):
        assert step in text
    assert "stage 1: RMSE valence" in text
    assert (out / "reports" / "report.md").is_file()
    assert (out / "router" / "meta.json").is_file()
    assert (tmp_path / "artifacts" / "cache").is_dir()
    assert re.search(r"true \w+ -> \w+ \(V [+-]\d", text)  # the one predicted test face
