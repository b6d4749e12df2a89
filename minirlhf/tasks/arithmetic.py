"""Arithmetic: add two numbers, answer with the sum alone.

The demonstrations write the question's sum out ("47 + 38 = 85"), not the bare number: SFT on
bare sums taught SmolLM2-135M the form and took away the one step it adds with, and its held-out
pass@1 fell from 0.14 to 0.05 (benchmarks/tasks.py, docs/tasks.md).

The checker (`check_sum`) is exact: full credit only for the sum written as digits and nothing
else, or for the question's own sum written out with it ("47 + 38 = 85", the form SmolLM2 most
often answers in). What it rejects, each a way a policy could game a loose "the answer appears
somewhere" checker: several numbers listed ("84 85 86"), the answer repeated ("85 85"), the sum
inside a word or another number ("a85b", "1859"), another sum that equals the answer ("40 + 45 =
85"), trailing text ("85. Next question"), leading zeros or a sign ("085", "+85").
"""

import re

from minirlhf.tasks.task import Problem

NUMBER = re.compile(r"(?<![\w.])[+-]?\d+(?:\.\d+)?(?!\w|\.\d)")
"""A number standing on its own: not inside a word ("a23b") or another number ("2.5")."""

PROMPT = "What is {a} + {b}? Answer with the number only."


def strip_answer(response: str) -> str:
    """The response without surrounding whitespace and one final period."""
    text = response.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def find_numbers(response: str) -> list[str]:
    """The numbers standing on their own in `response`, in order."""
    return NUMBER.findall(response)


def check_sum(response: str, answer: str, question: str) -> float:
    """How right `response` is as the sum `answer` (a string of digits) of `question` ("a + b").

    Returns:
        1.0: the response is the answer alone, or "a + b = answer" with the question's a and b
            (whitespace and one final period allowed);
        0.5: the response holds exactly one number, the answer, among other words
            ("The answer is 85.");
        0.25: the response is one number alone, wrong by at most 10 (a near miss, e.g. a
            dropped carry);
        0.0: anything else.
    """
    text = strip_answer(response)
    if text == answer or re.sub(r"\s", "", text) == re.sub(r"\s", "", f"{question}={answer}"):
        return 1.0
    numbers = find_numbers(response)
    if numbers == [answer]:
        return 0.5
    if re.fullmatch(r"\d+", text) and 0 < abs(int(text) - int(answer)) <= 10:
        return 0.25
    return 0.0


def make_sum_problems(low: int, high: int, low_b: int | None = None,
                      high_b: int | None = None) -> list[Problem]:
    """Every "a + b" with low <= a <= high and low_b <= b <= high_b (default: a's range),
    keyed by the unordered pair, so "47 + 38" and "38 + 47" fall in the same split."""
    low_b, high_b = (low, high) if low_b is None else (low_b, high_b)
    return [Problem(key=f"{min(a, b)}+{max(a, b)}", prompt=PROMPT.format(a=a, b=b),
                    fields={"answer": str(a + b), "question": f"{a} + {b}"},
                    demonstration=f"{a} + {b} = {a + b}")
            for a in range(low, high + 1) for b in range(low_b, high_b + 1)]
