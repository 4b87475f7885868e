"""``docs/reliability.md`` is the table of every registered reliability case (``tests/reliability.py``).

Regenerate it with ``MIADPO_WRITE_RELIABILITY_DOC=1 python -m pytest tests/test_reliability_doc.py``.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from conftest import REPO
from reliability import CASES

DOC = REPO / "docs" / "reliability.md"
# Sections in pipeline order (an area not listed goes last).
AREAS = ["source file", "image paths", "images", "augmentation", "selection", "pair file", "SFT", "configuration",
         "training", "checkpoints", "caches", "concurrency", "evaluation", "generate", "remote code"]
HEADER = """# Bad inputs and faults

What miadpo does with each bad input or fault it is tested against. Generated from the tests' parametrisation
(`tests/reliability.py`; the test that checks a row has the row's id); regenerate with
`MIADPO_WRITE_RELIABILITY_DOC=1 python -m pytest tests/test_reliability_doc.py`.

"""


def render() -> str:
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        if path.stem != Path(__file__).stem and "from reliability import" in path.read_text():
            importlib.import_module(path.stem)  # importing a test module registers its cases
    order = {name: index for index, name in enumerate(CASES)}
    lines = [HEADER.rstrip("\n"), ""]
    areas = sorted({c.area for c in CASES.values()}, key=lambda a: (AREAS.index(a) if a in AREAS else len(AREAS), a))
    for area in areas:
        lines += [f"## {area[0].upper()}{area[1:]}", "", "| case | bad input or fault | what it gets |",
                  "|---|---|---|"]
        ordered = sorted((c for c in CASES.values() if c.area == area), key=lambda c: (c.module, order[c.name]))
        lines += [f"| `{c.name}` | {c.bad_input} | {c.outcome} |" for c in ordered]
        lines.append("")
    return "\n".join(lines)


def test_the_reliability_document_is_the_table_of_the_tested_cases() -> None:
    text = render()
    if os.environ.get("MIADPO_WRITE_RELIABILITY_DOC"):
        DOC.write_text(text)
    assert CASES, "no reliability case registered"
    assert DOC.is_file() and DOC.read_text() == text, (
        "docs/reliability.md is out of date: MIADPO_WRITE_RELIABILITY_DOC=1 python -m pytest "
        "tests/test_reliability_doc.py")
