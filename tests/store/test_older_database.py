"""An older copy of conveyor.db put back (a backup taken mid-job, the job finished since): every command says the
database is behind the checkpoints, names the steps missing from its history, and nothing trains on it; the
newer database put back, everything goes on."""

from __future__ import annotations

import pytest

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from conftest import run_cli, text_file


@pytest.mark.slow  # the default run stays near 5 minutes; CI runs it with -m slow
def test_a_backup_from_mid_job_put_back_is_named_behind_and_nothing_trains_on_it(workspace, tmp_path):
    ws = workspace(training={"save_every": 1})
    release, backup = tmp_path / "release", tmp_path / "backup.db"
    argv = [sys.executable, "-m", "conveyor", "-w", str(ws), "train", str(text_file(tmp_path / "a.jsonl", 48)), "-q"]
    training = subprocess.Popen(argv, env={**os.environ, "CONVEYOR_TEST_HOLD": f"step:3:{release}"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{release}.reached").exists():
            assert time.monotonic() < deadline and training.poll() is None, training.communicate()
            time.sleep(0.02)
        source, copy = sqlite3.connect(ws / "conveyor.db"), sqlite3.connect(backup)
        source.backup(copy)  # what `sqlite3 conveyor.db ".backup backup.db"` does, at step 3 of 6
        source.close()
        copy.close()
    finally:
        release.write_text("go\n")
    out, err = training.communicate(timeout=300)
    assert training.returncode == 0, out + err
    newer = tmp_path / "newer"
    newer.mkdir()
    for suffix in ("", "-wal", "-shm"):
        if (ws / f"conveyor.db{suffix}").exists():
            shutil.move(ws / f"conveyor.db{suffix}", newer / f"conveyor.db{suffix}")
    shutil.copy(backup, ws / "conveyor.db")

    behind = "its history of run-0001 ends at step 2, but runs/run-0001/checkpoints/step-000006 holds step 6: " \
             "steps 3–6 (job 1) are missing from its history"  # step 3 was being recorded when the copy was taken
    for command in (["status"], ["doctor"], ["history", "--examples"],
                    ["train", str(text_file(tmp_path / "c.jsonl", 8, "c")), "-q"]):
        r = run_cli(ws, *command, subprocess_=True)
        assert r.code == 1, (command, r.out + r.err)
        assert behind in r.out + r.err, (command, r.out + r.err)
    assert not list((ws / "runs" / "run-0001" / "checkpoints").glob("step-000007"))

    for suffix in ("", "-wal", "-shm"):  # the newer database put back: it matches, and training goes on
        (ws / f"conveyor.db{suffix}").unlink(missing_ok=True)
        if (newer / f"conveyor.db{suffix}").exists():
            shutil.move(newer / f"conveyor.db{suffix}", ws / f"conveyor.db{suffix}")
    assert run_cli(ws, "doctor").code == 0
    assert run_cli(ws, "train", tmp_path / "c.jsonl", "-q").code == 0
