"""conveyor/serve/generate.py's functions called directly: loading a version, answering prompts, sampling, notes and
the chat loop (test_try_it.py drives the same code through the CLI)."""

from __future__ import annotations

import copy
import io
import json
import os
import secrets
from pathlib import Path

import pytest
from conftest import chat_file, drain_with_requests, make_workspace, run_cli, text_file

from conveyor.errors import ConveyorError
from conveyor.serve import generate as gen
from conveyor.serve.generate import Sampling
from conveyor.store.workspace import Workspace
from conveyor.train.evaluation import prompt_ids

SETTINGS = {"training": {"batch_size": 4, "grad_accum": 2, "learning_rate": 1e-3, "save_every": 2, "max_length": 64}}
KEYS = {"version", "run", "step", "chat", "prompt", "system", "sampling", "rendered", "output"}
PLAIN_HEADER = "v2 answers: run run-0001, step 2; plain text, each line is answered alone. /quit or end of input ends."
SYSTEM_IGNORED = ("--system ignored: run-0001 was trained on plain text, not chats, so each prompt is asked as it is, "
                  "without a chat template; put the instruction into the prompt instead")


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_dir) -> Path:
    """Two text files of 8 examples: v1 at step 1, v2 at step 2."""
    root = tmp_path_factory.mktemp("plain")
    ws = make_workspace(root / "ws", tiny_dir, **SETTINGS)
    r = run_cli(ws, "train", text_file(root / "a.jsonl", 8, "a"), text_file(root / "b.jsonl", 8, "b"), "-q")
    assert r.code == 0, r.out + r.err
    return ws


@pytest.fixture(scope="module")
def chats(tmp_path_factory, tiny_dir) -> Path:
    """One `messages` file of 8 conversations: v1 at step 1."""
    root = tmp_path_factory.mktemp("chats")
    ws = make_workspace(root / "ws", tiny_dir, **SETTINGS)
    r = run_cli(ws, "train", chat_file(root / "chat.jsonl", 8), "-q")
    assert r.code == 0, r.out + r.err
    return ws


@pytest.fixture(scope="module")
def plain_model(plain) -> gen.Loaded:
    return gen.load(Workspace.open(plain), None)


@pytest.fixture(scope="module")
def chat_model(chats) -> gen.Loaded:
    return gen.load(Workspace.open(chats), None)


def _scripted(monkeypatch, loaded: gen.Loaded) -> list[list[int]]:
    """Make `loaded` answer "r1", "r2", ... (the ids it was asked are recorded): the conversation logic alone."""
    asked: list[list[int]] = []
    monkeypatch.setattr(loaded, "complete", lambda ids, n, *sampling: asked.append(ids) or f"r{len(asked)}")
    return asked


# ---- load


def test_load_gives_the_newest_version_or_the_one_named(plain, plain_model):
    """Without a version the active run's newest checkpoint answers (v2), with one that version's checkpoint."""
    assert plain_model.about() == {"version": "v2", "run": "run-0001", "step": 2, "chat": False}
    assert plain_model.checkpoint.path == plain / "runs/run-0001/checkpoints/step-000002"
    assert plain_model.context == 2048 and not plain_model.asks_chat
    assert plain_model.threads == (None if "OMP_NUM_THREADS" in os.environ else 1)  # a 0.1M model: one thread
    v1 = gen.load(Workspace.open(plain), "v1")
    assert v1.about() == {"version": "v1", "run": "run-0001", "step": 1, "chat": False}


def test_load_marks_a_run_trained_on_chats(chat_model):
    """A run with a `messages` job is asked through the chat template."""
    assert chat_model.about() == {"version": "v1", "run": "run-0001", "step": 1, "chat": True}
    assert chat_model.asks_chat


def test_load_refuses_an_unknown_version_and_an_untrained_workspace(plain, workspace):
    """Both refusals name the fix, as the CLI shows them."""
    with pytest.raises(ConveyorError) as e:
        gen.load(Workspace.open(plain), "v9")
    assert str(e.value) == "no version 'v9'; versions: v1, v2. See `conveyor versions`"
    with pytest.raises(ConveyorError) as e:
        gen.load(Workspace.open(workspace()), None)
    assert str(e.value) == ("nothing trained yet: there is no checkpoint to answer with; train a file first "
                            "(`conveyor train FILE`)")


