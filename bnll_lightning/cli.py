"""Command line: LightningCLI for fit/validate/test, and every subcommand of the project (probe, evaluate, study, compare).

    python -m bnll_lightning fit --config configs/demo.yaml
    python -m bnll_lightning fit --config configs/demo.yaml --print_config
    python -m bnll_lightning probe --config configs/demo.yaml [--output report.json] [--max_batches N]
    python -m bnll_lightning evaluate --config configs/demo.yaml [--ckpt_path path.ckpt] [--output preds.jsonl] ...
    python -m bnll_lightning study --config configs/demo.yaml [--objectives nll dft ...] [--seeds 3] [--val_rows 200]
    python -m bnll_lightning compare runs/demo/NLL runs/demo/DFT [--step N] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import shlex
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, Optional, Union

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from bnll_lightning import compare, console, disk, study
from bnll_lightning.study_args import add_study_arguments, study_help
from bnll_lightning.callbacks import GenerationEval, StepProgressBar
from bnll_lightning.checkpoint_io import DirectCheckpointIO
from bnll_lightning.constraints import ConfigError
from bnll_lightning.data import SFTDataModule
from bnll_lightning.evaluate import CHECKERS, GenerationArgs, evaluate_generation, write_jsonl
from bnll_lightning.export import ExportFailed, unwritable_reason
from bnll_lightning.models import load_checkpoint_weights
from bnll_lightning.module import SFTModule
from bnll_lightning.probe import REPORT_KEYS, format_report, probe
from bnll_lightning.signals import EXIT_CODE, Preempted
from bnll_lightning.sources import DataError
from bnll_lightning.strategies import is_sharded
from bnll_lightning.tasks import TASKS

TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"
AUTO_NAME = "auto"
DEBUG_ENV = "BNLL_DEBUG"  # set to 1 for full tracebacks instead of one-line errors


def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def run_name(model_config: Any) -> str:
    """A log-directory name that tells runs apart by objective, e.g. ``AlphaFamily-alpha10.0``: the
    objective's own :attr:`~bnll_lightning.objectives.Objective.tag`, built from the config before
    the model is (an objective is cheap to build; one that rejects its arguments is named by its
    class here and reported when the model is built)."""
    objective = model_config.get("objective")
    name = "NLL"
    if objective:
        module, cls = objective["class_path"].rsplit(".", 1)
        try:
            name = getattr(importlib.import_module(module), cls)(**(objective.get("init_args") or {})).tag
        except (TypeError, ValueError):
            name = cls
    controller = model_config.get("alpha_controller")
    if controller:
        name = f"{_short(controller['class_path'])}-{name}"
    return name


class SFTCLI(LightningCLI):
    """LightningCLI wired for SFT: the module's tokenizer is handed to the data module."""

    module_class: type[SFTModule] = SFTModule  # the study's subclass copies one in-memory base model

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # the module injects its own optimizer
        kwargs.setdefault(
            "trainer_defaults",
            {"logger": {"class_path": TENSORBOARD, "init_args": {"save_dir": "runs", "name": AUTO_NAME}}},
        )
        # Parse errors are raised (not printed with the whole usage): main() reports them in one line.
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})
        # Seed 0 unless the config says otherwise: Lightning's default (True) seeds 0 too, warning "No seed found".
        kwargs.setdefault("seed_everything_default", 0)
        super().__init__(self.module_class, SFTDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("model.tokenizer", "data.tokenizer", apply_on="instantiate")
        # Not --verbose: Trainer.validate/test have a verbose argument of their own.
        parser.add_argument("--verbosity", type=Literal["short", "all"], default="short",
                            help="short: a header, the training bar, one line per validation and a summary; all: "
                                 "also all that Lightning and transformers print (devices, the model summary, "
                                 "loading and validation bars, every metric on the bar).")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        # Here, before LightningCLI seeds and builds anything, so that its output is quiet too.
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand, self.config) if subcommand else self.config
        self._verbose = config.get("verbosity") == "all"
        if not self._verbose:
            console.quiet()  # main() restores

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
        if self.subcommand == "fit":
            _check_output_dirs(config)
        self._data_read = _read_data(config)  # a data error before the model loads (15-30 s)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer, with :class:`StepProgressBar` as its progress bar unless the config names one
        or turns the bar off (stdout not a terminal, unless ``--verbosity all``: the bar disabled and
        :class:`~bnll_lightning.console.StepLines` printing its values as plain lines), checkpoints written by
        :class:`~bnll_lightning.checkpoint_io.DirectCheckpointIO` unless the config's plugins name a checkpoint IO,
        and for fit the console's header, validation lines and summary."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            bar, lines = StepProgressBar(validation_bars=self._verbose), []
            # In a file tqdm's \r redraws join into lines of thousands of characters (--verbosity all: Lightning's own).
            if not console.terminal() and not self._verbose:
                bar.disable()
                lines = [console.StepLines()]
            kwargs.setdefault("callbacks", [*callbacks, bar, *lines])
        if not self._verbose and config.get("enable_model_summary") is None:
            kwargs.setdefault("enable_model_summary", False)  # a table (rich's when installed), not a log line
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # a config's own checkpoint IO is kept
            kwargs.setdefault("plugins", [*plugins, DirectCheckpointIO()])
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "fit":
            trainer.callbacks.append(console.ConsoleReport())
        log_dir = getattr(trainer.logger, "log_dir", None)
        if log_dir and not os.path.exists(log_dir):
            trainer.callbacks.append(_RemoveLogDirIfNothingRan(log_dir))
        return trainer

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (DataError, ConfigError):
            raise
        except ValueError as err:  # a class of ours rejected a value of the config: one line
            cause = _root_cause(err)
            if not _raised_by_us(cause):
                raise  # a ValueError from inside torch or transformers is a bug or their message: keep its trace
            raise ConfigError(str(cause)) from err
        if self._data_read is not None and self.datamodule is not None:
            self.datamodule.use_rows_of(self._data_read)


