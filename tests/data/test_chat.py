"""Chat masking on templates in the style of real families: ids are the whole rendering, the trainable tokens are
exactly the assistant replies and their end-of-turn markers; templates conveyor cannot mask are named with the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_workspace, run_cli, status

from conveyor.data import chat, tiny
from conveyor.data.families import FAMILIES, ensure_family, make_tokenizer
from conveyor.data.formats import IGNORE, parse_file, tokenize_file
from conveyor.errors import DataError

SYSTEM = "You answer in one short sentence."
CONVERSATIONS = [
    [{"role": "system", "content": SYSTEM},
     {"role": "user", "content": "What colour is the sky?"},
     {"role": "assistant", "content": "<think>Air scatters blue light.</think>The sky is blue."},
     {"role": "user", "content": "And grass?"},
     {"role": "assistant", "content": "<think>Leaves hold green chlorophyll.</think>Grass is green."}],
    [{"role": "user", "content": "Name one fruit."},
     {"role": "assistant", "content": "An apple."}],
]


def write_chats(path: Path, conversations=CONVERSATIONS) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations), encoding="utf-8")
    return path


def expected_spans(family, messages: list[dict]) -> list[str]:
    """Each reply and its end marker; a template that drops earlier reasoning shows earlier replies without it."""
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    if family.drops_reasoning:
        replies = [r.split("</think>")[-1] for r in replies[:-1]] + replies[-1:]
    return [r + family.end for r in replies]


def as_rendered(family, messages: list[dict]) -> list[dict]:
    """The documented merge: without a system role, leading system text opens the first user turn."""
    if family.system or messages[0]["role"] != "system":
        return messages
    return [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}] + messages[2:]


def trained_runs(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    runs, current = [], []
    for k, (token, label) in enumerate(zip(ids, labels)):
        if label != IGNORE and k > 0:
            current.append(token)
        elif current:
            runs, current = runs + [tokenizer.decode(current)], []
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: ensure_family(name, root / name) for name in FAMILIES}


@pytest.fixture(scope="session")
def tokenizers(family_dirs):
    return {name: chat.load_tokenizer(str(folder)) for name, folder in family_dirs.items()}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_trains_exactly_the_replies_and_their_end_marker(name, tokenizers, tmp_path):
    family, tok = FAMILIES[name], tokenizers[name]
    data = tokenize_file(parse_file(write_chats(tmp_path / "chat.jsonl")), tok, 512)
    assert [e.line for e in data.examples] == [1, 2]
    for example, messages in zip(data.examples, CONVERSATIONS):
        rendered = tok.apply_chat_template(as_rendered(family, messages), tokenize=False)
        assert example.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]  # the whole rendering
        assert trained_runs(tok, example.input_ids, example.labels) == expected_spans(family, messages)
        assert all(label in (IGNORE, token) for token, label in zip(example.input_ids, example.labels))


def test_family_tokenizers_have_merges_and_are_built_the_same_every_time():
    for family in FAMILIES.values():
        first, again = make_tokenizer(family), make_tokenizer(family)
        assert first.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()
        merges = json.loads(first.backend_tokenizer.to_str())["model"]["merges"]
        assert len(merges) > 100, family.name
        assert len(first.tokenize("The sky is blue.")) < len("The sky is blue.")  # words are merged


def test_a_default_system_prompt_and_a_date_line_are_context_and_a_given_system_message_is_kept(tokenizers):
    qwen, llama = tokenizers["qwen2.5"], tokenizers["llama3"]
    plain = chat.render_chat(qwen, CONVERSATIONS[1])
    assert "You are Qwen, a helpful assistant." in plain.text  # the template's default, not trained
    assert [plain.text[a:b] for a, b in plain.spans] == ["An apple.<|im_end|>"]
    given = chat.render_chat(qwen, CONVERSATIONS[0])
    assert SYSTEM in given.text and "You are Qwen" not in given.text
    dated = chat.render_chat(llama, CONVERSATIONS[0])
    assert "Today Date: " in dated.text and SYSTEM in dated.text and not dated.merged_system
    assert all("Date" not in dated.text[a:b] for a, b in dated.spans)


def test_a_template_without_a_system_role_gets_the_system_text_in_the_first_user_turn(tokenizers):
    for name in ("mistral", "gemma"):
        rendered = chat.render_chat(tokenizers[name], CONVERSATIONS[0])
        assert rendered.merged_system
        assert f"{SYSTEM}\n\nWhat colour is the sky?" in rendered.text
    late = [CONVERSATIONS[1][0], {"role": "system", "content": "Be terse."}, *CONVERSATIONS[1][1:]]
    with pytest.raises(chat.ChatError) as e:
        chat.render_chat(tokenizers["gemma"], late)
    assert "no system role" in str(e.value) and "messages[1] is a system message after the conversation began" \
        in str(e.value) and "data.chat_template" in str(e.value)


def test_earlier_reasoning_a_template_drops_from_history_is_not_in_the_ids(tokenizers):
    rendered = chat.render_chat(tokenizers["qwen3"], CONVERSATIONS[0])
    assert "Air scatters" not in rendered.text and "Leaves hold green chlorophyll." in rendered.text
    assert rendered.method == chat.PREFIX


def test_generation_marks_are_the_templates_own_mask(tokenizers):
    tok = tokenizers["generation"]
    assert chat.method(tok) == chat.GENERATION
    tok = make_tokenizer(FAMILIES["generation"])  # the same template marking the reply but not its end marker
    marked = "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    assert marked in tok.chat_template
    tok.chat_template = tok.chat_template.replace(
        marked, "{% generation %}{{- message['content'] }}{% endgeneration %}{{- '<|im_end|>' }}")
    rendered = chat.render_chat(tok, CONVERSATIONS[1])
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["An apple."]


def test_the_tiny_models_chat_still_trains_every_reply_and_its_end(tiny_dir, tmp_path):
    tok = chat.load_tokenizer(str(tiny_dir))
    data = tokenize_file(parse_file(write_chats(tmp_path / "chat.jsonl")), tok, 512)
    assert trained_runs(tok, data.examples[0].input_ids, data.examples[0].labels) == [
        "<think>Air scatters blue light.</think>The sky is blue.<|end|>",
        "<think>Leaves hold green chlorophyll.</think>Grass is green.<|end|>"]
    first = chat.render_chat(tok, [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Hey"}])
    assert [first.text[a:b] for a, b in first.spans] == ["Hi.<|end|>"]  # a conversation may open with a reply


# A template that shows earlier replies as a placeholder: the reply is nowhere in the conversation.
HIDES_REPLIES = ("{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' and not loop.last %}"
                 "(earlier reply){% else %}{{ m['content'] }}{% endif %}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_templates_conveyor_cannot_mask_are_named_with_the_fix(tiny_dir, tmp_path):
    tok = chat.load_tokenizer(str(tiny_dir))
    tok.chat_template = HIDES_REPLIES
    path = write_chats(tmp_path / "chat.jsonl")
    with pytest.raises(DataError) as e:
        tokenize_file(parse_file(path), tok, 512, "chat.jsonl")
    message = str(e.value)
    assert message.startswith("chat.jsonl: the chat template cannot render or mask 1 example(s)")
    assert "line 1: messages[2] (assistant): the chat template renders this reply" in message
    assert 'set data.chat_template = "path/to/template.jinja"' in message
    tok.chat_template = None
    with pytest.raises(DataError) as e:
        tokenize_file(parse_file(path), tok, 512, "chat.jsonl")
    assert "lines 1, 2: the model has no chat template" in str(e.value)
    assert "data.chat_template" in str(e.value)


def test_data_chat_template_from_a_file_is_used_for_training_and_preview(workspace, tmp_path):
    ws = workspace(data={"chat_template": "templates/plain.jinja"})
    (ws / "templates").mkdir()
    (ws / "templates" / "plain.jinja").write_text(
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}### assistant: {% endif %}")
    path = write_chats(tmp_path / "chat.jsonl", CONVERSATIONS[1:])
    r = run_cli(ws, "preview", path, "--json")
    assert r.code == 0, r.out + r.err
    shown = json.loads(r.out)
    assert shown[0]["text"] == "### user: Name one fruit.<|end|>### assistant: An apple.<|end|>"
    assert shown[0]["trainable"] == ["An apple.<|end|>"]
    r = run_cli(ws, "train", path, "-q")
    assert r.code == 0, r.out + r.err
    assert status(ws)["jobs"][0]["state"] == "done"
    (ws / "templates" / "plain.jinja").unlink()
    r = run_cli(ws, "preview", path)
    assert r.code == 1 and 'data.chat_template = "templates/plain.jinja": no such file' in r.out + r.err


def test_the_tokenization_cache_follows_the_chat_template(workspace, tmp_path):
    from conveyor.store import jobs
    from conveyor.store.workspace import Workspace
    from conveyor.train.jobdata import job_data

    ws = Workspace.open(workspace())
    path = write_chats(tmp_path / "chat.jsonl", CONVERSATIONS[1:])
    assert run_cli(ws.root, "add", path).code == 0
    job, config = jobs.get(ws.db, 1), ws.config()
    model = ws.model_path("tiny")
    before = job_data(ws, job, config, model)
    (ws.root / "other.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]<|end|>{% endfor %}")
    config.data.chat_template = "other.jinja"
    after = job_data(ws, job, config, model)
    assert before.examples[0].input_ids != after.examples[0].input_ids
    assert len([p for p in (ws.data / "tokenized").iterdir() if (p / "meta.json").exists()]) == 2


@pytest.mark.parametrize("name", list(FAMILIES))
def test_preview_json_spans_are_the_replies_for_each_family(name, family_dirs, tmp_path, tiny_dir):
    ws = make_workspace(tmp_path / "ws", tiny_dir, model={"name": str(family_dirs[name])})
    r = run_cli(ws, "preview", write_chats(tmp_path / "chat.jsonl"), "--json")
    assert r.code == 0, r.out + r.err
    shown = json.loads(r.out)
    assert [s["trainable"] for s in shown] == [expected_spans(FAMILIES[name], m) for m in CONVERSATIONS]
    assert [s["line"] for s in shown] == [1, 2]


def test_a_chat_file_trains_end_to_end_on_a_family_model_folder(family_dirs, tmp_path, tiny_dir):
    ws = make_workspace(tmp_path / "ws", tiny_dir, model={"name": str(family_dirs["llama3"])},
                        training={"batch_size": 2, "grad_accum": 1, "max_length": 128, "save_every": 1})
    path = write_chats(tmp_path / "chat.jsonl", CONVERSATIONS * 2)
    r = run_cli(ws, "train", path, "-q")
    assert r.code == 0, r.out + r.err
    job = status(ws)["jobs"][0]
    assert job["state"] == "done" and job["examples"] == 4 and (job["start_step"], job["end_step"]) == (1, 2)
    assert (ws / "runs").is_dir() and any((ws / "runs").rglob("step-000002"))


def test_ids_are_the_whole_rendering_even_where_pieces_would_tokenize_differently(tmp_path):
    tok = make_tokenizer(FAMILIES["qwen2.5"])  # BPE with merges: " An" is one token, " " + "An" are two
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    messages = CONVERSATIONS[1]
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    whole = tok.apply_chat_template(messages, tokenize=False)
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    assert encode(whole) != encode(prompt) + encode(whole[len(prompt):])
    data = tokenize_file(parse_file(write_chats(tmp_path / "chat.jsonl", [messages])), tok, 512)
    assert data.examples[0].input_ids == encode(whole)
    # the token " An" holds the template's space and the reply's first word: the model writes it, so it trains
    assert trained_runs(tok, data.examples[0].input_ids, data.examples[0].labels) == [" An apple.<|im_end|>"]


# ---- the one tokenizer: training, evaluation samples, preview, generate and chat

def test_the_tokenizer_is_read_once_per_process_and_each_caller_gets_its_own(tmp_path, tiny_dir, monkeypatch):
    import shutil

    from transformers import AutoTokenizer

    folder = shutil.copytree(tiny_dir, tmp_path / "tiny")
    reads = []
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda path, **kw: reads.append(path) or real(path, **kw))
    first = chat.load_tokenizer(str(folder))
    first.chat_template = HIDES_REPLIES  # a caller trying a template changes nobody else's
    second = chat.load_tokenizer(str(folder))
    assert reads == [str(folder)] and second.chat_template == tiny.CHAT_TEMPLATE
    (tmp_path / "t.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]<|end|>{% endfor %}")
    assert chat.load_tokenizer(str(folder), "t.jinja", tmp_path).chat_template.startswith("{% for m in messages %}[")
    assert chat.load_tokenizer(str(folder), "t.jinja", tmp_path).pad_token == "<|pad|>"
    assert len(reads) == 2  # another template is another tokenizer, read once too
    (tmp_path / "t.jinja").write_text("{% for m in messages %}({{ m['content'] }})<|end|>{% endfor %}")
    assert "(" in chat.load_tokenizer(str(folder), "t.jinja", tmp_path).chat_template
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    assert chat.load_tokenizer(str(folder)).model_max_length == 77  # files rewritten in place: read again


def test_evaluation_samples_are_asked_through_data_chat_template(workspace, tmp_path, monkeypatch):
    from conveyor.train import evaluation

    ws = workspace(data={"chat_template": "plain.jinja"}, eval={"holdout": 1, "sample_prompts": ["Name one fruit."],
                                                                "max_new_tokens": 2})
    (ws / "plain.jinja").write_text(
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}### assistant: {% endif %}")
    asked = []
    real = evaluation.prompt_ids
    monkeypatch.setattr(evaluation, "prompt_ids", lambda tok, prompt, chat_: asked.append(
        tok.decode(real(tok, prompt, chat_))) or real(tok, prompt, chat_))
    r = run_cli(ws, "train", write_chats(tmp_path / "chat.jsonl", CONVERSATIONS * 4), "-q")
    assert r.code == 0, r.out + r.err
    assert asked and set(asked) == {"### user: Name one fruit.<|end|>### assistant: "}
    from conveyor.store.workspace import Workspace

    assert [r["prompt"] for r in Workspace.open(ws).db.execute("SELECT prompt FROM samples")] == ["Name one fruit."]


def test_an_answer_ends_at_the_templates_end_of_turn(tokenizers, tiny_dir):
    for name, family in FAMILIES.items():
        tok = tokenizers[name]
        assert chat.turn_end(tok) == tok.convert_tokens_to_ids(family.end), name
    tok = chat.load_tokenizer(str(tiny_dir))
    end = tok.convert_tokens_to_ids("<|end|>")
    assert chat.stop_ids(tok, 2, True) == [2, end] and chat.stop_ids(tok, [2, 5], False) == [2, 5]
    tok.chat_template = None
    assert chat.stop_ids(tok, None, True) == [tok.eos_token_id]


def test_a_system_prompt_is_asked_as_training_renders_it(tokenizers):
    from conveyor.serve.generate import conversation_ids

    asked = {name: tokenizers[name].decode(conversation_ids(tokenizers[name], [], "Hi", True, "Be brief."))
             for name in ("qwen2.5", "gemma")}
    assert asked["qwen2.5"] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                "<|im_start|>assistant\n")
    assert asked["gemma"] == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
