"""Config inheritance: every entry config × every option of its groups composes as before the configs inherited.

``tests/fixtures/composed_configs.json`` holds each composition (``OmegaConf.to_container(..., resolve=False)``)
as recorded before the YAML files were rewritten to inherit (``defaults:`` lists inside group files) instead of
copy. Every composition must still equal it, except the intended changes in ``expected`` below, each with its
reason. ``MIADPO_REGEN_CONFIG_FIXTURE=1 pytest tests/test_configs.py`` rewrites the fixture from the configs as
they are (only when a change of a composition is meant; say why in the commit).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from miadpo.config import config_dir, register_configs

CONF = Path(config_dir())
FIXTURE = Path(__file__).parent / "fixtures" / "composed_configs.json"
REGENERATE = os.environ.get("MIADPO_REGEN_CONFIG_FIXTURE") == "1"
TEST_DEFAULTS = ["model=tiny_llava", "data=synthetic"]  # tests/conftest.py: the tests' default job

# The groups each entry config uses (its defaults list; train also composes experiment=<name>).
ENTRY_GROUPS = {
    "train": ["optim", "model", "data", "selection", "trainer", "strategy", "dpo", "experiment", "logger", "eval"],
    "sft": ["optim", "model", "trainer", "strategy"],
    "select": ["model", "data", "selection", "trainer", "strategy"],
    "augment": ["data"],
    "evaluate": ["model", "eval"],
    "generate": ["model"],
    "verify": ["model"],
}
# Entries that train; the others (select, evaluate, generate, verify) have no optim any more.
TRAINING = {"train", "sft"}
# The recipes whose optimizer (and everything else) must be exactly what users got before.
UNCHANGED = [("train", []), ("train", TEST_DEFAULTS), ("train", ["experiment=mia_dpo_internlm_xc25"])]
TRAIN_ONLY_DATA = {"toy", "synthetic"}  # data recipes that set training settings (eval / optim) too
# Issue 18 (the paper's benchmarks): every eval config gains these keys at their defaults, the evaluate entry a
# ``compare`` key and an eval group (eval=none: the same values), and eval=paper is a new option.
EVAL_ADDED = {"benchmarks": {"mmmu": None, "blink": None, "mantis_eval": None, "nlvr2": None, "mvbench": None,
                             "muirbench": None},
              "nlvr2_split": "dev", "frames": 6, "frame_fps": 3.0, "max_length": None, "progress": True, "samples": 8,
              "datasets_cache_version": None, "max_image_aspect_ratio": 100.0}  # issue 35
# Options added after the fixture was recorded.
NEW_OPTIONS = {"eval": ["paper"], "data": ["llava", "pairs"], "experiment": ["mia_dpo_llava15"],
               # issues 33 and 34: the 2026 families, each a weights config and a tiny one
               "model": [f"{prefix}{family}" for prefix in ("", "tiny_")
                         for family in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "internvl3_5", "gemma3",
                                        "gemma4")]
                        + ["glm4_1v", "glm4_5v", "glm4_6v_flash", "tiny_glm4v", "tiny_glm4v_moe", "tiny_glm46v",
                           "minicpm_v4_6", "tiny_minicpm_v4_6"]}
# Issue 31: every model config states its token budget (model.max_length), which data.max_length: null means.
MODEL_BUDGETS = {"toy_llava": 512, "llava15": 4096, "qwen2_vl": 8192, "qwen2_5_vl": 8192, "idefics3": 16384,
                 "smolvlm": 8192, "internvl": 20480, "llava_onevision": 8192, "internlm_xc25": 16384}
TINY_BUDGET = 2048


def is_new(entry: str, overrides: tuple[str, ...] | list[str]) -> bool:
    """Whether a composition exists only since issue 18 (a new option, or a group the entry did not have)."""
    picked = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides}
    return (any(picked.get(g) in new for g, new in NEW_OPTIONS.items())
            or (entry == "evaluate" and "eval" in picked))


def with_later_additions(entry: str, composition: Any) -> Any:
    """The keys added since the fixture was recorded, at their defaults, applied to a recorded composition: issue 18
    (EVAL_ADDED, evaluate's compare), issue 19 (dpo.fast.reference_prepass: null, the old behaviour for full
    fine-tuning; LoRA runs now fill the cache in the step, with the same losses and weights), issue 20 (image-side
    negatives, off: data.augment.negatives and the dpo weights of the conditional and anchor terms at 0)."""
    if isinstance(composition.get("eval"), dict):
        composition["eval"] = {**copy.deepcopy(EVAL_ADDED), **composition["eval"]}
    if entry == "evaluate":
        composition.setdefault("compare", None)
    fast = composition.get("dpo", {}).get("fast") if isinstance(composition.get("dpo"), dict) else None
    if isinstance(fast, dict):
        fast.setdefault("reference_prepass", None)
    if isinstance(composition.get("dpo"), dict):
        for name, default in (("conditional_weight", 0.0), ("anchor_weight", 0.0), ("anchor_delta", 0.0)):
            composition["dpo"].setdefault(name, default)
    data = composition.get("data")
    if isinstance(data, dict) and "max_image_pixels" in data:
        data.setdefault("max_image_aspect_ratio", 100.0)  # issue 35: elongated images are bad records
    if isinstance(data, dict) and isinstance(data.get("augment"), dict):
        data["augment"].setdefault("negatives", {"kind": "none", "sigma": 80.0, "tries": 4})
        data.setdefault("columns", None)  # issue 32: data.pairs in another layout (null: miadpo's)
        data.setdefault("mix", [])  # issue 32: several preference sets with weights (none)
    model = composition.get("model")
    if isinstance(model, dict):  # issue 31: the model's token budget
        model["max_length"] = MODEL_BUDGETS.get(model["name"], TINY_BUDGET)
        # issue 33: InternLM-XC2.5's crop budgets moved under model.internlm_xc25
        model["internlm_xc25"] = {"hd_num": model.pop("hd_num"), "hd_num_multi": model.pop("hd_num_multi")}
        model["lora"].setdefault("target_parameters", None)  # issue 33: LoRA on an MoE's fused experts (none)
    return composition


def options(group: str) -> list[str]:
    """The selectable options of a config group: its YAML files, less the shared bases (``_*.yaml``)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def cases() -> dict[str, list[tuple[str, ...]]]:
    """Per entry, the override lists composed: the defaults, each group option alone (train: also on the tests'
    default job), and for train every model with data=mix and data=synthetic (where the optimizer is decided)."""
    out: dict[str, list[tuple[str, ...]]] = {}
    for entry, groups in ENTRY_GROUPS.items():
        bases = [(), tuple(TEST_DEFAULTS)] if entry == "train" else [()]
        seen: list[tuple[str, ...]] = []
        for base in bases:
            for group, option in [(None, None)] + [(g, o) for g in groups for o in options(g)]:
                overrides = tuple(o for o in base if not o.startswith(f"{group}=")) + ((f"{group}={option}",)
                                                                                       if group else ())
                if overrides not in seen:
                    seen.append(overrides)
        if entry == "train":  # grid / pip / sequence are mix's formats: covered above on toy_llava and tiny_llava
            for model in options("model"):
                for data in ("mix", "synthetic"):
                    pair = (f"model={model}", f"data={data}")
                    if pair not in seen:
                        seen.append(pair)
        out[entry] = seen
    return out


