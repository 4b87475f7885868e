"""The package as users install it: the built wheel (code, configs, console scripts) and the installed scripts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from conftest import REPO

SCRIPTS = {
    "miadpo-augment": "miadpo.augment.__main__:main",
    "miadpo-select": "miadpo.select.__main__:main",
    "miadpo-train": "miadpo.train:main",
    "miadpo-sft": "miadpo.sft:main",
    "miadpo-evaluate": "miadpo.evaluate:main",
    "miadpo-generate": "miadpo.generate:main",
    "miadpo-merge": "miadpo.merge:main",
    "miadpo-verify": "miadpo.models.verify:main",
}
# The Hydra entry points, composed from the unpacked wheel with one group override each.
HYDRA_ENTRIES = {
    "miadpo.train": "model=tiny_llava",
    "miadpo.augment.__main__": "data=grid",
    "miadpo.select.__main__": "model=tiny_llava",
    "miadpo.sft": "model=tiny_llava",
    "miadpo.generate": "model=tiny_llava",
    "miadpo.models.verify": "model=tiny_llava",
    "miadpo.evaluate": "model=tiny_llava",
}
# Every test here builds the wheel or starts the installed scripts (subprocesses): slow.
pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")


def checkout_files(folder: str, pattern: str) -> set[str]:
    return {p.relative_to(REPO / folder).as_posix() for p in (REPO / folder).rglob(pattern)
            if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the checkout (setuptools writes build/ next to the sources)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    for folder in ("miadpo", "conf"):
        shutil.copytree(REPO / folder, source / folder, ignore=IGNORED)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-v",
                           "-w", str(root / "dist")], cwd=source, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # A folder of configs or code left out of pyproject's package list ("Package would be ignored").
    assert "absent from the `packages` configuration" not in proc.stdout + proc.stderr
    (built,) = (root / "dist").glob("miadpo-*.whl")
    return built


@pytest.fixture(scope="module")
def unpacked(wheel: Path) -> Path:
    target = wheel.parent.parent / "unpacked"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


def test_wheel_carries_the_code_the_configs_and_every_console_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_file,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entries = archive.read(entry_file).decode()
    assert {f"miadpo/{p}" for p in checkout_files("miadpo", "*.py")} <= names
    assert {f"miadpo/conf/{p}" for p in checkout_files("conf", "*.yaml")} <= names
    assert "miadpo/toyworld/base_model/model.safetensors" in names and "miadpo/py.typed" in names
    listed = dict(line.split(" = ") for line in entries.split("[console_scripts]")[1].strip().splitlines())
    assert listed == SCRIPTS


@pytest.fixture(scope="module")
def composed(unpacked: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """``--cfg job`` of every Hydra entry point run from the unpacked wheel, in one process whose working
    directory is outside the checkout: entry module → (its file, what it printed)."""
    # -S: no site-packages .pth files, so the editable install of this checkout cannot supply any module; the
    # environment's packages come from its site-packages directory on PYTHONPATH, after the unpacked wheel.
    program = "\n".join([
        "import importlib, sys",
        "import miadpo, miadpo.config",
        "print('PATHS', list(miadpo.__path__), miadpo.config.config_dir())",
        "for name, override in zip(sys.argv[1::2], sys.argv[2::2]):",
        "    module = importlib.import_module(name)",
        "    print('MODULE', name, module.__file__, flush=True)",
        "    sys.argv = ['miadpo-x', '--cfg', 'job', override]",
        "    try:",
        "        module.main()",
        "    except BaseException as error:",
        "        print('FAILED', name, repr(error), flush=True)",
        "    print('END', name, flush=True)",
    ])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(unpacked), sysconfig.get_paths()["purelib"]]),
           "WANDB_MODE": "offline"}
    arguments = [word for entry in HYDRA_ENTRIES.items() for word in entry]
    proc = subprocess.run([sys.executable, "-S", "-c", program, *arguments], cwd=tmp_path_factory.mktemp("cwd"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = proc.stdout.split("PATHS ", 1)[1].splitlines()[0]
    assert str(REPO) not in paths and f"{unpacked / 'miadpo' / 'conf'}" in paths
    results = {}
    for name in HYDRA_ENTRIES:
        section = proc.stdout.split(f"MODULE {name} ", 1)[1].split(f"END {name}", 1)[0]
        module_file, printed = section.split("\n", 1)
        results[name] = (module_file, printed + proc.stderr[-1500:] * ("FAILED" in printed))
    return results


@pytest.mark.parametrize("entry", HYDRA_ENTRIES)
def test_the_wheel_composes_its_entry_config_outside_the_checkout(composed: dict[str, tuple[str, str]], unpacked: Path,
                                                                 entry: str) -> None:
    module_file, printed = composed[entry]
    assert Path(module_file).is_relative_to(unpacked), module_file
    assert "FAILED" not in printed, printed[-3000:]
    group, choice = HYDRA_ENTRIES[entry].split("=")
    # the group's block names the choice (its keys in schema order: the shared image settings come first)
    assert re.search(rf"^{group}:\n(?:  .*\n)*?  name: {choice}\n", printed, re.MULTILINE), printed[-2000:]


def test_every_console_script_is_installed_and_resolves_to_a_callable() -> None:
    installed = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("miadpo-")}
    assert {name: ep.value for name, ep in installed.items()} == SCRIPTS
    for name, ep in installed.items():
        assert callable(ep.load()), name
        assert (BIN / name).is_file(), f"{name} is not in {BIN}: pip install -e ."
    proc = subprocess.run([str(BIN / "miadpo-augment"), "--cfg", "job", "data=grid"], cwd=Path("/"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data:" in proc.stdout and "name: grid" in proc.stdout


@pytest.mark.parametrize(("script", "line", "expected"), [
    ("miadpo-train", "miadpo-train dpo=", {"dpo=sigmoid", "dpo=ipo"}),
    ("miadpo-augment", "miadpo-augment data=", {"data=grid", "data=sequence"}),
])
def test_tab_completion_of_the_console_scripts(tmp_path: Path, script: str, line: str, expected: set[str]) -> None:
    """What the README documents: eval "$(miadpo-<name> -sc install=bash)", then <TAB> completes overrides."""
    shell = "\n".join([
        f'eval "$({script} -sc install=bash)"',
        f'COMP_LINE="{line}"',
        "COMP_POINT=${#COMP_LINE}",
        "COMP_CWORD=1",
        "hydra_bash_completion",
        "complete -p " + script,
        'printf "%s\\n" "${COMPREPLY[@]}"',
    ])
    env = {**os.environ, "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", shell], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"-F hydra_bash_completion {script}" in proc.stdout
    assert expected <= set(proc.stdout.split())
