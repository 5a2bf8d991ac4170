"""Trying the model: `conveyor chat` loads it once and answers line after line (a chat-trained run sees every earlier
turn), and the dashboard's ask box answers as `conveyor generate` does, in a separate process, one question at a
time; the dashboard's forgetting matrix and held-out curves; and (slow) both in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import psutil
import pytest
from conftest import chat_file, make_workspace, run_cli, text_file
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from conveyor import cli
from conveyor.serve import api
from conveyor.serve import generate as gen
from conveyor.serve.api import ASK_BUSY
from conveyor.serve.dashboard import create_app
from conveyor.store.workspace import Workspace
from conveyor.train.evaluation import prompt_ids

LOCAL = "http://127.0.0.1:8750"
TOKEN = "s3cret-token"
SETTINGS = {"training": {"batch_size": 4, "grad_accum": 2, "learning_rate": 1e-3, "save_every": 2, "max_length": 64}}


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_dir) -> Path:
    """Two text files of 16 examples, 2 of each held out: v1 at step 2, v2 at step 4; held-out sets scored at both."""
    root = tmp_path_factory.mktemp("plain")
    ws = make_workspace(root / "ws", tiny_dir, eval={"holdout": 2}, **SETTINGS)
    r = run_cli(ws, "train", text_file(root / "a.jsonl", 16, "a"), text_file(root / "b.jsonl", 16, "b"), "-q")
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


def _generate(ws: Path, prompt: str, *options: str) -> dict:
    r = run_cli(ws, "generate", prompt, "--json", *options)
    assert r.code == 0, r.out + r.err
    return json.loads(r.out)


def _chat(ws: Path, text: str, *options: str):
    """`conveyor chat` in this process, `text` piped to its stdin."""
    return CliRunner().invoke(cli.app, ["-w", str(ws), "chat", *options], input=text, catch_exceptions=False)


# ---- conveyor chat

def test_chat_answers_piped_lines_as_generate_does(plain):
    """A real pipe (stdin not a terminal): the same line, asked again after /reset, gets the same answer as
    `conveyor generate`; empty lines are skipped and nothing after /quit is read."""
    expected = _generate(plain, "hello", "--max-new-tokens", "8")
    p = subprocess.run([sys.executable, "-m", "conveyor", "-w", str(plain), "chat", "--max-new-tokens", "8"],
                       input="hello\n\n   \n/reset\nhello\n/quit\nnever asked\n", capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    header = ("v2 answers: run run-0001, step 4; plain text, each line is answered alone. /quit or end of input "
              "ends.")
    assert p.stdout == f"{header}\n{expected['output']}\n{expected['output']}\n"
    assert "(nothing to clear: each line is answered alone)" in p.stderr


def test_chat_with_a_version_loads_once_and_says_what_it_cannot_do(plain, monkeypatch):
    loads = []
    real = gen.load
    monkeypatch.setattr(gen, "load", lambda ws, version, chat=None: loads.append(version) or real(ws, version, chat))
    expected = _generate(plain, "the quick", "--version", "v1", "--max-new-tokens", "5")
    loads.clear()
    r = _chat(plain, "the quick\n/rset\nthe quick\n", "--version", "v1", "--max-new-tokens", "5")  # EOF ends it
    assert r.exit_code == 0, r.stderr
    assert loads == ["v1"]
    assert r.stdout.splitlines()[0].startswith("v1 answers: run run-0001, step 2;")
    assert r.stdout.endswith(f"\n{expected['output']}\n{expected['output']}\n")
    assert "unknown command /rset: /reset starts over, /quit ends" in r.stderr


def test_chat_refuses_an_unknown_version_as_generate_does(plain, workspace):
    said = run_cli(plain, "generate", "hi", "--version", "v9")
    r = run_cli(plain, "chat", "--version", "v9")
    assert r.code == 1 and said.code == 1
    assert "no version 'v9'; versions: v1, v2" in r.err and r.err == said.err
    r = run_cli(workspace(), "chat")
    assert r.code == 1 and "nothing trained yet" in r.err


def test_a_chat_trained_run_sees_every_earlier_turn(chats):
    loaded = gen.load(Workspace.open(chats), None)
    asked, complete = [], loaded.complete
    loaded.complete = lambda ids, n, *sampling: asked.append(ids) or complete(ids, n, *sampling)
    conversation = gen.Conversation(loaded, max_new_tokens=6)
    assert conversation.keeps_history
    a1, _ = conversation.ask("q1")
    a2, _ = conversation.ask("q2")
    conversation.reset()
    again, _ = conversation.ask("q1")
    tokenizer = loaded.tokenizer
    assert asked[0] == prompt_ids(tokenizer, "q1", True) == asked[2] and again == a1  # as generate asks it
    history = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": a1},
               {"role": "user", "content": "q2"}]
    assert asked[1] == tokenizer.apply_chat_template(history, tokenize=True, add_generation_prompt=True,
                                                     return_dict=False)
    assert asked[1][:len(asked[0])] == asked[0]
    assert tokenizer.decode(asked[1]) == f"<|user|>q1<|end|><|assistant|>{a1}<|end|><|user|>q2<|end|><|assistant|>"
    assert gen.conversation_ids(tokenizer, history[:2], "q2", True) == asked[1]

    # the command gives the same answers: one model, the whole conversation, /reset starts over
    r = _chat(chats, "q1\nq2\n/reset\nq1\n/quit\n", "--max-new-tokens", "6")
    assert r.exit_code == 0, r.stderr
    header = "v1 answers: run run-0001, step 1; chat template, the conversation is kept (/reset starts over)."
    assert r.stdout == f"{header} /quit or end of input ends.\n{a1}\n{a2}\n{a1}\n"
    assert "(conversation cleared)" in r.stderr
    assert _generate(chats, "q1", "--max-new-tokens", "6")["output"] == a1


def test_the_oldest_exchanges_make_room_in_a_full_context(chats):
    loaded = gen.load(Workspace.open(chats), None)
    conversation = gen.Conversation(loaded, max_new_tokens=4)
    first, _ = conversation.ask("q1")
    alone = gen.conversation_ids(loaded.tokenizer, [], "q2", True)
    loaded.context = len(gen.conversation_ids(loaded.tokenizer, conversation.turns, "q2", True)) + 4 - 1
    answer, dropped = conversation.ask("q2")
    assert dropped == 1 and len(alone) + 4 <= loaded.context
    assert conversation.turns == [{"role": "user", "content": "q2"}, {"role": "assistant", "content": answer}]
    assert answer == gen.Conversation(loaded, max_new_tokens=4).ask("q2")[0]  # asked alone, as if new


def test_a_plain_text_run_answers_each_line_alone(plain):
    loaded = gen.load(Workspace.open(plain), None)
    conversation = gen.Conversation(loaded, max_new_tokens=3)
    conversation.ask("one")
    assert not conversation.keeps_history and conversation.turns == []
    assert gen.conversation_ids(loaded.tokenizer, [{"role": "user", "content": "one"}], "two", False) == \
        prompt_ids(loaded.tokenizer, "two", False)


# ---- sampling, a system prompt, a file of prompts

def test_sampling_is_seeded_and_greedy_stays_the_default(chats):
    """The same seed draws the same answer, another seed another one; a top-p that keeps only the likeliest token
    draws the greedy answer; without --seed the seed drawn is in the JSON and repeats the answer."""
    ask = ("q1", "--max-new-tokens", "12")
    greedy = _generate(chats, *ask)
    assert greedy["sampling"] == {"temperature": 0.0, "top_p": 1.0, "seed": None}
    hot = ("--temperature", "1.5")
    first = _generate(chats, *ask, *hot, "--seed", "3")
    assert first["sampling"] == {"temperature": 1.5, "top_p": 1.0, "seed": 3}
    assert _generate(chats, *ask, *hot, "--seed", "3")["output"] == first["output"] != greedy["output"]
    assert _generate(chats, *ask, *hot, "--seed", "4")["output"] != first["output"]
    assert _generate(chats, *ask, *hot, "--top-p", "1e-9", "--seed", "3")["output"] == greedy["output"]
    drawn = _generate(chats, *ask, *hot)
    assert isinstance(drawn["sampling"]["seed"], int)
    assert _generate(chats, *ask, *hot, "--seed", str(drawn["sampling"]["seed"]))["output"] == drawn["output"]
    r = run_cli(chats, "generate", *ask, "--seed", "5", "--top-p", "0.5")
    assert r.code == 0 and r.out == greedy["output"] + "\n"
    assert "note: --top-p 0.5 and --seed 5 ignored: greedy decoding (--temperature 0) draws nothing" in r.err
    r = run_cli(chats, "generate", *ask, *hot)
    assert r.code == 0 and "note: sampled with --seed " in r.err


def test_chat_samples_each_answer_from_the_seed(chats):
    r = _chat(chats, "q1\nq1\n", "--max-new-tokens", "8", "--temperature", "2", "--seed", "11")
    header, a1, a2 = r.stdout.splitlines()
    assert header.endswith("(/reset starts over); sampled at temperature 2, top-p 1, seed 11. /quit or end of "
                           "input ends.")
    again = _chat(chats, "q1\nq1\n", "--max-new-tokens", "8", "--temperature", "2", "--seed", "11")
    assert again.stdout == r.stdout
    assert a1 == _generate(chats, "q1", "--max-new-tokens", "8", "--temperature", "2", "--seed", "11")["output"]


def test_a_system_prompt_goes_through_the_chat_template(chats, plain):
    said = _generate(chats, "q1", "--system", "Answer in one word.", "--max-new-tokens", "4")
    assert said["system"] == "Answer in one word."
    assert said["rendered"] == "<|system|>Answer in one word.<|end|><|user|>q1<|end|><|assistant|>"
    assert _generate(chats, "q1", "--max-new-tokens", "4")["rendered"] == "<|user|>q1<|end|><|assistant|>"
    r = run_cli(plain, "generate", "hello", "--system", "Answer in one word.", "--json", "--max-new-tokens", "4")
    assert r.code == 0, r.err
    result = json.loads(r.out)
    assert result["system"] is None and result["rendered"] == "<|bos|>hello"
    assert result["output"] == _generate(plain, "hello", "--max-new-tokens", "4")["output"]
    assert "note: --system ignored: run-0001 was trained on plain text, not chats" in r.err

    loaded = gen.load(Workspace.open(chats), None)
    asked, complete = [], loaded.complete
    loaded.complete = lambda ids, n, *sampling: asked.append(ids) or complete(ids, n, *sampling)
    conversation = gen.Conversation(loaded, max_new_tokens=4, system="Be brief.")
    a1, _ = conversation.ask("q1")
    conversation.reset()
    conversation.ask("q2")
    assert [loaded.tokenizer.decode(ids) for ids in asked] == [
        "<|system|>Be brief.<|end|><|user|>q1<|end|><|assistant|>",
        "<|system|>Be brief.<|end|><|user|>q2<|end|><|assistant|>"]  # /reset keeps the system prompt
    r = _chat(chats, "q1\n", "--system", "Be brief.", "--max-new-tokens", "4")
    assert r.stdout.splitlines()[0] == ("v1 answers: run run-0001, step 1; chat template, the conversation is kept "
                                        "(/reset starts over), after the system prompt. /quit or end of input ends.")


def test_a_file_of_prompts_is_answered_by_one_model(plain, tmp_path, monkeypatch):
    alone = {p: _generate(plain, p, "--max-new-tokens", "6")["output"] for p in ("hello", "the quick")}
    lines = tmp_path / "prompts.txt"
    lines.write_text("hello\n\n  \nthe quick\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "hello"}\n\n{"prompt": "the quick", "note": "kept apart"}\n')
    loads = []
    real = gen.load
    monkeypatch.setattr(gen, "load", lambda ws, version, chat=None: loads.append(version) or real(ws, version, chat))
    for path in (lines, jsonl):
        r = run_cli(plain, "generate", "--prompts", path, "--max-new-tokens", "6", "--json")
        assert r.code == 0, r.err
        assert [(x["prompt"], x["output"], x["version"]) for x in json.loads(r.out)] == [
            ("hello", alone["hello"], "v2"), ("the quick", alone["the quick"], "v2")]
    assert loads == [None, None]  # once per command
    r = run_cli(plain, "generate", "--prompts", lines, "--max-new-tokens", "6")
    assert r.out == f"> hello\n{alone['hello']}\n> the quick\n{alone['the quick']}\n"


def test_a_bad_file_of_prompts_is_named_with_every_bad_line(plain, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\nnot json\n["hello"]\n')
    r = run_cli(plain, "generate", "--prompts", bad)
    assert r.code == 1
    assert (f"--prompts {bad}: 3 bad line(s): line 2: no \"prompt\" text; line 3: not JSON (Expecting value); "
            'line 4: no "prompt" text; each line of a .jsonl file is an object such as {"prompt": ') in r.err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    r = run_cli(plain, "generate", "--prompts", empty)
    assert r.code == 1 and f"--prompts {empty}: no prompts in it" in r.err
    r = run_cli(plain, "generate", "--prompts", tmp_path / "missing.txt")
    assert r.code == 1 and "cannot read it" in r.err


@pytest.mark.parametrize("args, said", [
    (["hi", "--temperature", "-0.5"], "Invalid value for '--temperature': -0.5 is below 0; give 0 for greedy"),
    (["hi", "--temperature", "nan"], "Invalid value for '--temperature': nan is below 0"),
    (["hi", "--top-p", "0"], "Invalid value for '--top-p': 0.0 is not above 0 and at most 1; give e.g. 0.9"),
    (["hi", "--top-p", "1.5"], "Invalid value for '--top-p': 1.5 is not above 0 and at most 1"),
    (["hi", "--seed", "-1"], "Invalid value for '--seed'"),
    ([], "Invalid value for PROMPT: nothing to ask: give a PROMPT or --prompts FILE"),
    (["hi", "--prompts", "p.txt"], "Invalid value for PROMPT: give a PROMPT or --prompts FILE, not both"),
])
def test_bad_sampling_values_are_refused_before_loading(plain, args, said, monkeypatch):
    monkeypatch.setattr(gen, "load", lambda *a: pytest.fail("loaded a model for a refused command"))
    unboxed = lambda text: " ".join(re.sub("[│╭╮╰╯─]", " ", text).split())  # typer's in-process error box
    r = run_cli(plain, "generate", *args)
    assert r.code == 2 and said in unboxed(r.err), r.err
    if args[1:2] in (["--temperature"], ["--top-p"], ["--seed"]):
        r = run_cli(plain, "chat", *args[1:])
        assert r.code == 2 and said in unboxed(r.err), r.err


def test_a_lora_adapter_is_merged_into_the_base_as_peft_computes_it(chats):
    """generate folds a plain LoRA adapter into the base weights (no peft import): the same logits as peft's model,
    and a process that answers imports neither peft nor the training libraries."""
    import torch

    from conveyor.serve.export import load_trained

    ws = Workspace.open(chats)
    loaded = gen.load(ws, None)
    reference = load_trained(loaded.run.identity, ws.model_path("tiny"), loaded.checkpoint.path).eval()
    ids = torch.tensor([prompt_ids(loaded.tokenizer, "q1 and a longer question", True)])
    with torch.no_grad():
        assert (loaded.model(ids).logits - reference(ids).logits).abs().max() < 1e-5
    assert not any("lora" in name for name, _ in loaded.model.named_parameters())
    code = ("import sys; from conveyor.serve import generate as gen; from conveyor.store.workspace import Workspace; "
            f"gen.answer_all(gen.load(Workspace.open({str(chats)!r}), None), ['q1'], 2); "
            "print(sorted(m for m in ('peft', 'datasets', 'bitsandbytes', 'conveyor.train.worker') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stderr


# ---- the dashboard's ask box

@pytest.fixture
def client(plain) -> TestClient:
    return TestClient(create_app(plain), base_url=LOCAL)


def test_ask_answers_as_generate_does_in_another_process(client, plain, monkeypatch):
    expected = _generate(plain, "hello", "--version", "v1", "--max-new-tokens", "8")

    def in_this_process(*args):
        raise AssertionError("the model was loaded in the dashboard's process")

    monkeypatch.setattr(gen, "load", in_this_process)
    monkeypatch.setattr(gen, "generate", in_this_process)
    r = client.post("/api/ask", json={"prompt": "hello", "version": "v1", "max_new_tokens": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    pid = body.pop("pid")
    assert body == expected and (body["version"], body["step"]) == ("v1", 2)
    assert pid != os.getpid() and not psutil.pid_exists(pid)  # it answered, exited and was reaped


def test_ask_errors_say_what_is_wrong(client, plain, workspace):
    r = client.post("/api/ask", json={"prompt": "hi", "version": "v9"})
    assert r.status_code == 404
    assert r.json()["detail"] == "no version 'v9'; versions: v1, v2. See `conveyor versions`"  # as the CLI says
    assert r.json()["detail"] in run_cli(plain, "generate", "hi", "--version", "v9").err
    for body in ({}, {"prompt": ""}, {"prompt": "hi", "max_new_tokens": 0}, {"prompt": "hi", "max_new_tokens": 513},
                 {"prompt": "x" * 8001}):
        assert client.post("/api/ask", json=body).status_code == 422, body
    empty = TestClient(create_app(workspace()), base_url=LOCAL)
    r = empty.post("/api/ask", json={"prompt": "hi"})  # the process answers that it cannot
    assert r.status_code == 409 and r.json()["detail"].startswith("nothing trained yet: there is no checkpoint")


def test_an_ask_that_takes_too_long_is_stopped(plain):
    client = TestClient(create_app(plain, ask_timeout=0.001), base_url=LOCAL)  # no Python starts that fast
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    r = client.post("/api/ask", json={"prompt": "hello"})
    assert r.status_code == 504 and "no answer within 0.001 s, so it was stopped" in r.json()["detail"]
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before  # killed and reaped


def test_one_question_at_a_time(client, monkeypatch):
    started, release, answers = threading.Event(), threading.Event(), []

    async def held(root, body, timeout):
        started.set()
        await anyio.to_thread.run_sync(release.wait)
        return JSONResponse({"output": f"answer to {body.prompt}"})

    monkeypatch.setattr(api, "ask_in_process", held)
    first = threading.Thread(target=lambda: answers.append(client.post("/api/ask", json={"prompt": "first"})))
    first.start()
    try:
        assert started.wait(30)
        r = client.post("/api/ask", json={"prompt": "second"})
        assert r.status_code == 429 and r.json()["detail"] == ASK_BUSY
    finally:
        release.set()
        first.join(30)
    assert answers[0].status_code == 200 and answers[0].json() == {"output": "answer to first"}
    assert client.post("/api/ask", json={"prompt": "third"}).json() == {"output": "answer to third"}  # free again


def test_versions_route_and_the_token(client, plain):
    assert client.get("/api/versions").json() == json.loads(run_cli(plain, "versions", "--json").out)
    guarded = TestClient(create_app(plain, token=TOKEN), base_url="http://box.lan:8750")
    assert guarded.get("/api/versions").status_code == 401
    assert guarded.post("/api/ask", json={"prompt": "hi", "version": "v9"}).status_code == 401
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert [v["version"] for v in guarded.get("/api/versions", headers=good).json()] == ["v1", "v2"]
    assert guarded.post("/api/ask", json={"prompt": "hi", "version": "v9"}, headers=good).status_code == 404
    r = client.post("/api/ask", json={"prompt": "hi"}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403


def test_forgetting_matrix_and_held_out_series(client, plain):
    matrix = client.get("/api/matrix").json()
    assert matrix == json.loads(run_cli(plain, "eval", "--json").out) == client.get("/api/matrix?run=run-0001").json()
    assert [(s["name"], s["file"], s["examples"]) for s in matrix["sets"]] == [("job 1", "a.jsonl", 2),
                                                                                ("job 2", "b.jsonl", 2)]
    assert [(r["version"], r["step"], r["loss"]["job 2"] is None) for r in matrix["rows"]] == [("v1", 2, True),
                                                                                              ("v2", 4, False)]
    body = client.get("/api/set_evals").json()
    assert body["run"] == "run-0001"
    assert [(r["step"], r["name"], r["job_id"], r["examples"]) for r in body["rows"]] == [
        (2, "job 1", 1, 2), (4, "job 1", 2, 2), (4, "job 2", 2, 2)]  # job_id: the job training at that step
    by_version = {r["step"]: r["loss"] for r in matrix["rows"]}
    assert all(r["loss"] == by_version[r["step"]][r["name"]] for r in body["rows"])
    assert client.get("/api/set_evals?run=run-0001").json() == body
    for path in ("/api/set_evals?run=nope", "/api/matrix?run=nope"):
        r = client.get(path)
        assert r.status_code == 404 and "known runs: run-0001" in r.json()["detail"]
    guarded = TestClient(create_app(plain, token=TOKEN), base_url="http://box.lan:8750")
    assert guarded.get("/api/matrix").status_code == 401 and guarded.get("/api/set_evals").status_code == 401


def test_page_has_the_ask_box_and_the_forgetting_cards(client):
    text = client.get("/").text
    for element in ('id="ask-prompt"', 'id="ask-version"', 'id="ask-tokens"', 'id="btn-ask"', 'id="ask-status"',
                    'id="ask-answer"', 'id="matrix"', 'id="sets-chart"'):
        assert element in text


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.mark.slow
def test_ask_box_and_forgetting_in_chromium(plain):
    """The page with a token: the forgetting matrix and held-out curves drawn; the version list filled from the API,
    v1 asked from the box, its answer shown with who answered; nothing fetched from anywhere else."""
    from test_dashboard import serving

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    expected = _generate(plain, "the quick", "--version", "v1", "--max-new-tokens", "6")
    problems, foreign = [], []
    with serving(plain, token=TOKEN) as base, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        refused = "the server responded with a status of 422"  # Chromium logs the refused ask asked for
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" and refused not in m.text
                else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("request", lambda r: foreign.append(r.url) if not r.url.startswith(base) else None)
        page.goto(f"{base}/?token={TOKEN}")
        sync_api.expect(page.locator("#ask-version option")).to_have_count(3, timeout=20_000)
        sync_api.expect(page.locator("#matrix tr.matrix-row")).to_have_count(2, timeout=20_000)
        cells = [[c.text_content() for c in row.locator("td.cell").all()]
                 for row in page.locator("#matrix tr.matrix-row").all()]
        assert [len(c) for c in cells] == [2, 2] and cells[0][1] == "" and all(cells[1])
        assert page.locator("#matrix td.cell").first.get_attribute("title").endswith("(+0.0% since its first score)")
        sync_api.expect(page.locator("#sets-chart")).to_have_attribute("data-points", "3", timeout=20_000)
        page.fill("#ask-prompt", "the quick")
        page.select_option("#ask-version", "v1")
        page.fill("#ask-tokens", "6")
        page.click("#btn-ask")
        sync_api.expect(page.locator("#ask-status")).to_contain_text("answered in", timeout=120_000)
        assert page.locator("#ask-answer div.muted").text_content() == "v1 answered (run run-0001, step 2):"
        assert [d.text_content() for d in page.locator("#ask-answer div.label").all()] == ["prompt", "output"]
        assert page.locator("#ask-answer pre").nth(0).text_content() == "the quick"
        shown = page.locator("#ask-answer pre").nth(1).text_content()
        out = expected["output"]
        assert shown == (out if out.strip() else f"({len(out)} whitespace character(s))" if out else "(empty)"), shown
        page.fill("#ask-tokens", "0")
        page.click("#btn-ask")
        sync_api.expect(page.locator("#ask-status")).to_contain_text("max_new_tokens: Input should be greater")
        artifacts = Path(__file__).resolve().parents[2] / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        page.locator("#btn-ask").scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / "dashboard-ask.png"), full_page=True)
        browser.close()
    assert problems == [] and foreign == []