def test_a_checkpoint_in_the_middle_of_a_job_answers_as_no_version(workspace, tmp_path):
    """A job stopped after its first of two steps: its step-1 checkpoint answers, with no version name."""
    ws = workspace()
    assert run_cli(ws, "add", text_file(tmp_path / "a.jsonl", 16, "a")).code == 0
    assert drain_with_requests(ws, "stop@1").code == 75
    loaded = gen.load(Workspace.open(ws), None)
    assert loaded.about() == {"version": None, "run": "run-0001", "step": 1, "chat": False}
    assert gen.header(loaded, False) == ("the newest checkpoint (mid-job: not a version) answers: run run-0001, "
                                         "step 1; plain text, each line is answered alone. /quit or end of input "
                                         "ends.")
    assert gen.answer_all(loaded, ["hello"], 3)[0]["version"] is None


# ---- answer_all and generate


def test_answer_all_answers_each_prompt_alone_and_says_who_answered(plain, plain_model):
    """Each prompt gets a record of who answered and the answer it gets alone, greedy, as generate gives it."""
    out = gen.answer_all(plain_model, ["hello", "the quick"], 6)
    assert [set(x) for x in out] == [KEYS, KEYS]
    assert [(x["version"], x["run"], x["step"], x["chat"], x["prompt"], x["system"]) for x in out] == [
        ("v2", "run-0001", 2, False, "hello", None), ("v2", "run-0001", 2, False, "the quick", None)]
    assert [x["sampling"] for x in out] == [{"temperature": 0.0, "top_p": 1.0, "seed": None}] * 2
    assert [x["rendered"] for x in out] == ["<|bos|>hello", "<|bos|>the quick"]
    assert all(isinstance(x["output"], str) for x in out)
    assert gen.answer_all(plain_model, ["the quick", "hello"], 6) == out[::-1]
    assert gen.answer_all(plain_model, ["hello"], 6) == out[:1]
    assert gen.generate(Workspace.open(plain), "hello", None, 6) == out[0]
    assert json.loads(json.dumps(out)) == out  # what --json prints


def test_generate_with_a_version_answers_from_that_version(plain):
    """`generate` with v1 says v1 and step 1 answered."""
    said = gen.generate(Workspace.open(plain), "hello", "v1", 4)
    assert (said["version"], said["run"], said["step"]) == ("v1", "run-0001", 1)