def key(entry: str, overrides: tuple[str, ...] | list[str]) -> str:
    return f"{entry} {' '.join(overrides)}".strip()


def composed(entry: str, overrides: tuple[str, ...] | list[str]) -> Any:
    """The composition as JSON data (int keys become strings, enums their values), or the error's class."""
    try:
        cfg = compose(config_name=entry, overrides=list(overrides))
    except Exception as error:  # a composition that fails is recorded too (it must keep failing)
        return {"__error__": type(error).__name__, "message": str(error).splitlines()[0]}
    return json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=False)))


@pytest.fixture(scope="module")
def hydra_context():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


@pytest.fixture(scope="module")
def fixture(hydra_context) -> dict[str, Any]:
    if REGENERATE:
        data = {"options": {g: options(g) for g in sorted({g for gs in ENTRY_GROUPS.values() for g in gs})},
                "configs": {key(e, o): composed(e, o) for e, cases_ in cases().items() for o in cases_}}
        write_fixture(data)
    return json.loads(FIXTURE.read_text())


def write_fixture(data: dict[str, Any]) -> None:
    """One composition a line (a readable diff when one changes)."""
    lines = [f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(data["configs"].items())]
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text('{"options": ' + json.dumps(data["options"], sort_keys=True) + ',\n"configs": {\n'
                       + ",\n".join(lines) + "\n}}\n")


