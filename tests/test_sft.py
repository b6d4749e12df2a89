"""SFT (`minirlhf.sft`) against oracles: the loss against a naive per-token loop over response
tokens only, the batch's masks against the sampler's own tokenization, demonstrations read from
every record shape (and refused with a clear error), and a tiny model learning a toy mapping."""

import copy
import json
import random

import pytest
import torch
from rich.console import Console

from minirlhf.demonstrations import Demonstration, load_sft_records, to_demonstrations
from minirlhf.prompts import render_prompt
from minirlhf.sampling import SamplingConfig, get_samples, tokenize_prompts
from minirlhf.sft import (
    SFTArgs,
    SFTTrainer,
    calc_sft_loss,
    count_correct,
    tokenize_demonstrations,
)
from tests.test_dpo_training import CharTokenizer

END = 93  # '~': the char model's EOS in these tests


# ---------------------------------------------------------------- the loss


def naive_sft_loss(logits, tokens, counted_mask):
    """Cross-entropy by hand: for every token a mask marks (token s, predicted by the logits at
    s - 1), -log softmax, averaged over those tokens."""
    total, count = 0.0, 0
    for b in range(tokens.shape[0]):
        for s in range(1, tokens.shape[1]):
            if counted_mask[b, s]:
                total = total - torch.log_softmax(logits[b, s - 1], dim=-1)[tokens[b, s]]
                count += 1
    return total / count


def make_batch(seed: int = 0):
    """Three rows of different prompt and response lengths, right-padded (token ids and logits
    on the padding are random: the loss must not read them)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [(2, 3), (4, 1), (1, 5)]  # (prompt incl. BOS, response incl. EOS)
    seq = max(p + r for p, r in lengths) + 1
    tokens = torch.randint(0, 11, (3, seq), generator=generator)
    attention_mask, loss_mask = torch.zeros_like(tokens), torch.zeros_like(tokens)
    for i, (p, r) in enumerate(lengths):
        attention_mask[i, : p + r], loss_mask[i, p : p + r] = 1, 1
    logits = torch.randn(3, seq, 11, generator=generator)
    return logits.requires_grad_(), tokens, attention_mask, loss_mask


def wrong_loss_with_prompt_tokens(logits, tokens, loss_mask):
    """A known-wrong SFT loss: every real token counted, the prompt's included."""
    real = (loss_mask.cumsum(-1) > 0) | (torch.arange(tokens.shape[1]) < 5)
    counted = real[:, 1:]
    logprobs = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    return -torch.where(counted, logprobs, 0.0).sum() / counted.sum()


def matches_naive_loss(loss_fn) -> bool:
    """Whether `loss_fn` equals the naive loop over response tokens, in value and gradient."""
    logits, tokens, _, loss_mask = make_batch()
    loss = loss_fn(logits, tokens, loss_mask)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = naive_sft_loss(logits, tokens, loss_mask)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    return bool(torch.allclose(loss, expected, atol=1e-6)
                and torch.allclose(grad, expected_grad, atol=1e-7))


def test_the_loss_is_the_mean_cross_entropy_over_response_tokens():
    assert matches_naive_loss(calc_sft_loss)


def test_the_check_fails_when_prompt_tokens_are_counted():
    assert not matches_naive_loss(wrong_loss_with_prompt_tokens)


def test_the_check_fails_on_a_mean_per_response():
    """Also wrong: the mean over each response, then over responses (long ones weigh less)."""
    def per_response(logits, tokens, loss_mask):
        rows = [calc_sft_loss(logits[i : i + 1], tokens[i : i + 1], loss_mask[i : i + 1])
                for i in range(len(tokens))]
        return torch.stack(rows).mean()

    assert not matches_naive_loss(per_response)


def test_accuracy_counts_greedy_tokens_and_whole_responses():
    _, tokens, _, loss_mask = make_batch()
    logits = torch.full((*tokens.shape, 11), -5.0)
    logits[:, :-1].scatter_(-1, tokens[:, 1:, None], 5.0)  # every next token is the argmax
    logits[0, 2, (tokens[0, 3] + 1) % 11] = 10.0  # row 0: its second response token is wrong
    counts = count_correct(logits, tokens, loss_mask)
    assert counts == {"tokens": 9, "correct": 8, "rows": 3, "exact": 2}


# ---------------------------------------------------------------- demonstrations and tokens


def test_every_record_shape_gives_the_same_demonstration():
    chat = [{"role": "user", "content": "2+2?"}]
    shapes = [{"messages": chat, "response": "4", "answer": 4},  # a task's demonstrations
              {"messages": [*chat, {"role": "assistant", "content": "4"}], "answer": 4}]
    found = to_demonstrations(shapes)
    assert found[0] == found[1] == Demonstration({"messages": chat, "answer": 4}, "4")
    assert to_demonstrations([{"prompt": "2+2=", "response": "4"}])[0] == Demonstration(
        {"prompt": "2+2="}, "4")


@pytest.mark.parametrize("lines, message", [
    ([], "holds no demonstrations"),
    (['{"prompt": "2+2="}'], "no response to learn"),
    (['{"prompt": "2+2=", "response": ""}'], "no response to learn"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], "no response to learn"),
    (['{"messages": [{"role": "assistant", "content": "hi"}]}'], 'put the "user" message'),
    (['{"messages": [{"role": "system", "content": "be brief"}], "response": "ok"}'],
     'no message with role "user"'),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], '
      '"response": "c"}'], "give the response once"),
    (['{"prompt": "a", "response": "b"}', "{not json"], ":2: invalid JSON"),
    (['["a", "b"]'], "expected a JSON object"),
])
def test_bad_records_say_what_is_wrong(tmp_path, lines, message):
    path = tmp_path / "demos.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        load_sft_records(path)


