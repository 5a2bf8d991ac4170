"""A corpus of bad (and some good) input dropped at once into the inbox of a running daemon: every bad file is
rejected with its file, line and reason or left in place and reported once, every good one trains, the daemon
lives on, and every dropped file is kept byte-identical somewhere in the workspace (law 6, DESIGN: Processes)."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import stat
import zipfile
from pathlib import Path

import pytest
from service import running

from conveyor.data.kept import NAME_MAX, REASON, printable

pytestmark = pytest.mark.slow
FAST = {"training": {"batch_size": 2, "grad_accum": 1, "save_every": 3, "max_length": 48},
        "inbox": {"settle_seconds": 1.0, "poll_seconds": 0.2}, "daemon": {"min_free_mb": 0}}
LINE_LIMIT = 1 << 20  # CONVEYOR_MAX_LINE_BYTES for the daemon: a 3 MB line is then too long
UTF16 = "this looks like UTF-16 text: save it as UTF-8"


def _lines(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _texts(tag: str, n: int = 4) -> bytes:
    return _lines(*({"text": f"{tag} {i}: the quick brown fox"} for i in range(1, n + 1)))


def _zip(data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("data.jsonl", data)
    return out.getvalue()


CHAT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
LONG_BAD = "b" * 240 + ".jsonl"  # with `00012-` and `.reason.txt`, beyond NAME_MAX
LONG_GOOD = "g" * 246 + ".jsonl"  # 252 bytes: its claimed/ and finished/ names must be shortened

# name → (bytes, what its rejection must say: each piece in the job's error)
BAD = {
    "invalid json.jsonl": (b'{"text": "ok"}\n{"text": "unterminated\n',
                           ["line 2: invalid JSON: Unterminated string starting at column 10"]),
    "wrong fields.jsonl": (_lines({"text": "ok"}, {"txt": "a"}), ["line 2: keys ['txt'] match no format"]),
    "wrong types.jsonl": (_lines({"text": 3}, {"prompt": ["a"], "completion": "b"}),
                          ['line 1: "text" must be a string, found int', 'line 2: "prompt" must be a string, found list']),
    "empty text.jsonl": (_lines({"text": "  "}), ['line 1: "text" is empty']),
    "empty.jsonl": (b"", ["the file has no examples"]),
    "blank only.jsonl": (b"\n  \n\t\r\n", ["the file has no examples"]),
    "mixed.jsonl": (_lines({"text": "a"}, {"prompt": "p", "completion": "c"}),
                    ["mixes formats: text (first on line 1), prompt_completion (first on line 2)"]),
    "chat no assistant.jsonl": (_lines({"messages": [{"role": "user", "content": "hi"}]}),
                                ["line 1: no assistant turn, so nothing to train on"]),
    "chat bad role.jsonl": (_lines(CHAT, {"messages": [{"role": "robot", "content": "x"}]}),
                            ["line 2: messages[0].role 'robot' is unknown"]),
    "not objects.jsonl": (b'[1, 2]\n"text"\n', ["line 1: a line must be a JSON object, found list",
                                                 "line 2: a line must be a JSON object, found str"]),
    "latin1.jsonl": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ["line 2: invalid UTF-8 at byte 13"]),
    "utf16 bom.jsonl": (_texts("u").decode().encode("utf-16"), [UTF16]),
    "utf16 no bom.jsonl": (_texts("u").decode().encode("utf-16-le"), [UTF16]),
    "utf16 big endian.jsonl": (_texts("u").decode().encode("utf-16-be"), [UTF16]),
    "gzipped.jsonl": (gzip.compress(_texts("z")), ["this looks like gzip-compressed data: decompress it (gunzip)"]),
    "zipped.jsonl": (_zip(_texts("z")), ["this looks like a zip archive: extract it (unzip)"]),
    "bzipped.jsonl": (bz2.compress(_texts("z")), ["this looks like bzip2-compressed data"]),
    "xz.jsonl": (lzma.compress(_texts("z")), ["this looks like xz-compressed data"]),
    "nul bytes.jsonl": (_texts("n", 2) + b'{"text": "a\x00b"}\n', ["line 3: binary data: a NUL byte at byte 11"]),
    "nested.jsonl": (_texts("d", 1) + b"[" * 200_000 + b"\n",
                     ["line 2: nested deeper than the JSON parser allows"]),
    "huge line.jsonl": (_texts("h", 1) + _lines({"text": "w" * 3_000_000}),
                        ["line 2: longer than 1 MiB, the most one line may hold"]),
    "surrogate.jsonl": (b'{"text": "half \\ud83d"}\n', ['line 1: "text" holds an unpaired surrogate \\ud83d']),
    "données été 数据.jsonl": (b"not json\n", ["line 1: invalid JSON: Expecting value at column 1"]),
    LONG_BAD: (b'{"text": 1}\n', ['line 1: "text" must be a string, found int']),
}
GOOD = {
    "text.jsonl": _texts("t"),
    "chat.jsonl": _lines(CHAT, CHAT | {"messages": CHAT["messages"] + [{"role": "user", "content": "More?"},
                                                                       {"role": "assistant", "content": "No."}]}),
    "prompt completion.jsonl": _lines(*({"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(4))),
    "with spaces and ünïcode.jsonl": _texts("s", 3),
    LONG_GOOD: _texts("l", 3),
    "bom.jsonl": b"\xef\xbb\xbf" + _texts("b", 3),
    "crlf.jsonl": _texts("c", 3).replace(b"\n", b"\r\n"),
    os.fsdecode(b"caf\xe9 latin1 name.jsonl"): _texts("f", 3),  # a name that is not UTF-8
}
HIGH = {"urgent.jsonl": _texts("hi", 2)}  # in inbox/high/
IGNORED = {"upload.jsonl.part": _texts("p"), "x.jsonl.tmp": _texts("x"), ".hidden.jsonl": _texts("."),
           "notes.txt": b"hello\n"}


def _drop(inbox: Path, staging: Path, files: dict[str, bytes]) -> None:
    """Write each file elsewhere, then rename it in: it appears complete, as a careful person's copy does."""
    staging.mkdir(exist_ok=True)
    for name, data in files.items():
        (staging / name).write_bytes(data)
        os.rename(staging / name, inbox / name)