def choice(overrides: tuple[str, ...] | list[str], group: str, default: str | None) -> str | None:
    picked = [o.split("=", 1)[1] for o in overrides if o.startswith(f"{group}=")]
    return picked[-1] if picked else default


def expected(entry: str, overrides: tuple[str, ...], before: Any, recorded: dict[str, Any]) -> Any:
    """What ``entry overrides`` must compose to now: the recorded composition, with the intended changes."""
    data = choice(overrides, "data", "toy" if entry == "train" else "mix")
    if entry in ("augment", "select") and data == "toy":
        # Issue 31: every entry point composes with every data recipe it can use (this failed). The toy recipe's
        # training part (lr, SFT weight, epochs, evaluation) moved to conf/recipe/train/toy.yaml, picked by
        # miadpo.train only; its selection settings (conf/recipe/toy_selection.yaml) are included by train and
        # select alike. So: the entry's default composition with the default train's toy data (and selection).
        default_train = recorded[key("train", [])]
        before = {**recorded[key(entry, [])], "data": default_train["data"]}
        if entry == "select":
            before["selection"] = default_train["selection"]
    if "__error__" in before:
        return before
    after = copy.deepcopy(before)
    if entry not in TRAINING:
        # The optimizer is unused by selection, evaluation, generation and verification: no optim field or group
        # any more (it was there only because model configs picked the optimizer).
        after.pop("optim", None)
        if entry == "select" and data == "synthetic":
            # data=synthetic (pairs drawn in code, no source to augment or select from: the stage failed at run
            # time) now picks the training optimizer, so only miadpo.train composes it — as data=toy already.
            return {"__error__": "ConfigCompositionException"}
    elif choice(overrides, "experiment", None) is None:
        # The recipe picks the optimizer, not the model config: optim=<name> on the command line, else data=toy's
        # settings (adamw and tiny differ only in lr, which toy sets: unchanged), data=synthetic → tiny (the
        # random-weight smoke job, for any model), and adamw (the entry's default, the paper's) for every other
        # train recipe and for sft. Before, each tiny_*/toy_llava model config picked optim=tiny for itself.
        # experiment=<name> picks its own (unchanged).
        raw = {name: recorded[key("sft", [f"optim={name}"])]["optim"] for name in options("optim")}
        if choice(overrides, "optim", None) is not None or (entry == "train" and data == "toy"):
            pass  # optim=<name> always won over the model's pick; data=toy sets lr over either
        elif entry == "sft":
            after["optim"] = raw["adamw"]
        elif data == "synthetic":
            after["optim"] = raw["tiny"]
        elif data != "toy":
            after["optim"] = raw["adamw"]
    if entry == "augment" and data == "synthetic":
        return {"__error__": "ConfigCompositionException"}  # as select data=synthetic above
    if isinstance(after.get("data"), dict) and after["data"].get("name") in ("mix", "grid", "pip", "sequence",
                                                                              "synthetic") \
            and choice(overrides, "experiment", None) is None:
        after["data"]["max_length"] = None  # issue 31: null, the model's budget (was 4096, synthetic 2048)
    if entry == "sft":
        after["data"]["max_length"] = None  # issue 31: the model's budget (was 2048)
    # Recipes name their preparation steps (issue 17: no entry point branches on a config name): the toy base is
    # copied by model.prepare=toy_base (was: model.name == "toy_llava"); the toy splits by data.prepare=toy_world
    # (was: data.name == "toy"); pairs are drawn (synthetic) or selected (a source recipe) by data.prepare.
    if isinstance(after.get("model"), dict):
        after["model"]["prepare"] = "toy_base" if after["model"].get("name") == "toy_llava" else "none"
    if isinstance(after.get("data"), dict) and entry not in ("sft",):
        after["data"]["prepare"] = {"toy": "toy_world", "synthetic": "synthetic"}.get(after["data"].get("name"),
                                                                                     "select")
    return with_later_additions(entry, after)


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: missing now" for k in a.keys() - b.keys()]
        out += [f"{path}.{k}: new" for k in b.keys() - a.keys()]
        for k in a.keys() & b.keys():
            out += differences(a[k], b[k], f"{path}.{k}")
        return out
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


