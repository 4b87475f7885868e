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

import sys
from dataclasses import dataclass, field
from typing import Any

import pytest


@dataclass(frozen=True)
class Case:
    area: str  # where the input enters: "pair file", "source file", "images", "training", "caches", ...
    name: str  # the pytest id
    bad_input: str  # the bad input or fault, as a user would describe it
    outcome: str  # what miadpo does about it
    # The test module that registers it: the document lists an area's cases by module, then in registration order,
    # so the order does not depend on which test module happened to be imported first.
    module: str = field(default="", compare=False)


CASES: dict[str, Case] = {}


def case(area: str, name: str, bad_input: str, outcome: str, *values: Any, marks: Any = ()) -> Any:
    """Register a case and return it as a ``pytest.param`` of ``values`` (id = ``name``)."""
    registered = Case(area, name, bad_input, outcome, sys._getframe(1).f_globals.get("__name__", ""))
    if CASES.get(name, registered) != registered:
        raise ValueError(f"reliability case {name!r} registered twice with different texts")
    CASES[name] = registered
    return pytest.param(*values, id=name, marks=marks)
