"""Exact-match scoring of generated answers: GSM8K numbers and generic exact strings."""

from __future__ import annotations

import math
import re
import string

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _to_number(text: str) -> float | None:
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        v = float(t)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def gsm8k_answer(text: str) -> float | None:
    """The number a GSM8K solution ends with: the one after `####` (the data set's convention),
    else the last number in the text (what models that skip the marker write)."""
    if "####" in text:
        m = _NUMBER.search(text.split("####")[-1])
        return _to_number(m.group()) if m else None
    found = _NUMBER.findall(text)
    return _to_number(found[-1]) if found else None


def gsm8k_correct(generated: str, reference: str) -> bool:
    """Numeric equality of the two answers (1e-6 relative), False if either has none."""
    a, b = gsm8k_answer(generated), gsm8k_answer(reference)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def normalize(text: str) -> str:
    """Lower case, no surrounding punctuation or articles, single spaces (SQuAD-style)."""
    t = text.lower().strip()
    t = "".join(ch for ch in t if ch not in string.punctuation)
    t = re.sub(r"\b(a|an|the)\b", " ", t)
    return " ".join(t.split())


def exact_correct(generated: str, reference: str) -> bool:
    return normalize(generated) == normalize(reference)


CHECKERS = {"gsm8k": gsm8k_correct, "exact": exact_correct}