def normalised(value: Any) -> Any:
    return {"__error__": value["__error__"]} if isinstance(value, dict) and "__error__" in value else value


@pytest.mark.parametrize("entry", list(ENTRY_GROUPS))
def test_every_composition_is_unchanged_but_for_the_intended_changes(entry: str, fixture: dict[str, Any]) -> None:
    recorded = fixture["configs"]
    problems = []
    for overrides in cases()[entry]:
        name = key(entry, overrides)
        if is_new(entry, overrides):
            assert "__error__" not in composed(entry, overrides), name
            continue
        assert name in recorded, f"{name!r} is not in {FIXTURE.name}: regenerate it (MIADPO_REGEN_CONFIG_FIXTURE=1)"
        want = normalised(expected(entry, overrides, recorded[name], recorded))
        got = normalised(composed(entry, overrides))
        if want != got:
            problems.append(f"{name}: " + "; ".join(differences(want, got) or [f"{want} -> {got}"]))
    assert not problems, "\n".join(problems)


def test_the_recipes_that_matter_compose_exactly_as_before(fixture: dict[str, Any], hydra_context) -> None:
    """The default train (toy world), the tests' default job and the paper's experiment: no difference at all,
    their optimizer included, besides the preparation steps the recipes now name (checked here too) and the
    synthetic job's token budget, now the tiny model's (the same 2,048 tokens)."""
    preparations = {(): ("toy_base", "toy_world"), tuple(TEST_DEFAULTS): ("none", "synthetic"),
                    ("experiment=mia_dpo_internlm_xc25",): ("none", "select")}
    for entry, overrides in UNCHANGED:
        now = composed(entry, overrides)
        assert (now["model"].pop("prepare"), now["data"].pop("prepare")) == preparations[tuple(overrides)]
        if tuple(overrides) == tuple(TEST_DEFAULTS):
            assert now["data"]["max_length"] is None and now["model"]["max_length"] == 2048
            now["data"]["max_length"] = 2048
        assert now == with_later_additions(entry, copy.deepcopy(fixture["configs"][key(entry, overrides)])), \
            key(entry, overrides)
    assert composed("train", TEST_DEFAULTS)["optim"]["lr"] == 1.0e-3  # tiny
    assert composed("train", ["experiment=mia_dpo_internlm_xc25"])["optim"]["lr"] == 5.0e-5  # the paper's
    assert composed("train", [])["optim"]["lr"] == 5.0e-4  # the toy recipe's


def test_every_option_is_covered_by_the_fixture(fixture: dict[str, Any]) -> None:
    for group, recorded in fixture["options"].items():
        now = [o for o in options(group) if o not in NEW_OPTIONS.get(group, [])]
        assert now == recorded, f"conf/{group} options changed: regenerate {FIXTURE.name}"


def test_no_model_config_picks_the_optimizer() -> None:
    for path in sorted((CONF / "model").glob("*.yaml")):
        assert "optim" not in path.read_text(), f"{path.name}: the recipe picks the optimizer, not the model"


def content_lines(path: Path) -> list[str]:
    return [line.rstrip() for line in path.read_text().splitlines() if line.strip()]


def test_no_yaml_file_repeats_five_lines_of_another() -> None:
    """A block of ≥ 5 consecutive identical (non-blank) lines in two files is a copy: inherit it instead."""
    block = 5
    files = sorted(CONF.rglob("*.yaml"))
    seen: dict[tuple[str, ...], Path] = {}
    copies = []
    for path in files:
        lines = content_lines(path)
        for i in range(len(lines) - block + 1):
            window = tuple(lines[i:i + block])
            first = seen.setdefault(window, path)
            if first != path:
                copies.append(f"{path.relative_to(CONF)} repeats {first.relative_to(CONF)}: " + " / ".join(window))
    assert not copies, "\n".join(copies)


