"""Instructions: how a task is said in words, and how the words are read back.

The population builder stores several phrasings per checkpoint in the zoo's ``instructions``
field (``TRAIN_TEMPLATES``); instruction-conditioned generators learn from those. Evaluation uses
phrasings no generator was trained on (``EVAL_TEMPLATES``), and acceptance uses ones nobody here
wrote. Class order in the text is label order: the first class named is label 0.
"""
from __future__ import annotations

import re

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TRAIN_TEMPLATES = (
    "classify handwritten {digits}",
    "a small network that tells apart the digits {words}",
    "{labels}",
    "recognize the digits {digits} in small grayscale images",
    "sort pictures of {words} into classes, in that order",
)
EVAL_TEMPLATES = (  # never in the zoo, never used in training
    "build me a classifier for the numbers {digits}",
    "which of {words} is written here? answer in this order",
)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def phrase(classes: list[int], template: str) -> str:
    """One phrasing of the digit task ``classes`` (label i is digit classes[i])."""
    return template.format(digits=_join([str(c) for c in classes]), words=_join([NUMBER_WORDS[c] for c in classes]),
                           labels=", ".join(f"label {i} is a {c}" for i, c in enumerate(classes)), k=len(classes))


def phrasings(classes: list[int], which: str = "train") -> list[str]:
    templates = {"train": TRAIN_TEMPLATES, "eval": EVAL_TEMPLATES}[which]
    return [phrase(classes, t) for t in templates]


def digits_from_dataset(name: str) -> list[int] | None:
    """``digits:classes=3,1,4`` -> [3, 1, 4] (also ``mnist...;classes=...``); all ten for a plain digit
    dataset; None for datasets that are not digits."""
    if not name.startswith(("digits", "mnist")):
        return None
    m = re.search(r"classes=([0-9,]+)", name)
    return [int(c) for c in m.group(1).split(",")] if m else list(range(10))


_TOKEN = re.compile(r"label\s+(\d+)\s+is\s+an?\s+(\w+)|\b(\d)\b|\b(" + "|".join(NUMBER_WORDS) + r")\b", re.I)


def classes_from_instruction(text: str) -> list[int]:
    """The digit classes an instruction names, in label order: "label i is a X" pairs when there are
    any, else digits and number words in order of first mention. Raises ValueError when fewer than
    two distinct classes are named (a classifier needs at least two)."""
    pairs, order = {}, []
    for m in _TOKEN.finditer(text):
        if m.group(1) is not None:
            word = m.group(2).lower()
            c = int(word) if word.isdigit() else NUMBER_WORDS.index(word) if word in NUMBER_WORDS else None
            if c is not None:
                pairs[int(m.group(1))] = c
        else:
            c = int(m.group(3)) if m.group(3) is not None else NUMBER_WORDS.index(m.group(4).lower())
            if c not in order:
                order.append(c)
    if pairs:
        if sorted(pairs) != list(range(len(pairs))):
            raise ValueError(f"instruction {text!r} labels {sorted(pairs)}; labels must be 0..{len(pairs) - 1}")
        order = [pairs[i] for i in range(len(pairs))]
    if len(set(order)) < 2:
        raise ValueError(f"instruction {text!r} names fewer than two digit classes; say which digits to tell apart, "
                         f"e.g. 'classify handwritten 2, 7 and 9'")
    return order
