"""Following a format: describe a thing in exactly N words, or ask one question about it.

The topics are the shipped words (`letters.load_words`). A format checker cannot judge meaning,
so it checks the form strictly and closes the cheap ways to meet it. `check_word_count`
rejects a word repeated to make up the count ("the the the"), numbered lists and digits
("1. calm 2. blue 3. deep"), and any other text around the words. `check_question` rejects a
question inside other text ("Sure! What ...?"), several questions ("Why? Why? Why?"), a bare
"?", and a question that does not name its topic (a generic "What do you think?").
"""

import re

from minirlhf.tasks.letters import load_words
from minirlhf.tasks.task import Problem

WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*")
"""A word: letters, with inner apostrophes or hyphens ("don't", "sky-blue")."""

PUNCTUATION = set(" \t\n.,;:!\"'")
"""What may stand between the words of a word-count answer."""

NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}

COUNT_PROMPT = "Describe a {topic} in exactly {count} words. Answer with the {count} words only."
QUESTION_PROMPT = "Ask me one question about a {topic}. Reply with the question only."

COUNT_DEMOS = {3: ["Small {topic}, big.", "I like {topic}s.", "A nice {topic}.",
                   "{Topic}s are useful."]}
"""Right answers to imitate, filled with the topic (for each count there is a list)."""
QUESTION_DEMOS = ["What makes a {topic} special?", "Where can I find a {topic}?",
                  "How old is the oldest {topic}?", "Why do people like a {topic}?"]


def get_words(response: str) -> list[str] | None:
    """The words of `response`, or None if anything but words and punctuation is in it."""
    leftover = WORD.sub(" ", response)
    return WORD.findall(response) if set(leftover) <= PUNCTUATION else None


def check_word_count(response: str, count: int) -> float:
    """How well `response` meets "answer in exactly `count` words".

    Returns:
        1.0: words and punctuation only, exactly `count` words, no word twice (ignoring case);
        0.25: the same, one word too many or too few;
        0.0: anything else (digits, symbols, a repeated word, no words).
    """
    words = get_words(response)
    if not words or len({word.lower() for word in words}) != len(words):
        return 0.0
    if len(words) == count:
        return 1.0
    return 0.25 if abs(len(words) - count) == 1 else 0.0


def names_topic(text: str, topic: str) -> bool:
    """Whether `text` holds the topic word (or its plural) as a word of its own."""
    return re.search(rf"\b{re.escape(topic)}(s|es)?\b", text, flags=re.IGNORECASE) is not None


def check_question(response: str, topic: str) -> float:
    """How well `response` meets "ask one question about `topic`, the question only".

    Returns:
        1.0: one sentence of at least three words ending with its only "?", naming the topic;
        0.5: the same, not naming the topic;
        0.25: a question about the topic inside other text (another sentence around it);
        0.0: anything else.
    """
    text = response.strip()
    enough_words = len(WORD.findall(text)) >= 3
    if text.endswith("?") and text.count("?") == 1 and enough_words:
        if not re.search(r"[.!]\s", text) and "\n" not in text:
            return 1.0 if names_topic(text, topic) else 0.5
    return 0.25 if "?" in text and enough_words and names_topic(text, topic) else 0.0


def make_count_problems(count: int, lengths: tuple[int, ...] = (4, 5)) -> list[Problem]:
    """One "describe a <topic> in exactly `count` words" per shipped word, keyed by the word."""
    if count not in COUNT_DEMOS:
        raise ValueError(f"No demonstrations for {count} words: use one of {sorted(COUNT_DEMOS)}.")
    demos = COUNT_DEMOS[count]
    return [Problem(key=topic, prompt=COUNT_PROMPT.format(topic=topic,
                                                          count=NUMBER_WORDS[count]),
                    fields={"count": count},
                    demonstration=demos[i % len(demos)].format(topic=topic,
                                                               Topic=topic.capitalize()))
            for i, topic in enumerate(load_words(lengths))]


def make_question_problems(lengths: tuple[int, ...] = (4, 5)) -> list[Problem]:
    """One "ask one question about a <topic>" per shipped word, keyed by the word."""
    return [Problem(key=topic, prompt=QUESTION_PROMPT.format(topic=topic),
                    fields={"topic": topic},
                    demonstration=QUESTION_DEMOS[i % len(QUESTION_DEMOS)].format(topic=topic))
            for i, topic in enumerate(load_words(lengths))]
