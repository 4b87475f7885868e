"""VLMEvalKit multiple-choice TSVs: shared images, image files, markers in place, options A–Z, circular
evaluation, category groups and VLMEvalKit's answer extraction."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from miadpo.eval.items import EvalItem, tsv_items
from miadpo.eval.scoring import option_letter, score

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
PROMPT_END = "Please select the correct answer from the options above. \n"


def image_b64(colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path: Path, rows: list[dict[str, object]]) -> Path:
    """A TSV as VLMEvalKit ships them: a header, tab-separated cells, lists written as Python list literals."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["\t".join(columns)] + ["\t".join(str(row.get(c, "")) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def colours(item: EvalItem) -> list[tuple[int, int, int]]:
    return [image.getpixel((0, 0)) for image in item.load_images()]


def test_vlmevalkit_tsv_with_several_images(tmp_path: Path) -> None:
    """Moved from tests/test_toyworld.py; the prompt now follows ImageMCQDataset.build_prompt."""
    two = str([image_b64(RED), image_b64(BLUE)])
    rows = ["index\tquestion\tA\tB\tC\tD\tanswer\timage",
            f"1\tWhich image is red?\tthe first\tthe second\t\t\tA\t{two}",
            f"2\tWhat colour?\tred\tgreen\tblue\tblack\tC\t{image_b64(BLUE)}"]
    path = tmp_path / "bench.tsv"
    path.write_text("\n".join(rows) + "\n")
    items = tsv_items(path)
    assert len(items[0].sources) == 2 and items[0].prompt.startswith("<image>\n<image>\nQuestion: Which image is red?")
    assert "C. blue" in items[1].prompt and items[0].options == {"A": "the first", "B": "the second"}
    table = score(items, ["A", "(B) green"])
    assert table["tsv:bench"] == {"n": 2, "accuracy": 50.0}
    assert option_letter("blue", items[1].options) == "C" and option_letter("no idea", items[1].options) is None


def test_default_prompt_layout_with_hint(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "bench.tsv", [
        {"index": 0, "question": "What colour?", "hint": "Look closely.", "A": "red", "B": "green", "answer": "A",
         "image": image_b64(RED)},
        {"index": 1, "question": "What colour?", "hint": "nan", "A": "red", "B": "None", "answer": "A",
         "image": image_b64(RED)}])
    first, second = tsv_items(path)
    assert first.prompt == ("<image>\nHint: Look closely.\nQuestion: What colour?\nOptions:\nA. red\nB. green\n"
                            + PROMPT_END)
    # "nan" and "None" cells are NaN to pandas, so VLMEvalKit shows no hint and no option B.
    assert second.prompt == "<image>\nQuestion: What colour?\nOptions:\nA. red\n" + PROMPT_END


def test_image_cell_holding_another_rows_index(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "bench.tsv", [
        {"index": 10, "question": "Colour?", "A": "red", "B": "blue", "answer": "A", "image": image_b64(RED)},
        {"index": 11, "question": "Not blue?", "A": "yes", "B": "no", "answer": "A", "image": "10"},
        {"index": 12, "question": "No image", "A": "yes", "B": "no", "answer": "A", "image": ""},
        {"index": 13, "question": "Two", "A": "yes", "B": "no", "answer": "B",
         "image": str([image_b64(GREEN), image_b64(BLUE)])},
        {"index": 14, "question": "Two again", "A": "yes", "B": "no", "answer": "B", "image": "13"}])
    items = tsv_items(path)
    assert [item.id for item in items] == ["10", "11", "13", "14"]  # a row with no image is skipped
    assert colours(items[1]) == [RED] and colours(items[3]) == [GREEN, BLUE]
    assert items[3].prompt.startswith("<image>\n<image>\nQuestion: Two again")
    bad = write_tsv(tmp_path / "bad.tsv", [
        {"index": 1, "question": "q", "A": "a", "B": "b", "answer": "A", "image": image_b64(RED)},
        {"index": 2, "question": "q", "A": "a", "B": "b", "answer": "A", "image": "7"}])
    with pytest.raises(ValueError, match=r"bad\.tsv:3: image cell '7'"):
        tsv_items(bad)


