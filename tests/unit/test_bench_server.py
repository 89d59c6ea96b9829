"""bench/server.py reads the startup phases an instance logs (issue 15, point 5)."""

from __future__ import annotations

from pathlib import Path

from bench.server import startup_phases

LINE = ('I1201 14:02:11.123 1234 pb_stub.cc:366] zimage instance zimage_0_0 on cuda:0: '
        'startup phases (s): {"load": 12.3, "steps": {"fuse_projections": 0.1}, "warmup": 20.1}')


def test_the_logged_phases(tmp_path: Path):
    log = tmp_path / "server.log"
    log.write_text(f"starting\n{LINE}\nready\n")
    assert startup_phases(log) == {"load": 12.3, "steps": {"fuse_projections": 0.1},
                                   "warmup": 20.1}


def test_the_last_instance_wins(tmp_path: Path):
    log = tmp_path / "server.log"
    log.write_text(f"{LINE}\n{LINE.replace('12.3', '15.0')} trailing words\n")
    assert startup_phases(log)["load"] == 15.0


def test_no_line_no_phases(tmp_path: Path):
    log = tmp_path / "server.log"
    log.write_text("starting\nready\n")
    assert startup_phases(log) is None
    assert startup_phases(tmp_path / "absent.log") is None
    log.write_text('startup phases (s): {"load": 12.3,\n')  # cut short
    assert startup_phases(log) is None
