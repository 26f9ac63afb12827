"""The account of what the data layer could not use: counts per reason, first locations.

Nothing is dropped silently: every skipped row goes through `SkipLog.skip`, which counts it under a
reason and keeps the first few `file:line` locations. With `strict=True` the first skip raises
`DataError` naming the location instead. Warnings (`SkipLog.warn`) are kept examples that a
researcher should know about (a prompt whose tokens merge across the response boundary, a prompt
truncated to fit); they are counted the same way but never fatal.

Preference pairs are kept or dropped whole: `PairSkips` collects what the encoder reports for the
two sides and counts a dropped pair once, so `SkipLog.total` is the number of rows dropped.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

# Reasons, with what they mean (printed in reports).
REASONS = {
    "invalid_utf8": "the line is not valid UTF-8",
    "malformed_json": "the line is not valid JSON",
    "not_an_object": "the row is not a JSON object",
    "missing_field": "a required field is absent",
    "wrong_type": "a field has the wrong type",
    "empty_response": "the response is empty",
    "empty_prompt": "the prompt is empty (no token precedes the response)",
    "no_assistant_turn": "the conversation does not end with an assistant turn",
    "prompt_mismatch": "chosen and rejected do not share the same prompt",
    "no_rejected": "no incorrect model solution to use as the rejected answer",
    "template_mismatch": "the chat template does not render the prompt as a prefix",
    "special_token_in_text": "the text contains the BOS token, which would restart the sequence",
    "too_long": "longer than the maximum length",
}
WARNINGS = {
    "boundary_merge": "prompt tokens are not a prefix of the joint tokenization",
    "truncated_prompt": "the prompt was truncated from the left to fit",
}


class DataError(ValueError):
    """Bad input in strict mode, or input that cannot be read at all; names file and line."""


@dataclasses.dataclass
class SkipLog:
    """Per-reason counts and the first `keep` locations of skipped rows and warnings."""

    strict: bool = False
    keep: int = 5
    skipped: Counter = dataclasses.field(default_factory=Counter)
    warnings: Counter = dataclasses.field(default_factory=Counter)
    where: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, location: str, detail: str = "") -> None:
        """Count a skipped row; in strict mode raise instead."""
        assert reason in REASONS, reason
        if self.strict:
            raise DataError(
                f"{location}: {reason} ({REASONS[reason]}){': ' + detail if detail else ''}"
            )
        self.skipped[reason] += 1
        self._note(reason, location, detail)

    def warn(self, reason: str, location: str, detail: str = "") -> None:
        assert reason in WARNINGS, reason
        self.warnings[reason] += 1
        self._note(reason, location, detail)

    def _note(self, reason: str, location: str, detail: str) -> None:
        locs = self.where.setdefault(reason, [])
        if len(locs) < self.keep:
            locs.append(f"{location}: {detail}" if detail else location)

    @property
    def total(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: SkipLog | dict[str, Any]) -> None:
        """Add another log (e.g. another process's part) into this one."""
        d = other.to_dict() if isinstance(other, SkipLog) else other
        self.skipped.update(d.get("skipped", {}))
        self.warnings.update(d.get("warnings", {}))
        for reason, locs in d.get("where", {}).items():
            mine = self.where.setdefault(reason, [])
            mine.extend(locs[: max(0, self.keep - len(mine))])

    def to_dict(self) -> dict[str, Any]:
        return {
            "skipped": dict(sorted(self.skipped.items())),
            "warnings": dict(sorted(self.warnings.items())),
            "where": {k: list(v) for k, v in sorted(self.where.items())},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], strict: bool = False) -> SkipLog:
        log = cls(strict=strict)
        log.merge(d)
        return log

    def report(self, kept: int | None = None, unit: str = "examples") -> str:
        """Human-readable lines: counts per reason with the first locations (`unit`: what a
        row is, e.g. "pairs" for preference data, where a row is skipped or kept whole)."""
        lines = []
        if kept is not None:
            lines.append(f"kept {kept:,} {unit}, skipped {self.total:,}")
        for title, counts, meanings in (
            ("skipped", self.skipped, REASONS),
            ("warning", self.warnings, WARNINGS),
        ):
            for reason, n in sorted(counts.items()):
                lines.append(f"  {title} {reason} ({meanings[reason]}): {n:,}")
                for loc in self.where.get(reason, []):
                    lines.append(f"      {loc}")
        return "\n".join(lines)


class PairSkips:
    """Stands in for a `SkipLog` while the sides of preference pairs are encoded.

    Both sides of a pair share the pair's location, so events are held per location until
    `settle`: a dropped pair counts once, under the first failing side's reason (encode the
    chosen sides before the rejected ones), with the other side's reason in the detail; a kept
    pair passes its warnings on. Warnings of a dropped pair are not counted (nothing was kept).
    Strict mode still raises at the first failing side.
    """

    def __init__(self, log: SkipLog) -> None:
        self.log = log
        self._events: dict[str, list[tuple[bool, str, str]]] = {}

    def skip(self, reason: str, location: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        if self.log.strict:
            self.log.skip(reason, location, detail)  # raises, naming the location
        self._events.setdefault(location, []).append((True, reason, detail))

    def warn(self, reason: str, location: str, detail: str = "") -> None:
        assert reason in WARNINGS, reason
        self._events.setdefault(location, []).append((False, reason, detail))

    def settle(self, location: str, kept: bool) -> None:
        """Count the pair at `location` (kept: its warnings; dropped: one skip)."""
        events = self._events.pop(location, [])
        skips = [(r, d) for is_skip, r, d in events if is_skip]
        if kept:
            assert not skips, (location, skips)
            for _, reason, detail in events:
                self.log.warn(reason, location, detail)
            return
        assert skips, f"{location}: a pair was dropped without a reason"
        reason, detail = skips[0]
        if len(skips) > 1:
            detail += f"; the other side too: {skips[1][0]} ({skips[1][1]})"
        self.log.skip(reason, location, detail)