def _left_in_place(inbox: Path, tmp_path: Path) -> dict[str, str]:
    """Entries that cannot be claimed → the start of the problem reported for each."""
    (inbox / "folder.jsonl").mkdir()
    (inbox / "folder.jsonl" / "inner.jsonl").write_bytes(_texts("i"))
    (tmp_path / "elsewhere.jsonl").write_bytes(_texts("e"))
    (inbox / "outside.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    (inbox / "broken.jsonl").symlink_to(inbox / "does-not-exist.jsonl")
    (inbox / "loop.jsonl").symlink_to("loop.jsonl")
    os.mkfifo(inbox / "pipe.jsonl")
    return {"notes.txt": "not a .jsonl file", "folder.jsonl": "a folder", "outside.jsonl": "a symlink to",
            "broken.jsonl": "a symlink to", "loop.jsonl": "a symlink that loops back on itself",
            "pipe.jsonl": "not a regular file"}


def _hashes(ws: Path) -> set[str]:
    """sha256 of every regular file in the person-facing folders (data/ and runs/ are conveyor's own)."""
    found = set()
    for folder in ("inbox", "claimed", "finished", "rejected"):
        for root, _, names in os.walk(ws / folder):
            for name in names:
                path = os.path.join(root, name)
                if stat.S_ISREG(os.lstat(path).st_mode):
                    found.add(hashlib.sha256(Path(path).read_bytes()).hexdigest())
    return found


@pytest.fixture
def service(workspace, monkeypatch):
    monkeypatch.setenv("CONVEYOR_MAX_LINE_BYTES", str(LINE_LIMIT))  # inherited by the daemon
    with running(workspace(**FAST)) as svc:
        yield svc


def test_a_corpus_of_bad_input_never_stops_the_daemon_and_nothing_is_lost(service, tmp_path):
    inbox = service.ws / "inbox"
    left = _left_in_place(inbox, tmp_path)
    _drop(inbox, tmp_path / "staging", {**{n: data for n, (data, _) in BAD.items()}, **GOOD, **IGNORED})
    _drop(inbox / "high", tmp_path / "staging", HIGH)
    claimed = {printable(n) for n in [*BAD, *GOOD, *HIGH]}
    assert len(claimed) + len(left) + len(IGNORED) >= 30
    service.wait(lambda: set(service.jobs()) >= claimed and all(
        j["state"] in ("done", "rejected") for j in service.jobs().values()), 600, "every file to be dealt with")
    jobs = service.jobs()
    assert set(jobs) == claimed  # one job each, and none for what is ignored or left in place
    for name, (data, pieces) in BAD.items():
        job = jobs[printable(name)]
        assert job["state"] == "rejected", name
        assert job["error"].startswith(f"{printable(name)}: rejected, nothing trained from it"), job["error"]
        for piece in pieces:
            assert piece in job["error"], (name, job["error"])
        kept = Path(job["kept"])
        assert kept.parent == service.ws / "rejected" and kept.read_bytes() == data
        assert len(kept.name.encode()) + len(REASON) <= NAME_MAX
        assert (kept.parent / (kept.name + REASON)).read_text() == job["error"] + "\n"
    for name in [*GOOD, *HIGH]:
        assert jobs[printable(name)]["state"] == "done", (name, jobs[printable(name)]["error"])
    assert jobs["urgent.jsonl"]["priority"] == 0
    service.wait(lambda: all(Path(service.jobs()[printable(n)]["kept"] or "").parent == service.ws / "finished"
                             for n in [*GOOD, *HIGH]), 60, "originals to move to finished/")
    for name, data in {**GOOD, **HIGH}.items():
        assert Path(service.jobs()[printable(name)]["kept"]).read_bytes() == data

    # Scans go on: a file dropped now is claimed, so every entry left in place was seen again since its report.
    _drop(inbox, tmp_path / "staging", {"sentinel.jsonl": _texts("last", 2)})
    service.wait(lambda: service.jobs().get("sentinel.jsonl", {}).get("state") == "done", 120, "the sentinel")
    messages = service.messages()
    for name, problem in left.items():
        assert messages.count(f"inbox: left {name} in place: {problem}") == 1, (name, messages)
        assert os.path.lexists(inbox / name)
    for name, data in IGNORED.items():
        assert (inbox / name).read_bytes() == data
    assert not any(printable(n) in messages for n in IGNORED if n != "notes.txt")
    assert service.proc.poll() is None  # the daemon lives

    everything = _hashes(service.ws)
    dropped = {**{n: data for n, (data, _) in BAD.items()}, **GOOD, **HIGH, **IGNORED, "inner.jsonl": _texts("i")}
    lost = [name for name, data in dropped.items() if hashlib.sha256(data).hexdigest() not in everything]
    assert not lost
