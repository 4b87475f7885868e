"""MVBench (``OpenGVLab/MVBench`` on the Hugging Face hub): 20 video tasks, each frames + a multiple-choice question.

Published layout (huggingface.co/datasets/OpenGVLab/MVBench, main branch; the task table of the authors'
``video_chat2/mvbench.ipynb`` in OpenGVLab/Ask-Anything, the same in VLMEvalKit's ``vlmeval/dataset/mvbench.py``):
``json/<task>.json`` per task, a JSON list of ``{"video", "question", "candidates", "answer"}`` (``answer`` is the
text of one candidate; the five bounded tasks add ``start`` / ``end`` in seconds), and the videos unpacked from
``video/*.zip`` under ``video/<prefix>`` (e.g. ``video/star/Charades_v1_480/<id>.mp4``; the re-uploaded STAR and
CLEVRER clips under ``video/data0613/<prefix>``, looked in second, as VLMEvalKit and lmms-eval do); Episodic
Reasoning's
``video`` names a folder of frames (``00001.jpg``, …, 3 fps). A video may be given as a folder of frames instead
(its path without the suffix, frames at ``frame_fps``), so no decoder is needed.

Prompt (VLMEvalKit's MVBench): its system text, then the frames, then ``Question: <question>\\nOptions:\\n(A)
<candidate>\\n(B) …\\nOnly give the best option.``; the system text leads the user turn (the adapters' chat
templates take no system turn) and VLMEvalKit's assistant prefill ``Best option:(`` is left out, the answer
being read by ``option_letter`` ("(B) ...", "B"). Frames: ``eval.frames`` segment midpoints
(``miadpo.eval.sources.segment_frames``); the default 6 keeps a LLaVA-1.5 prompt (576 tokens a frame) inside
its 4,096 tokens. Groups: ``MVBench`` and ``MVBench/<task>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from miadpo.data.images import ImageOptions
from miadpo.data.pairs import BadRecordReport
from miadpo.eval.benchmarks.tables import BadRowError, Row, collect, text_cell
from miadpo.eval.items import LETTERS, EvalItem
from miadpo.eval.sources import FrameFolder, ImageSource, VideoFrames
from miadpo.text import IMAGE_TOKEN

NAME = "MVBench"
SYSTEM = ("Carefully watch the video and pay attention to the cause and sequence of events, the detail and movement "
          "of objects, and the action and pose of persons. Based on your observations, select the best option that "
          "accurately addresses the question.")
INSTRUCTION = "Only give the best option."
# task → (json file stem, video prefix under video/, frames stored as a folder, has start/end bounds)
TASKS: dict[str, tuple[str, str, bool, bool]] = {
    "Action Sequence": ("action_sequence", "star/Charades_v1_480", False, True),
    "Action Prediction": ("action_prediction", "star/Charades_v1_480", False, True),
    "Action Antonym": ("action_antonym", "ssv2_video", False, False),
    "Fine-grained Action": ("fine_grained_action", "Moments_in_Time_Raw/videos", False, False),
    "Unexpected Action": ("unexpected_action", "FunQA_test/test", False, False),
    "Object Existence": ("object_existence", "clevrer/video_validation", False, False),
    "Object Interaction": ("object_interaction", "star/Charades_v1_480", False, True),
    "Object Shuffle": ("object_shuffle", "perception/videos", False, False),
    "Moving Direction": ("moving_direction", "clevrer/video_validation", False, False),
    "Action Localization": ("action_localization", "sta/sta_video", False, True),
    "Scene Transition": ("scene_transition", "scene_qa/video", False, False),
    "Action Count": ("action_count", "perception/videos", False, False),
    "Moving Count": ("moving_count", "clevrer/video_validation", False, False),
    "Moving Attribute": ("moving_attribute", "clevrer/video_validation", False, False),
    "State Change": ("state_change", "perception/videos", False, False),
    "Fine-grained Pose": ("fine_grained_pose", "nturgbd", False, False),
    "Character Order": ("character_order", "perception/videos", False, False),
    "Egocentric Navigation": ("egocentric_navigation", "vlnqa", False, False),
    "Episodic Reasoning": ("episodic_reasoning", "tvqa/frames_fps3_hq", True, True),
    "Counterfactual Inference": ("counterfactual_inference", "clevrer/video_validation", False, False),
}


def task_rows(root: Path, task: str) -> list[Row]:
    """(file, number from 1, example) of each example in a task's JSON list, a non-object kept as an ``_error`` row;
    ValueError if the file is not a JSON list."""
    path = root / "json" / f"{TASKS[task][0]}.json"
    try:
        examples = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(examples, list):
        raise ValueError(f"{path}: not a JSON list of examples")
    return [(path, k, e if isinstance(e, dict) else {"_error": "not a JSON object"})
            for k, e in enumerate(examples, start=1)]


def video_places(root: Path, task: str) -> list[Path]:
    """Where a task's videos may lie, in order: ``video/<prefix>`` (or ``<prefix>`` beside ``json/``), then
    ``video/data0613/<prefix>``, where the re-uploaded STAR and CLEVRER clips sit on the main branch (VLMEvalKit
    and lmms-eval look there too)."""
    prefix = TASKS[task][1]
    base = root / "video" if (root / "video").is_dir() else root
    return [base / prefix, root / "video" / "data0613" / prefix]


def video_path(root: Path, task: str, video: str) -> Path | None:
    """The first place holding the video (its file, or its folder of frames), else None."""
    for place in video_places(root, task):
        path = place / video
        if path.is_file() or path.is_dir() or path.with_suffix("").is_dir():
            return path
    return None


def video_source(root: Path, task: str, video: str, frames: int, bound: tuple[float, float] | None,
                 frame_fps: float) -> ImageSource:
    """Where an item's frames come from: a ``FrameFolder`` for a task stored as frame folders or a video given as one
    (its path without the suffix), else ``VideoFrames``."""
    as_folder = TASKS[task][2]
    path = video_path(root, task, video) or video_places(root, task)[0] / video
    if as_folder:
        return FrameFolder(path, frames, bound)
    if not path.is_file() and path.with_suffix("").is_dir():  # pre-extracted frames
        return FrameFolder(path.with_suffix(""), frames, bound, frame_fps)
    return VideoFrames(path, frames, bound)


def mvbench_id(task: str, number: int) -> str:
    """An item's id, ``<task file stem>/<n>`` (n from 1 in the task's JSON list), whether it is answered or skipped."""
    return f"{TASKS[task][0]}/{number}"


def mvbench_item(row: dict[str, Any], root: Path, task: str, number: int, frames: int, frame_fps: float,
                 options: ImageOptions) -> EvalItem:
    """One MVBench example as an item: ``frames`` frames of its video and the candidates as options; BadRowError or
    ImageError if it cannot be used."""
    if "_error" in row:
        raise BadRowError(row["_error"])
    candidates = row["candidates"]
    if not isinstance(candidates, list) or not candidates:
        raise BadRowError(f"candidates {candidates!r} is not a list of option texts")
    texts = [str(c) for c in candidates]
    answer = text_cell(row, "answer")
    if answer not in texts:
        raise BadRowError(f"answer {answer!r} is none of the candidates")
    bound = (float(row["start"]), float(row["end"])) if TASKS[task][3] else None
    source = video_source(root, task, text_cell(row, "video"), frames, bound, frame_fps)
    source.check(options)
    choice = {LETTERS[i]: t for i, t in enumerate(texts)}
    question = "".join([f"Question: {text_cell(row, 'question')}\nOptions:\n",
                        "\n".join(f"({k}) {v}" for k, v in choice.items())])
    prompt = f"{SYSTEM}\n" + f"{IMAGE_TOKEN}\n" * frames + f"{question}\n{INSTRUCTION}"
    item_id = mvbench_id(task, number)
    return EvalItem(item_id, NAME, [source], prompt, LETTERS[texts.index(answer)], options=choice,
                    extra_groups=(f"{NAME}/{task}",))


def read_mvbench(root: Path, report: BadRecordReport, options: ImageOptions, frames: int = 6,
                 frame_fps: float = 3.0) -> list[EvalItem]:
    """Every task's items; FileNotFoundError naming the task files missing under ``root/json`` (a partial MVBench
    is not MVBench). A task none of whose videos can be found is not evaluated (``report.skip_whole``: named, with
    the reason and how to supply them), not counted as bad rows."""
    missing = [f"json/{stem}.json" for stem, *_ in TASKS.values() if not (root / "json" / f"{stem}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{NAME}: {root} lacks {len(missing)} of the 20 task files: {', '.join(missing)}")
    items = []
    for task in TASKS:
        rows = task_rows(root, task)
        videos = [row.get("video") for _, _, row in rows if isinstance(row.get("video"), str)]
        if videos and not any(video_path(root, task, video) for video in videos):
            report.skip_whole(f"{NAME}/{task}", not_found(root, task, len(videos)))
            continue
        items += collect(rows, lambda row, file, n, task=task: mvbench_item(
            row, root, task, n, frames, frame_fps, options), report, lambda row, n, task=task: mvbench_id(task, n))
    return items


def not_found(root: Path, task: str, count: int) -> str:
    """Why a task is not evaluated and how to supply its videos."""
    places = " or ".join(str(place) for place in video_places(root, task))
    reason = f"none of its {count} videos is under {places}"
    if task == "Fine-grained Pose":
        return (f"{reason}: the dataset no longer ships nturgbd.zip (MVBench_videos_ntu.txt lists the NTU RGB+D "
                f"clips, available from the NTU RGB+D authors on request); unpack them under {places.split(' or ')[0]}")
    return f"{reason}: unpack the task's videos there"