class _RemoveLogDirIfNothingRan(Callback):
    """Bad input found once fit has begun (data that needs the tokenizer, packing refused) leaves no empty
    ``version_N`` behind: Lightning creates the folder before the data module's and the model's setup."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = os.path.abspath(log_dir)
        self.existed = self.log_dir  # the nearest folder above it that is there before fit
        while not os.path.exists(self.existed):
            self.existed = os.path.dirname(self.existed)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if isinstance(exception, (DataError, ConfigError)) and trainer.global_step == 0 and trainer.is_global_zero:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            parent = os.path.dirname(self.log_dir)
            while parent != self.existed and len(parent) > len(self.existed) and not os.listdir(parent):
                os.rmdir(parent)  # the run name's folder, made for this version
                parent = os.path.dirname(parent)


def _read_data(config: Any) -> SFTDataModule | None:
    """The config's data module with its rows read, before any model loads (None: data settings that its
    ``__init__`` rejects, which are reported with their option when the classes are built)."""
    data = config.get("data")
    if data is None:
        return None
    args = {k: v for k, v in (data.as_dict() if hasattr(data, "as_dict") else dict(data)).items() if k != "tokenizer"}
    try:
        module = SFTDataModule(**args)
    except DataError:
        raise
    except (TypeError, ValueError):
        return None
    module.read()
    return module


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


def _check_output_dirs(config: Any) -> None:
    """Before anything loads: every directory fit writes to (logs, checkpoints, the export) can be
    written, else a :class:`ConfigError` naming the option. Found after training, the export's would lose it."""
    trainer = config.get("trainer") or {}
    dirs = [("trainer.default_root_dir", trainer.get("default_root_dir"))]
    logger = trainer.get("logger")
    for item in logger if isinstance(logger, list) else [logger]:
        args = (item.get("init_args") or {}) if hasattr(item, "get") else {}
        dirs += [(f"trainer.logger.init_args.{key}", args.get(key)) for key in ("save_dir", "root_dir")]
    for item in trainer.get("callbacks") or []:
        if hasattr(item, "get") and str(item.get("class_path", "")).endswith("ModelCheckpoint"):
            dirs.append(("ModelCheckpoint's dirpath", (item.get("init_args") or {}).get("dirpath")))
    dirs.append(("model.export_dir", (config.get("model") or {}).get("export_dir")))
    for key, path in dirs:
        if path and (reason := unwritable_reason(str(path))):
            raise ConfigError(f"{key}: {path} cannot be written ({reason})")


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


