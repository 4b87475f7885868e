"""Every ``python -m miadpo.*`` command of the README composes, in process (Hydra's compose API), and a command that
names its own data or model composes nothing of the toy recipe (issue 31). The bare default is the toy recipe.

Commands are read from the README's code blocks (``\\`` continuations joined, ``# ...`` comments dropped) and its
inline code spans. ``...`` stands for the arguments of the command above and is dropped; placeholders such as
``/data/...`` are plain values to compose, ``<run>`` becomes ``run``. Modules that are not Hydra entry points
(``miadpo.merge``, ``miadpo.select.calibrate``, ``miadpo.toyworld.base``) take their own arguments and are only
checked to exist.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from miadpo.config import ENTRY_SCHEMAS, check_keys, check_recipe, config_dir, register_configs

README = Path(__file__).resolve().parent.parent / "README.md"
# The Hydra entry points by module: their entry config and schema.
ENTRIES = {f"miadpo.{'models.' if name == 'verify' else ''}{name}": (name, schema)
           for name, schema in ENTRY_SCHEMAS.items()}
# The toy recipe's files, as the config-group choices that load them.
TOY_CHOICES = {"data": "toy", "eval": "toy", "model": "toy_llava", "recipe/train": "toy", "recipe/select": "toy"}
OWN_DATA_KEYS = ("data.pairs", "data.source", "data.image_root")


def readme_commands(text: str) -> list[str]:
    """The ``python -m miadpo.*`` commands of a README: code-block lines (continuations joined) and inline spans."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("python -m miadpo"):
                commands.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += [span.strip() for span in re.findall(r"`(python -m miadpo\.\w[\w.]*(?: [^`]*)?)`", prose)]
    return commands


def overrides_of(command: str) -> tuple[str, list[str], str | None]:
    """(module, Hydra overrides, ``--config-name`` or None) of a command; ``...`` and Hydra's other flags
    (``-sc install=bash``) are dropped, a ``<placeholder>`` becomes its name (what a user types in its place), and a
    multirun's sweep ``key=a,b`` composes its first job (``key=a``)."""
    tokens = shlex.split(re.sub(r"<([\w.-]+)>", r"\1", command))
    module, args, overrides = tokens[2], tokens[3:], []
    multirun = any(token in ("-m", "--multirun") for token in args)
    config_name, flag = None, None
    for token in args:
        if flag is not None:
            config_name = token if flag in ("-cn", "--config-name") else config_name
            flag = None
        elif token in ("-sc", "--shell-completion", "-cd", "--config-dir", "-cn", "--config-name"):
            flag = token
        elif token.startswith("-") or token == "...":
            continue
        elif multirun and re.fullmatch(r"[\w.]+=[^\[{(\"']+,.+", token):
            overrides.append(token.split(",", 1)[0])
        else:
            overrides.append(token)
    return module, overrides, config_name


def names_own_data_or_model(overrides: list[str]) -> bool:
    for override in overrides:
        key, _, value = override.partition("=")
        if key in OWN_DATA_KEYS or (key == "data" and value != "toy") or (key == "model" and value != "toy_llava"):
            return True
    return False


COMMANDS = readme_commands(README.read_text())


def test_the_readme_has_the_commands_this_test_reads() -> None:
    modules = {overrides_of(c)[0] for c in COMMANDS}
    assert {"miadpo.train", "miadpo.augment", "miadpo.select", "miadpo.sft", "miadpo.evaluate", "miadpo.generate",
            "miadpo.models.verify"} <= modules, modules
    assert len(COMMANDS) >= 30


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_composes_without_toy_values_when_it_names_its_own(command: str) -> None:
    module, overrides, config_name = overrides_of(command)
    if module not in ENTRIES:
        assert importlib.util.find_spec(module) is not None, f"{command}: no module {module}"
        return
    name, schema = ENTRIES[module]
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name=config_name or name, overrides=overrides, return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    check_keys(cfg, schema)
    if names_own_data_or_model(overrides):
        toy = {group: option for group, option in TOY_CHOICES.items() if choices.get(group) == option}
        assert not toy, f"{command}: names its own data or model, yet composes the toy recipe's {toy}"
        if name in ("train", "select", "augment"):  # the entries with data recipes
            check_recipe(cfg.data, cfg.model if "model" in cfg else None)


def test_the_bare_default_is_the_toy_recipe() -> None:
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True)
    assert {g: cfg.hydra.runtime.choices.get(g) for g in ("data", "eval", "model", "recipe/train")} == \
        {"data": "toy", "eval": "toy", "model": "toy_llava", "recipe/train": "toy"}


def test_the_check_catches_a_command_that_keeps_the_toy_recipe() -> None:
    """The check itself: the README's old own-data command (no data=pairs) composes the toy recipe's files."""
    old = ("python -m miadpo.train data.pairs=/data/pairs.jsonl data.image_root=/data/images model=llava15 "
           "model.path=/models/llava-1.5-7b-hf trainer=gpu")
    with pytest.raises(AssertionError, match="composes the toy recipe"):
        test_every_readme_command_composes_without_toy_values_when_it_names_its_own(old)
