"""Command line: LightningCLI for fit/validate/test, plus the project's own subcommands.

    python -m bnll_lightning fit --config configs/demo.yaml
    python -m bnll_lightning fit --config configs/demo.yaml --print_config
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI

from bnll_lightning.data import SFTDataModule
from bnll_lightning.module import SFTModule

TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"
AUTO_NAME = "auto"


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


def load_from_config(argv: list[str], cli_class: type[SFTCLI] = SFTCLI) -> SFTCLI:
    """Parse a ``fit`` config and instantiate model, data and trainer without running anything.

    For subcommands that reuse the training config (``probe``, ``evaluate``): pass a subclass
    of ``SFTCLI`` whose ``add_arguments_to_parser`` adds their own options; read them from
    ``cli.config``.
    """
    return cli_class(args=argv, run=False)


# Subcommands beyond Lightning's fit/validate/test/predict: name -> "module:function(argv)".
EXTRA_COMMANDS = {
    "probe": "bnll_lightning.probe:main",
    "evaluate": "bnll_lightning.evaluate:main",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        module_name, function = EXTRA_COMMANDS[argv[0]].split(":")
        getattr(importlib.import_module(module_name), function)(argv[1:])
        return
    SFTCLI(args=argv)
