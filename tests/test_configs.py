"""The config hub: every job x objective overlay parses, every README command line parses, and the
overlays' comments are the docstrings of the knobs they set (so they cannot drift)."""

import importlib
import re
import shlex
from pathlib import Path

import docstring_parser
import pytest
import yaml

from bnll_lightning.cli import main
from bnll_lightning.module import SFTModule

ROOT = Path(__file__).parents[1]
JOBS = ["demo.yaml", "math_qwen.yaml"]
OBJECTIVES = sorted((ROOT / "configs" / "objectives").glob("*.yaml"))


def print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("overlay", OBJECTIVES, ids=lambda p: p.stem)
def test_every_objective_overlay_layers_on_every_job(job, overlay, capsys):
    printed = print_config(["--config", str(ROOT / "configs" / job), "--config", str(overlay)], capsys)
    wanted = yaml.safe_load(overlay.read_text())["model"]
    assert printed["model"]["objective"]["class_path"] == wanted["objective"]["class_path"]
    assert printed["model"]["alpha_controller"] == (wanted["alpha_controller"] and printed["model"]["alpha_controller"])
    if wanted["alpha_controller"]:
        assert printed["model"]["alpha_controller"]["class_path"] == wanted["alpha_controller"]["class_path"]
    assert printed["model"]["model"] == yaml.safe_load((ROOT / "configs" / job).read_text())["model"]["model"]


def readme_commands() -> list[list[str]]:
    """Every ``python -m bnll_lightning fit ... --config ...`` line of the README, as arguments."""
    lines = re.findall(r"python -m bnll_lightning fit (--config [^#`\n]*)", (ROOT / "README.md").read_text())
    return [shlex.split(line) for line in lines]


def test_the_readme_shows_overlays():
    assert any(args.count("--config") >= 2 for args in readme_commands())


@pytest.mark.parametrize("args", readme_commands(), ids=" ".join)
def test_every_readme_fit_command_parses(args, capsys):
    args = [a for a in args if a != "--print_config"]
    printed = print_config([str(ROOT / a) if a.startswith("configs/") else a for a in args], capsys)
    assert printed["model"]["model"] and printed["data"]["train"]


def _doc(owner: type) -> dict[str, str]:
    """A class's documented arguments (class and ``__init__`` docstrings), whitespace normalised."""
    params = {}
    for text in (owner.__init__.__doc__, owner.__doc__):  # the constructor's Args first
        for p in docstring_parser.parse(text or "").params:
            params.setdefault(p.arg_name, " ".join((p.description or "").split()))
    return params


def _comments(path: Path) -> dict[tuple[str, ...], str]:
    """``key path -> trailing comment`` for every ``key: value  # comment`` line of a YAML file."""
    out, stack = {}, []
    for line in path.read_text().splitlines():
        m = re.match(r"^(\s*)([A-Za-z_][\w]*):(.*?)(?:\s+#\s*(.*))?$", line)
        if not m or line.lstrip().startswith("#"):
            continue
        depth = len(m.group(1)) // 2
        stack = stack[:depth] + [m.group(2)]
        if m.group(4):
            out[tuple(stack)] = " ".join(m.group(4).split())
    return out


@pytest.mark.parametrize("overlay", OBJECTIVES, ids=lambda p: p.stem)
def test_overlay_comments_are_the_docstrings(overlay):
    config = yaml.safe_load(overlay.read_text())["model"]
    header = overlay.read_text().splitlines()[0]
    classes = {}
    for key in ("objective", "alpha_controller"):
        if config.get(key):
            module, name = config[key]["class_path"].rsplit(".", 1)
            classes[key] = getattr(importlib.import_module(module), name)
    main_class = classes.get("alpha_controller", classes["objective"])
    summary = " ".join(main_class.__doc__.split())
    name, _, text = header.removeprefix("# ").partition(": ")
    assert name == main_class.__name__ and summary.startswith(text), f"{overlay.name}: first line must be '# {main_class.__name__}: {summary}'"
    for keys, comment in _comments(overlay).items():
        if keys[:1] != ("model",):
            continue
        if len(keys) == 2:  # a knob of the module itself
            owner, arg = SFTModule, keys[1]
        else:
            assert keys[2] == "init_args", keys
            owner, arg = classes[keys[1]], keys[3]
        doc = _doc(owner).get(arg)
        assert doc is not None, f"{overlay.name}: {'.'.join(keys)} has no docstring in {owner.__name__}"
        assert doc.startswith(comment), f"{overlay.name}: {'.'.join(keys)}: comment must begin the docstring: {doc!r}"
