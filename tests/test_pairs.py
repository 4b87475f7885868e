"""The pair record: path rule, official-format reader, writer, validation and the bad-record policy."""

import json
import logging
from pathlib import Path

import pytest
from conftest import good_record
from reliability import case

from miadpo.config import BadRecordPolicy
from miadpo.data.pairs import BadRecordError, BadRecordReport, ImageRoots, PairRecord, read_pairs, write_pairs


def roots(tmp_path: Path) -> ImageRoots:
    (tmp_path / "out").mkdir(exist_ok=True)
    return ImageRoots(image_root=tmp_path / "images", out_dir=tmp_path / "out")


def read(path: Path, tmp_path: Path, policy: str = "skip", max_bad: float = 0.5) -> tuple[list, BadRecordReport]:
    report = BadRecordReport(BadRecordPolicy(policy), max_bad)
    return read_pairs(path, roots(tmp_path), report), report


def test_path_rule_resolves_source_and_composed_images(tmp_path: Path) -> None:
    r = roots(tmp_path)
    assert r.resolve("coco/1.jpg") == (tmp_path / "images" / "coco/1.jpg").resolve()
    assert r.resolve("@out/grid/1.png") == (tmp_path / "out" / "grid/1.png").resolve()
    assert r.composed(tmp_path / "out" / "grid" / "1.png") == "@out/grid/1.png"
    for bad in ("../secret.png", "/etc/passwd", "@out/../../x.png", "a/../../b.png", "@out/"):
        with pytest.raises(ValueError):
            r.resolve(bad)


def test_mixed_source_and_composed_paths_load_without_edits(tmp_path: Path, pair_files) -> None:
    record = good_record(tmp_path, 0)
    (tmp_path / "out" / "grid").mkdir(parents=True)
    (tmp_path / "images" / record["images"][1]).rename(tmp_path / "out" / "grid" / "g.png")
    record["images"][1] = "@out/grid/g.png"
    records, report = read(pair_files([record]), tmp_path)
    assert [r.images for r in records] == [record["images"]] and not report.bad


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    rec = good_record(tmp_path, 1, n_images=3)
    original = PairRecord(rec["id"], rec["images"], rec["prompt"], rec["chosen"], rec["rejected"], rec["meta"])
    path = tmp_path / "sub" / "pairs.jsonl"
    assert write_pairs(path, [original]) == 1
    records, _ = read(path, tmp_path)
    assert records == [original]


def test_concurrent_writers_of_one_pair_file_do_not_collide(tmp_path: Path) -> None:
    """Two runs sharing a data directory rewrite the same pairs file at once (a multirun over β does)."""
    from concurrent.futures import ThreadPoolExecutor

    rec = good_record(tmp_path, 0)
    records = [PairRecord(f"p{i}", rec["images"], rec["prompt"], rec["chosen"], rec["rejected"], rec["meta"])
               for i in range(300)]
    path = tmp_path / "pairs" / "pairs.jsonl"
    with ThreadPoolExecutor(4) as pool:
        counts = list(pool.map(lambda _: write_pairs(path, records), range(40)))
    assert counts == [300] * 40
    assert [r.id for r in read(path, tmp_path)[0]] == [f"p{i}" for i in range(300)]
    assert sorted(p.name for p in path.parent.iterdir()) == ["pairs.jsonl"]  # no temporary file left behind


def test_official_release_format_is_accepted(tmp_path: Path, pair_files) -> None:
    rec = good_record(tmp_path, 0, n_images=1)
    official_single = {"id": 7, "image": rec["images"][0], "prompt": "<image>\nWhat is it?",
                       "chosen": "A cat.", "rejected": "A dog.", "extra_field": 1}
    rec2 = good_record(tmp_path, 1, n_images=2)
    official_list = {"id": "x", "image": rec2["images"], "prompt": rec2["prompt"], "chosen": "a", "rejected": "b"}
    records, report = read(pair_files([official_single, official_list]), tmp_path)
    assert [r.id for r in records] == ["7", "x"]
    assert records[0].images == rec["images"] and records[0].meta == {}
    assert not report.bad