def test_answer_all_samples_every_prompt_from_the_same_seed(plain_model):
    """A seed repeats a draw within a call and across calls; a draw without one records a seed that repeats it."""
    hot = Sampling(temperature=1.5, seed=7)
    first = gen.answer_all(plain_model, ["hello", "hello"], 8, hot)
    assert first[0] == first[1] and first[0]["sampling"] == {"temperature": 1.5, "top_p": 1.0, "seed": 7}
    assert gen.answer_all(plain_model, ["hello"], 8, hot) == first[:1]
    drawn = gen.answer_all(plain_model, ["hello"], 8, Sampling(temperature=1.5))[0]
    seed = drawn["sampling"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2 ** 31
    assert gen.answer_all(plain_model, ["hello"], 8, Sampling(temperature=1.5, seed=seed))[0] == drawn


def test_a_system_prompt_reaches_a_chat_run_only(plain_model, chat_model):
    """A chat run's record carries the system prompt in its rendered form; a plain run's drops it."""
    said = gen.answer_all(chat_model, ["q1"], 4, system="Be brief.")[0]
    assert (said["system"], said["rendered"]) == ("Be brief.",
                                                  "<|system|>Be brief.<|end|><|user|>q1<|end|><|assistant|>")
    plain = gen.answer_all(plain_model, ["hello"], 4, system="Be brief.")[0]
    assert (plain["system"], plain["rendered"]) == (None, "<|bos|>hello")
    assert plain == gen.answer_all(plain_model, ["hello"], 4)[0]


# ---- Sampling, notes, header


def test_sampling_greedy_by_default_and_seeded_only_when_it_draws(monkeypatch):
    """Greedy needs no seed; a given seed is kept; a draw without one gets a random seed, other fields kept."""
    greedy = Sampling()
    assert greedy.greedy and greedy.seeded() is greedy and greedy == gen.GREEDY
    given = Sampling(0.7, 0.9, 3)
    assert not given.greedy and given.seeded() is given
    monkeypatch.setattr(secrets, "randbelow", lambda n: n - 1)
    assert Sampling(0.7, 0.9).seeded() == Sampling(0.7, 0.9, 2 ** 31 - 1)
    assert Sampling(0.7, 0.9, 3).to_json() == {"temperature": 0.7, "top_p": 0.9, "seed": 3}


@pytest.mark.parametrize("kwargs, said", [
    ({"temperature": -0.5}, "--temperature -0.5: must be 0 (greedy) or more, e.g. 0.7"),
    ({"temperature": float("nan")}, "--temperature nan: must be 0 (greedy) or more, e.g. 0.7"),
    ({"top_p": 0.0}, "--top-p 0.0: must be above 0 and at most 1, e.g. 0.9 (1: no cut)"),
    ({"top_p": 1.5}, "--top-p 1.5: must be above 0 and at most 1, e.g. 0.9 (1: no cut)"),
])
def test_sampling_refuses_bad_values_with_the_option_named(kwargs, said):
    """A negative or NaN temperature and a top-p outside (0, 1] are refused with the value and an example."""
    with pytest.raises(ConveyorError) as e:
        Sampling(**kwargs)
    assert str(e.value) == said


def test_sampling_says_what_greedy_decoding_ignores():
    """Top-p and a seed given with temperature 0 are named as ignored; with sampling nothing is."""
    tail = " ignored: greedy decoding (--temperature 0) draws nothing; give --temperature above 0 to sample"
    assert Sampling(top_p=0.5, seed=5).unused() == "--top-p 0.5 and --seed 5" + tail
    assert Sampling(seed=3).unused() == "--seed 3" + tail
    assert Sampling(top_p=0.25).unused() == "--top-p 0.25" + tail
    assert Sampling().unused() is None and Sampling(0.7, 0.5, 5).unused() is None


def test_notes_name_ignored_options_the_seed_drawn_and_an_unused_system_prompt(plain_model, chat_model):
    """Notes: what greedy ignores, the seed a draw picked, a system prompt a plain run cannot use."""
    assert gen.notes(plain_model, Sampling(), Sampling(), None) == []
    assert gen.notes(plain_model, Sampling(seed=5), Sampling(seed=5), "Be brief.") == [
        "--seed 5 ignored: greedy decoding (--temperature 0) draws nothing; give --temperature above 0 to sample",
        SYSTEM_IGNORED]
    assert gen.notes(chat_model, Sampling(0.7), Sampling(0.7, seed=42), "Be brief.") == [
        "sampled with --seed 42 (give it to get these answers again)"]
    assert gen.notes(chat_model, Sampling(0.7, seed=4), Sampling(0.7, seed=4), None) == []


def test_header_says_who_answers_and_how(plain_model, chat_model):
    """The header names the version, run and step, whether history is kept, the system prompt and the sampling."""
    assert gen.header(plain_model, False) == PLAIN_HEADER
    assert gen.header(plain_model, False, system="Be brief.") == PLAIN_HEADER  # not kept: not said
    assert gen.header(chat_model, True, Sampling(0.7, 0.9, 3), "Be brief.") == (
        "v1 answers: run run-0001, step 1; chat template, the conversation is kept (/reset starts over), after the "
        "system prompt; sampled at temperature 0.7, top-p 0.9, seed 3. /quit or end of input ends.")


# ---- conversation_ids and Conversation


def test_conversation_ids_for_plain_and_chat_runs(chat_model):
    """Plain: the prompt alone after BOS, whatever the turns; chat: system, turns and prompt through the template."""
    tok = chat_model.tokenizer
    turns = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    assert gen.conversation_ids(tok, turns, "q2", False, "Be brief.") == prompt_ids(tok, "q2", False)
    assert gen.conversation_ids(tok, [], "q2", True) == prompt_ids(tok, "q2", True)
    assert tok.decode(gen.conversation_ids(tok, turns, "q2", True, "Be brief.")) == (
        "<|system|>Be brief.<|end|><|user|>q1<|end|><|assistant|>a1<|end|><|user|>q2<|end|><|assistant|>")


def test_a_template_without_a_system_role_gets_the_system_prompt_in_the_first_user_turn(chat_model):
    """As training renders it: the system text merged into the first user message."""
    tok = copy.deepcopy(chat_model.tokenizer)
    tok.chat_template = ("{% for message in messages %}{% if message['role'] != 'system' %}<|{{ message['role'] }}|>"
                         "{{ message['content'] }}<|end|>{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    turns = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    assert tok.decode(gen.conversation_ids(tok, turns, "q2", True, "Be brief.")) == (
        "<|user|>Be brief.\n\nq1<|end|><|assistant|>a1<|end|><|user|>q2<|end|><|assistant|>")


def test_a_conversation_keeps_its_history_and_reset_keeps_the_system_prompt(chat_model, monkeypatch):
    """Each ask sees the system prompt and every earlier exchange; reset forgets the exchanges only."""
    asked = _scripted(monkeypatch, chat_model)
    talk = gen.Conversation(chat_model, 4, system="Be brief.")
    assert talk.keeps_history and talk.system == "Be brief."
    assert [talk.ask("q1"), talk.ask("q2")] == [("r1", 0), ("r2", 0)]
    assert talk.turns == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "r1"},
                          {"role": "user", "content": "q2"}, {"role": "assistant", "content": "r2"}]
    talk.reset()
    assert talk.turns == [] and talk.ask("q3") == ("r3", 0)
    assert [chat_model.tokenizer.decode(ids) for ids in asked] == [
        "<|system|>Be brief.<|end|><|user|>q1<|end|><|assistant|>",
        "<|system|>Be brief.<|end|><|user|>q1<|end|><|assistant|>r1<|end|><|user|>q2<|end|><|assistant|>",
        "<|system|>Be brief.<|end|><|user|>q3<|end|><|assistant|>"]