def _add_checkpoint_arguments(parser: Any, what: str) -> None:
    """``--ckpt_path`` and ``--weights_only`` of the subcommands that run a model from a fit config."""
    parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                        help=f"{what} the weights of this Lightning checkpoint (None: the config's model).")
    parser.add_argument("--weights_only", type=Optional[bool], default=None,
                        help="torch.load the checkpoint with weights_only (None: True, the safe loader).")


def _ready_module(cli: SFTCLI) -> Any:
    """The CLI's module with the ``--ckpt_path`` weights, converted and on the device as the trainer would run it."""
    config, module, trainer = cli.config, cli.model, cli.trainer
    if config.get("ckpt_path"):
        load_checkpoint_weights(module, config.ckpt_path, config.weights_only)
    # bf16-true/16-true convert the weights (mixed precision leaves them).
    module = trainer.precision_plugin.convert_module(module)
    return module.to(trainer.strategy.root_device)


# ----------------------------------------------------------------------------- probe subcommand
class ProbeCLI(SFTCLI):
    """The ``fit`` config plus the probe's own options (read back from ``cli.config``)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--output", type=Optional[str], default=None, help="Write the report as JSON here.")
        parser.add_argument(
            "--max_batches", type=int, default=16,
            help="Batches of the sample to run (<= 0: the whole split). 16 x 8 rows give thousands of tokens.",
        )
        parser.add_argument("--split", type=Literal["train", "val"], default="train", help="Which split to probe.")
        _add_checkpoint_arguments(parser, "Probe")
        parser.add_argument(
            "--generate", type=int, default=0,
            help="Also answer the first N val rows by generation and score them with the built-in task's checker "
            "(0: off). Token probabilities cannot tell whether whole answers are right; this can.",
        )
        parser.add_argument("--max_new_tokens", type=int, default=GenerationArgs.max_new_tokens,
                            help="Generation budget per answer (--generate).")
        parser.add_argument("--batch_size", type=int, default=GenerationArgs.batch_size,
                            help="Prompts generated together (--generate).")


def _probe_generation(module: Any, data: Any, config: Any, context: Any) -> dict[str, Any] | None:
    """Base accuracy by generation on the first ``config.generate`` val rows (task checker only)."""
    rows = data.raw_rows("val")[: config.generate]
    if not rows or any(row.get("task") not in TASKS for row in rows):
        print("probe --generate: skipped, the val rows have no built-in task checker", flush=True)
        return None
    module.eval()
    with context():
        result = evaluate_generation(
            module.model, module.tokenizer, rows, data, "task",
            max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
        )  # fmt: skip
    return {
        "rows": result.n,
        "correct": result.correct,
        "accuracy": result.accuracy,
        "checker": "task",
        "max_new_tokens": config.max_new_tokens,
    }


def probe_main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m bnll_lightning probe --config X.yaml [--output report.json] [--max_batches N]``;
    prints the report and returns its figures (the ``--output`` JSON)."""
    cli = load_from_config(list(argv or []), ProbeCLI)
    config, data, trainer = cli.config, cli.datamodule, cli.trainer
    data.set_tokenizer(cli.model.tokenizer)
    model, device = _ready_module(cli), trainer.strategy.root_device
    context = trainer.precision_plugin.forward_context
    figures = probe(model, data, max_batches=config.max_batches, split=config.split, device=device, context=context)
    report = {
        "model": config.model.model,
        "data": data.train if config.split == "train" else data.val or data.train,
        "checkpoint": config.get("ckpt_path"),
        "generation": _probe_generation(model, data, config, context) if config.generate > 0 else None,
        **figures,
    }
    report = {key: report.get(key) for key in REPORT_KEYS}
    print(format_report(report), flush=True)
    if config.output:
        os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
        with open(config.output, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"report written to {config.output}")
    return report