def test_the_official_release_reads_as_its_generator_scripts_write_it(tmp_path: Path) -> None:
    """A JSON array (``json.dump(..., indent=4)``), ``<image-placeholder>`` markers, ``image`` lists, the extra
    ``gt`` key, and a single ``image`` string whose prompt has no marker (the reference trainer prepends one)."""
    two, one = good_record(tmp_path, 0, n_images=2), good_record(tmp_path, 1, n_images=1)
    release = [
        {"id": "000000033471", "image": two["images"],
         "prompt": "Image1: <image-placeholder>\nImage2: <image-placeholder>\nIn Image2, what colour is the bus?",
         "chosen": "White and blue.", "rejected": "Red.", "gt": "White and blue."},
        {"id": "A0001", "image": one["images"][0], "prompt": "What is the man holding?",
         "chosen": "An umbrella.", "rejected": "A surfboard.", "gt": "An umbrella."},
        {"id": "A0002", "image": one["images"][0], "prompt": "<image>\nWhat is it?", "chosen": "A cat.",
         "rejected": "A dog.", "gt": "A cat."},
        {"id": "bad", "image": two["images"], "prompt": "Image1: <image-placeholder>\nWhat?", "chosen": "a",
         "rejected": "b", "gt": "a"},
    ]
    path = tmp_path / "duotu_74.json"
    path.write_text(json.dumps(release, indent=4))
    records, report = read(path, tmp_path)
    assert [r.id for r in records] == ["000000033471", "A0001", "A0002"]
    assert records[0].prompt == "Image1: <image>\nImage2: <image>\nIn Image2, what colour is the bus?"
    assert records[0].images == two["images"]
    assert records[1].prompt == "<image>\nWhat is the man holding?" and records[1].images == one["images"]
    assert records[2].prompt == "<image>\nWhat is it?"
    (bad,) = report.bad
    first_line = path.read_text().splitlines().index('        "id": "bad",')  # 0-based: the line of the '{'
    assert (bad.line, bad.id) == (first_line, "bad") and "prompt has 1 <image> for 2 images" in bad.reason


def corrupt_record(tmp_path: Path) -> dict:
    record = good_record(tmp_path, 16)
    (tmp_path / "images" / record["images"][0]).write_bytes(b"\x89PNG not really")
    return record


# Each key is a substring that the logged reason must contain.
BAD_CASES = {
    "malformed JSON": lambda t: '{"id": "broken", ',
    "image count mismatch": lambda t: {**good_record(t, 10), "prompt": "Image1: <image>\nWhat?"},
    "empty 'chosen'": lambda t: {**good_record(t, 11), "chosen": "  "},
    "empty 'rejected'": lambda t: {**good_record(t, 12), "rejected": ""},
    "escapes its root": lambda t: {**good_record(t, 13), "images": ["../x.png", "r13_1.png"]},
    "must be relative": lambda t: {**good_record(t, 14), "images": ["/etc/hosts", "r14_1.png"]},
    "image missing": lambda t: {**good_record(t, 15), "images": ["missing.png", "r15_1.png"]},
    "image corrupt": lambda t: corrupt_record(t),
    "identical": lambda t: {**good_record(t, 17), "rejected": "The circle is red."},
    "not a JSON object": lambda t: "[1, 2]",
    "field 'id' missing": lambda t: {k: v for k, v in good_record(t, 18).items() if k != "id"},
}


# What each bad record is, as a user would meet it (rows of docs/reliability.md).
BAD_CASE_INPUTS = {
    "malformed JSON": "a line that is not valid JSON",
    "image count mismatch": "a prompt whose `<image>` count differs from its images",
    "empty 'chosen'": "an empty or blank chosen answer",
    "empty 'rejected'": "an empty rejected answer",
    "escapes its root": "an image path with `..` leaving its root",
    "must be relative": "an absolute image path",
    "image missing": "an image that does not exist",
    "image corrupt": "an image file that does not decode",
    "identical": "chosen and rejected identical",
    "not a JSON object": "a line holding JSON that is not an object",
    "field 'id' missing": "a record without `id`",
}


@pytest.mark.parametrize("reason", [
    case("pair file", f"pairs-{reason.replace(chr(39), '').replace(' ', '-').lower()}", BAD_CASE_INPUTS[reason],
         "that record is skipped and logged as `file:line (id=…): reason` (`data.on_bad_record=error` stops "
         "there); the rest loads", reason)
    for reason in sorted(BAD_CASES)])
def test_each_bad_record_is_skipped_with_file_line_and_id(tmp_path: Path, pair_files, caplog, reason: str) -> None:
    good = [good_record(tmp_path, i) for i in range(3)]
    bad = BAD_CASES[reason](tmp_path)
    path = pair_files([good[0], bad, good[1], good[2]])
    with caplog.at_level(logging.WARNING):
        records, report = read(path, tmp_path)
    assert [r.id for r in records] == ["pair-0", "pair-1", "pair-2"]  # nothing else lost
    assert len(report.bad) == 1 and report.total == 4
    entry = report.bad[0]
    assert entry.line == 2 and entry.file == str(path)
    assert reason in entry.reason
    assert f"{path}:2" in caplog.text and "skipped 1 of 4" in caplog.text


@pytest.mark.parametrize("rejected", [
    case("pair file", "answers-equal-up-to-whitespace", "chosen and rejected differ only in spaces (a double space, "
         "NBSP, tab or zero-width space), case or punctuation", "that record is a bad record (`file:line (id=…): "
         "chosen and rejected are identical once case, punctuation, spaces and invisible characters are ignored`); "
         "the rest loads", "The circle  is red."),
    "The\u00a0circle is red.", "The circle\tis red.", "The circle is\u200b red.", "the circle is RED", "The\u200bcircle"
    " is red"])