def test_circular_dataset_scored_per_group(tmp_path: Path) -> None:
    def rotation(index: int, answer: str, category: str) -> dict[str, object]:
        return {"index": index, "question": "Colour?", "A": "red", "B": "blue", "C": "green", "answer": answer,
                "category": category, "l2-category": "perception", "image": image_b64(RED)}

    # Question 1 (two rotations) and question 2 (three rotations, one answered wrong); a rotation's own
    # category does not matter: it is counted under its main row's.
    rows = [rotation(1, "A", "colour"), rotation(1000001, "B", "colour"), rotation(2, "C", "shape"),
            rotation(1000002, "A", "colour"), rotation(2000002, "B", "shape")]
    predictions = ["A", "The answer is B", "C", "A", "C"]
    items = tsv_items(write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows))
    table = score(items, predictions)
    assert table["tsv:MMBench_DEV_EN"] == {"n": 2, "accuracy": 50.0, "row accuracy": 80.0}
    assert [item.circular_group for item in items] == ["1", "1", "2", "2", "2"]
    assert table["tsv:MMBench_DEV_EN/colour"] == {"n": 1, "accuracy": 100.0, "row accuracy": 100.0}
    assert table["tsv:MMBench_DEV_EN/shape"]["n"] == 1 and table["tsv:MMBench_DEV_EN/shape"]["accuracy"] == 0.0
    assert table["tsv:MMBench_DEV_EN/perception"]["n"] == 2
    # Without a circular name VLMEvalKit scores every row on its own, large indices or not.
    plain = tsv_items(write_tsv(tmp_path / "bench.tsv", rows))
    assert score(plain, predictions)["tsv:bench"] == {"n": 5, "accuracy": 80.0}
    # A g_index column names the groups itself.
    grouped = [dict(row, index=i, g_index=g) for row, i, g in zip(rows, [5, 6, 7, 8, 9], [5, 5, 7, 7, 7])]
    items = tsv_items(write_tsv(tmp_path / "BLINK_circular.tsv", grouped))
    assert score(items, predictions)["tsv:BLINK_circular"]["accuracy"] == 50.0


def test_inline_image_markers_are_used_in_place(tmp_path: Path) -> None:
    two = str([image_b64(RED), image_b64(BLUE)])
    path = write_tsv(tmp_path / "bench.tsv", [
        {"index": 1, "question": "Is <image> the same colour as <image>?", "A": "yes", "B": "no", "answer": "B",
         "image": two},
        {"index": 2, "question": "Which? <image> <image> <image>", "A": "<image>", "B": "none", "answer": "A",
         "image": two}])
    first, second = tsv_items(path)
    assert first.prompt.startswith("Question: Is <image> the same colour as <image>?\nOptions:")
    assert first.prompt.count("<image>") == 2 and colours(first) == [RED, BLUE]
    # Markers beyond the images are removed (MUIRDataset.split_MUIR).
    assert second.prompt.startswith("Question: Which? <image> <image> \n") and second.prompt.count("<image>") == 2
    assert "A. \n" in second.prompt


def test_muirbench_prompt_layout(tmp_path: Path) -> None:
    two = str([image_b64(RED), image_b64(BLUE)])
    path = write_tsv(tmp_path / "MUIRBench.tsv", [
        {"index": 1, "question": "Which image is red? <image> <image>", "A": "first", "B": "second", "answer": "A",
         "image": two}])
    (item,) = tsv_items(path)
    assert item.prompt == ("Which image is red? <image> <image>\nA. first\nB. second\n"
                           "Answer with the option's letter from the given choices directly.")


def test_image_path_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), RED).save(tmp_path / "imgs" / "red.png")
    Image.new("RGB", (8, 8), BLUE).save(tmp_path / "imgs" / "blue.png")
    (tmp_path / "images" / "bench").mkdir(parents=True)
    Image.new("RGB", (8, 8), GREEN).save(tmp_path / "images" / "bench" / "green.png")
    rows = [{"index": 1, "question": "Colour?", "A": "red", "B": "blue", "answer": "A", "image_path": "imgs/red.png"},
            {"index": 2, "question": "Order?", "A": "rb", "B": "br", "answer": "B",
             "image_path": str(["imgs/blue.png", str(tmp_path / "imgs" / "red.png")])},
            {"index": 3, "question": "Colour?", "A": "green", "B": "blue", "answer": "A", "image_path": "green.png"}]
    path = write_tsv(tmp_path / "bench.tsv", rows)
    monkeypatch.chdir(tmp_path / "imgs")  # relative to the TSV's folder, not the working directory
    items = tsv_items(path)
    assert [colours(item) for item in items] == [[RED], [BLUE, RED], [GREEN]]
    assert items[1].prompt.startswith("<image>\n<image>\nQuestion: Order?")
    missing = write_tsv(tmp_path / "missing.tsv", [*rows[:1], dict(rows[0], index=4, image_path="imgs/gone.png")])
    with pytest.raises(ValueError, match=r"missing\.tsv:3: .*'imgs/gone\.png' not found"):
        tsv_items(missing)