def test_the_oldest_exchanges_go_until_the_prompt_fits(chat_model, monkeypatch):
    """Three exchanges kept; a context that holds only the newest one and the prompt drops the two oldest."""
    asked = _scripted(monkeypatch, chat_model)
    talk = gen.Conversation(chat_model, 4)
    for prompt in ("q1", "q2", "q3"):
        talk.ask(prompt)
    tok = chat_model.tokenizer
    newest = talk.turns[4:]
    fits = len(gen.conversation_ids(tok, newest, "q4", True)) + 4
    assert len(gen.conversation_ids(tok, talk.turns[2:], "q4", True)) + 4 > fits
    monkeypatch.setattr(chat_model, "context", fits)
    assert talk.ask("q4") == ("r4", 2)
    assert asked[-1] == gen.conversation_ids(tok, newest, "q4", True)
    assert [t["content"] for t in talk.turns] == ["q3", "r3", "q4", "r4"]


def test_a_prompt_too_long_even_alone_is_asked_with_no_history(chat_model, monkeypatch):
    """When nothing fits, every exchange is dropped and the prompt is still asked alone (the loop ends)."""
    asked = _scripted(monkeypatch, chat_model)
    talk = gen.Conversation(chat_model, 4)
    talk.ask("q1")
    talk.ask("q2")
    monkeypatch.setattr(chat_model, "context", 1)
    assert talk.ask("q3") == ("r3", 2)
    assert asked[-1] == prompt_ids(chat_model.tokenizer, "q3", True)


def test_without_a_known_context_nothing_is_dropped(chat_model, monkeypatch):
    """A model whose config gives no context size keeps every exchange."""
    _scripted(monkeypatch, chat_model)
    monkeypatch.setattr(chat_model, "context", None)
    talk = gen.Conversation(chat_model, 10 ** 6)
    assert [talk.ask(p)[1] for p in ("q1", "q2", "q3")] == [0, 0, 0] and len(talk.turns) == 6


