"""Tokenized jobs on disk: memory-mapped arrays equal to in-memory tokenization, no pickle, flat memory for big
files (validation and tokenization stream), and tokenized data pruned once no job needs it."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from conftest import run_cli, status, text_file

from conveyor.data.chat import load_tokenizer
from conveyor.data.formats import parse_file, scan_file, tokenize_file
from conveyor.data.tokenized import TokenizedArrays, tokenize_cached, tokens_of

FILES = {
    "text.jsonl": [{"text": "the quick brown fox"}, {"text": "jumps over the lazy dog " * 5}],
    "chat.jsonl": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]},
                   {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "4"}]}],
    "pc.jsonl": [{"prompt": "Q: sky?", "completion": " blue"}, {"prompt": "Q: grass?", "completion": " green"}],
}


@pytest.mark.parametrize("name", list(FILES))
def test_memory_mapped_examples_equal_in_memory_tokenization(name, tiny_dir, tmp_path):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in FILES[name]), encoding="utf-8")
    tokenizer = load_tokenizer(str(tiny_dir))
    expected = tokenize_file(parse_file(path), tokenizer, 64)
    cached = tokenize_cached(path, name, tokenizer, 64, tmp_path / "cache", "key")
    assert isinstance(cached.examples, TokenizedArrays) and len(cached.examples) == len(expected.examples)
    assert [(e.line, e.input_ids, e.labels) for e in cached.examples] == \
        [(e.line, e.input_ids, e.labels) for e in expected.examples]
    assert (cached.tokens, cached.truncated_lines, cached.truncated) == \
        (expected.tokens, expected.truncated_lines, expected.truncated)
    assert tokens_of(cached, [2, 1, 2]) == tokens_of(expected, [2, 1, 2])
    folder = next((tmp_path / "cache").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["ids.bin", "index.bin", "mask.bin", "meta.json"]
    assert cached.examples.ids.dtype.name == "uint16"  # 263 tokens: two bytes a token
    again = tokenize_cached(path, name, tokenizer, 64, tmp_path / "cache", "key")  # read back, not rebuilt
    assert [e.input_ids for e in again.examples] == [e.input_ids for e in expected.examples]


def test_a_damaged_cache_entry_is_rebuilt(tiny_dir, tmp_path):
    path = text_file(tmp_path / "d.jsonl", 5)
    tokenizer = load_tokenizer(str(tiny_dir))
    first = tokenize_cached(path, "d.jsonl", tokenizer, 64, tmp_path / "cache", "key")
    folder = next((tmp_path / "cache").iterdir())
    (folder / "meta.json").write_text("{not json")
    rebuilt = tokenize_cached(path, "d.jsonl", tokenizer, 64, tmp_path / "cache", "key")
    assert [e.input_ids for e in rebuilt.examples] == [e.input_ids for e in first.examples]


def _big_file(path: Path, megabytes: int) -> Path:
    line = json.dumps({"text": "the quick brown fox jumps over the lazy dog; " * 4}) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(line * (megabytes * (1 << 20) // len(line)))
    return path


@pytest.mark.slow  # a 4 MB file scanned and tokenized under tracemalloc: 13 s of the default run
def test_validation_and_tokenization_stream_in_flat_memory(tiny_dir, tmp_path):
    path = _big_file(tmp_path / "big.jsonl", 4)
    lines = sum(1 for _ in open(path, "rb"))
    tracemalloc.start()
    try:
        assert scan_file(path) == ("text", lines)
        _, scan_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        data = tokenize_cached(path, "big.jsonl", load_tokenizer(str(tiny_dir)), 256, tmp_path / "cache", "k")
        _, tokenize_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(data.examples) == lines
    # A 4 MiB file held as Python records or token lists would take tens of MB; streamed, under 2 MB.
    assert scan_peak < 2 << 20 and tokenize_peak < 2 << 20, (scan_peak, tokenize_peak)


def test_tokenized_data_of_finished_jobs_is_pruned_and_waiting_jobs_keep_theirs(workspace, tmp_path, monkeypatch):
    ws = workspace()  # 8 examples a step: each file below trains 2 steps
    tokenized = ws / "data" / "tokenized"
    assert run_cli(ws, "train", text_file(tmp_path / "a.jsonl", 16, "a"), "-q").code == 0
    assert list(tokenized.iterdir()) == []  # job a is done: nothing reads its tokens again
    for tag in "bc":
        assert run_cli(ws, "add", text_file(tmp_path / f"{tag}.jsonl", 16, tag)).code == 0
    monkeypatch.setenv("CONVEYOR_TEST_REQUESTS", "stop@3")  # job b stops after its first step
    assert run_cli(ws, "run", "--drain", "-q").code == 75  # stopped with jobs waiting
    assert [j["state"] for j in status(ws)["jobs"]] == ["done", "interrupted", "queued"]
    kept = [json.loads((p / "meta.json").read_text())["key"].split(":")[0] for p in tokenized.iterdir()]
    assert kept == [status(ws)["jobs"][1]["fingerprint"]]  # b's tokens stay for its resume
    monkeypatch.delenv("CONVEYOR_TEST_REQUESTS")
    assert run_cli(ws, "run", "--drain", "-q").code == 0
    assert [j["state"] for j in status(ws)["jobs"]] == ["done", "done", "done"]
    assert list(tokenized.iterdir()) == []
    assert len(list((ws / "data").glob("*.jsonl"))) == 3  # the stored copies of the data stay


def test_a_file_truncated_throughout_counts_every_line_and_names_the_first(tiny_dir, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"text": "x" * 100}) + "\n" for _ in range(250)))
    data = tokenize_cached(path, "long.jsonl", load_tokenizer(str(tiny_dir)), 16, tmp_path / "cache", "k")
    assert data.truncated == 250 and data.truncated_lines == list(range(1, 101))


def test_arrays_carry_their_hashes_and_one_that_fails_is_rebuilt_with_a_warning(tiny_dir, tmp_path):
    from conveyor.fingerprint import FileHashes, fingerprint

    path = text_file(tmp_path / "d.jsonl", 5)
    tokenizer = load_tokenizer(str(tiny_dir))
    hashes = FileHashes(tmp_path)
    first = tokenize_cached(path, "d.jsonl", tokenizer, 64, tmp_path / "cache", "key", hashes)
    folder = next((tmp_path / "cache").iterdir())
    files = json.loads((folder / "meta.json").read_text())["files"]
    assert files == {name: [(folder / name).stat().st_size, fingerprint(folder / name)]
                     for name in ("ids.bin", "mask.bin", "index.bin")}
    ids = folder / "ids.bin"
    ids.write_bytes(bytes([ids.read_bytes()[0] ^ 1]) + ids.read_bytes()[1:])  # same size, a new mtime
    said: list[str] = []
    rebuilt = tokenize_cached(path, "d.jsonl", tokenizer, 64, tmp_path / "cache", "key", hashes, warn=said.append)
    expected = tokenize_file(parse_file(path), tokenizer, 64)  # (`first` maps the altered file itself)
    assert [(e.input_ids, e.labels) for e in rebuilt.examples] == [(e.input_ids, e.labels) for e in expected.examples]
    assert len(first.examples) == len(rebuilt.examples) and len(said) == 1 and said[0].startswith(f"tmp_path/cache/{folder.name}/ids.bin no longer matches its sha256"
                                                 .replace("tmp_path", tmp_path.name))
    assert "rebuilt from the stored copy d.jsonl" in said[0]