# ----------------------------------------------------------------------------- evaluate subcommand
class EvaluateCLI(SFTCLI):
    """The fit config's model and data, plus the options of ``evaluate``."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        _add_checkpoint_arguments(parser, "Evaluate")
        parser.add_argument("--split", type=Literal["train", "val"], default="val",
                            help="Rows to answer: the data module's val or train rows.")
        parser.add_argument("--num_rows", type=Optional[int], default=None, help="Only the first N rows (None: all).")
        # Generation settings: None takes the config's GenerationEval callback (so the evaluation
        # of a checkpoint follows the protocol the run validated with), else the default shown.
        default = GenerationArgs()
        parser.add_argument("--max_new_tokens", type=Optional[int], default=None,
                            help=f"Generation budget per answer (None: the config's GenerationEval, else "
                                 f"{default.max_new_tokens}).")
        parser.add_argument("--batch_size", type=Optional[int], default=None,
                            help=f"Prompts generated together (None: the config's GenerationEval, else "
                                 f"{default.batch_size}).")
        parser.add_argument("--checker", type=Optional[Literal[tuple(CHECKERS)]], default=None,
                            help="Answer checker (None: the config's GenerationEval's, else auto = the built-in "
                                 "task's own, else normalized).")
        parser.add_argument("--temperature", type=Optional[float], default=None,
                            help=f"0: greedy; > 0: sampling (None: the config's GenerationEval, else "
                                 f"{default.temperature:g}).")
        parser.add_argument("--top_p", type=Optional[float], default=None,
                            help=f"Nucleus sampling mass (None: the config's GenerationEval, else {default.top_p:g}).")
        parser.add_argument("--num_samples", type=Optional[int], default=None,
                            help=f"Answers per prompt, temperature > 0 (None: the config's GenerationEval, else "
                                 f"{default.num_samples}).")
        parser.add_argument("--pass_k", type=Optional[Union[int, list[int]]], default=None,
                            help="k of the unbiased pass@k with num_samples > 1 (None: the config's "
                                 "GenerationEval, else num_samples); maj@num_samples is printed too.")
        parser.add_argument("--output", type=Optional[str], default=None,
                            help="Predictions jsonl (default: predictions_<split>.jsonl).")
        parser.add_argument("--show", type=int, default=5, help="Examples printed.")


def _shorten(text: str, width: int = 100) -> str:
    """``text`` on one line, cut to ``width`` characters."""
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= width else text[: width - 1] + "…"


# What the evaluate command may set, and the defaults; the seed is the config's seed_everything.
_GENERATION_DEFAULTS = {**asdict(GenerationArgs()), "checker": None, "pass_k": None}
del _GENERATION_DEFAULTS["seed"]


def generation_settings(cfg: Any, callbacks: Sequence[Any]) -> dict[str, Any]:
    """The evaluate command's generation settings: each option given on the command line, else the
    config's :class:`GenerationEval` callback's, else the default."""
    callback = next((c for c in callbacks if isinstance(c, GenerationEval)), None)
    own = {} if callback is None else {**asdict(callback.generation), "checker": callback.checker,
                                       "pass_k": callback.pass_k}
    settings = {key: getattr(cfg, key) if getattr(cfg, key) is not None else own.get(key, default)
                for key, default in _GENERATION_DEFAULTS.items()}
    if isinstance(settings["pass_k"], int):
        settings["pass_k"] = [settings["pass_k"]]
    ks, n = settings["pass_k"], settings["num_samples"]
    if n == 1 and cfg.pass_k is None:
        settings["pass_k"] = None  # one answer per prompt (the command line's): the config's pass@k does not apply
    elif ks is not None and not all(1 <= k <= n for k in ks):
        given = "" if cfg.pass_k is not None else " (the config's GenerationEval)"
        raise ConfigError(f"--pass_k {ks}{given}: each k must lie in [1, num_samples = {n}] (pass@k draws k of a "
                          "prompt's samples); raise --num_samples")
    return settings


def evaluate_main(argv: list[str] | None = None) -> None:
    """``python -m bnll_lightning evaluate --config X.yaml [--ckpt_path ...] [--split val] ...``"""
    cli = load_from_config(list(argv or []), EvaluateCLI)
    cfg, data, trainer = cli.config, cli.datamodule, cli.trainer
    settings = generation_settings(cfg, trainer.callbacks)
    module = _ready_module(cli)
    rows = data.raw_rows(cfg.split)[: cfg.num_rows]
    if not rows:
        raise SystemExit(
            f"evaluate: the data has no {cfg.split} rows (train={data.train!r}, val={data.val!r}); nothing to "
            "evaluate. For file data set data.val or data.val_fraction > 0, or use --split train."
        )
    checker = settings.pop("checker")
    start = time.perf_counter()
    with trainer.precision_plugin.forward_context():
        result = evaluate_generation(
            module.model, module.tokenizer, rows, data, checker, **settings,
            seed=cfg.seed_everything if isinstance(cfg.seed_everything, int) else 0,
        )
    seconds = time.perf_counter() - start
    output = write_jsonl(cfg.output or f"predictions_{cfg.split}.jsonl", result.predictions)
    weights = cfg.ckpt_path or cfg.model.model
    print(f"model: {weights}")
    sampling = (f"{settings['num_samples']} samples at temperature {settings['temperature']}, top_p {settings['top_p']}"
                if settings["temperature"] > 0 else "greedy")
    print(f"accuracy: {result.accuracy:.4f} ({result.correct}/{result.n}) on {len(rows)} {cfg.split} rows, "
          f"checker {checker or 'auto'}, {sampling}, max_new_tokens {settings['max_new_tokens']}, {seconds:.1f} s")
    for name, value in result.sample_metrics().items():
        print(f"{name}: {value:.4f} (mean over {result.rows} rows)")
    for p in result.predictions[: cfg.show]:
        mark = "ok " if p["correct"] else "BAD"
        print(f"  [{mark}] {_shorten(p['prompt'], 70)!s}\n        -> {_shorten(p['prediction'])!r}"
              f"  (answer {p['answer']!r})")
    print(f"predictions: {output}")


# ----------------------------------------------------------------------------- study and compare subcommands
class StudyCLI(SFTCLI):
    """The job's config plus the options of ``study``; its module copies the base model loaded once."""

    module_class = study.StudyModule
    # The options below: the study's own, left out of the config its runs' ``fit`` processes read.
    options = ("objectives", "seeds", "max_steps", "val_rows", "checker", "max_new_tokens", "out", "bootstrap")

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        add_study_arguments(parser)