def test_a_plain_run_answers_each_prompt_alone_and_ignores_the_system_prompt(plain_model, monkeypatch):
    """No history, no system prompt: every ask is the prompt after BOS."""
    asked = _scripted(monkeypatch, plain_model)
    talk = gen.Conversation(plain_model, 4, system="Be brief.")
    assert not talk.keeps_history and talk.system is None
    assert [talk.ask("one"), talk.ask("two")] == [("r1", 0), ("r2", 0)]
    assert talk.turns == [] and asked == [prompt_ids(plain_model.tokenizer, p, False) for p in ("one", "two")]


# ---- talk and input_lines


def test_talk_answers_lines_on_stdout_and_notes_on_stderr(plain, plain_model, capsys):
    """Blank lines skipped, /reset and /unknown noted, a path-like prompt asked, nothing after /quit read."""
    answers = {p: x["output"] for p, x in zip(("hello", "/etc/hosts is what?"),
                                              gen.answer_all(plain_model, ["hello", "/etc/hosts is what?"], 5))}
    capsys.readouterr()
    read = []

    def lines():
        for line in ["hello\n", "\n", "   \n", "/reset\n", "/nope\n", "/etc/hosts is what?\n", "hello\r\n",
                     "/quit\n", "never asked\n"]:
            read.append(line)
            yield line

    gen.talk(Workspace.open(plain), None, 5, lines())
    out, err = capsys.readouterr()
    assert out == f"{PLAIN_HEADER}\n{answers['hello']}\n{answers['/etc/hosts is what?']}\n{answers['hello']}\n"
    assert err == ("(nothing to clear: each line is answered alone)\n"
                   "unknown command /nope: /reset starts over, /quit ends\n")
    assert read[-1] == "/quit\n"


def test_talk_with_a_chat_run_clears_and_says_when_it_drops_exchanges(chats, chat_model, monkeypatch, capsys):
    """/reset clears a chat; an exchange dropped to fit the context is noted with the context's size."""
    _scripted(monkeypatch, chat_model)
    tok = chat_model.tokenizer
    first = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "r1"}]
    context = len(gen.conversation_ids(tok, first, "q2", True)) + 4 - 1  # q1's exchange and q2 do not fit
    monkeypatch.setattr(chat_model, "context", context)
    monkeypatch.setattr(gen, "load", lambda ws, version, chat=None: chat_model)
    gen.talk(Workspace.open(chats), None, 4, ["q1", "q2", "/reset", "q3"])
    out, err = capsys.readouterr()
    assert out.splitlines() == ["v1 answers: run run-0001, step 1; chat template, the conversation is kept (/reset "
                                "starts over). /quit or end of input ends.", "r1", "r2", "r3"]
    assert err == (f"(1 oldest exchange(s) dropped: the conversation outgrew the model's {context} positions)\n"
                   "(conversation cleared)\n")


def test_talk_notes_the_drawn_seed_and_an_ignored_system_prompt_before_the_header(plain, monkeypatch, capsys):
    """A draw without a seed: the seed picked is noted and shown in the header; no input, no answers."""
    monkeypatch.setattr(secrets, "randbelow", lambda n: 99)
    gen.talk(Workspace.open(plain), "v1", 4, [], Sampling(0.7), system="Be brief.")
    out, err = capsys.readouterr()
    assert out == ("v1 answers: run run-0001, step 1; plain text, each line is answered alone; sampled at "
                   "temperature 0.7, top-p 1, seed 99. /quit or end of input ends.\n")
    assert err == f"note: sampled with --seed 99 (give it to get these answers again)\nnote: {SYSTEM_IGNORED}\n"


def test_input_lines_reads_piped_stdin_as_it_comes(monkeypatch):
    """Not a terminal: every line as read, newline and all, until end of input."""
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\n/quit\nlast"))
    assert list(gen.input_lines()) == ["hello\n", "\n", "/quit\n", "last"]


