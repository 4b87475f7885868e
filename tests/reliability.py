"""The reliability cases: each is a pytest parameter of the test that checks it and a row of
``docs/reliability.md`` (``tests/test_reliability_doc.py`` renders the table from this registry, so the
document cannot drift from the tests).

    @pytest.mark.parametrize("encoding", [
        case("pair file", "non-utf8-line", "a line with non-UTF-8 bytes",
             "that line is a bad record (file:line, reason); the rest loads", "latin-1"),
    ])
    def test_...(encoding): ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest


@dataclass(frozen=True)
class Case:
    area: str  # where the input enters: "pair file", "source file", "images", "training", "caches", ...
    name: str  # the pytest id
    bad_input: str  # the bad input or fault, as a user would describe it
    outcome: str  # what miadpo does about it


CASES: dict[str, Case] = {}


def case(area: str, name: str, bad_input: str, outcome: str, *values: Any, marks: Any = ()) -> Any:
    """Register a case and return it as a ``pytest.param`` of ``values`` (id = ``name``)."""
    registered = Case(area, name, bad_input, outcome)
    if CASES.get(name, registered) != registered:
        raise ValueError(f"reliability case {name!r} registered twice with different texts")
    CASES[name] = registered
    return pytest.param(*values, id=name, marks=marks)