def study_main(argv: list[str] | None = None) -> compare.Comparison | None:
    """``python -m bnll_lightning study --config job.yaml [--objectives ...] [--seeds N] [--max_steps N]
    [--val_rows N] [--out DIR]``: fine-tune the job once per objective and seed, score every run on the same
    held-out rows, and print the comparison. On one device the runs train copies of the base model loaded
    once, in this process; with several devices or a distributed strategy each run is a ``fit`` process.
    ``-h``/``--help``: :func:`study_help` (None returned)."""
    argv = list(argv or [])
    if {"-h", "--help"} & set(argv):
        print(study_help(), end="", flush=True)
        return None
    with study.lightning_quiet():
        cli = load_from_config(argv, StudyCLI)  # parses the job and loads the base model, once
    cfg, trainer = cli.config, cli.trainer
    if trainer.num_nodes > 1:  # the processes of a run on other nodes would need their own launcher
        raise compare.StudyError(f"study launches its runs on this node; the job's trainer has {trainer.num_nodes} "
                                 "nodes: add --trainer.num_nodes 1 (every device of the node stays available)")
    max_steps = cfg.max_steps if cfg.max_steps is not None else cfg.trainer.max_steps
    if max_steps is None or max_steps < 1 or cfg.seeds < 1:
        raise compare.StudyError(f"need --max_steps >= 1 (or the job's trainer.max_steps) and --seeds >= 1, got "
                                 f"{max_steps} and {cfg.seeds}")
    names = list(dict.fromkeys(n.strip() for arg in cfg.objectives for n in arg.split(",") if n.strip()))
    configs, saved = {}, {}
    for name in names:
        key = study.objective_key(name)
        configs[key] = run_config = cli.parser.parse_args([*argv, *study.objective_args(name)])
        model = run_config.model
        saved[key] = {k: model[k].as_dict() if hasattr(model[k], "as_dict") else model[k]
                      for k in ("objective", "alpha_controller", "warm_start_batches")}
        schedule = model.alpha_controller
        if schedule is not None and "steps" in (schedule.get("init_args") or {}):
            schedule.init_args.steps = max_steps  # a schedule ramps over the study's run
    data, rows = study.held_out(cli.datamodule, cfg.val_rows)
    callback = next((c for c in trainer.callbacks if isinstance(c, GenerationEval)), None)
    checker = cfg.checker or (callback.checker if callback is not None else None)
    built_in = all(row.get("task") in TASKS for row in rows)
    if (checker is None and callback is None or checker == "task") and not built_in:
        raise compare.StudyError("the job has no answer checker for its rows (not a built-in task's): add "
                                 "bnll_lightning.callbacks.GenerationEval to trainer.callbacks with checker: exact, "
                                 "normalized or math, or pass --checker")
    generation = callback.generation if callback is not None else GenerationArgs()
    max_new_tokens = cfg.max_new_tokens or generation.max_new_tokens
    trainer_kwargs = {k: cfg.trainer[k] for k in study.TRAINER_KEYS
                      if k in cfg.trainer and (k != "strategy" or isinstance(cfg.trainer[k], str))}  # fmt: skip
    model_args = {k: v for k, v in cfg.model.as_dict().items() if k not in (
        "objective", "alpha_controller", "warm_start_batches", "histogram_every_n_steps", "export_dir")}
    key = study.config_key(model_args, dict(data.hparams), trainer_kwargs, max_steps, checker, max_new_tokens, rows)
    cli.model = cli.config_init["model"] = None  # the CLI's own copy of the base: every run makes its own
    common = dict(objectives=list(configs), seeds=range(cfg.seeds), rows=rows, out=cfg.out, config=key,
                  max_steps=max_steps, checker=checker, max_new_tokens=max_new_tokens,
                  batch_size=generation.batch_size, objective_configs=saved, model=str(cfg.model.model))  # fmt: skip
    os.makedirs(cfg.out, exist_ok=True)
    if isinstance(trainer.strategy, SingleDeviceStrategy):

        def make_module(objective: str) -> SFTModule:
            try:
                return cli.parser.instantiate_classes(configs[objective]).model
            except ValueError as err:
                cause = _root_cause(err)
                if not _raised_by_us(cause):
                    raise
                raise ConfigError(f"--objectives {objective}: {cause}") from err

        runs: study.Study = study.InProcessStudy(make_module, data, trainer_kwargs, **common)
    else:
        study.StudyModule.base.clear()  # each run loads the base model in its own processes
        texts = {objective: cli.parser.dump(_job_config(config)) for objective, config in configs.items()}
        accumulate = cfg.trainer.accumulate_grad_batches or 1
        runs = study.SubprocessStudy(texts, data, accumulate, is_sharded(trainer.strategy), **common)
    done = runs.run()
    note = (f"study of {cfg.model.model} on {data.train}: {len(configs)} objectives x {cfg.seeds} seeds, "
            f"{max_steps} steps each, scored on {len(rows)} held-out rows (checker {checker or 'auto'}, greedy, "
            f"max_new_tokens {max_new_tokens}); config {key}")  # fmt: skip
    result, text = study.report(done, list(configs), cfg.out, resamples=cfg.bootstrap, note=note)
    print(text, flush=True)
    return result