def test_input_lines_at_a_terminal_prompts_until_end_of_input(monkeypatch):
    """A terminal: each line through input("> ") until EOF."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    typed, prompts = iter(["hello", "/quit"]), []

    def fake_input(prompt):
        prompts.append(prompt)
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("sys.stdin", Terminal())
    monkeypatch.setattr("builtins.input", fake_input)
    assert list(gen.input_lines()) == ["hello", "/quit"] and prompts == ["> "] * 3


# ---- read_prompts


def test_read_prompts_reads_one_prompt_a_line_from_a_text_file(tmp_path):
    """Text: each non-blank line as written (leading spaces, JSON-looking text kept), CRLF endings cut."""
    path = tmp_path / "prompts.txt"
    path.write_bytes(b'hello\r\n\r\n   \n  indented\n{"prompt": "literal"}\nlast')
    assert gen.read_prompts(path) == ["hello", "  indented", '{"prompt": "literal"}', "last"]


def test_read_prompts_reads_a_prompt_from_each_jsonl_line(tmp_path):
    """JSONL: the "prompt" of each object, other keys ignored, blank lines skipped."""
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hello", "id": 1}\n\n{"prompt": " spaced "}\r\n')
    assert gen.read_prompts(path) == ["hello", " spaced "]


def test_read_prompts_names_bad_lines_by_their_line_in_the_file(tmp_path):
    """Line numbers count blank lines; the first five bad lines are named, then how many more."""
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(['{"prompt": "fine"}', "", "{oops", '{"prompt": 3}', '"text"', '{"text": "x"}',
                               "[1]", '{"prompt": null}', "nope"]) + "\n")
    with pytest.raises(ConveyorError) as e:
        gen.read_prompts(path)
    assert str(e.value) == (
        f"--prompts {path}: 7 bad line(s): line 3: not JSON (Expecting property name enclosed in double quotes); "
        'line 4: no "prompt" text; line 5: no "prompt" text; line 6: no "prompt" text; line 7: no "prompt" text '
        '(and 2 more); each line of a .jsonl file is an object such as {"prompt": "What does the owl do?"}')


def test_read_prompts_refuses_an_unreadable_or_empty_file(tmp_path):
    """Not UTF-8, a folder, or nothing but blank lines: refused, naming the file."""
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConveyorError) as e:
        gen.read_prompts(latin)
    assert str(e.value).startswith(f"--prompts {latin}: cannot read it ('utf-8' codec can't decode byte 0xe9")
    assert str(e.value).endswith('give a UTF-8 text file, one prompt a line, or a .jsonl file with a "prompt" on '
                                 "each line")
    with pytest.raises(ConveyorError, match="cannot read it"):
        gen.read_prompts(tmp_path)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    with pytest.raises(ConveyorError) as e:
        gen.read_prompts(blank)
    assert str(e.value) == f"--prompts {blank}: no prompts in it; write one prompt a line"


def test_torch_threads_sets_the_count_meanwhile_and_restores_it():
    """One thread inside, the count from before after; None leaves it alone."""
    import torch

    before = torch.get_num_threads()
    with gen.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with gen.torch_threads(None):
        assert torch.get_num_threads() == before


def test_after_a_rollback_a_version_is_asked_as_its_lineage_trained_it(workspace, tmp_path):
    """chats (v1), then plain text (v2): v2's newest run asks through the template (its lineage trained chats);
    a rollback to v1 inherits that; a run that trained only text asks the prompt alone; --raw/--chat choose."""
    ws = workspace()
    assert run_cli(ws, "train", chat_file(tmp_path / "chats.jsonl", 8), text_file(tmp_path / "t.jsonl", 8), "-q").code == 0
    assert run_cli(ws, "rollback", "v1").code == 0

    def asked(*args) -> bool:
        r = run_cli(ws, "generate", "hello", "--json", "--max-new-tokens", "2", *args)
        assert r.code == 0, r.out + r.err
        return json.loads(r.out)["chat"]

    assert asked() is True  # run-0002 trained nothing yet; it branches from v1, trained on chats
    assert asked("--version", "v2") is True  # v2's lineage holds the chats of v1
    assert asked("--raw") is False and asked("--version", "v2", "--raw") is False
    other = workspace("text-only")
    assert run_cli(other, "train", text_file(tmp_path / "u.jsonl", 8), "-q").code == 0
    r = run_cli(other, "generate", "hello", "--json", "--max-new-tokens", "2")
    assert json.loads(r.out)["chat"] is False
    r = run_cli(other, "generate", "hello", "--json", "--max-new-tokens", "2", "--chat")
    assert json.loads(r.out)["chat"] is True
