"""String operations: reverse the letters of a short word, sort them, or write it in capitals.

The words are the shipped list `data/task_words.txt` (common English nouns of 3 to 5 letters).
The checker (`check_letters`) is exact: full credit only for the letters alone, in the right
order (quotes around the word do not matter, nor case, except for capitals). What it rejects:
several candidates listed ("enots, stone"), the answer repeated, the answer inside a sentence or
with trailing text, letters split by spaces or hyphens ("e-n-o-t-s"), and the word itself sent
back.
"""

import re
from pathlib import Path

from minirlhf.tasks.task import Problem

WORDS_FILE = Path(__file__).resolve().parent.parent / "data" / "task_words.txt"

PROMPTS = {
    "reverse": 'Write the word "{word}" backwards, letter by letter reversed. '
               "Answer with the reversed word only.",
    "sort": 'Sort the letters of the word "{word}" in alphabetical order. '
            "Answer with the sorted letters only.",
    "upper": 'Write the word "{word}" in capital letters. Answer with that word only.',
}
"""The user's message for each operation."""


def load_words(lengths: tuple[int, ...]) -> list[str]:
    """The shipped words whose length is one of `lengths`, in the file's order."""
    words = WORDS_FILE.read_text().split()
    return [word for word in words if len(word) in lengths]


def apply_operation(operation: str, word: str) -> str:
    """The answer: the word's letters reversed, or sorted."""
    if operation == "reverse":
        return word[::-1]
    if operation == "sort":
        return "".join(sorted(word))
    if operation == "upper":
        return word.upper()
    raise ValueError(f"Unknown letter operation {operation!r}: use one of {', '.join(PROMPTS)}.")


def normalize_word(response: str) -> str:
    """The response without surrounding whitespace, one final period, and one pair of matching
    quotes or backticks around it."""
    text = response.strip()
    text = text[:-1].rstrip() if text.endswith(".") else text
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def check_letters(response: str, answer: str, word: str) -> float:
    """How right `response` is as `answer`, the letters of `word` rearranged.

    Returns:
        1.0: the response is the answer alone (see `normalize_word` for what is ignored), in
            any case for a lower-case answer, in capitals for a capitalised one;
        0.25: one run of letters alone, with the word's letters in another order or case,
            other than the word itself (the right letters, wrong order);
        0.0: anything else.
    """
    text = normalize_word(response)
    if text == answer or (answer.islower() and text.lower() == answer):
        return 1.0
    if (re.fullmatch(r"[A-Za-z]+", text) and sorted(text.lower()) == sorted(word)
            and text.lower() != word):
        return 0.25
    return 0.0


def make_letter_problems(operation: str, lengths: tuple[int, ...]) -> list[Problem]:
    """One problem per shipped word of those lengths (skipping words the operation leaves
    unchanged, such as an already sorted "box"), keyed by the word."""
    problems = []
    for word in load_words(lengths):
        answer = apply_operation(operation, word)
        if answer != word:
            problems.append(Problem(key=word, prompt=PROMPTS[operation].format(word=word),
                                    fields={"answer": answer, "word": word},
                                    demonstration=answer))
    return problems
