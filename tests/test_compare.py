"""Paired comparison of two evaluations (bootstrap interval, McNemar), ``miadpo.evaluate compare=``, the
before/after table of training, and the evaluation's per-batch image decoding and length guard."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CONFIG_DIR, compose_train
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image
from reliability import case
from test_benchmarks import BLUE, GREEN, RED, blink_row, mmmu_fixture, png, write_parquet

from miadpo.eval.compare import compare_correctness, mcnemar_p
from miadpo.eval.scoring import MEAN_ROW
from miadpo.evaluate import run_evaluation
from miadpo.train import train


def test_a_known_difference_gets_its_interval_and_p_value() -> None:
    rng = np.random.default_rng(1)
    n = 1000
    before = rng.random(n) < 0.5
    after = before.copy()
    after[np.flatnonzero(~before)[:100]] = True  # 100 wrong answers made right: +10 points, nothing lost
    a = {"bench": {str(i): bool(v) for i, v in enumerate(before)}}
    b = {"bench": {str(i): bool(v) for i, v in enumerate(after)}}
    row = compare_correctness(a, b)["bench"]
    assert row.n == n and row.delta == pytest.approx(10.0)
    # Per unit the difference is 0 or 1 (p = 0.1): standard error √(0.1·0.9/1000) = 0.95 points.
    half_width = 1.96 * 100 * math.sqrt(0.1 * 0.9 / n)
    assert row.low == pytest.approx(10.0 - half_width, abs=0.4) and row.high == pytest.approx(10 + half_width, abs=0.4)
    assert row.mcnemar_p == pytest.approx(2 * 0.5**100)
    same = compare_correctness(a, a)["bench"]
    assert (same.delta, same.low, same.high, same.mcnemar_p) == (0.0, 0.0, 0.0, 1.0)
    assert compare_correctness(a, b) == compare_correctness(a, b)  # seeded: the same on every run


def test_a_no_difference_interval_covers_zero_and_units_in_one_only_are_left_out() -> None:
    rng = np.random.default_rng(2)
    a = {"x N=2": {str(i): bool(rng.random() < 0.6) for i in range(400)}}
    b = {"x N=2": {str(i): bool(rng.random() < 0.6) for i in range(400)}}
    b["x N=2"]["extra"] = True
    del b["x N=2"]["0"]
    table = compare_correctness(a, b)
    row = table["x N=2"]
    assert row.n == 399 and row.unpaired == 2 and row.low < 0 < row.high and row.mcnemar_p > 0.05
    assert table[MEAN_ROW].delta == pytest.approx(row.delta) and table[MEAN_ROW].mcnemar_p is None


def test_mcnemar_exact_p_values() -> None:
    assert mcnemar_p(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert mcnemar_p(5, 5) == 1.0 and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(0, 20) == pytest.approx(2 * 0.5**20)


def compose_evaluate(overrides: list[str], run_dir: Path) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="evaluate", overrides=[f"run_dir={run_dir}", "eval.max_new_tokens=2",
                                                          "eval.progress=false", *overrides])


def blink_dir(tmp_path: Path) -> Path:
    truncated = png(BLUE)[:60]  # a readable header, pixels cut off: found only when decoded
    rows = [blink_row(1, "Counting"), blink_row(2, "Counting", image_2=None),
            blink_row(3, "Counting", image_2={"bytes": truncated, "path": None})]
    write_parquet(tmp_path / "BLINK" / "Counting" / "val-00000-of-00001.parquet", rows)
    return tmp_path / "BLINK"


def test_predictions_are_kept_per_benchmark_when_item_ids_repeat_across_them(tmp_path: Path) -> None:
    """Two VLMEvalKit TSVs both index their rows from 0 (as every one does): eval.json keeps all four answers,
    under each TSV's group, and each benchmark's correctness."""
    from test_evaluate_tsv import image_b64, write_tsv

    rows = [{"index": k, "question": f"Which colour? {k}", "A": "red", "B": "blue", "answer": "A",
             "image": image_b64(RED)} for k in range(2)]
    first, second = write_tsv(tmp_path / "first.tsv", rows), write_tsv(tmp_path / "second.tsv", rows)
    results = run_evaluation(compose_evaluate([f"eval.tsv=[{first},{second}]"], tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["predictions"] == results["predictions"]
    assert {group: sorted(answers) for group, answers in saved["predictions"].items()} == {
        "tsv:first": ["0", "1"], "tsv:second": ["0", "1"]}
    assert sorted(saved["correct"]["tsv:first"]) == sorted(saved["correct"]["tsv:second"]) == ["0", "1"]


def test_evaluate_compares_with_another_run_and_skips_what_cannot_be_answered(tmp_path: Path) -> None:
    bench = blink_dir(tmp_path)
    first = run_evaluation(compose_evaluate([f"eval.benchmarks.blink={bench}", "eval.max_bad_fraction=0.5"],
                                            tmp_path / "first"))
    assert set(first["correct"]["BLINK"]) == {"val_Counting_1", "val_Counting_2"}
    assert [s.split(" (id=")[1].split(")")[0] for s in first["skipped"]] == ["val_Counting_3"]
    assert "image truncated" in first["skipped"][0] and first["table"]["BLINK"]["n"] == 2
    second = run_evaluation(compose_evaluate([f"eval.benchmarks.blink={bench}", "eval.max_bad_fraction=0.5",
                                              f"compare={tmp_path / 'first' / 'eval.json'}"], tmp_path / "second"))
    row = second["comparison"]["BLINK"]
    assert row["n"] == 2 and row["delta"] == 0.0 and row["mcnemar_p"] == 1.0  # the same model, greedy
    markdown = (tmp_path / "second" / "eval.md").read_text()
    assert "95% CI (paired bootstrap)" in markdown and "McNemar p" in markdown
    assert json.loads((tmp_path / "second" / "eval.json").read_text())["comparison"]["other"].endswith("eval.json")
    # Prompts longer than eval.max_length tokens are skipped and counted, never cut: with tiny_llava's 16 tokens
    # an image, item 1 (two images) takes 160 tokens, item 2 (one) 142.
    short = run_evaluation(compose_evaluate([f"eval.benchmarks.blink={bench}", "eval.max_bad_fraction=0.5",
                                             "eval.max_length=150"], tmp_path / "short"))
    assert list(short["correct"]["BLINK"]) == ["val_Counting_2"]
    assert any("(id=val_Counting_1): too long" in s for s in short["skipped"])
    (tmp_path / "old.json").write_text(json.dumps({"table": {}}))
    with pytest.raises(ValueError, match=r"compare=.*old\.json: no per-item 'correct' results"):
        run_evaluation(compose_evaluate([f"eval.benchmarks.blink={bench}", f"compare={tmp_path / 'old.json'}"],
                                        tmp_path / "bad"))


def test_training_before_after_table_carries_the_paired_interval(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    lines = []
    for i, colour in enumerate([RED, GREEN, BLUE, RED]):
        Image.new("RGB", (20, 20), colour).save(tmp_path / "images" / f"e{i}.png")
        lines.append(json.dumps({"id": f"e{i}", "image": f"e{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]}))
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    result = train(compose_train(["trainer.max_steps=2", "data.synthetic.num_pairs=8",
                                  f"eval.files=[{tmp_path / 'test.jsonl'}]", f"eval.image_root={tmp_path / 'images'}",
                                  "eval.max_new_tokens=2"], tmp_path))
    saved = json.loads((result.run_dir / "eval_before_after.json").read_text())
    assert {"before", "after", "paired", "skipped"} <= set(saved)
    paired = saved["paired"]["single"]
    assert paired["n"] == 4 and paired["low"] <= paired["delta"] <= paired["high"]
    change = saved["after"]["single"]["accuracy"] - saved["before"]["single"]["accuracy"]
    assert paired["delta"] == pytest.approx(change)
    header = (result.run_dir / "eval_before_after.md").read_text().splitlines()[0]
    assert "95% CI" in header and "McNemar p" in header


def test_a_missing_benchmark_directory_stops_training_before_any_stage(tmp_path: Path) -> None:
    cfg = compose_train([f"eval.benchmarks.mmmu={tmp_path / 'nowhere'}"], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"eval\.benchmarks\.mmmu: .*nowhere"):
        train(cfg)
    assert not (Path(cfg.run_dir) / "base_model").exists()


def test_eval_paper_names_every_benchmark_directory() -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["eval=paper"])
    dirs = cfg.eval.benchmarks
    assert all(getattr(dirs, name) for name in ("mmmu", "blink", "mantis_eval", "nlvr2", "mvbench", "muirbench"))
    assert cfg.eval.nlvr2_split == "test1" and cfg.eval.frames == 6


def test_wandb_samples_show_every_benchmark_with_images_question_prediction_and_answer(tmp_path: Path) -> None:
    blink = tmp_path / "BLINK"
    write_parquet(blink / "Counting" / "val-00000-of-00001.parquet",
                  [blink_row(1, "Counting"), blink_row(2, "Counting")])
    mmmu = mmmu_fixture(tmp_path / "MMMU")
    results = run_evaluation(compose_evaluate([f"eval.benchmarks.blink={blink}", f"eval.benchmarks.mmmu={mmmu}",
                                               "eval.max_bad_fraction=0.5", "eval.wandb=true",
                                               "eval.wandb_mode=offline", "eval.samples=3"], tmp_path / "run"))
    [table_file] = (tmp_path / "run").glob("wandb/offline-run-*/files/media/table/eval/samples_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["id", "group", "images", "question", "prediction", "answer"]
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    # Taken from each benchmark in turn, so the first benchmark's items do not fill the table.
    assert [row["group"] for row in rows] == ["MMMU", "BLINK", "MMMU"]
    assert [row["id"] for row in rows] == ["validation_Art_1", "val_Counting_1", "validation_Art_2"]
    assert rows[0]["prediction"] == results["predictions"]["MMMU"]["validation_Art_1"] and rows[0]["answer"] == "B"
    assert rows[0]["question"].count("<image>") == 3  # MMMU's <image 2>, <image 1>, <image 1> in place
    # The images travel in the table's artifact: one contact sheet per sample, the item's images side by side.
    staged = [path for path in (tmp_path / "run" / "wandb" / "data").rglob("*") if path.is_file()]
    sheets = []
    for path in staged:
        try:
            with Image.open(path) as image:
                sheets.append(image.size)
        except OSError:
            continue
    assert sorted(sheets) == [(160, 160), (2 * 160, 160), (3 * 160, 160)]


def test_the_readme_benchmark_commands_compose(monkeypatch) -> None:
    """Each ``python -m miadpo.<entry>`` line of the README's Benchmarks block is a valid set of overrides."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Benchmarks (`eval=paper`)")[1].split("```bash\n")[1].split("```")[0]
    commands = [shlex.split(line.split("#")[0]) for line in block.replace("\\\n", " ").splitlines()
                if line.startswith("python -m miadpo.")]
    assert [c[2] for c in commands] == ["miadpo.evaluate", "miadpo.evaluate", "miadpo.train"]
    monkeypatch.setenv("MIADPO_BENCHMARKS", "/data/benchmarks")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for command in commands:
            cfg = compose(config_name=command[2].split(".")[1], overrides=command[3:])
            assert cfg.eval.benchmarks.mvbench == "/data/benchmarks/MVBench" and cfg.model.name == "llava15"