# The groups whose options are read against a schema class (trainer stays a dict checked against
# lightning.Trainer's signature; experiment files are recipes that pin a paper's settings on purpose).
SCHEMA_OF_GROUP = {"data": "DataConfig", "dpo": "DPOConfig", "optim": "OptimConfig", "selection": "SelectionConfig",
                   "eval": "EvalConfig", "logger": "LoggerConfig", "strategy": "StrategyConfig",
                   "model": "ModelConfig"}


def option_base(group: str, path: Path) -> Any:
    """What an option file starts from: its group's schema defaults, then the options of its own group that its
    ``defaults:`` list names before ``_self_``."""
    import miadpo.config as schemas

    base = OmegaConf.structured(getattr(schemas, SCHEMA_OF_GROUP[group]))
    for entry in OmegaConf.load(path).get("defaults", []):
        if entry == "_self_":
            break
        if isinstance(entry, str):
            parent = CONF / group / f"{entry}.yaml"
            base = OmegaConf.merge(base, option_base(group, parent), own_values(parent))
    return base


def own_values(path: Path) -> Any:
    values = OmegaConf.load(path)
    values.pop("defaults", None)
    return values


def restated(own: Any, base: Any, prefix: str = "") -> list[str]:
    """The leaves of ``own`` whose value ``base`` already holds (``name`` left out: it names the option)."""
    found = []
    for key in own:
        value, path = own._get_node(key), f"{prefix}{key}"
        if path == "name" or key not in base:
            continue
        if OmegaConf.is_dict(value) and len(value) and OmegaConf.is_dict(base._get_node(key)):
            found += restated(value, base._get_node(key), f"{path}.")
        elif OmegaConf.to_container(OmegaConf.create({"v": value}), resolve=False)["v"] == OmegaConf.to_container(
                OmegaConf.create({"v": base._get_node(key)}), resolve=False, enum_to_str=True)["v"]:
            found.append(path)
    return found


def test_each_default_is_stated_once() -> None:
    """An option file states only what differs from its schema's defaults (``miadpo/config.py``) and from the
    options it inherits: the same value in both is a second copy that can drift."""
    copies = []
    for group in SCHEMA_OF_GROUP:
        for path in sorted((CONF / group).glob("*.yaml")):
            copies += [f"{path.relative_to(CONF)}: {key}" for key in restated(own_values(path), option_base(group,
                                                                                                        path))]
    assert copies == []


def test_value_checks_live_on_the_groups_and_are_all_named_at_once(hydra_context) -> None:
    """Each group states its ranges beside its fields (``Checked``); ``check_keys`` walks the entry's schema and
    names every value out of range in one error, from any group (the loss and optimizer settings included)."""
    from miadpo.config import Checked, DataConfig, DPOConfig, OptimConfig, SelectionConfig, TrainConfig, check_keys

    assert all(issubclass(group, Checked) for group in (DataConfig, DPOConfig, OptimConfig, SelectionConfig))
    cfg = compose(config_name="train", overrides=[
        *TEST_DEFAULTS, "dpo.beta=0", "dpo=cdpo", "dpo.label_smoothing=0.5", "optim.betas=[0.9,1.5]",
        "data.batch_size=0", "selection.thresholds.grid.4=1.5", "trainer.max_steps=0", "eval.frames=0"])
    with pytest.raises(ValueError) as raised:
        check_keys(cfg, TrainConfig)
    named = [part.split("=")[0] for part in str(raised.value).removeprefix("settings out of range: ").split("; ")]
    assert sorted(named) == ["data.batch_size", "dpo.beta", "dpo.label_smoothing", "eval.frames", "optim.betas",
                             "selection.thresholds.grid.4", "trainer.max_steps"]
    from miadpo.config import SFTJobConfig  # the SFT entry's data has the same loader ranges

    with pytest.raises(ValueError, match=r"^settings out of range: data\.batch_size=0 must be at least 1$"):
        check_keys(compose(config_name="sft", overrides=["data.batch_size=0"]), SFTJobConfig)
    huge = OptimConfig.problems(OmegaConf.structured(OptimConfig(lr=1e38)), "optim")
    assert len(huge) == 1 and "overflows float32" in huge[0]
