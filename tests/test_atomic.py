"""lib.atomic: a crash or an error never leaves a half-written file behind, and results keep the usual mode."""

import json

import pytest

from lib import atomic


def test_atomic_writes_never_leave_a_half_written_file(tmp_path):
    target = tmp_path / "m.json"
    atomic.write_json(target, {"ok": 1})
    with pytest.raises(TypeError, match="cannot write"):
        atomic.write_json(target, {"bad": object()})
    with pytest.raises(ZeroDivisionError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text('{"partial": ')
            1 / 0
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temp files left behind
    assert target.stat().st_mode & 0o777 == 0o666 & ~atomic._UMASK  # not mkstemp's owner-only mode


def test_write_csv_and_save_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atomic.write_csv(tmp_path / "a.csv", [{"x": 1}, {"x": 2, "y": 3}])
    assert (tmp_path / "a.csv").read_text().splitlines() == ["x,y", "1,", "2,3"]
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    atomic.save_figure(tmp_path / "f.png", fig)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _dead_pid():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temp_names_carry_host_and_pid(tmp_path):
    import os

    with atomic.atomic_path(tmp_path / "x.bin") as tmp:
        m = atomic._TEMP.match(tmp.name)
        assert m and m["host"] == atomic._HOST and int(m["pid"]) == os.getpid()


def test_a_save_removes_dead_writers_temp_files_never_a_live_ones(tmp_path):
    import os

    import torch

    from lib import checkpoint

    dead = tmp_path / f".last.pt.{atomic._HOST}-{_dead_pid()}.abcd1234.tmp"
    live = tmp_path / f".last.pt.{atomic._HOST}-{os.getpid()}.efgh5678.tmp"
    other_host = tmp_path / f".last.pt.{'0' * 8 if atomic._HOST != '0' * 8 else '1' * 8}-{_dead_pid()}.ijkl9012.tmp"
    for p in (dead, live, other_host):
        p.write_bytes(b"half a checkpoint")
    checkpoint.save(tmp_path / "last.pt", {"w": torch.zeros(2)})
    assert not dead.exists() and live.exists() and other_host.exists()
    assert torch.equal(checkpoint.load(tmp_path / "last.pt")["w"], torch.zeros(2))


def test_atomic_dir_replaces_a_folder_only_when_its_block_succeeds(tmp_path):
    from lib.atomic import atomic_dir

    dest = tmp_path / "bundle"
    with atomic_dir(dest) as stage:
        (stage / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as stage:
            (stage / "a.txt").write_text("second")
            raise RuntimeError("half-way")
    assert (dest / "a.txt").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    with atomic_dir(dest) as stage:
        (stage / "b.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]