def test_options_beyond_f_and_numbered_image_references(tmp_path: Path) -> None:
    three = str([image_b64(RED), image_b64(GREEN), image_b64(BLUE)])
    options = {k: f"option {k}" for k in "ABCDEFGH"}
    path = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", [
        {"index": 1, "question": "Compare <image 2> with <image 1>.", **options, "answer": "G", "image": three},
        {"index": 2, "question": "How many sides? <image 1>", "answer": "6", "image": three}])
    mcq, open_question = tsv_items(path)
    assert list(mcq.options) == list("ABCDEFGH") and "G. option G\nH. option H\n" in mcq.prompt
    # Images in the order of their references; image 3, never referenced, is dropped (split_MMMU).
    assert mcq.prompt.startswith("Question: Compare <image> with <image>.\nOptions:\nA. option A\n")
    assert colours(mcq) == [GREEN, RED] and option_letter("H", mcq.options) == "H"
    # An open MMMU question: no options in the prompt, scored as A = the answer, B = "Other Answers".
    assert open_question.prompt == "Question: How many sides? <image>\n" and colours(open_question) == [RED]
    assert open_question.options == {"A": "6", "B": "Other Answers"} and open_question.answer == "A"
    table = score([mcq, open_question], ["The answer is G", "It has 6 sides."])
    assert table["tsv:MMMU_DEV_VAL"] == {"n": 2, "accuracy": 100.0}
    bad = write_tsv(tmp_path / "bad.tsv", [{"index": 1, "question": "See <image 4>", "A": "a", "B": "b",
                                            "answer": "A", "image": three}])
    with pytest.raises(ValueError, match=r"bad\.tsv:2: .*images \[4\] but the row has 3"):
        tsv_items(bad)


def test_option_letter_follows_vlmevalkit() -> None:
    options = {"A": "red", "B": "green", "C": "blue", "D": "black"}
    assert option_letter("The answer is C", options) == "C"
    assert option_letter("Answer: B", options) == "B"
    assert option_letter("**B**.", options) == "B"
    assert option_letter("The correct answer is b.", options) == "B"  # "answer is X", any case
    assert option_letter("b", options) is None  # a lone letter is matched case-sensitively, as in VLMEvalKit
    assert option_letter("A cat sits on the mat by the door", options) is None  # the letter is not near the end
    assert option_letter("B or C", options) is None  # two letters
    assert option_letter("the answer is apple", options) is None
    assert option_letter("Cannot determine the answer, maybe blue", options) is None  # a refusal: "Z"
    assert option_letter("I think it is blue", options) == "C"  # the option text, once
    assert option_letter("red or blue", options) is None
    assert option_letter("blue " * 20, options) is None  # longer than twice all option texts
    many = {k: f"option {k}" for k in "ABCDEFGHIJ"}
    assert option_letter("So: J.", many) == "J"


def test_category_and_split_groups(tmp_path: Path) -> None:
    rows = [{"index": i, "question": "Colour?", "A": "red", "B": "blue", "answer": "A", "category": category,
             "split": split, "image": image_b64(RED)}
            for i, (category, split) in enumerate([("colour", "dev"), ("colour", "val"), ("count", "val")])]
    items = tsv_items(write_tsv(tmp_path / "bench.tsv", rows))
    table = score(items, ["A", "B", "A"])
    assert table["tsv:bench"]["n"] == 3
    assert table["tsv:bench/colour"] == {"n": 2, "accuracy": 50.0}
    assert table["tsv:bench/count"] == {"n": 1, "accuracy": 100.0}
    assert table["tsv:bench/split=val"] == {"n": 2, "accuracy": 50.0}