def _job_config(config: Any) -> Any:
    """``config`` of the study command without the study's own options: a config ``fit`` reads."""
    job = config.clone()
    for option in StudyCLI.options:
        del job[option]
    return job


def compare_main(argv: list[str] | None = None) -> compare.Comparison:
    """``python -m bnll_lightning compare RUN_DIR... [--step N] [--reference LABEL] [--out DIR]``: the study's
    table and plot from runs made with ``fit`` and GenerationEval, paired by item across runs."""
    parser = argparse.ArgumentParser(
        prog="python -m bnll_lightning compare", exit_on_error=False,
        description="Compare runs made with fit + GenerationEval on the same validation rows: accuracy per "
                    "objective (the run's log-directory name) with paired bootstrap intervals over seeds x items.",
    )  # fmt: skip
    parser.add_argument("runs", nargs="+", help="Run directories (with predictions/), or folders of version_* runs.")
    parser.add_argument("--step", type=int, default=None, help="Compare the predictions of this step (default: last).")
    parser.add_argument("--reference", default="NLL", help="The objective differences are taken against.")
    parser.add_argument("--out", default="runs/compare", help="Where compare.md, compare.png, recommendation.yaml go.")
    parser.add_argument("--bootstrap", type=int, default=4000, help="Bootstrap resamples per interval.")
    parser.add_argument("--delete_checkpoints", action="store_true",
                        help="After comparing, remove each run's checkpoints/ (weights and optimizer state: what resumes "
                             "or extends a run; compare reads only predictions/ and config.yaml).")  # fmt: skip
    args = parser.parse_args(argv or [])
    runs = [compare.read_run(path, args.step) for path in compare.find_runs(args.runs)]
    found = compare.checkpoints_of(runs)
    result = compare.summarize(compare.match_items(runs), reference=args.reference, resamples=args.bootstrap)
    configs = {run.label: run.config for run in runs if run.config is not None}
    note = f"compare of {len(runs)} runs scored on the same {result.items} validation rows"
    table, yaml_text = compare.markdown(result), compare.recommendation(result, configs, note)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compare.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "recommendation.yaml"), "w", encoding="utf-8") as f:
        f.write(yaml_text)
    plotted = compare.plot(result, os.path.join(args.out, "compare.png"))
    print("\n".join([table, "", yaml_text, f"files in {args.out}: compare.md, recommendation.yaml"
                     + (", compare.png" if plotted else " (no plot: pip install matplotlib)")]), flush=True)
    if found and args.delete_checkpoints:
        print(f"deleted the checkpoints/ of {len(found)} runs: {disk.human(compare.delete_checkpoints(found))} freed")
    elif found:
        print(f"the compared runs' checkpoints/ hold {disk.human(sum(found.values()))} (to resume or extend them; compare"
              " does not read them): --delete_checkpoints removes them")
    return result


