"""Command line: LightningCLI for fit/validate/test, plus the project's own subcommands.

    python -m bnll_lightning fit --config configs/demo.yaml
    python -m bnll_lightning fit --config configs/demo.yaml --print_config
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from bnll_lightning.callbacks import StepProgressBar
from bnll_lightning.data import DataError, SFTDataModule
from bnll_lightning.module import SFTModule

TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"
AUTO_NAME = "auto"
DEBUG_ENV = "BNLL_DEBUG"  # set to 1 for full tracebacks instead of one-line errors


class ConfigError(ValueError):
    """A config value that parses but that a class rejects when it is built."""


def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def run_name(model_config: Any) -> str:
    """A log-directory name that tells runs apart by objective, e.g. ``AlphaFamily-alpha10.0``.

    Built from the config (before anything is instantiated), so it needs no model.
    """
    objective = model_config.get("objective")
    if not objective:
        name = "NLL"
    else:
        name = _short(objective["class_path"])
        args = objective.get("init_args") or {}
        if "alpha" in args and name == "AlphaFamily":
            name += f"-alpha{float(args['alpha'])}"
        for key in ("tau", "fraction", "gamma"):
            if key in args:
                name += f"-{key}{float(args[key])}"
    controller = model_config.get("alpha_controller")
    if controller:
        name = f"{_short(controller['class_path'])}-{name}"
    return name


class SFTCLI(LightningCLI):
    """LightningCLI wired for SFT: the module's tokenizer is handed to the data module."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # the module injects its own optimizer
        kwargs.setdefault(
            "trainer_defaults",
            {"logger": {"class_path": TENSORBOARD, "init_args": {"save_dir": "runs", "name": AUTO_NAME}}},
        )
        # Parse errors are raised (not printed with the whole usage): main() reports them in one line.
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})
        super().__init__(SFTModule, SFTDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("model.tokenizer", "data.tokenizer", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        logger = config.get("trainer", {}).get("logger")
        loggers = logger if isinstance(logger, list) else [logger]
        for item in loggers:
            if isinstance(item, dict) or hasattr(item, "get"):
                if item.get("class_path") == TENSORBOARD and item.get("init_args", {}).get("name") == AUTO_NAME:
                    item["init_args"]["name"] = run_name(config["model"])
                resuming = self.subcommand == "fit" and config.get("ckpt_path") == "last"
                if resuming and item.get("class_path") == TENSORBOARD:
                    _continue_last_version(item["init_args"])

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer, with :class:`StepProgressBar` as its progress bar unless the config names one
        or turns the bar off."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, StepProgressBar()])
        return super().instantiate_trainer(**kwargs)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except DataError:
            raise
        except ValueError as err:  # a class of ours rejected a value of the config: one line
            cause = _root_cause(err)
            if not _raised_by_us(cause):
                raise  # a ValueError from inside torch or transformers is a bug or their message: keep its trace
            raise ConfigError(str(cause)) from err


def _raised_by_us(err: BaseException) -> bool:
    """Whether ``err`` was raised by this package's validation (or by jsonargparse's own checks)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename if tb is not None else ""
    return any(f"{os.sep}{pkg}{os.sep}" in where for pkg in ("bnll_lightning", "jsonargparse"))


def _root_cause(err: BaseException) -> BaseException:
    """The innermost ValueError of ``err``'s cause chain: jsonargparse wraps a class's own complaint
    ("low must be < high") in its union bookkeeping ("Does not validate against any of the Union
    subtypes"), and the complaint is what the user can act on."""
    while isinstance(err.__cause__, ValueError):
        err = err.__cause__
    return err


def _continue_last_version(logger_args: Any) -> None:
    """``fit --ckpt_path last``: log into the newest ``version_N`` that holds a ``checkpoints/last*.ckpt``.

    Lightning looks for "last" in the checkpoint directory of *this* run's logger; a fresh
    auto-numbered version would have none, and the run would silently start over. Continuing
    the version also keeps one TensorBoard curve per run.
    """
    if logger_args.get("version") is not None:
        return
    root = Path(str(logger_args.get("save_dir") or "runs")) / str(logger_args.get("name") or "")
    versions = [
        int(p.name[len("version_"):])
        for p in root.glob("version_*")
        if p.name[len("version_"):].isdigit() and any((p / "checkpoints").glob("last*.ckpt"))
    ]
    if versions:
        logger_args["version"] = max(versions)


def load_from_config(argv: list[str], cli_class: type[SFTCLI] = SFTCLI) -> SFTCLI:
    """Parse a ``fit`` config and instantiate model, data and trainer without running anything.

    For subcommands that reuse the training config (``probe``, ``evaluate``): pass a subclass
    of ``SFTCLI`` whose ``add_arguments_to_parser`` adds their own options; read them from
    ``cli.config``.
    """
    with warnings.catch_warnings():
        # ``python -m bnll_lightning evaluate ...`` passes its own argv on purpose; sys.argv also has one.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return cli_class(args=argv, run=False)


# Subcommands beyond Lightning's fit/validate/test/predict: name -> "module:function(argv)".
EXTRA_COMMANDS = {
    "probe": "bnll_lightning.probe:main",
    "evaluate": "bnll_lightning.evaluate:main",
}


# Lines of a jsonargparse error that describe its structure rather than what is wrong.
_STRUCTURE = re.compile(
    r"(Does not validate against|Subtypes:|Errors:|- Problem with given class_path|- Expected a|Given value)"
)


_NO_ATTRIBUTE = re.compile(r"module '([\w.]+)' has no attribute '(\w+)'")


def _no_such_class(match: re.Match) -> str:
    """"module M has no attribute X" (a class_path typo) as what to write instead."""
    module_name, name = match.groups()
    module = importlib.import_module(module_name)
    classes = {k: v for k, v in vars(module).items()
               if inspect.isclass(v) and v.__module__ == module_name and not k.startswith("_")}  # fmt: skip
    # The classes a config can name are those built on a base of the same module (objectives on Objective).
    usable = [k for k, v in classes.items() if any(v is not b and issubclass(v, b) for b in classes.values())]
    return f"no class {name} in module {module_name}; it has: {', '.join(sorted(usable or classes))}"


def one_line(error: BaseException) -> str:
    """A parse error's message in one line: the option's dotted key and the innermost reason."""
    error = _root_cause(error)
    lines = [_NO_ATTRIBUTE.sub(_no_such_class, line.strip()) for line in str(error).strip().splitlines() if line.strip()]
    keys, reason = [], None
    for line in lines:
        if match := re.fullmatch(r'Parser key "([^"]+)":?', line):
            keys.append(match.group(1))
        elif reason is None and not _STRUCTURE.match(line):
            reason = line  # the innermost complaint, past jsonargparse's union bookkeeping
    if keys and reason:
        return f"{'.'.join(keys)}: {reason}"
    return " ".join(lines) if len(lines) <= 3 else f"{lines[0]} ... ({DEBUG_ENV}=1 for details)"


def main(argv: list[str] | None = None) -> None:
    """Entry point. Bad data, an invalid config value or a bad option exits with code 2 and one
    line on stderr; a run stopped by NaN/Inf losses exits with 1. ``BNLL_DEBUG=1`` re-raises
    with the traceback instead."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in EXTRA_COMMANDS:
            module_name, function = EXTRA_COMMANDS[args[0]].split(":")
            getattr(importlib.import_module(module_name), function)(args[1:])
            return
        SFTCLI(args=argv)  # None: LightningCLI reads sys.argv itself
    except (DataError, ConfigError, argparse.ArgumentError) as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        kind = "data" if isinstance(err, DataError) else "config"
        print(f"bnll_lightning: {kind} error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as err:  # model.max_nonfinite_steps NaN/Inf steps in a row
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"bnll_lightning: training stopped: {err}", file=sys.stderr)
        sys.exit(1)
