"""Structured configuration: the schema every YAML file under ``conf/`` is validated against.

The dataclasses are registered with Hydra's ConfigStore as ``train_schema``; ``conf/train.yaml`` lists it
first in its defaults, so a misspelt key or a value outside an enum fails when the config is composed.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any, ClassVar, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

Check = tuple[str, Callable[[Any], bool], str]  # key in its group (``*``: every key of a map), test, what it must be
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def _fraction(value: Any) -> bool:
    return 0 <= value <= 1


def _weights(value: Any) -> bool:
    """Weights of a draw: none negative, not all zero."""
    values = list(value.values())
    return all(v >= 0 for v in values) and sum(values) > 0


def _finite_at_least_0(value: Any) -> bool:
    return math.isfinite(value) and value >= 0


def _epochs_or_steps(value: Any) -> bool:
    return value is None or value == -1 or value >= 1


class Checked:
    """A config group whose values have ranges: ``checks`` beside its fields (a subclass adds its own to its
    bases'), checked once a config is composed (``check_values``, run by ``check_keys``); a rule over several
    fields goes in ``problems``."""

    checks: ClassVar[tuple[Check, ...]] = ()

    @classmethod
    def problems(cls, node: Any, path: str) -> list[str]:
        """Each value of ``node`` (this group, at ``path``) outside its range, as ``key=value must be ...``."""
        found = []
        for klass in reversed(cls.__mro__):
            for key, valid, expected in vars(klass).get("checks", ()):
                for name, value in _values(node, key.split("."), path):
                    try:
                        ok = bool(valid(value))
                    except (TypeError, ValueError):
                        ok = False
                    if not ok:
                        found.append(f"{name}={_shown(value)} must be {expected}")
        return found


TRAINER_CHECKS: tuple[Check, ...] = (
    ("trainer.max_epochs", _epochs_or_steps, "null, -1 (no limit) or at least 1 (0 trains nothing)"),
    ("trainer.max_steps", _epochs_or_steps, "-1 (no limit) or at least 1 (0 trains nothing)"),
)


LOADER_CHECKS: tuple[Check, ...] = (  # the training data of DPO (data) and SFT (data of miadpo.sft)
    ("batch_size", lambda v: v >= 1, "at least 1"),
    ("val_fraction", lambda v: 0 <= v < 1, "from 0 to below 1 (1 would leave nothing to train on)"),
    ("num_workers", lambda v: v >= 0, "at least 0"),
)


class _Count(IntEnum):
    """A count used as a map key (images per prompt, questions per grid): an ``int`` everywhere in code, and a key
    that ``key.N=value`` on the command line reaches. OmegaConf keys typed ``int`` refuse the override's string
    ``"N"``; an enum key converts it by name (and YAML's ``N:`` by value), and names the valid counts otherwise."""

    def __str__(self) -> str:
        return str(int(self))

    __format__ = int.__format__


MAX_COUNT = 16
ImageCount = _Count("ImageCount", {str(n): n for n in range(1, MAX_COUNT + 1)})


class Choice(str, Enum):
    """A closed config choice, refused at composition when unknown; a ``str`` that prints as its value
    (``f"{SelectionName.random}"`` is ``random``) and hashes as it, so it reads and keys like the string it
    replaced."""

    def __str__(self) -> str:
        return str(self.value)

    __hash__ = str.__hash__


class SelectionName(Choice):
    """The selection rule (``selection.name``): MIA-DPO's attention rule, or the matched-count random baseline."""

    attention = "attention"
    random = "random"


class NoiseRegion(Choice):
    """Where selection's input noise goes (``selection.noise.<format>.region``)."""

    target = "target"  # the asked-about image, tile or pasted box
    whole = "whole"  # every image, or the whole composed image


class Dtype(Choice):
    """The model's parameter dtype (``model.dtype``)."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class StrategyName(Choice):
    """Lightning's distribution strategy (``strategy.name``; ``conf/strategy/*.yaml`` pick one)."""

    auto = "auto"
    cpu = "cpu"
    ddp = "ddp"
    fsdp = "fsdp"
    deepspeed = "deepspeed"


class CheckpointMode(Choice):
    """Whether the monitored metric is better high or low (``checkpoint.mode``)."""

    max = "max"
    min = "min"


class Nlvr2Split(Choice):
    """The NLVR2 split the evaluation reads (``eval.nlvr2_split``)."""

    dev = "dev"
    test1 = "test1"
    test2 = "test2"


class BadRecordPolicy(str, Enum):
    """What a stage does with a bad record (``on_bad_record``): skip it (counted, logged) or stop with an error."""

    skip = "skip"
    error = "error"


class TooLongPolicy(str, Enum):
    """A pair whose answer overflows the token budget (``data.on_too_long``): answer truncated, or pair skipped."""

    truncate_answer = "truncate_answer"
    skip = "skip"


class LargeImagePolicy(str, Enum):
    """An image above ``max_image_pixels`` (``on_large_image``): downsized to it, or its record a bad record."""

    downsize = "downsize"  # to max_image_pixels, aspect kept (counted and logged)
    skip = "skip"  # the record is a bad record ("image too large")


# Pixel cap of every image loaded (miadpo/data/images.py): well below PIL's decompression-bomb limit (~89 MP).
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# Longest side over shortest side of an image loaded: beyond it, a bad record ("too elongated"). Qwen2-VL's and
# GLM-4V's resize refuse 200; a square canvas (LLaVA's pad-to-square) grows with the long side's square.
DEFAULT_MAX_IMAGE_ASPECT_RATIO = 100.0


class LossType(str, Enum):
    """The preference loss (``dpo.loss``, one ``conf/dpo/*.yaml`` each): DPO, cDPO, rDPO, IPO or a SLiC-style hinge."""

    sigmoid = "sigmoid"
    cdpo = "cdpo"
    robust = "robust"
    ipo = "ipo"
    hinge = "hinge"


class ModelPreparation(str, Enum):
    """What the pipeline does before it loads ``model.path`` (``miadpo.pipeline.prepare_model``)."""

    none = "none"
    toy_base = "toy_base"  # copy the toy base shipped with the package to model.path on first use


class DataPreparation(str, Enum):
    """How a data recipe makes its pairs when ``data.pairs`` is not set (``miadpo.pipeline.prepare_data``)."""

    pairs = "pairs"  # data.pairs is the pair file (required): nothing to make
    synthetic = "synthetic"  # draw the embedded synthetic pairs (data.synthetic)
    select = "select"  # augment data.source, then select pairs with the model
    toy_world = "toy_world"  # generate the toy world's splits (beside data.source) first, then as select


class LoggerName(str, Enum):
    """The training run's logger (``logger.name``): Weights & Biases or a CSV file in the run directory."""

    wandb = "wandb"
    csv = "csv"


@dataclass
class LoraConfig:
    """``model.lora``: whether the model trains LoRA adapters, their rank, alpha and dropout, and where they sit."""

    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # None: the adapter's default (every LLM linear layer except lm_head).
    target_modules: Any = None
    # Parameters (not modules) that also get LoRA, by name suffix (peft's target_parameters): an MoE's fused routed
    # experts, e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj]. None: none.
    target_parameters: list[str] | None = None


@dataclass
class InternLMXC25Options:
    """InternLM-XC2.5 only (``model.internlm_xc25.*``): most 560-px crops per image when the prompt has one image /
    several images."""

    hd_num: int = 24
    hd_num_multi: int = 6


@dataclass
class TinyModelConfig:
    """Sizes of a model built in code with random weights (used when ``model.path`` is null)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    vision_hidden_size: int = 64
    vision_layers: int = 2
    image_size: int = 56
    patch_size: int = 14
    vocab_size: int = 512
    init_seed: int = 0
    # Dynamic-resolution models: most tiles (crops) per image, or max pixels = tiles × image_size² (Qwen).
    max_tiles: int = 4


@dataclass
class ModelConfig:
    """The ``model`` config group (``conf/model/*.yaml``): the weights, family and chat template, what trains (freeze
    switches, LoRA) and the token budget of one sequence."""

    # Every conf/model/*.yaml that is a model names itself; the shared bases (_*.yaml) leave it missing.
    name: str = MISSING
    family: str = "llava"
    # Local directory (or hub id when allow_download) of the weights; null builds the tiny model in code.
    path: str | None = None
    prepare: ModelPreparation = ModelPreparation.none
    allow_download: bool = False
    template: str = "vicuna_v1"
    pad_to_square: bool = True
    attn_implementation: str = "sdpa"
    dtype: Dtype = Dtype.float32
    freeze_vision_tower: bool = True
    freeze_projector: bool = True
    freeze_llm: bool = False
    gradient_checkpointing: bool = False
    # Token budget of one sequence (images included) when a recipe leaves data.max_length null: every model config
    # states one that fits its images at the recipes' largest image count (5).
    max_length: int = 2048
    # Run the tokenizer code shipped in the weights directory (InternLM-XC2.5's InternLM2 tokenizer lives there;
    # the model itself is always ours).
    trust_remote_code: bool = False
    # Options of one family sit under its name; the other families ignore them.
    internlm_xc25: InternLMXC25Options = field(default_factory=InternLMXC25Options)
    lora: LoraConfig = field(default_factory=LoraConfig)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class SyntheticConfig:
    """The embedded default data set: multi-image pairs drawn in code (no download)."""

    num_pairs: int = 96
    min_images: int = 2
    max_images: int = 4
    image_size: int = 64
    seed: int = 0


@dataclass
class SequenceAugmentConfig(Checked):
    """``data.augment.sequence``: the Sequence format's draw of images per prompt."""

    checks = (("n_weights", _weights, "weights ≥ 0, not all zero"),)

    # Weights of N (images per prompt); the reference's split was about 55/16/16/13 %.
    n_weights: dict[ImageCount, float] = field(default_factory=lambda: {2: 0.55, 3: 0.16, 4: 0.16, 5: 0.13})


@dataclass
class GridAugmentConfig(Checked):
    """``data.augment.grid``: the Grid Collage format's images per grid, its cell and label layout, and how many
    records share a grid."""

    checks = (("n_weights", _weights, "weights ≥ 0, not all zero"),
              ("records_per_grid", _weights, "weights ≥ 0, not all zero"),
              ("cell_size", lambda v: v >= 8, "at least 8 pixels"))

    n_weights: dict[ImageCount, float] = field(default_factory=lambda: {n: 1.0 for n in range(2, 10)})
    cell_size: int = 448
    gap: int = 40  # between columns
    band: int = 40  # label band above each row
    font_size: int = 36
    label_x: int = 20  # label start, from the cell's left edge
    # Weights of how many source records share one grid (each asks its own question about its own tile).
    records_per_grid: dict[ImageCount, float] = field(default_factory=lambda: {1: 1.0})


@dataclass
class PipAugmentConfig(Checked):
    """``data.augment.pip``: the Pic-in-Pic format's size of the pasted target."""

    checks = (("scale", lambda v: 0 < v <= 1, "in (0, 1]: the target's size relative to the background"),)

    scale: float = 0.7  # target size relative to the background's width (or height, if too tall)


class NegativeKind(str, Enum):
    """How an image-side negative is made (``data.augment.negatives.kind``; ``none``: no negatives)."""

    none = "none"
    replace = "replace"
    companion = "companion"
    noise = "noise"


@dataclass
class ImageNegativesConfig:
    """Image-side negatives (``rejected_images``): each record's images with only the asked-about image changed.

    ``replace``: the target image (Sequence), tile (Grid), centre picture (Pic-in-Pic) or single image replaced by
    another photograph of the same source with other pixels; ``companion``: replaced by one of the record's own
    other images (a Sequence image or Grid tile, the Pic-in-Pic background; a single image, having none, by another
    photograph as in ``replace``); ``noise``: Gaussian noise of std ``sigma`` on the target region. Drawn per
    (seed, record id)."""

    kind: NegativeKind = NegativeKind.none
    sigma: float = 80.0
    # Same-source photographs drawn as replacements, in order; the first whose pixels differ from the target's
    # is used (a record whose every draw equals its target gets no negative).
    tries: int = 4


@dataclass
class AugmentConfig(Checked):
    """``data.augment``: the augmentation stage's formats, refusal records, image-side negatives, source records
    and workers."""

    checks = (("jpeg_quality", lambda v: 1 <= v <= 100, "from 1 to 100"),
              ("refusal_fraction", _fraction, "from 0 to 1"),
              ("workers", lambda v: v >= 1, "at least 1"),
              ("chunk_size", lambda v: v >= 1, "at least 1"))

    sequence: SequenceAugmentConfig = field(default_factory=SequenceAugmentConfig)
    grid: GridAugmentConfig = field(default_factory=GridAugmentConfig)
    pip: PipAugmentConfig = field(default_factory=PipAugmentConfig)
    # Fraction of extra refusal records (a question about Image{N+1} of an N-image sequence).
    refusal_fraction: float = 0.0
    jpeg_quality: int = 95
    workers: int = 2
    chunk_size: int = 8
    # Retry every skipped composition on the next run (by default only those whose input images changed).
    retry_skipped: bool = False
    # Source of a record (companions are drawn from its source): this field of the record when set; else the first
    # folder of its image path when it is one of known_sources (or any first folder when known_sources is empty);
    # else the whole source file is one source (miadpo/augment/source.py, record_source).
    source_field: str | None = None
    known_sources: list[str] = field(default_factory=lambda: ["coco", "gqa", "ocr_vqa", "textvqa", "vg"])
    # Text-only records (no "image" key, as in LLaVA-665k): counted and skipped; false makes them bad records.
    skip_text_only: bool = True
    # Use only the first N source records (quick runs); null uses all.
    max_records: int | None = None
    negatives: ImageNegativesConfig = field(default_factory=ImageNegativesConfig)


@dataclass
class PairSetConfig:
    """One preference set of a mix (``data.mix``): a pair file (or, with ``columns``, a set of another layout) and
    its weight: the share of its pairs in each epoch (0.5: a seeded half; 2: each pair twice)."""

    pairs: str = MISSING
    columns: Any = None
    weight: float = 1.0


@dataclass
class ImageSourceConfig(Checked):
    """Where a stage's records find their images and what it does with a bad record or image: the settings the
    data recipe (``data``), SFT data and the evaluation set (``eval``) share (``ImageRoots.of``,
    ``ImageOptions.of``). The rules of every image: ``miadpo/data/images.py``."""

    checks = (("max_bad_fraction", _fraction, "from 0 to 1"),
              ("max_image_pixels", lambda v: v is None or v >= 0, "null or at least 0"),
              ("max_image_aspect_ratio", lambda v: v is None or v == 0 or v >= 1, "null, 0 (no limit) or at least 1"))

    # Source photographs; record paths without the composed prefix resolve here.
    image_root: str = "data/images"
    # Derived data and caches; record paths starting with "@out/" resolve here.
    out_dir: str = "data/miadpo"
    # Symlinks inside image_root / out_dir may point anywhere (images/coco -> /mnt/coco); false: refuse them.
    follow_symlinks: bool = True
    # A record with an unusable image or field: skipped (counted, logged) or error; more than max_bad_fraction of
    # them stops the stage.
    on_bad_record: BadRecordPolicy = BadRecordPolicy.skip
    max_bad_fraction: float = 0.01
    # Images above this many pixels are downsized to it (aspect kept) or, with on_large_image=skip, bad records;
    # null: no cap (PIL's decompression-bomb limit still holds).
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    on_large_image: LargeImagePolicy = LargeImagePolicy.downsize
    # Images whose long side is more than this many times the short side are bad records ("too elongated"): a
    # 1×20000 strip would otherwise be padded to a 20000² canvas or refused by the model's resize. null: no limit.
    max_image_aspect_ratio: float | None = DEFAULT_MAX_IMAGE_ASPECT_RATIO


@dataclass
class DataConfig(ImageSourceConfig):
    """The ``data`` config group, a data recipe (``conf/data/*.yaml``): where its pairs come from (a pair file, a
    mix, synthetic pairs, or augmentation and selection), their token budget, validation split and loaders."""

    checks = LOADER_CHECKS

    name: str = "synthetic"
    # LLaVA-format single-image JSON consumed by the augmentation stage.
    source: str | None = None
    # A pair JSONL; when set, training uses it directly; else the recipe's preparation step makes one. With
    # data.columns, a preference set of another layout (a JSONL / JSON / parquet file or a folder of them).
    pairs: str | None = None
    # The layout of data.pairs when it is not miadpo's: a preset (trl: TRL's vision preference layout; rlaif_v:
    # RLAIF-V's columns) or a mapping {id, prompt, chosen, rejected, images} of column names
    # (miadpo/data/preferences.py). null: miadpo's pair file (or the official MIA-DPO release).
    columns: Any = None
    # Several preference sets trained together, each with its weight (instead of data.pairs): miadpo's pairs beside
    # a hub set, e.g. [{pairs: out/pairs.jsonl}, {pairs: /data/rlaif-v, columns: rlaif_v, weight: 0.3}]. Relative
    # image paths of every set resolve under data.image_root; embedded images under data.out_dir.
    mix: list[PairSetConfig] = field(default_factory=list)
    prepare: DataPreparation = DataPreparation.synthetic
    formats: dict[str, float] = field(
        default_factory=lambda: {"sequence": 1.0, "grid": 1.0, "pip": 1.0}
    )
    # Each record's images are decoded when the pairs are read (false: only opened).
    check_images: bool = True
    # Sample pairs (with attention heat maps) in <run_dir>/data_report and the W&B table; 0 = no data report.
    report_samples: int = 8
    val_fraction: float = 0.1
    # Tokens of one sequence (images included); null: the model config's budget (model.max_length).
    max_length: int | None = None
    on_too_long: TooLongPolicy = TooLongPolicy.truncate_answer
    batch_size: int = 4
    num_workers: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class GenerationConfig:
    """``selection.generation``: how the model answers the augmented questions in the selection stage (length,
    sampling, batch size, which records)."""

    max_new_tokens: int = 512
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8
    # Only records whose ground-truth answer is shorter than this (characters) are answered.
    max_answer_chars: int = 512


@dataclass
class NoiseConfig:
    """Gaussian pixel noise before generation (float, clipped); the pair points at the clean image."""

    sigma: float = 0.0
    region: NoiseRegion = NoiseRegion.target


@dataclass
class PostSelectionConfig:
    """``selection.post``: ranges of a selected candidate's perplexity, length ratio and edit similarity outside
    which post-selection drops it (null: no bound)."""

    perplexity_min: float | None = None
    perplexity_max: float | None = None
    # len(rejected) / len(chosen) in tokens
    length_ratio_min: float | None = None
    length_ratio_max: float | None = None
    # normalised edit similarity (rapidfuzz ratio / 100) between chosen and rejected
    edit_similarity_min: float | None = None
    edit_similarity_max: float | None = None


class RightAnswerNegatives(str, Enum):
    """The rejected answer of a pair made from a question the model answers right
    (``selection.right_answer_negatives``; ``none``: no such pairs)."""

    none = "none"
    other_image = "other_image"
    runner_up = "runner_up"


class ExportImagePaths(str, Enum):
    """How image paths are written in ``trl.jsonl`` / ``llamafactory.json`` (``selection.export_image_paths``)."""

    relative = "relative"  # relative to the pair directory (LLaMA-Factory's default media_dir)
    absolute = "absolute"


@dataclass
class SelectionConfig(Checked):
    """The ``selection`` config group (``conf/selection/*.yaml``): which of the model's answers become pairs
    (attention-ratio thresholds, perplexity, noise, post-selection) and how the pairs are exported."""

    checks = (("thresholds.*.*", _fraction, "an attention ratio from 0 to 1"),
              ("min_perplexity", lambda v: v >= 0, "at least 0 (0: no perplexity filter)"))

    name: SelectionName = SelectionName.attention
    # Decoder layer whose attention is read; null = the middle layer.
    layer: int | None = None
    # The reference thresholds of the attention ratio per format and N; N the reference lacked (grid 5, 7, 8)
    # interpolated. Their one copy: conf/selection/*.yaml do not repeat them (a recipe may override some).
    thresholds: dict[str, dict[ImageCount, float]] = field(default_factory=lambda: {
        "sequence": {2: 0.8, 3: 0.7, 4: 0.6, 5: 0.6},
        "grid": {2: 0.7, 3: 0.6, 4: 0.5, 5: 0.45, 6: 0.4, 7: 0.37, 8: 0.33, 9: 0.3},
        "pip": {1: 0.8},
        "single": {1: 1.0},  # one image: the ratio is 1, the attention rule keeps every wrong answer
    })
    operators: dict[str, str] = field(default_factory=lambda: {"sequence": "<=", "grid": "<", "pip": "<",
                                                                "single": "<="})
    min_perplexity: float = 1.1
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    noise: dict[str, NoiseConfig] = field(default_factory=lambda: {
        "sequence": NoiseConfig(0.0, NoiseRegion.target),
        "grid": NoiseConfig(225.0, NoiseRegion.target),
        "pip": NoiseConfig(49.0, NoiseRegion.whole),
    })
    post: PostSelectionConfig = field(default_factory=PostSelectionConfig)
    # Pairs also for the questions the model answers right (pairs otherwise come only from its failures), the
    # rejected answer being, when it differs from the ground truth: other_image — the answer to the same question
    # about another image (Sequence, Grid; the element-interference answer); runner_up — the model's own best
    # answer that starts with another token than its greedy one (any format). One extra answer per such record.
    right_answer_negatives: RightAnswerNegatives = RightAnswerNegatives.none
    save_attention_maps: bool = False
    # Image paths in trl.jsonl / llamafactory.json: relative to the pair directory (survives moving the data
    # tree) or absolute. Not a selection rule: the pair directory is the same either way.
    export_image_paths: ExportImagePaths = ExportImagePaths.relative


@dataclass
class FastPathConfig:
    """Exact speed-ups of the DPO step (each gives the same log-probs as the plain concatenated forward)."""

    # The prompt and images run once per pair; chosen and rejected continue from its key/value cache.
    # Off automatically under gradient checkpointing (which drops the cache).
    shared_prefix: bool = True
    # Frozen vision tower and projector: image features computed once per batch, shared by policy and reference.
    shared_image_features: bool = True
    # Reference log-probs computed once per pair and kept on disk (miadpo/dpo/reference_cache.py): later epochs,
    # resumed runs and sweep jobs read them.
    reference_cache: bool = True
    # How the cache is filled. false: in the first epoch's steps, where the reference is computed anyway (sharing
    # the prompt pass' image features). true: a separate pass before training, so no reference is held while
    # training. null: the pre-pass for full fine-tuning (the in-step reference would be a frozen copy of the whole
    # model in memory) and for dpo.reference_path (another model); in the step with LoRA (the policy with its
    # adapter disabled is the reference, at no memory cost).
    reference_prepass: bool | None = None
    # null: <data.out_dir>/reference_logps
    reference_cache_dir: str | None = None


@dataclass
class DPOConfig(Checked):
    """The ``dpo`` config group (``conf/dpo/*.yaml``): the preference loss, β, the SFT and image-side terms, the
    reference model and the exact speed-ups."""

    checks = (("beta", lambda v: math.isfinite(v) and v > 0, "a positive finite number"),
              ("sft_weight", _finite_at_least_0, "a finite number ≥ 0"),
              ("conditional_weight", _finite_at_least_0, "a finite number ≥ 0"),
              ("anchor_weight", _finite_at_least_0, "a finite number ≥ 0"),
              ("anchor_delta", math.isfinite, "finite"),
              ("collapse_warning_nats", lambda v: v is None or (math.isfinite(v) and v > 0),
               "positive (or null: never warn)"))

    loss: LossType = LossType.sigmoid
    beta: float = 0.1
    # epsilon of cdpo (label smoothing) and robust (assumed label-flip rate).
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    # Weights of the reference model when it is not the policy's starting point (on-policy rounds with the
    # original base as reference); needs dpo.fast.reference_cache. null: the policy's starting weights.
    reference_path: str | None = None
    # Warn (once, with the step) when the policy's mean log-prob per chosen-answer token falls more than this many
    # nats below the reference's: the model is collapsing (e.g. to uniform output). null: never.
    collapse_warning_nats: float | None = 2.0
    # Image-side terms (pairs with rejected_images; data.augment.negatives): the conditional preference of the
    # chosen answer with the original over the negative images, and the anchor on the chosen answer's reward.
    conditional_weight: float = 0.0
    anchor_weight: float = 0.0
    anchor_delta: float = 0.0
    fast: FastPathConfig = field(default_factory=FastPathConfig)

    @classmethod
    def problems(cls, node: Any, path: str) -> list[str]:
        """The ranges, and ε of the losses that read it (cdpo, robust) in [0, 0.5)."""
        found = super().problems(node, path)
        if LossType(node.loss) in (LossType.cdpo, LossType.robust) and not 0 <= node.label_smoothing < 0.5:
            found.append(f"{path}.label_smoothing={node.label_smoothing} must be in [0, 0.5) for "
                         f"{path}.loss={LossType(node.loss).value}")
        return found


@dataclass
class OptimConfig(Checked):
    """The ``optim`` config group (``conf/optim/*.yaml``): AdamW's settings and the warm-up share of the linear
    schedule."""

    checks = (("lr", _finite_at_least_0, "a finite number ≥ 0"),
              ("betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
              ("eps", _finite_at_least_0, "a finite number ≥ 0"),
              ("weight_decay", _finite_at_least_0, "a finite number ≥ 0"),
              ("warmup_ratio", _fraction, "in [0, 1]"))

    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.1

    @classmethod
    def problems(cls, node: Any, path: str) -> list[str]:
        """The ranges, and an lr whose first AdamW step, ``lr / (1 - betas[0])`` (bias-corrected), overflows
        float32: beyond it the optimizer fails mid-run with an overflow that names no setting."""
        found = super().problems(node, path)
        if not found and float(node.lr) / (1 - float(node.betas[0])) > FLOAT32_MAX:
            step = float(node.lr) / (1 - float(node.betas[0]))
            found.append(f"{path}.lr={float(node.lr):g} is too large: AdamW's first step, {path}.lr / (1 - "
                         f"{path}.betas[0]) = {step:.3g}, overflows float32 (max {FLOAT32_MAX:.3g}); DPO learning "
                         "rates are about 1e-6 to 1e-3")
        return found


@dataclass
class LoggerConfig:
    """The ``logger`` config group (``conf/logger/*.yaml``): the training logger and its W&B project, entity,
    mode, tags, group and run name."""

    name: LoggerName = LoggerName.wandb
    project: str = "miadpo"
    entity: str | None = None
    # W&B mode: offline unless WANDB_MODE says otherwise.
    mode: str = "${oc.env:WANDB_MODE,offline}"
    tags: list[str] = field(default_factory=list)
    # W&B run group and name (sweeps set them: one group per sweep, the job's overrides as its name).
    group: str | None = None
    run_name: str | None = None


@dataclass
class StrategyConfig:
    """The ``strategy`` config group (``conf/strategy/*.yaml``): Lightning's distribution strategy and its DDP,
    FSDP or DeepSpeed options."""

    # conf/strategy/: auto, cpu, ddp, fsdp, deepspeed_zero2, deepspeed_zero3
    name: StrategyName = StrategyName.auto
    find_unused_parameters: bool = False
    # FSDP: FULL_SHARD | SHARD_GRAD_OP | NO_SHARD | HYBRID_SHARD (each decoder layer is one FSDP unit)
    sharding_strategy: str = "FULL_SHARD"
    # DeepSpeed ZeRO stage and offloading (GPU only)
    stage: int = 2
    offload_optimizer: bool = False
    offload_parameters: bool = False


@dataclass
class CheckpointConfig:
    """``checkpoint``: when the training run saves Lightning checkpoints and which it keeps."""

    every_n_train_steps: int | None = None
    save_last: bool = True
    save_top_k: int = 1
    # Keep the best checkpoints by a logged metric (e.g. val/rewards/accuracies with mode max); null = the latest.
    monitor: str | None = None
    mode: CheckpointMode = CheckpointMode.max


@dataclass
class BenchmarkDirs:
    """Local directories of the paper's benchmarks as their authors publish them (``miadpo.eval.benchmarks``);
    null: not evaluated."""

    mmmu: str | None = None  # MMMU/MMMU (validation split)
    blink: str | None = None  # BLINK-Benchmark/BLINK (val split)
    mantis_eval: str | None = None  # TIGER-Lab/Mantis-Eval (test split)
    nlvr2: str | None = None  # lil-lab/nlvr's nlvr2/ (eval.nlvr2_split + its image folder)
    mvbench: str | None = None  # OpenGVLab/MVBench (json/ + video/)
    muirbench: str | None = None  # MUIRBENCH/MUIRBENCH (test split)


@dataclass
class EvalConfig(ImageSourceConfig):
    """The ``eval`` config group (``conf/eval/*.yaml``): the evaluation sets (LLaVA-format files, TSVs,
    benchmarks), their limits, and the W&B logging of the results."""

    checks = (("batch_size", lambda v: v >= 1, "at least 1"), ("frames", lambda v: v >= 1, "at least 1"))

    files: list[str] = field(default_factory=list)  # LLaVA-format test files (augmented records too)
    tsv: list[str] = field(default_factory=list)  # VLMEvalKit-style multiple-choice TSVs
    benchmarks: BenchmarkDirs = field(default_factory=BenchmarkDirs)
    nlvr2_split: Nlvr2Split = Nlvr2Split.dev
    frames: int = 6  # MVBench: frames per video (6 × 576 tokens keeps a LLaVA-1.5 prompt inside 4,096)
    frame_fps: float = 3.0  # MVBench videos given as folders of frames: their rate
    # A benchmark read from ``datasets``' Arrow cache where one config's split is cached more than once (two
    # <version>/<hash> folders): the folder to read, by its hash or "<version>/<hash>". null: the newest (by
    # modification time); the others are named in a warning.
    datasets_cache_version: str | None = None
    # Prompt tokens (images included) an item may take; longer ones are skipped and counted. null: the model's
    # context length less max_new_tokens.
    max_length: int | None = None
    progress: bool = True  # a progress bar over the batches
    samples: int = 8  # items (images, question, prediction, answer) in the W&B table of samples
    toy_source: str | None = None  # toy source JSON: classify wrong answers (distractor / in no image)
    batch_size: int = 16
    max_new_tokens: int = 16
    # (ImageSourceConfig) a skipped test record or TSV row is listed under "skipped" in eval.json.
    wandb: bool = False
    wandb_project: str = "miadpo"
    wandb_mode: str = "${oc.env:WANDB_MODE,offline}"


class RoundReference(str, Enum):
    """The reference model of each on-policy round (``rounds.reference``)."""

    round_start = "round_start"  # each round's reference is the policy it starts from
    base = "base"  # every round's reference is the original base model


@dataclass
class RoundsConfig:
    """On-policy rounds: select with the current policy on a fresh augmentation seed, then DPO from it."""

    count: int = 1
    reference: RoundReference = RoundReference.round_start


@dataclass
class TrainConfig(Checked):
    """``python -m miadpo.train``: the whole pipeline (model, data recipe, selection, DPO, training, evaluation,
    rounds)."""

    checks = TRAINER_CHECKS

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    # Picked by the recipe, never by the model config: train.yaml's optim=adamw, data=synthetic's optim=tiny,
    # data=toy's lr, experiment=<name>'s own; optim=<name> on the command line wins.
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Keyword arguments of lightning.Trainer (max_steps, devices, precision, ...).
    trainer: dict[str, Any] = field(default_factory=dict)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    # Evaluated before and after training when eval.files or eval.tsv are set.
    eval: EvalConfig = field(default_factory=EvalConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    seed: int = 42
    run_dir: str = "${hydra:runtime.output_dir}"
    # Resume from a Lightning checkpoint.
    ckpt_path: str | None = None


@dataclass
class AugmentJobConfig:
    """``python -m miadpo.augment``: a dataset recipe and a seed."""

    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 42


@dataclass
class SelectJobConfig(Checked):
    """``python -m miadpo.select``: base model + dataset recipe → candidates → pairs."""

    checks = TRAINER_CHECKS

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    seed: int = 42


@dataclass
class SFTDataConfig(ImageSourceConfig):
    """LLaVA-format files (JSON array or JSONL; single- or multi-image; augmented records too)."""

    checks = LOADER_CHECKS

    files: list[str] = field(default_factory=list)
    max_length: int | None = None  # null: the model config's budget (model.max_length)
    batch_size: int = 8
    val_fraction: float = 0.0
    num_workers: int = 0
    # Each record's images are decoded at load (false: only opened), as data.check_images.
    check_images: bool = True


@dataclass
class SFTJobConfig(Checked):
    """``python -m miadpo.sft``: supervised fine-tuning on the first turn of each record."""

    checks = TRAINER_CHECKS

    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    seed: int = 42
    run_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class EvalJobConfig:
    """``python -m miadpo.evaluate``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Another run's eval.json: each group's accuracy difference (this − that) with a paired bootstrap 95%
    # interval and a McNemar p-value over the items both answered.
    compare: str | None = None
    seed: int = 42
    run_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class GenerateJobConfig:
    """``python -m miadpo.generate``: answer one (multi-image) question with a base, adapter or merged model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    # A peft adapter directory (e.g. <run>/adapter) applied on top of model.path; null = the model alone.
    adapter: str | None = None
    images: list[str] = field(default_factory=list)
    # "<image>" marks where each image goes; without any, "Image{k}: <image>" lines are put before the prompt.
    prompt: str = MISSING
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 42


@dataclass
class VerifyJobConfig:
    """``python -m miadpo.models.verify``: load real weights in our implementation, answer a fixed multi-image
    prompt and, when the checkpoint's original remote code imports here, compare image features and logits."""

    model: ModelConfig = field(default_factory=ModelConfig)
    images: list[str] = field(default_factory=list)  # empty: two drawn images (a wide and a tall one)
    prompt: str = "Image1 <image>; Image2 <image>; Which image shows a red square? Answer briefly."
    # auto: the original model class from the weights directory when model.trust_remote_code=true and it imports,
    # else reported why not; original: the same, but stop when it cannot run; none: skip.
    reference: str = "auto"
    max_new_tokens: int = 16
    # Largest |logit difference| reported as a match (bf16 through 32 layers drifts by a few hundredths).
    atol: float = 0.1
    report: str | None = None  # also write the results as JSON here


def unknown_keys(node: Any, schema: Any, path: str = "") -> list[tuple[str, list[str]]]:
    """Keys of a composed config that ``schema`` (a dataclass or a ``dict[K, V]`` hint) does not have, each with
    the keys it does have at that place. Hydra's ``+key=value`` adds a key even to a structured config; this finds
    it (and a key added by any other route)."""
    if not isinstance(node, DictConfig):
        return []
    if is_dataclass(schema):
        hints = get_type_hints(schema)
        known = [f.name for f in fields(schema)]
        found = [(f"{path}{key}", known) for key in node if key not in hints]
        return found + [bad for key in node if key in hints
                        for bad in unknown_keys(node._get_node(key), hints[key], f"{path}{key}.")]
    if get_origin(schema) is dict:
        value_type = get_args(schema)[1]
        return [bad for key in node for bad in unknown_keys(node._get_node(key), value_type, f"{path}{key}.")]
    return []


def read_only(cfg: DictConfig) -> DictConfig:
    """A read-only copy of a composed config, which each entry runs on: no stage writes into it (each returns what
    it makes)."""
    frozen = cfg.copy()
    OmegaConf.set_readonly(frozen, True)
    return frozen


def check_keys(cfg: DictConfig, schema: type) -> None:
    """Stop, like a typo does, when the composed ``cfg`` has a key its entry's ``schema`` lacks (``+dpo.betta=0.1``):
    every key, its suggestion and the schema class are named."""
    problems = []
    for key, known in unknown_keys(cfg, schema):
        parent, _, name = key.rpartition(".")
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
        problems.append(f"'{key}'{hint}")
    if problems:
        raise ValueError(f"unknown config key{'s' if len(problems) > 1 else ''} {', '.join(problems)}: not in "
                         f"{schema.__name__} (miadpo/config.py). A '+' adds no key to miadpo's configs: every key "
                         "is in the schema, so a key that is not there is a typo.")
    check_values(cfg, schema)


def _values(node: Any, parts: list[str], path: str) -> Iterator[tuple[str, Any]]:
    """(key, value) of every key of ``node`` that ``parts`` (dot-separated, ``*``: every key) names."""
    if not parts:
        yield path, node
        return
    head, rest = parts[0], parts[1:]
    if not isinstance(node, DictConfig | dict):
        return
    keys = list(node.keys()) if head == "*" else [head] if head in node else []
    for key in keys:
        yield from _values(node[key], rest, f"{path}.{key}" if path else str(key))


def _shown(value: Any) -> str:
    """A setting's value as a user writes it (a map as ``{2: 0.0, 3: 0.0}``)."""
    if isinstance(value, DictConfig | dict):
        return "{" + ", ".join(f"{int(k) if isinstance(k, IntEnum) else k}: {v}" for k, v in value.items()) + "}"
    return str(value)


def check_values(cfg: DictConfig, schema: type) -> None:
    """ValueError naming every value of ``cfg`` outside its range: each group's ``Checked.problems``, walking
    ``schema`` (an entry's job config) down its dataclass fields."""
    problems = _problems(cfg, schema, "")
    if problems:
        raise ValueError("settings out of range: " + "; ".join(problems))


def _problems(node: Any, schema: Any, path: str) -> list[str]:
    found = schema.problems(node, path) if isinstance(schema, type) and issubclass(schema, Checked) else []
    if is_dataclass(schema) and isinstance(node, DictConfig):
        hints = get_type_hints(schema)
        for f in fields(schema):
            child = hints[f.name]
            if is_dataclass(child) and f.name in node and node[f.name] is not None:
                found += _problems(node[f.name], child, f"{path}.{f.name}" if path else f.name)
    return found


# The data recipes that make or read users' data, named when the toy recipe is asked to run on it.
OWN_DATA_RECIPES = ("data=pairs (train on a pair file: data.pairs=..., data.image_root=...)",
                    "data=llava, mix, sequence, grid or pip (augment and select from a LLaVA-format data.source)")


def check_recipe(data: DataConfig, model: ModelConfig | None = None) -> None:
    """The toy recipe (``data=toy``, the default: ``data.prepare=toy_world``) runs only as the toy demonstration:
    on a toy world (its pool split and images beside it, wherever it sits), with the toy base. A run that names its
    own data (``data.source``, ``data.image_root``, ``data.pairs``) or model under it stops before anything runs,
    naming the recipes to pick (its lr, epochs, token budget, thresholds and evaluation are the toy world's); so does
    the toy base (the train entry's default model) asked to train on another recipe's data."""
    toy_model = model is not None and ModelPreparation(model.prepare) is ModelPreparation.toy_base
    if DataPreparation(data.prepare) is not DataPreparation.toy_world:
        if toy_model:
            raise ValueError(f"model={model.name} is the toy base, which reads only the toy world, but this run "
                             f"names data={data.name}: name your model, e.g. model=llava15 "
                             "model.path=/models/llava-1.5-7b-hf (README, Models), or model=tiny_llava for a "
                             "random-weight smoke run")
        return
    toy = OmegaConf.load(Path(config_dir()) / "data" / "toy.yaml")
    # A toy world anywhere (python -m miadpo.toyworld.base --out DIR, the tests' small worlds) is laid out as the
    # recipe's: the pool split and its images folder side by side.
    source, image_root = Path(data.source or ""), Path(data.image_root)
    layout = {"source": source.name == Path(toy.source).name,
              "image_root": image_root == source.parent / Path(toy.image_root).name, "pairs": not data.pairs,
              "mix": not data.mix}
    named = [f"data.{key}={getattr(data, key)}" for key, toy_like in layout.items() if not toy_like]
    if model is not None and not toy_model:
        named.append(f"model={model.name}")
    if named:
        raise ValueError(f"data=toy is the toy demonstration (the default recipe), but this run names its own "
                         f"{' and '.join(named)}: the toy recipe's settings (lr, epochs, token budget, selection "
                         f"thresholds, evaluation) are the toy world's. Pick a recipe for your data: "
                         f"{'; or '.join(OWN_DATA_RECIPES)}. The toy recipe itself runs with model=toy_llava.")


# Each entry config (conf/<entry>.yaml) and the schema it is validated against (registered as <entry>_schema).
ENTRY_SCHEMAS: dict[str, type] = {"train": TrainConfig, "augment": AugmentJobConfig, "select": SelectJobConfig,
                                  "sft": SFTJobConfig, "evaluate": EvalJobConfig, "generate": GenerateJobConfig,
                                  "verify": VerifyJobConfig}


def register_configs() -> None:
    """Register each entry's schema (``ENTRY_SCHEMAS``) in Hydra's ConfigStore as ``<entry>_schema``."""
    store = ConfigStore.instance()
    for entry, schema in ENTRY_SCHEMAS.items():
        store.store(name=f"{entry}_schema", node=schema)


def config_dir() -> str:
    """The Hydra config root of every entry point (absolute path).

    From a checkout (running from source or an editable install) it is the repository's ``conf/``, beside the
    package; an installed wheel carries a copy of it as ``miadpo/conf`` (pyproject.toml maps ``conf/`` there).
    """
    package = Path(__file__).resolve().parent
    checkout = package.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf" / "train.yaml").is_file():
        return str(checkout / "conf")
    return str(package / "conf")
