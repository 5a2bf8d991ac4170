"""A full disk is a state, not a crash: the workspace on a small file system (tmpfs) fills up at a checkpoint
write, a tokenized-data write and a database write. The daemon stays up and says how much room it waits for;
once space is freed it goes on by itself, and the queue ends with every line once and the weights of an
uninterrupted run (laws 2, 3). Needs root to mount a tmpfs; skipped with the reason where that is impossible."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import adapter_weights, make_workspace, max_abs_diff, run_cli, text_file

pytestmark = pytest.mark.slow
SETTINGS = {"training": {"batch_size": 4, "grad_accum": 2, "learning_rate": 1e-3, "save_every": 2, "max_length": 64},
            "inbox": {"settle_seconds": 0.3, "poll_seconds": 0.2},
            "daemon": {"min_free_mb": 0, "retry_backoff_seconds": 0.2}}


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 40 MB tmpfs here ({done.stderr.strip() or done.returncode}); "
                    "the disk-full test needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dir):
    """The uninterrupted run of the same two files: its last checkpoint's adapter weights."""
    root = tmp_path_factory.mktemp("reference")
    ws = make_workspace(root / "ws", tiny_dir, **SETTINGS)
    files = _files(root)
    assert run_cli(ws, "train", *files, "-q").code == 0
    return adapter_weights(ws / "runs/run-0001/checkpoints/step-000004")


def _files(folder: Path) -> list[Path]:
    return [text_file(folder / f"{t}.jsonl", 16, t) for t in "ab"]  # 2 steps each


def _query(ws: Path, sql: str) -> list[dict]:
    con = sqlite3.connect(ws / "conveyor.db", timeout=30)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql)]
    finally:
        con.close()


def _wait(what: str, predicate, proc: subprocess.Popen, out: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"the daemon exited ({proc.returncode}) waiting for {what}:\n{out.read_text()}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{out.read_text()}")


@pytest.mark.parametrize("where", ["checkpoint:2", "tokenized:0", "db:2"])
def test_a_full_disk_waits_for_room_and_then_ends_as_an_uninterrupted_run(small_disk, tiny_dir, tmp_path,
                                                                         reference, where):
    ws = make_workspace(small_disk / "ws", tiny_dir, **SETTINGS)
    assert run_cli(ws, "add", *_files(tmp_path)).code == 0
    filler = small_disk / "filler"
    out = tmp_path / "daemon-output.txt"  # not on the full disk: a terminal or the journal in real life
    with open(out, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "conveyor", "-w", str(ws), "run"], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "CONVEYOR_TEST_FILL": f"{where}:{filler}"})
    try:
        _wait("the disk to fill", lambda: "No job starts until" in out.read_text(), proc, out)
        text = out.read_text()
        assert "disk full" in text and "MB more" in text and "Traceback" not in text, text
        assert proc.poll() is None  # the daemon stays up, waiting
        filler.unlink()  # room again: it goes on by itself
        _wait("both jobs done", lambda: [r["state"] for r in _query(ws, "SELECT state FROM jobs ORDER BY id")]
              == ["done", "done"], proc, out)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Traceback" not in out.read_text(), out.read_text()
    audit = _query(ws, "SELECT step, job_id, lines FROM audit ORDER BY step")
    assert [(a["step"], a["job_id"]) for a in audit] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    for job in (1, 2):  # every line of each file once (law 2)
        assert Counter(x for a in audit if a["job_id"] == job for x in json.loads(a["lines"])) == \
            Counter(range(1, 17))
    assert [(r["job_id"], r["start_step"], r["end_step"]) for r in
            _query(ws, "SELECT * FROM ledger WHERE outcome = 'done' ORDER BY id")] == [(1, 1, 2), (2, 3, 4)]
    assert max_abs_diff(adapter_weights(ws / "runs/run-0001/checkpoints/step-000004"), reference) <= 1e-6
