"""conveyor.toml: every setting written with a comment; every bad key or value named, all at once."""

from __future__ import annotations

import tomllib
from conftest import run_cli, set_setting

from conveyor.config import Config


def test_init_writes_every_setting_with_a_comment(tmp_path):
    r = run_cli(None, "init", tmp_path / "w", "--model", "tiny")
    assert r.code == 0, r.out + r.err
    text = (tmp_path / "w" / "conveyor.toml").read_text()
    data = tomllib.loads(text)
    for section, model in Config.model_fields.items():
        for key in model.annotation.model_fields:
            assert key in data[section], f"{section}.{key}"
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if " = " in line and not line.startswith("#"):
            assert lines[i - 1].startswith("# "), line
    assert (tmp_path / "w" / "inbox").is_dir()
    assert run_cli(None, "init", tmp_path / "w").code == 1  # never overwrites a workspace


def test_all_config_problems_are_listed_with_dotted_keys(tmp_path):
    run_cli(None, "init", tmp_path / "w")
    path = tmp_path / "w" / "conveyor.toml"
    text = path.read_text().replace('method = "lora"', 'method = "qlora"').replace("r = 8", "r = 0")
    text = text.replace("batch_size = 4", 'batch_size = "four"') + "\n[extra]\nfoo = 1\n"
    path.write_text(text)
    r = run_cli(tmp_path / "w", "run", "--drain")
    assert r.code == 1
    message = r.out + r.err
    assert "4 problem(s)" in message
    for key in ("adapter.method", "adapter.r", "training.batch_size", "extra: unknown key"):
        assert key in message
    assert "'qlora'" in message and "'lora' or 'full'" in message


def test_invalid_toml_names_the_line(tmp_path):
    run_cli(None, "init", tmp_path / "w")
    (tmp_path / "w" / "conveyor.toml").write_text("[training\nbatch_size = 4\n")
    r = run_cli(tmp_path / "w", "doctor")
    assert r.code == 1 and "not valid TOML" in r.out + r.err and "line 1" in r.out + r.err
    r = run_cli(tmp_path / "w", "status")  # status still shows the rest, and the problem
    assert r.code == 0 and "not valid TOML" in r.out + r.err


def test_commands_outside_a_workspace_say_what_to_do(tmp_path):
    r = run_cli(tmp_path, "status")
    assert r.code == 1 and "not a conveyor workspace" in r.out + r.err and "conveyor init" in r.out + r.err


def test_bad_command_arguments(workspace, tmp_path):
    ws = workspace()
    r = run_cli(ws, "add", tmp_path / "missing.jsonl")
    assert r.code == 1 and "no such file" in r.out + r.err
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    r = run_cli(ws, "add", tmp_path / "a.jsonl", "--priority", "urgent", subprocess_=True)
    assert r.code == 2 and "'urgent' is not one of high, normal, low" in r.out + r.err  # a usage error
    r = run_cli(ws, "add", tmp_path)
    assert r.code == 1 and "is a folder; pass the JSONL files in it" in r.out + r.err
    r = run_cli(ws, "history", "--run", "run-9999")
    assert r.code == 1 and "--run 'run-9999': no such run; the runs are none yet" in r.out + r.err
    r = run_cli(ws, "queue", "move", "42", "--priority", "high")
    assert r.code == 1 and "no job 42" in r.out + r.err
    r = run_cli(ws, "rollback", "2")
    assert r.code == 1 and "no version '2' (did you mean v2?)" in r.out + r.err
    r = run_cli(ws, "export", tmp_path / "out")
    assert r.code == 1 and "nothing trained yet" in r.out + r.err


def test_bad_replay_and_notify_settings_are_named_with_what_to_do(workspace):
    ws = workspace()
    for section, key, value in (("replay", "fraction", "0.7"), ("notify", "webhook", '"ftp://example.com/hook"'),
                                ("notify", "secret_header", '"no colon here"'), ("notify", "command", '"notify \\"x"')):
        set_setting(ws, section, key, value)
    r = run_cli(ws, "run", "--drain")
    message = r.out + r.err
    assert r.code == 1 and "4 problem(s)" in message
    assert "replay.fraction: Input should be less than or equal to 0.5 (found 0.7)" in message
    assert "notify.webhook: an http:// or https:// URL" in message and "'ftp://example.com/hook'" in message
    assert 'notify.secret_header: one header as "Name: value"' in message
    assert "notify.command: a command line (split like a shell, without running one): No closing quotation" in message
