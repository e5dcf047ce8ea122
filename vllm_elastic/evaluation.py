"""Grading of the mini tasks (and GSM8K-style `#### answer` lines)."""

from __future__ import annotations

import re


def extract_answer(text: str) -> str | None:
    """The text after the last '####', to the end of that line (None if absent)."""
    i = text.rfind("####")
    if i < 0:
        return None
    return text[i + 4:].split("\n", 1)[0].strip()


def normalize(answer: str | None) -> str | None:
    if answer is None:
        return None
    a = answer.strip().lower()
    if re.fullmatch(r"-?[\d,]+", a):
        try:
            return str(int(a.replace(",", "")))
        except ValueError:
            return a
    return ",".join(part.strip() for part in a.split(","))


def is_correct(text: str, gold: str) -> bool:
    """Integers exact; lists comma-separated, case-insensitive."""
    got = normalize(extract_answer(text))
    return got is not None and got == normalize(gold)
