"""The study's own command-line options, importable without torch or Lightning (``study --help`` in a blink)."""

from __future__ import annotations

from typing import Any, Literal, Optional

# One source for the study's defaults: study.py and cli.py read them from here.
DEFAULT_OBJECTIVES = ("nll", "negprob", "dft", "adaptive", "linear")
# evaluate.CHECKERS' names and GenerationArgs.max_new_tokens, written out so that --help imports no torch
# (tests/test_cli.py checks they match).
CHECKER_NAMES = ("auto", "exact", "normalized", "task", "math")
DEFAULT_MAX_NEW_TOKENS = 64


def add_study_arguments(parser: Any) -> None:
    """The study's own options, on the full parser (``StudyCLI``) and on ``study --help``'s."""
    parser.add_argument("--objectives", type=str, nargs="+", default=list(DEFAULT_OBJECTIVES),
                        help="Objectives to compare: overlay names of configs/objectives (nll, negprob, dft, "
                             "adaptive, linear, ...), YAML overlays, or Objective class paths.")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3,
                        help="Runs per objective, seeds 0..N-1: the training order and RNGs (the rows stay).")
    parser.add_argument("--max_steps", type=Optional[int], default=None,
                        help="Optimizer steps per run (None: the job's trainer.max_steps).")
    parser.add_argument("--val_rows", type=int, default=200,
                        help="Held-out rows every run is scored on: the first N of data.val, or held out "
                             "of the job's data when data.val is not set; never trained on (checked).")  # fmt: skip
    parser.add_argument("--checker", type=Optional[Literal[CHECKER_NAMES]], default=None,
                        help="Answer checker (None: the job's GenerationEval's, else the built-in task's).")
    parser.add_argument("--max_new_tokens", type=Optional[int], default=None,
                        help="Generation budget per answer (None: the job's GenerationEval's, else "
                             f"{DEFAULT_MAX_NEW_TOKENS}); greedy.")  # fmt: skip
    parser.add_argument("--out", type=str, default="runs/study",
                        help="Output folder: study.csv (one row per run; a rerun skips finished runs), "
                             "study.md, study.png, recommendation.yaml, answers/ (each run's answers).")  # fmt: skip
    parser.add_argument("--bootstrap", type=int, default=4000, help="Bootstrap resamples per interval.")


def study_help() -> str:
    """``study --help``: the study's own options, then where the job's are. Built without the fit parser, whose
    help (every Trainer, model and data option: ~780 lines, seconds to build) is ``fit --help``'s."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog="python -m bnll_lightning study",
        description="Fine-tune the job once per objective and seed, score every run on the same held-out rows by "
                    "generation, and print the comparison (study.md, study.png, recommendation.yaml in --out). "
                    "File data (rows that are not a built-in task's) needs --checker exact, normalized or math, "
                    "unless the job's trainer.callbacks has a GenerationEval, whose checker the study then uses.",
        epilog="The job's own options (model, data, trainer, seed_everything) are fit's and apply here too: "
               "python -m bnll_lightning fit --help",
    )  # fmt: skip
    parser.add_argument("-c", "--config", action=ActionConfigFile,
                        help="The job: a fit config (repeat to layer overlays), as fit reads it.")
    add_study_arguments(parser)
    return parser.format_help()