@pytest.mark.parametrize(("correct", "reason"), [
    case("evaluation", "compare-malformed", "compare= an eval.json whose 'correct' is malformed (the whole evaluation "
         "ran, then died before eval.json was written; a list gave an empty table with no reason)", "stops before the "
         "model loads, naming the file and what 'correct' must be", [["a", True]], "'correct' is a list"),
    ({"BLINK": ["val_1"]}, "correct['BLINK'] is not a map of item id"),
    ({"BLINK": {"val_1": "yes"}}, "correct['BLINK'] is not a map of item id"),
])
def test_a_malformed_compare_file_stops_before_the_model_loads(tmp_path: Path, correct: Any, reason: str,
                                                             monkeypatch) -> None:
    from miadpo import evaluate as evaluate_module

    (tmp_path / "other.json").write_text(json.dumps({"table": {}, "correct": correct}))
    monkeypatch.setattr(evaluate_module, "prepare_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=rf"compare=.*other\.json: {re.escape(reason)}"):
        run_evaluation(compose_evaluate([f"eval.benchmarks.blink={blink_dir(tmp_path)}",
                                         f"compare={tmp_path / 'other.json'}"], tmp_path / "run"))


@pytest.mark.parametrize("case_name", [
    case("evaluation", "tsv-answer-not-an-option", "a TSV row whose answer is none of its options (E for A–D, empty, "
         "free text: scored as an item that could never be right)", "a bad row (file:row (index): answer ... is not "
         "one of the options), skipped and counted", "answer"),
    case("evaluation", "tsv-bom-crlf", "a TSV with a UTF-8 BOM and CRLF line ends (refused as a whole)", "read as "
         "VLMEvalKit reads it: the BOM skipped", "bom"),
])
def test_tsv_rows_whose_answer_is_no_option_are_bad_and_a_bom_is_skipped(tmp_path: Path, case_name: str) -> None:
    from test_evaluate_tsv import image_b64

    from miadpo.data.pairs import BadRecordReport
    from miadpo.eval.items import tsv_items

    answers = ["A", "E", "", "blue"] if case_name == "answer" else ["A", "B"]
    lines = ["index\tquestion\tA\tB\tC\tD\tanswer\timage"]
    lines += [f"{k}\tColour?\tred\tblue\tgreen\tgrey\t{a}\t{image_b64(RED)}" for k, a in enumerate(answers)]
    path = tmp_path / "bench.tsv"
    if case_name == "bom":
        path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    else:
        path.write_text("\n".join(lines) + "\n")
    report = BadRecordReport("skip", max_bad_fraction=1.0, stage="eval", settings="eval")
    items = tsv_items(path, report)
    if case_name == "bom":
        assert [(i.id, i.answer) for i in items] == [("0", "A"), ("1", "B")] and not report.bad
    else:
        assert [i.id for i in items] == ["0"]
        assert [str(b).split(": ", 1)[1] for b in report.bad] == [
            "answer 'E' is not one of the options A, B, C, D", "answer '' is not one of the options A, B, C, D",
            "answer 'blue' is not one of the options A, B, C, D"]


@pytest.mark.parametrize("outside", [
    case("evaluation", "tsv-image-path-outside-its-folder", "a TSV image_path that leaves the TSV's folder (an "
         "absolute path or '..'; used silently)", "used, as VLMEvalKit does, and said once per TSV folder in a "
         "warning", "../elsewhere/red.png"),
])
def test_a_tsv_image_path_outside_its_folder_is_said_once(tmp_path: Path, caplog, outside: str) -> None:
    from miadpo.eval import items as items_module

    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8), RED).save(tmp_path / "elsewhere" / "red.png")
    (tmp_path / "bench").mkdir()
    lines = ["index\tquestion\tA\tB\tanswer\timage_path"] + [f"{k}\tColour?\tred\tblue\tA\t{outside}" for k in range(3)]
    (tmp_path / "bench" / "b.tsv").write_text("\n".join(lines) + "\n")
    items_module._OUTSIDE_TSV_FOLDER.discard((tmp_path / "bench").resolve())
    with caplog.at_level("WARNING", logger="miadpo.eval.items"):
        assert len(items_module.tsv_items(tmp_path / "bench" / "b.tsv")) == 3
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "image_path '../elsewhere/red.png' is outside the TSV's folder" in warning