# Subcommands beyond Lightning's fit/validate/test/predict: name -> function(argv).
EXTRA_COMMANDS: dict[str, Callable[[list[str]], Any]] = {"probe": probe_main, "evaluate": evaluate_main,
                                                        "study": study_main, "compare": compare_main}


# Lines of a jsonargparse error that describe its structure rather than what is wrong.
_STRUCTURE = re.compile(
    r"(Does not validate against|Subtypes:|Errors:|Problem with given class_path|Expected a|Given value)"
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


def _single_line_causes(error: BaseException) -> list[str]:
    """The one-line messages down ``error``'s chain of causes (and contexts), outermost first, past the
    structure: jsonargparse drops the given value from a nested union's complaint ("does not conform to
    restriction v<1"), which the exception it wraps still has ("1.5 does not conform ...")."""
    out, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error).strip()
        if text and "\n" not in text and not _STRUCTURE.match(text) and not text.startswith("Parser key"):
            out.append(_NO_ATTRIBUTE.sub(_no_such_class, text))
        error = error.__cause__ or error.__context__
    return out


def one_line(error: BaseException) -> str:
    """A parse error's message in one line: the option's dotted key and the innermost reason."""
    chain = _single_line_causes(error)
    error = _root_cause(error)
    lines = [_NO_ATTRIBUTE.sub(_no_such_class, line.strip().removeprefix("- ")) for line in str(error).strip().splitlines()
             if line.strip()]  # fmt: skip
    keys, reason = [], None
    for line in lines:
        if match := re.fullmatch(r'Parser key "([^"]+)":?', line):
            keys.append(match.group(1))
        elif reason is None and not _STRUCTURE.match(line):
            reason = line  # the innermost complaint, past jsonargparse's union bookkeeping
    if keys and chain:
        reason = chain[0]
    if keys and reason:
        return f"{'.'.join(keys)}: {reason}"
    return " ".join(lines) if len(lines) <= 3 else f"{lines[0]} ... ({DEBUG_ENV}=1 for details)"


