"""runs: the one owner of run rows. A run's identity decides resumption (law 5); a new run (or a rollback's)
becomes the only active one; lineage is walked up through the versions runs branched from."""

from __future__ import annotations

import pytest

from conveyor.config import Config
from conveyor.store import runs
from conveyor.store.database import connect


@pytest.fixture
def con(tmp_path):
    return connect(tmp_path / "conveyor.db")


def test_identity_names_every_field_a_checkpoint_must_match(tiny_dir):
    config = Config()
    ident = runs.identity(config, str(tiny_dir))
    assert ident["model.name"] == "tiny" and ident["adapter.method"] == "lora"
    assert ident["model.config_hash"] and ident["model.weights_hash"] and ident["model.tokenizer_hash"]
    assert ident["adapter.r"] == config.adapter.r and "model.quantization" not in ident
    config.adapter.r = 4
    changed = runs.identity(config, str(tiny_dir))
    assert runs.differences(ident, changed) == [f"adapter.r: {ident['adapter.r']} → 4"]
    assert runs.differences(ident, ident) == []
    hub = runs.identity(Config(), "org/not-local")  # a hub id has no local files to hash
    assert hub["model.config_hash"] is None


def test_create_makes_the_new_run_the_only_active_one_and_keeps_the_others(con):
    first = runs.create(con, {"a": 1})
    runs.set_step(con, first.id, 7)
    second = runs.create(con, {"a": 2}, note="new identity")
    assert (first.id, second.id) == ("run-0001", "run-0002")
    assert [(r.id, r.active, r.global_step) for r in runs.all_runs(con)] == [("run-0001", False, 7),
                                                                            ("run-0002", True, 0)]
    assert runs.active(con).note == "new identity"


def test_a_rollbacks_run_starts_at_its_versions_step_and_names_it(con):
    runs.create(con, {"a": 1})
    con.execute("INSERT INTO versions (run_id, job_id, step, created_at) VALUES ('run-0001', 1, 4, 0)")
    branch = runs.create(con, {"a": 1}, "rolled back", step=4, parent_run="run-0001", parent_version=1)
    assert (branch.global_step, branch.parent_run, branch.parent_version) == (4, "run-0001", 1)
    assert branch.to_json()["parent_version"] == "v1"
    assert runs.ancestry(con, branch.id) == [("run-0002", None), ("run-0001", 4)]


def test_ancestry_ends_on_a_cycle_a_damaged_database_could_hold(con):
    runs.create(con, {"a": 1})
    runs.create(con, {"a": 1})
    con.execute("INSERT INTO versions (run_id, job_id, step, created_at) VALUES ('run-0002', 1, 3, 0)")
    con.execute("UPDATE runs SET parent_run = 'run-0002', parent_version = 1 WHERE id = 'run-0001'")
    con.execute("UPDATE runs SET parent_run = 'run-0001', parent_version = 1 WHERE id = 'run-0002'")
    assert [r for r, _ in runs.ancestry(con, "run-0001")] == ["run-0001", "run-0002"]
