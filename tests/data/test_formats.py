"""Input formats: whole-file validation with every bad line reported, and loss masks per format."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import zipfile

import pytest
from conftest import ASSETS, run_cli, status, text_file

from conveyor.data import formats
from conveyor.data.formats import CHAT, IGNORE, PROMPT, TEXT, parse_file, tokenize_file
from conveyor.errors import DataError

try:
    from conveyor.data.chat import load_tokenizer
except ImportError:  # its home before the training code was split into trainer.py and worker.py
    from conveyor.data.chat import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_tokenizer(str(tiny_dir))


@pytest.mark.parametrize("name, expected", [
    ("bad_json_and_fields.jsonl", ["line 2: invalid JSON", 'line 3: "text" must be a string, found int',
                                   'line 4: "text" is empty', "line 5: keys ['txt'] match no format"]),
    ("bad_chat.jsonl", ["line 1: messages[1].role 'robot' is unknown", "line 2: no assistant turn",
                        'line 3: "messages" must be a non-empty list']),
    ("mixed_formats.jsonl", ["mixes formats: text (first on line 1), prompt_completion (first on line 2)"]),
    ("empty.jsonl", ["the file has no examples"]),
    ("bad_utf8.jsonl", ["line 2: invalid UTF-8 at byte 13"]),
    ("bad_prompt.jsonl", ['line 1: "completion" is empty', 'line 2: "prompt" must be a string, found int']),
])
def test_bad_files_name_every_problem_by_line(name, expected):
    with pytest.raises(DataError) as e:
        parse_file(ASSETS / name)
    for text in expected:
        assert text in str(e.value)
    assert "nothing trained" in str(e.value)


def test_many_bad_lines_show_first_20_and_a_count():
    with pytest.raises(DataError) as e:
        parse_file(ASSETS / "many_bad.jsonl")
    message = str(e.value)
    assert "30 problem(s)" in message and "line 20:" in message and "line 21:" not in message
    assert "... and 10 more problem(s)" in message


def test_preview_says_a_bad_file_would_be_rejected():
    with pytest.raises(DataError) as e:
        parse_file(ASSETS / "empty.jsonl", preview=True)
    assert str(e.value).split("\n") == ["empty.jsonl would be rejected (1 problem(s)):", "  the file has no examples",
                                        "Fix the file, then add it."]
    with pytest.raises(DataError) as e:
        parse_file(ASSETS / "empty.jsonl")  # the inbox's words
    assert str(e.value).split("\n") == ["empty.jsonl: rejected, nothing trained from it (1 problem(s)):",
                                        "  the file has no examples", "Fix the file and add it again."]


def _problems(path) -> list[str]:
    """The problem lines of a rejection, without the indentation, header and advice."""
    with pytest.raises(DataError) as e:
        parse_file(path)
    head, *lines, advice = str(e.value).split("\n")
    assert head.startswith(f"{path.name}: rejected, nothing trained from it ({len(lines)} problem(s))")
    assert advice in ("Fix the lines above and add the file again.", "Fix the file and add it again.")
    return [line.removeprefix("  ") for line in lines]


def _zip(data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("data.jsonl", data)
    return out.getvalue()


GOOD = b'{"text": "one"}\n{"text": "two"}\n'
UTF16 = 'this looks like UTF-16 text: save it as UTF-8 (most editors offer the encoding under "Save as") and add it again'


@pytest.mark.parametrize("data, expected", [
    (GOOD + b"[" * 200_000 + b"\n" + GOOD,
     ["line 3: nested deeper than the JSON parser allows; an example is one flat JSON object"]),
    (gzip.compress(GOOD), ["this looks like gzip-compressed data: decompress it (gunzip) and drop the .jsonl"]),
    (_zip(GOOD), ["this looks like a zip archive: extract it (unzip) and drop the .jsonl files in it"]),
    (bz2.compress(GOOD), ["this looks like bzip2-compressed data: decompress it (bunzip2) and drop the .jsonl"]),
    (lzma.compress(GOOD), ["this looks like xz-compressed data: decompress it (unxz) and drop the .jsonl"]),
    (b"\x28\xb5\x2f\xfd" + bytes(range(40)),
     ["this looks like zstd-compressed data: decompress it (unzstd) and drop the .jsonl"]),
    (GOOD.decode().encode("utf-16"), [UTF16]),  # with a byte order mark
    (GOOD.decode().encode("utf-16-le"), [UTF16]),  # without one: NUL in every other byte
    (GOOD.decode().encode("utf-16-be"), [UTF16]),
    (GOOD + b'{"text": "a\x00b"}\n' + b"\x89PNG\x00\x00\n",
     ["line 3: binary data: a NUL byte at byte 11; a JSONL file holds only text",
      "line 4: binary data: a NUL byte at byte 4; a JSONL file holds only text"]),
    (b'{"text": "caf\xe9"}\n', ["line 1: invalid UTF-8 at byte 13; save the file as UTF-8"]),
    (b'\xef\xbb\xbf{"text": "caf\xe9"}\n', ["line 1: invalid UTF-8 at byte 16; save the file as UTF-8"]),
    (GOOD + b'\xef\xbb\xbf{"text": "x"}\n', ["line 3: invalid JSON: Unexpected UTF-8 BOM (decode using utf-8-sig) "
                                            "at column 1"]),  # a BOM is only ever at the start of a file
    (b'{"text": "half a pair \\ud83d"}\n',
     ['line 1: "text" holds an unpaired surrogate \\ud83d at character 13, which is not text; remove it, or '
      "write the character itself"]),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udc00"}]}\n',
     ["line 1: messages[1].content holds an unpaired surrogate \\udc00 at character 1, which is not text; "
      "remove it, or write the character itself"]),
    (b"", ["the file has no examples"]),
    (b"\n   \n\t\r\n\n", ["the file has no examples"]),
    (b'[1, 2]\n"text"\n', ["line 1: a line must be a JSON object, found list",
                           "line 2: a line must be a JSON object, found str"]),
])
def test_each_kind_of_bad_input_is_named_with_its_line(tmp_path, data, expected):
    path = tmp_path / "input.jsonl"
    path.write_bytes(data)
    assert _problems(path) == expected
    assert path.read_bytes() == data  # only read


def test_a_utf8_byte_order_mark_on_line_1_is_accepted_and_the_file_left_as_it_is(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD)
    parsed = parse_file(path)
    assert parsed.format == TEXT and [(e.line, e.record) for e in parsed.examples] == [(1, {"text": "one"}),
                                                                                      (2, {"text": "two"})]
    assert path.read_bytes() == b"\xef\xbb\xbf" + GOOD


def test_a_line_longer_than_the_limit_is_rejected_by_number_and_skipped_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "MAX_LINE_BYTES", 64)
    monkeypatch.setattr(formats, "CHUNK", 16)  # the rest of a long line is skipped in pieces this small
    read_lines, seen = formats._read_lines, []

    def spy(f, limit):
        for number, raw in read_lines(f, limit):
            seen.append(None if raw is None else len(raw))
            yield number, raw

    monkeypatch.setattr(formats, "_read_lines", spy)
    exact = json.dumps({"text": "x" * 52}).encode()
    assert len(exact) == 64
    path = tmp_path / "long.jsonl"
    path.write_bytes(exact + b"\n" + json.dumps({"text": "y" * 200}).encode() + b"\n" + GOOD
                     + exact + b"z")  # the last line, without a newline, one byte too long
    assert _problems(path) == ["line 2: longer than 64 bytes, the most one line may hold; split it into smaller examples",
                               "line 5: longer than 64 bytes, the most one line may hold; split it into smaller examples"]
    assert seen == [65, None, 16, 16, None]  # no line held beyond the limit (and its newline)
    path.write_bytes(exact + b"\n" + GOOD + exact)
    assert [e.line for e in parse_file(path).examples] == [1, 2, 3, 4]  # exactly the limit is fine


def test_the_line_limit_is_64_mib_unless_the_environment_lowers_it(tmp_path, monkeypatch):
    assert formats.MAX_LINE_BYTES == 64 << 20 and formats.max_line_bytes() == 64 << 20
    monkeypatch.setenv("CONVEYOR_MAX_LINE_BYTES", "1024")
    path = tmp_path / "long.jsonl"
    path.write_bytes(GOOD + json.dumps({"text": "w" * 2000}).encode() + b"\n")
    assert _problems(path) == ["line 3: longer than 1 KiB, the most one line may hold; split it into smaller examples"]
    monkeypatch.setenv("CONVEYOR_MAX_LINE_BYTES", "lots")  # not a number: the default stands
    assert formats.max_line_bytes() == 64 << 20


def test_text_trains_on_everything_after_bos(tok, tmp_path):
    parsed = parse_file(text_file(tmp_path / "t.jsonl", 1, "t"))
    assert parsed.format == TEXT
    ex = tokenize_file(parsed, tok, 512).examples[0]
    assert ex.labels[0] == IGNORE and ex.labels[1:] == ex.input_ids[1:]
    assert tok.decode(ex.input_ids) == "<|bos|>t 1: the quick brown fox 7 jumps.<|eos|>"
    assert parse_file(ASSETS / "chat_multi.jsonl").format == CHAT
    assert parse_file(ASSETS / "prompt_completion.jsonl").format == PROMPT


def test_prompt_completion_masks_the_prompt(tok):
    data = tokenize_file(parse_file(ASSETS / "prompt_completion.jsonl"), tok, 512)
    ex = data.examples[0]
    trained = tok.decode([i for i, l in zip(ex.input_ids, ex.labels) if l != IGNORE])
    assert trained == " A0<|eos|>"
    assert tok.decode(ex.input_ids) == "<|bos|>Q0: capital? A0<|eos|>"


def test_chat_trains_every_assistant_turn_and_nothing_else(tok):
    data = tokenize_file(parse_file(ASSETS / "chat_multi.jsonl"), tok, 512)
    ex = data.examples[0]
    trained = tok.decode([i for i, l in zip(ex.input_ids, ex.labels) if l != IGNORE])
    assert trained == "Hello.<|end|>Ciao.<|end|>"
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(parse_file(ASSETS / "chat_multi.jsonl").examples[0]
                                                               .record["messages"], tokenize=False)


def test_truncation_is_counted_and_fully_cut_examples_are_excluded(tok, tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "x" * 40, "completion": "yes"}) + "\n"
                    + json.dumps({"prompt": "short", "completion": "z" * 40}) + "\n"
                    + json.dumps({"prompt": "hi", "completion": "ok"}) + "\n")
    data = tokenize_file(parse_file(path), tok, 20)
    assert data.truncated_lines == [1, 2]
    assert data.excluded_lines == [1]  # its completion was cut away entirely
    assert [e.line for e in data.examples] == [2, 3]
    assert all(len(e.input_ids) <= 20 for e in data.examples)


def test_bad_files_are_rejected_and_good_files_after_them_still_train(workspace, tmp_path):
    ws = workspace()
    bad = sorted(p for p in ASSETS.glob("*.jsonl") if p.name not in ("chat_multi.jsonl", "prompt_completion.jsonl"))
    good = text_file(tmp_path / "good.jsonl", 8, "g")
    r = run_cli(ws, "train", *bad, good, "-q")
    assert r.code == 1  # something was rejected
    jobs = {j["file"]: j for j in status(ws)["jobs"]}
    for path in bad:
        assert jobs[path.name]["state"] == "rejected", path.name
        assert "line" in jobs[path.name]["error"] or "no examples" in jobs[path.name]["error"]
        kept = list((ws / "rejected").glob(f"*-{path.name}"))
        assert len(kept) == 1 and kept[0].read_bytes() == path.read_bytes()
        assert (ws / "rejected" / f"{kept[0].name}.reason.txt").read_text().strip() == jobs[path.name]["error"]
    assert jobs["good.jsonl"]["state"] == "done" and jobs["good.jsonl"]["end_step"] == 1
    assert "bad_json_and_fields.jsonl: rejected" in r.out + r.err


def test_too_long_reject_policy_fails_the_job_with_line_numbers(workspace, tmp_path):
    ws = workspace(data={"too_long": "reject"}, training={"max_length": 16})
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "a much longer line here"}) + "\n")
    r = run_cli(ws, "train", path, "-q")
    assert r.code == 1
    job = status(ws)["jobs"][0]
    assert job["state"] == "failed" and "1 example(s) longer than training.max_length=16 tokens (lines 2)" in job["error"]


def test_truncation_and_exclusion_are_reported_per_job(workspace, tmp_path):
    ws = workspace(training={"max_length": 12})
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                            for p, c in [("a" * 20, "b"), ("q", "c" * 20), ("q", "ok")]))
    r = run_cli(ws, "train", path, "-q")
    assert r.code == 0, r.out + r.err
    job = status(ws)["jobs"][0]
    assert job["truncated"] == 2 and job["excluded_lines"] == [1] and job["examples"] == 2
    assert any("truncated" in w for w in job["warnings"]) and any("not trained (lines 1)" in w for w in job["warnings"])


def test_a_job_that_would_train_0_steps_is_an_error(workspace, tmp_path):
    ws = workspace(training={"max_length": 8})
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "a long prompt", "completion": "c"}) + "\n")
    r = run_cli(ws, "train", path, "-q")
    assert r.code == 1
    job = status(ws)["jobs"][0]
    assert job["state"] == "failed" and "would train 0 steps" in job["error"]


def test_sharegpt_and_alpaca_files_train_as_chat_and_prompt_completion(workspace, tmp_path):
    import json as _json

    from conftest import ledger, run_cli

    ws = workspace()
    share = tmp_path / "share.jsonl"
    share.write_text("".join(_json.dumps({"system": "Be brief.", "conversations": [
        {"from": "human", "value": f"Name {i}?"}, {"from": "gpt", "value": f"It is {i}."}]}) + "\n"
        for i in range(8)))
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("".join(_json.dumps({"instruction": "Double it.", "input": str(i), "output": str(2 * i)})
                              + "\n" for i in range(8)))
    r = run_cli(ws, "preview", alpaca, "--lines", "3", "--json")
    assert r.code == 0, r.out + r.err
    shown = _json.loads(r.out)[0]
    assert "Double it.\n\n2\n\n" in shown["text"] and shown["trainable"] == ["4<|eos|>"]
    r = run_cli(ws, "preview", share, "--lines", "1", "--json")
    trained = _json.loads(r.out)[0]["trainable"]
    assert len(trained) == 1 and trained[0].startswith("It is 0.") and "Name 0?" not in trained[0]
    r = run_cli(ws, "train", share, alpaca, "-q")
    assert r.code == 0, r.out + r.err
    assert [(x["job"], x["start_step"], x["end_step"]) for x in ledger(ws)] == [(1, 1, 1), (2, 2, 2)]
    formats = [j["format"] for j in _json.loads(run_cli(ws, "status", "--json").out)["jobs"]]
    assert formats == ["messages", "prompt_completion"]


def test_a_bad_sharegpt_speaker_and_json_cut_at_the_end_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"conversations": [{"from": "bot", "value": "hi"}]}\n{"text": "abc"\n')
    assert _problems(path) == [
        "line 1: conversations[0].from 'bot' is unknown; use one of system, human, user, gpt, assistant, model, "
        "chatgpt, bard",
        "line 2: invalid JSON: Expecting ',' delimiter at column 15 (the end of the line: is something missing?)"]


def test_preview_in_a_pipe_marks_the_trained_text(workspace, tmp_path):
    import subprocess
    import sys

    ws = workspace()
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "Q: hi\\n", "completion": "A: yo"}\n')
    out = subprocess.run([sys.executable, "-m", "conveyor", "-w", str(ws), "preview", str(data)],
                         capture_output=True, text=True, timeout=120).stdout
    assert "⟦trained⟧ / context" in out and "Q: hi\n⟦A: yo<|eos|>⟧" in out, out


@pytest.mark.parametrize("fmt, record", [
    ("text", {"text": "the quick brown fox jumps. " * 16_000}),
    ("prompt_completion", {"prompt": "q " * 10, "completion": "a long answer, " * 30_000}),
    ("prompt_completion", {"prompt": "a long question " * 30_000, "completion": "short"}),
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes " * 100_000}]}),
])
def test_a_huge_line_is_tokenized_only_as_far_as_it_trains(tok, fmt, record):
    """A 400 KB example with max_length 64: the same ids and labels as tokenizing it whole and cutting, while the
    tokenizer is handed a prefix of a few kilobytes, not the line (a 50 MB line took 9.8 GB and 82 s before)."""
    from conveyor.data.formats import Example, _ids_and_labels, tokenize_example

    fmt = {"text": TEXT, "prompt_completion": PROMPT, "chat": CHAT}[fmt]
    whole_ids, whole_labels = _ids_and_labels(tok, record, fmt)
    seen: list[int] = []
    encode, call = tok.encode, type(tok).__call__
    tok.encode = lambda text, **kw: (seen.append(len(text)), encode(text, **kw))[1]
    try:
        type(tok).__call__ = lambda self, text, **kw: (seen.append(len(text)), call(self, text, **kw))[1]
        got = tokenize_example(tok, Example(1, record), fmt, 64)
    finally:
        del tok.encode
        type(tok).__call__ = call
    assert (got.input_ids, got.labels, got.truncated) == (whole_ids[:64], whole_labels[:64], True)
    assert max(seen) <= 64 * 64, seen  # a prefix: SLACK tokens past the cut at most a few doublings away


# Preference pairs and feedback -----------------------------------------------------------------------------------
def _user(content: str) -> dict:
    return {"role": "user", "content": content}


def _assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def _jsonl(path, records: list) -> object:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _trained(tok, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, label in zip(ids, labels) if label != IGNORE])


CONVERSATION = [_user("Hi"), _assistant("Hello."), _user("2+2?")]  # an earlier assistant turn in the prompt


def test_pairs_and_feedback_are_detected_in_each_of_their_forms(tmp_path):
    strings = {"prompt": "Q: sky?", "chosen": " blue", "rejected": " green"}
    chat = {"prompt": CONVERSATION, "chosen": [_assistant("4")], "rejected": [_assistant("5")]}
    implicit = {"chosen": CONVERSATION + [_assistant("4")], "rejected": CONVERSATION + [_assistant("5")]}
    for records, expected in (([strings], [strings]), ([chat], [chat]), ([implicit], [chat]), ([strings, implicit],
                                                                                             [strings, chat])):
        parsed = parse_file(_jsonl(tmp_path / "pairs.jsonl", records))
        assert parsed.format == formats.PAIR and [e.record for e in parsed.examples] == expected
    feedback = [{"prompt": "Q: sky?", "completion": " blue", "label": True},
                {"prompt": CONVERSATION, "completion": [_assistant("5")], "label": False}]
    parsed = parse_file(_jsonl(tmp_path / "feedback.jsonl", feedback))
    assert parsed.format == formats.FEEDBACK and [e.record for e in parsed.examples] == feedback


def test_bad_pairs_and_feedback_are_named_by_line(tmp_path):
    bad = [
        {"prompt": "Q", "chosen": "A", "rejected": "A"},
        {"prompt": "Q", "completion": "A", "label": "yes"},
        {"prompt": "Q", "completion": "A", "label": 1},
        {"prompt": [_user("Q")], "chosen": "A", "rejected": "B"},
        {"prompt": [_user("Q")], "chosen": [_assistant("A"), _user("and?")], "rejected": [_assistant("B")]},
        {"chosen": "A", "rejected": "B"},
        {"chosen": [_user("Q"), _assistant("A")], "rejected": [_user("R"), _assistant("B")]},
        {"chosen": [_user("Q"), _assistant("A")], "rejected": [_user("Q"), _assistant("A")]},
        {"chosen": [_user("Q"), _assistant("A")], "rejected": [_user("Q"), _assistant("A"), _user("?"),
                                                               _assistant("B")]},
        {"prompt": "Q", "chosen": "A", "rejected": "B", "label": True},
    ]
    assert _problems(_jsonl(tmp_path / "bad.jsonl", bad)) == [
        'line 1: "chosen" and "rejected" are the same answer: there is nothing to prefer',
        'line 2: "label" must be true (a good answer) or false (a bad one), found \'yes\'',
        'line 3: "label" must be true (a good answer) or false (a bad one), found 1',
        'line 4: "prompt" is a conversation, so "chosen" must be one too (a list of messages), found str',
        'line 5: "chosen" must end with the assistant\'s message, the answer that trains',
        ('line 6: "chosen" and "rejected" without "prompt": give the question as "prompt" (or both as whole '
         "conversations, lists of messages sharing their first messages)"),
        ('line 7: "chosen" and "rejected" share no first message, so there is no prompt; give it as "prompt" (a list '
         "of messages) and the answers after it"),
        'line 8: "chosen" and "rejected" are the same conversation: there is nothing to prefer',
        ('line 9: "chosen" is the start of the other conversation, so it has no answer of its own; each must end with '
         "its own assistant message after the messages they share"),
        ("line 10: keys ['chosen', 'label', 'prompt', 'rejected'] match no format; use {\"text\"}, {\"messages\"} or "
         '{"prompt", "completion"} (or ShareGPT {"conversations"}, Alpaca {"instruction", "input", "output"}), '
         'preference pairs {"prompt", "chosen", "rejected"} or feedback {"prompt", "completion", "label"}'),
    ]


@pytest.mark.parametrize("label, expected", [
    (True, "every one of the 3 feedback answers is labelled true: KTO learns from the difference between good and "
           'bad answers, so a file needs both (true and false); train good answers alone as {"prompt", '
           '"completion"} (supervised)'),
    (False, "every one of the 3 feedback answers is labelled false: KTO learns from the difference between good and "
            "bad answers, so a file needs both (true and false); add answers labelled true"),
])
def test_feedback_labelled_all_one_way_is_rejected_as_a_file(tmp_path, label, expected):
    path = _jsonl(tmp_path / "feedback.jsonl", [{"prompt": f"Q{i}", "completion": "A", "label": label}
                                               for i in range(3)])
    assert _problems(path) == [expected]


def test_a_file_mixing_pairs_and_text_is_rejected(tmp_path):
    path = _jsonl(tmp_path / "mixed.jsonl", [{"text": "t"}, {"prompt": "Q", "chosen": "A", "rejected": "B"}])
    assert _problems(path) == [("the file mixes formats: text (first on line 1), preference (first on line 2); "
                                "one file must use one format")]


def test_a_pair_trains_each_answer_after_its_prompt_and_feedback_keeps_its_label(tok, tmp_path):
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q: sky?", "chosen": " blue", "rejected": " green"}])
    [ex] = tokenize_file(parse_file(pairs), tok, 512).examples
    assert tok.decode(ex.input_ids) == "<|bos|>Q: sky? blue<|eos|>"
    assert tok.decode(ex.rejected_ids) == "<|bos|>Q: sky? green<|eos|>"
    assert _trained(tok, ex.input_ids, ex.labels) == " blue<|eos|>"
    assert _trained(tok, ex.rejected_ids, ex.rejected_labels) == " green<|eos|>"
    assert ex.label is None and ex.tokens == len(ex.input_ids) + len(ex.rejected_ids)
    feedback = _jsonl(tmp_path / "feedback.jsonl", [{"prompt": "Q: sky?", "completion": " blue", "label": True},
                                                    {"prompt": "Q: sky?", "completion": " red", "label": False}])
    good, bad = tokenize_file(parse_file(feedback), tok, 512).examples
    assert (good.label, bad.label) == (True, False) and good.rejected_ids is None
    assert _trained(tok, bad.input_ids, bad.labels) == " red<|eos|>"


def test_a_conversations_earlier_assistant_turns_carry_no_loss_in_pairs_and_feedback(tok, tmp_path):
    pairs = _jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": CONVERSATION, "chosen": [_assistant("4")], "rejected": [_assistant("5")]},
        {"chosen": CONVERSATION + [_assistant("Four.")], "rejected": CONVERSATION + [_assistant("Five.")]}])
    for ex, (chosen, rejected) in zip(tokenize_file(parse_file(pairs), tok, 512).examples,
                                      [("4", "5"), ("Four.", "Five.")]):
        assert tok.decode(ex.input_ids) == tok.apply_chat_template(CONVERSATION + [_assistant(chosen)],
                                                                   tokenize=False)
        assert _trained(tok, ex.input_ids, ex.labels) == f"{chosen}<|end|>"  # not "Hello.<|end|>"
        assert _trained(tok, ex.rejected_ids, ex.rejected_labels) == f"{rejected}<|end|>"
    feedback = _jsonl(tmp_path / "feedback.jsonl", [
        {"prompt": CONVERSATION, "completion": [_assistant("4")], "label": True},
        {"prompt": CONVERSATION, "completion": [_assistant("Well."), _user("So?"), _assistant("5")], "label": False}])
    good, bad = tokenize_file(parse_file(feedback), tok, 512).examples
    assert _trained(tok, good.input_ids, good.labels) == "4<|end|>"
    assert _trained(tok, bad.input_ids, bad.labels) == "Well.<|end|>5<|end|>"  # the answer's turns, not the prompt's


def test_a_pair_is_truncated_when_either_side_is_cut_and_excluded_when_its_prompt_leaves_nothing(tok, tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Q", "chosen": "ok", "rejected": "no" * 20},  # only the rejected side is cut
        {"prompt": "Q", "chosen": "yes" * 20, "rejected": "no"},  # only the chosen side
        {"prompt": "Q", "chosen": "ok", "rejected": "no"},  # neither
        {"prompt": "x" * 30, "chosen": "ok", "rejected": "no"},  # the prompt fills max_length: nothing trains
    ])
    data = tokenize_file(parse_file(path), tok, 16)
    assert data.truncated_lines == [1, 2, 4] and data.excluded_lines == [4]
    first, second, third = data.examples
    assert _trained(tok, first.input_ids, first.labels) == "ok<|eos|>" and len(first.rejected_ids) == 16
    assert _trained(tok, first.rejected_ids, first.rejected_labels) == "no" * 7  # cut: no end of text
    assert len(second.input_ids) == 16 and _trained(tok, second.rejected_ids, second.rejected_labels) == "no<|eos|>"
    assert not third.truncated and data.tokens == sum(e.tokens for e in data.examples)


def test_pairs_and_feedback_come_back_identical_from_the_tokenized_arrays_and_a_kept_holdout(tok, tmp_path):
    from conveyor.data import holdout
    from conveyor.data.tokenized import TokenizedArrays, tokenize_cached, tokens_of

    files = {
        "pairs.jsonl": [{"prompt": f"Q{i}: sky?", "chosen": " blue" * (i + 1), "rejected": " green"} for i in range(3)]
        + [{"chosen": CONVERSATION + [_assistant("4")], "rejected": CONVERSATION + [_assistant("5")]}],
        "feedback.jsonl": [{"prompt": f"Q{i}", "completion": f" A{i}", "label": i % 2 == 0} for i in range(4)]
        + [{"prompt": CONVERSATION, "completion": [_assistant("4")], "label": True}],
    }
    fields = lambda e: (e.line, e.input_ids, e.labels, e.rejected_ids, e.rejected_labels, e.label)
    for job_id, (name, records) in enumerate(files.items(), 1):
        path = _jsonl(tmp_path / name, records)
        expected = tokenize_file(parse_file(path), tok, 64)
        cached = tokenize_cached(path, name, tok, 64, tmp_path / "cache", f"key-{name}")
        assert isinstance(cached.examples, TokenizedArrays)
        assert [fields(e) for e in cached.examples] == [fields(e) for e in expected.examples]
        assert cached.tokens == expected.tokens and tokens_of(cached, [1, 2]) == tokens_of(expected, [1, 2])
        held = holdout.split(cached, [2, len(records)]).held
        holdout.save(tmp_path / "holdout", job_id, "key", held)
        kept = holdout.load(tmp_path / "holdout", job_id, "key")
        assert [fields(e) for e in kept] == [fields(e) for e in held]
        assert [fields(e) for e in held] == [fields(expected.examples[1]), fields(expected.examples[-1])]
    assert [e.label for e in kept] == [False, True] and all(type(e.label) is bool for e in kept)