def resume_command(args: list[str], checkpoint: str, found_by_last: bool) -> str:
    """The command that continues a stopped run (SIGTERM, a failed export): the same arguments, with
    ``--ckpt_path`` the checkpoint it wrote (``last`` where that finds it: the run then logs into the same version)."""
    kept: list[str] = []
    for arg, before in zip(args, [None, *args]):
        if arg == "--ckpt_path" or arg.startswith("--ckpt_path=") or before == "--ckpt_path":
            continue
        kept.append(arg)
    return shlex.join([sys.executable, "-m", "bnll_lightning", *kept, "--ckpt_path",
                       "last" if found_by_last else checkpoint])


def main(argv: list[str] | None = None) -> None:
    """Entry point. Bad data, an invalid config value or a bad option exits with code 2 and one
    line on stderr (a directory fit would write to that cannot be written, too); a run stopped by
    NaN/Inf losses or a failed export (its weights in a checkpoint) exits with 1; a fit stopped by SIGTERM writes
    a checkpoint, prints the command that resumes it and exits with 143. ``BNLL_DEBUG=1`` re-raises
    with the traceback instead."""
    args = list(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():
        # torch deprecates LeafSpec and Lightning's own pytree code uses it: nothing a user can act on.
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        _main(args, argv)


def _main(args: list[str], argv: list[str] | None) -> None:
    """:func:`main`'s work: run the subcommand, turning the errors it documents into one line and an exit code."""
    try:
        if args and args[0] in EXTRA_COMMANDS:
            EXTRA_COMMANDS[args[0]](args[1:])
            return
        SFTCLI(args=argv)  # None: LightningCLI reads sys.argv itself
    except (DataError, ConfigError, compare.StudyError, argparse.ArgumentError, MisconfigurationException) as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        kind = "data" if isinstance(err, DataError) else "study" if isinstance(err, compare.StudyError) else "config"
        print(f"bnll_lightning: {kind} error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as err:  # model.max_nonfinite_steps NaN/Inf steps in a row
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"bnll_lightning: training stopped: {err}", file=sys.stderr)
        sys.exit(1)
    except Preempted as stop:  # SIGTERM: a checkpoint at the step boundary, then 143 and the way on
        if stop.global_zero:
            # fit resumes from the checkpoint; a study (its runs are fits too) continues when run again
            again = (f"resume with: {resume_command(args, stop.checkpoint, stop.found_by_last)}" if args[:1] == ["fit"]
                     else "run the same command again to continue")
            print(f"bnll_lightning: stopped by SIGTERM after optimizer step {stop.step}; checkpoint {stop.checkpoint}\n"
                  f"{again}", file=sys.stderr)
        sys.exit(stop.code)
    except ExportFailed as err:  # after training: the weights went to a checkpoint, which the message names
        print(f"bnll_lightning: {err}", file=sys.stderr)
        if err.checkpoint:
            print("export them, once there is room or with another --model.export_dir, with: "
                  f"{resume_command(args, err.checkpoint, err.found_by_last)}", file=sys.stderr)
        sys.exit(1)
    except SIGTERMException:  # Lightning's own stop: SIGTERM before training was under way
        print("bnll_lightning: stopped by SIGTERM before training was under way: nothing to resume, run the "
              "command again", file=sys.stderr)
        sys.exit(EXIT_CODE)
    finally:
        console.restore()