def test_the_batch_is_the_samplers_prompt_then_response_then_eos(tiny_model):
    """The prompt's tokens are those RL's sampler reads (template applied, BOS first); the loss
    mask covers the response and its EOS, and nothing else."""
    args = SFTArgs(prompt_template="Q: {prompt}\nA:")
    demos = [Demonstration({"prompt": "two and two"}, " four"),
             Demonstration({"prompt": "hi"}, " hello there, friend")]
    batch = tokenize_demonstrations(tiny_model, demos, args)
    eos = tiny_model.tokenizer.eos_token_id
    for row, demo in enumerate(demos):
        text = render_prompt(demo.prompt, args.prompt_template, False)
        prompt_ids, _ = tokenize_prompts(tiny_model, [text], prepend_bos=True)
        n = prompt_ids.shape[1]
        real = batch.tokens[row][batch.attention_mask[row].bool()]
        assert torch.equal(real[:n], prompt_ids[0])
        response = batch.tokens[row][batch.loss_mask[row].bool()]
        assert response[-1] == eos and tiny_model.tokenizer.decode(response[:-1]) == demo.response
        assert batch.loss_mask[row, :n].sum() == 0
    assert torch.equal(batch.loss_mask * batch.attention_mask, batch.loss_mask)


def test_chat_records_render_with_the_chat_template(tiny_model):
    model = copy.copy(tiny_model)
    model.tokenizer = copy.deepcopy(tiny_model.tokenizer)
    model.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    args = SFTArgs(chat_template=True)
    demo = to_demonstrations([{"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]}])[0]
    batch = tokenize_demonstrations(model, [demo], args)
    text = model.tokenizer.decode(batch.tokens[0, 1:])  # after BOS
    assert text == "<user>hi\n<assistant>hello<|endoftext|>"
    with pytest.raises(ValueError, match="chat_template=True"):
        tokenize_demonstrations(model, [demo], SFTArgs())


@pytest.mark.parametrize("bad, message", [
    (dict(held_out_fraction=0.0), "held_out_fraction"),
    (dict(epochs=0), "epochs"),
    (dict(lora_targets="q,nope"), "nope"),
    (dict(prompt_template="no slot"), "{prompt}"),
])
def test_bad_args_say_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        SFTArgs(**bad)


# ---------------------------------------------------------------- learning


def make_copy_task(count: int, seed: int = 0) -> list[Demonstration]:
    """"417:" -> "417": copy three digits (distinct prompts, so held-out ones are new)."""
    digits = [f"{n:03d}" for n in random.Random(seed).sample(range(1000), count)]
    return [Demonstration({"prompt": f"{d}:"}, d) for d in digits]


@pytest.fixture
def char_model(make_printable_model):
    model = make_printable_model(seed=0)
    model.tokenizer = CharTokenizer(model.tokenizer)
    model.tokenizer.eos_token_id = END
    return model


def test_a_tiny_model_learns_a_toy_mapping_and_to_end(char_model):
    """A one-layer model learns to copy three digits onto prompts it never saw, and then to end:
    greedy samples from RL's sampler (stop_at_eos) are the responses, each ended by its EOS."""
    demos = make_copy_task(160)
    train, held_out = demos[:128], demos[128:]
    assert not {d.prompt["prompt"] for d in held_out} & {d.prompt["prompt"] for d in train}
    args = SFTArgs(prepend_bos=False, epochs=8, batch_size=16, base_lr=1e-2, eval_every=8)
    history = SFTTrainer(char_model, train, held_out, args, Console(quiet=True)).train()
    evals = [m for m in history if "held_out/accuracy" in m]
    assert evals[0]["held_out/accuracy"] < 0.8 and len(evals) == 8
    assert evals[-1]["held_out/accuracy"] >= 0.98, evals[-1]
    assert evals[-1]["held_out/exact_match"] >= 0.9
    samples = get_samples(char_model, [d.prompt["prompt"] for d in held_out], gen_len=6,
                          sampling=SamplingConfig(top_k=1), prepend_bos=False, stop_at_eos=True)
    right = [s == d.response for s, d in zip(samples.responses, held_out)]
    assert sum(right) >= 0.9 * len(held_out) and samples.ended.float().mean() >= 0.9


def test_without_eos_the_model_does_not_learn_to_end(char_model):
    """The check above can fail: trained without the EOS, the same model never ends."""
    demos = make_copy_task(160)
    args = SFTArgs(prepend_bos=False, epochs=8, batch_size=16, base_lr=1e-2, eval_every=8,
                   append_eos=False)
    SFTTrainer(char_model, demos[:128], demos[128:], args, Console(quiet=True)).train()
    samples = get_samples(char_model, [d.prompt["prompt"] for d in demos[128:]], gen_len=6,
                          sampling=SamplingConfig(top_k=1), prepend_bos=False, stop_at_eos=True)
    assert samples.ended.float().mean() < 0.5


def test_only_the_adapters_train_with_lora(char_model):
    base = {name: value.clone() for name, value in char_model.state_dict().items()}
    demos = make_copy_task(40)
    args = SFTArgs(prepend_bos=False, epochs=1, batch_size=8, base_lr=1e-2, lora_rank=4)
    history = SFTTrainer(char_model, demos[:32], demos[32:], args, Console(quiet=True)).train()
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    for name, value in char_model.state_dict().items():
        if name in base:
            assert torch.equal(value, base[name]), name
    assert any(name.startswith("lora.") for name in char_model.state_dict())


def test_records_file_round_trip(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": d.prompt["prompt"], "response": d.response})
                              for d in make_copy_task(5)) + "\n\n")
    assert load_sft_records(path) == make_copy_task(5)