def test_answers_equal_up_to_spaces_case_or_invisible_characters_are_bad(tmp_path: Path, pair_files,
                                                                          rejected: str) -> None:
    records, report = read(pair_files([good_record(tmp_path, 0), {**good_record(tmp_path, 1), "rejected": rejected}]),
                           tmp_path, max_bad=1.0)
    assert [r.id for r in records] == ["pair-0"]
    (bad,) = report.bad
    assert (bad.line, bad.id) == (2, "pair-1") and "identical once case, punctuation, spaces" in bad.reason


HUGE = "1" * 5000


@pytest.mark.parametrize(("meta", "reason"), [
    case("pair file", "meta-huge-integer", "a `meta` number of 5,000 digits (beyond what Python converts)",
         "that line is a bad record (`file:line: malformed JSON: a number of 5000 digits`), found when the file is "
         "read, before any model loads; the rest loads", f'{{"format": "sequence", "x": {HUGE}}}',
         "a number of 5000 digits"),
    case("pair file", "meta-wrong-type", "`meta.attention_ratio` that is not a number (e.g. `[[0.3]]`), or another "
         "meta field miadpo reads with the wrong type", "that record is a bad record naming the field and what it "
         "must be; the data report never meets it", '{"attention_ratio": [[0.3]]}',
         "meta.attention_ratio must be a number or null"),
    case("pair file", "meta-non-finite", "a `meta` number that is `NaN`, `Infinity` or overflows (`1e999`)",
         "that record is a bad record naming the field", '{"attention_ratio": 1e999}',
         "meta.attention_ratio is inf: numbers in meta must be finite"),
    ('{"scores": [NaN]}', "meta.scores[0] is nan"),
    ('{"n_images": 0}', "meta.n_images must be a whole number ≥ 1 or null"),
    ('{"target": true}', "meta.target must be a whole number ≥ 1, a list of them, or null"),
    ('{"id": 123456789012345678901234567890}', "meta.id is an integer of 30 digits, outside the 64-bit range"),
    ('{"attention_maps": [{"grids": [{"rows": 2, "cols": 2, "values": [1]}]}]}', "meta.attention_maps must be"),
])
def test_meta_types_and_finite_numbers_are_checked_when_read(tmp_path: Path, pair_files, meta: str,
                                                             reason: str) -> None:
    good = json.dumps(good_record(tmp_path, 1))
    line = good[: good.rindex('"meta"')] + f'"meta": {meta}}}'
    records, report = read(pair_files([good_record(tmp_path, 0), line, good_record(tmp_path, 2)]), tmp_path,
                           max_bad=1.0)
    assert [r.id for r in records] == ["pair-0", "pair-2"]
    (bad,) = report.bad
    assert bad.line == 2 and reason in bad.reason, bad.reason


def test_duplicate_ids_are_bad(tmp_path: Path, pair_files) -> None:
    rec = good_record(tmp_path, 0)
    records, report = read(pair_files([rec, good_record(tmp_path, 1), rec]), tmp_path)
    assert len(records) == 2 and report.bad[0].reason == "duplicate id" and report.bad[0].line == 3


def test_error_policy_stops_at_the_first_bad_record(tmp_path: Path, pair_files) -> None:
    path = pair_files([good_record(tmp_path, 0), {**good_record(tmp_path, 1), "chosen": ""}])
    with pytest.raises(BadRecordError, match=r"pairs.jsonl:2 \(id=pair-1\): empty 'chosen'"):
        read(path, tmp_path, policy="error")


def test_bad_fraction_above_the_limit_stops_with_the_first_bad_records(tmp_path: Path, pair_files) -> None:
    records = [good_record(tmp_path, i) for i in range(9)] + ["not json"]
    with pytest.raises(BadRecordError, match=r"1 of 10 records are bad (.|\n)*pairs.jsonl:10"):
        read(pair_files(records), tmp_path, max_bad=0.05)
    kept, report = read(pair_files(records), tmp_path, max_bad=0.1)
    assert len(kept) == 9 and report.fraction == pytest.approx(0.1)


def test_a_file_of_only_bad_records_names_them(tmp_path: Path, pair_files) -> None:
    path = pair_files(["{", json.dumps({"id": "a", "images": [], "prompt": "", "chosen": "x", "rejected": "y"})])
    with pytest.raises(BadRecordError, match=r"2 of 2 records are bad(.|\n)*pairs.jsonl:1(.|\n)*pairs.jsonl:2"):
        read(path, tmp_path, max_bad=1.0)


def test_empty_and_missing_files(tmp_path: Path, pair_files) -> None:
    with pytest.raises(BadRecordError, match="no records"):
        read(pair_files([]), tmp_path)
    with pytest.raises(FileNotFoundError, match="pair file not found"):
        read(tmp_path / "nope.jsonl", tmp_path)
