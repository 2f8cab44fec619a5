"""Field paths over a CloudEvent (``data.customer.email``, ``data.cards[*].number``, ``subject``).

A path is compiled once into steps; applying it copies only the containers along the path
(copy-on-write), so the event's other data is shared, not copied, and the caller's input is
never changed. A path that does not exist in an event (a missing key, a null or a value of
another shape on the way) is simply not applied: a policy protects the field *where it exists*.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["DROP", "FieldPath", "compile_path"]

#: Returned by a transform to delete the field (the ``drop`` action).
DROP: Any = object()

_ANY = -1  # the ``[*]`` step
_SEGMENT = re.compile(r"^([^.\[\]*]+)((?:\[(?:\*|\d+)\])*)$")
_INDEX = re.compile(r"\[(\*|\d+)\]")
_ROOTS = ("data", "subject")


@dataclass(frozen=True, slots=True)
class FieldPath:
    """A compiled field path.

    Attributes:
        text: the path as written.
        root: ``data`` or ``subject``.
        steps: keys (str) and list indexes (int; ``-1`` for ``[*]``) below the root.
    """

    text: str
    root: str
    steps: tuple[str | int, ...]

    def apply(self, value: Any, fn: Callable[[Any], Any]) -> Any:
        """``value`` (the root's value) with ``fn`` applied where the path points; copy-on-write."""
        if not self.steps:
            return fn(value)
        return _walk(value, self.steps, 0, fn)


def _walk(node: Any, steps: tuple[str | int, ...], i: int, fn: Callable[[Any], Any]) -> Any:
    step = steps[i]
    last = i == len(steps) - 1
    if isinstance(step, str):
        if type(node) is not dict or step not in node:
            return node
        old = node[step]
        new = fn(old) if last else _walk(old, steps, i + 1, fn)
        if new is old:
            return node
        out = dict(node)
        if new is DROP:
            del out[step]
        else:
            out[step] = new
        return out
    if type(node) is not list:
        return node
    indexes = range(len(node)) if step == _ANY else ((step,) if step < len(node) else ())
    out_list: list[Any] | None = None
    dropped: set[int] = set()
    for j in indexes:
        old = node[j]
        new = fn(old) if last else _walk(old, steps, i + 1, fn)
        if new is old:
            continue
        if out_list is None:
            out_list = list(node)
        if new is DROP:
            dropped.add(j)
        else:
            out_list[j] = new
    if out_list is None:
        return node
    return [v for j, v in enumerate(out_list) if j not in dropped] if dropped else out_list


def compile_path(text: str) -> FieldPath:
    """Compile ``text`` into a :class:`FieldPath`.

    Grammar: ``root(.key([*]|[n])*)*`` where root is ``data`` (the event's data) or ``subject``
    (the whole attribute). Keys are any text without ``.``, ``[``, ``]`` and ``*``.

    Raises:
        ValueError: saying which part of the path is wrong and what is expected.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a field path must be a non-empty string such as 'data.customer.email'")
    parts = text.split(".")
    head = _SEGMENT.match(parts[0])
    root = head.group(1) if head else parts[0]
    steps: list[str | int] = [_ANY if i == "*" else int(i) for i in _INDEX.findall(head.group(2))] if head else []
    if root not in _ROOTS:
        raise ValueError(f"field path {text!r} must start with 'data' or 'subject' (other attributes are not PII "
                         f"and ids/types are needed to route), got {root!r}")
    if root == "subject" and (len(parts) > 1 or steps):
        raise ValueError(f"field path {text!r}: 'subject' is a string attribute; it has no fields below it")
    for seg in parts[1:]:
        m = _SEGMENT.match(seg)
        if not m:
            raise ValueError(
                f"field path {text!r}: bad segment {seg!r}; expected a key optionally followed by [*] or [n], "
                "e.g. 'cards[*]' (empty keys, spaces around dots and '*' inside keys are not allowed)"
            )
        steps.append(m.group(1))
        for idx in _INDEX.findall(m.group(2)):
            steps.append(_ANY if idx == "*" else int(idx))
    return FieldPath(text, root, tuple(steps))
