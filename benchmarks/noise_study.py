"""The model-strong end under label noise: held-out accuracy over several epochs, per objective and noise rate.

The paper's strong end (arXiv 2510.00526) is a base model that already gives its training targets a
mean p near 0.8. Here the targets are the base model's own correct greedy answers, in its own words
(:mod:`bnll_lightning.self_targets`: rejection-sampled self-distillation data), so the training
targets' base mean p is high by construction; label noise replaces a share of the answers with a
wrong one in the same phrasing; training runs for several epochs over a small set, long enough to
memorise, and held-out accuracy is read at several points. f_α is the generalized cross-entropy L_q
of the noisy-label literature (Zhang & Sabuncu 2018), where NLL memorises the wrong labels and
MAE (= −p) holds; the question is whether the same shows here and whether a moving α beats both
static ends and a ramp.

Design (what keeps it honest), on top of ``continuum.py``'s (whose bootstrap and CSV locking it uses):

* **Held-out items only.** The evaluation set is a fixed set of distinct prompts drawn apart; the
  self-phrasing pool is drawn from another stream with every evaluation prompt removed; each seed's
  training rows and its clean held-out probe rows (the "probe whose loss turns up") are disjoint
  subsets of the pool's kept rows. Evaluation scores against the truth, never the noisy answers.
* **Paired.** For a task, seed and noise rate every objective trains on the same rows, order and
  noise, and answers the same items: differences are paired over seeds × items.
* **Roles.** ``dev`` tasks may be used to choose a controller's design; ``report`` tasks never are.
* **Curves.** Accuracy on the evaluation set at the end of the epochs in ``--eval_epochs``; the
  last is the run's result (no run is stopped early and no epoch is picked after the fact).
* **Resumable.** Every finished run is appended to ``noise_study.csv`` at once; a rerun skips
  finished runs. Processes started on the same ``--out`` share one queue in the plan's order
  (:func:`claim_next`), so two of them use two cores and either can be restarted at any time.

    python benchmarks/noise_study.py --out docs/noise_study &              # the study, in 2 processes
    python benchmarks/noise_study.py --out docs/noise_study &
    python benchmarks/noise_study.py --out docs/noise_study --report       # tables and plots from the CSV
    python benchmarks/noise_study.py --quick                               # tiny random model: the harness
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from benchmarks import _common as C
from benchmarks import continuum as CT
from bnll_lightning.alpha import AdaptiveAlpha, PlateauAlpha
from bnll_lightning.data import SFTDataModule
from bnll_lightning.models import load_model, load_tokenizer
from bnll_lightning.modes import eval_mode
from bnll_lightning.objectives import EAFT, AlphaFamily, TokenAlpha
from bnll_lightning.probe import probe
from bnll_lightning.self_targets import self_phrased
from bnll_lightning.study import RunsCSV
from bnll_lightning.tasks import TASKS


@dataclass(frozen=True)
class NoiseTask:
    """A task of the study: the built-in task, whether its targets are self-phrased, its role and sizes."""

    name: str
    task: str
    self_phrased: bool
    role: str  # "dev": may be used to choose a controller's design; "report": never
    why: str
    num_eval: int | None = None  # None: --num_eval
    pool: int = 320  # candidate prompts answered by the base model (self-phrased tasks)
    num_train: int | None = None  # None: --num_train


NOISE_TASKS = {
    t.name: t
    for t in (
        # Counting: base accuracy ~0.5 on the reply-only prompt, 999 distinct items.
        NoiseTask("successor_self", "successor", True, "dev", "model-strong targets: the base model's own right "
                  "answers to 'the number after n'"),  # fmt: skip
        # Two-digit addition: the base model is right on ~1 in 4, so its right answers are a strong set.
        NoiseTask("add_self", "add", True, "report", "model-strong targets: the base model's own right sums of two "
                  "numbers below 100", pool=480),  # fmt: skip
        # Knowledge: 189 countries; 90 held out for evaluation, the other 99 answered by the base model (it is right
        # on 46: 30 train and 16 probe a seed).
        NoiseTask("capital_self", "world_capital", True, "report", "model-strong targets: the base model's own right "
                  "capitals (189 countries)", num_eval=90, pool=99, num_train=30),  # fmt: skip
        # Knowledge: the past tense of 779 English verbs (tasks.PastTenseTask); base accuracy ~0.47, so its own right
        # answers are a strong set with >= 200 held-out items (issue 27: power where capital_self's 90 are too few).
        NoiseTask("past_tense_self", "past_tense", True, "report", "model-strong targets: the base model's own right "
                  "past tenses of English verbs (779 verbs)"),  # fmt: skip
        # The weak end, trained long: clean canonical targets the base model finds unlikely.
        NoiseTask("reverse3_long", "reverse3", False, "report", "model-weak, long: reverse a 3-letter pseudo-word, "
                  "canonical targets", num_train=64),  # fmt: skip
    )
}

ENTRIES = dict(CT.ENTRIES)  # with α = 0.5, ASFT and the chosen controller (plateau_v3_best)
# PlateauAlpha's first design, every setting named (the class's defaults are the design the dev task chose).
FIRST_DESIGN = dict(monitor="val/nll", mode="min", restore_best=False, before_rise="nll")
for _e in (
    CT.Entry("eaft", "EAFT", lambda a: (EAFT(), None), None),
    # Per-token α (its defaults: −p on tokens with p >= 0.55, NLL below 0.1): a static objective.
    CT.Entry("token", "TokenAlpha", lambda a: (TokenAlpha(), None), None),
    # v2 on the median token p, which the noisy tail cannot pull down: a candidate on the dev task, tied with v3
    # there and not chosen (its warm start skips the NLL phase).
    CT.Entry("adaptive_median", "AdaptiveAlpha v2 on the median",
             lambda a: (AlphaFamily(0.0), AdaptiveAlpha(low=0.6, high=0.9, statistic="quantile", quantile=0.5)), None,
             False, True),
    # The validation-aware controller (its defaults: NLL until val/nll stops improving, then −p); needs --validate.
    CT.Entry("plateau", "PlateauAlpha (val/nll, patience 0)", lambda a: (AlphaFamily(0.0), PlateauAlpha(**FIRST_DESIGN)),
             None, False),
    # Its second design (issue 27): a rise also takes the weights back to the best validation's, which the first
    # design's late rise could not undo. Three candidates on the dev task: the signal (val/nll or val/mean_p) and
    # what α does before a rise (NLL, or v3's target).
    CT.Entry("plateau_best", "PlateauAlpha (val/nll, restore best)",
             lambda a: (AlphaFamily(0.0), PlateauAlpha(**{**FIRST_DESIGN, "restore_best": True})), None, False),
    CT.Entry("plateau_p_best", "PlateauAlpha (val/mean_p, restore best)",
             lambda a: (AlphaFamily(0.0), PlateauAlpha(**{**FIRST_DESIGN, "monitor": "val/mean_p", "mode": "max",
                                                          "restore_best": True})), None, False),  # fmt: skip
):
    ENTRIES[_e.key] = _e
# The noise grid's objectives. adaptive_median and adaptive_learn joined after the first dev runs had shown
# the per-step traces: the controller's candidates, chosen or not on the dev task, reported on the others either way.
CORE = ("nll", "negprob", "alpha05", "adaptive", "linear", "adaptive_median", "adaptive_learn")
# The controllers the dev task did not choose: at 20 % with the core, at 0 % and 40 % only after everything else.
NOT_CHOSEN = ("adaptive", "adaptive_median")
REST = ("dft", "eaft", "asft", "token")  # the rest of the list, at the middle noise rate
# The weak + long regime: α should stay 0 there; the ramp ends at −p. With the dev task's leading candidate,
# and α = 0.5, which the strong tasks never found behind the best static objective.
WEAK = ("nll", "negprob", "alpha05", "adaptive", "linear", "adaptive_learn")
BASE = CT.BASE
TAU = 0.2  # "share of tokens under τ" in the per-step trace (probe's τ)
QUICK = dict(num_train=4, batch_size=2, epochs=2, eval_epochs=[1, 2], num_eval=6, max_new_tokens=4, pool_scale=0.1,
             probe_rows=2, seeds=2, tasks=["successor_self", "reverse3_long"], noises=[0.0, 0.5], bootstrap=200,
             objectives=["nll", "negprob", "linear"], probe_batches=1, canonical_targets=True)  # fmt: skip
CSV_FIELDS = (
    "config", "task", "role", "objective", "label", "seed", "noise", "accuracy", "correct", "n", "items", "curve",
    "alpha_mean", "alpha_end", "alphas", "trace", "base_mean_p", "base_geometric_mean_p", "pool", "noisy_rows",
    "num_train", "steps", "epochs", "batch_size", "lr", "model", "train_seconds", "eval_seconds", "finished",
    "val_curve", "best_step", "best_epoch", "best_accuracy", "best_correct", "best_items", "alpha_rises",
    "best_p_step", "best_p_epoch", "best_p_accuracy", "best_p_correct", "best_p_items",
)  # fmt: skip
# --validate: besides --monitor, every run also keeps its best checkpoint by val/mean_p (higher is better). On a split
# as noisy as training, val/nll charges a model for not believing the noisy labels; mean p of the labels moves with
# the clean ones (a held-out noisy label is not learnable). Its columns: best_p_*; rows finished before it have none.
SECOND_MONITOR = ("val/mean_p", "max")
# --validate: the early-stopping grid, most important first (issue 27): early-stopped NLL against −p and the v3
# default on the strong tasks at the noisiest rate, with the validation-aware controller; then the other rates;
# then the rest of the list.
VALIDATE_FIRST = ("nll", "negprob", "adaptive_learn", "plateau")
VALIDATE_THEN = ("alpha05", "asft", "linear")
# Of those, last: the ramp, a controller the regret table already places far from the default, after the static
# objectives that the default is measured against.
THEN_LAST = ("linear",)
# The controller's second design, ahead of everything else still queued: its candidates on the dev task at the
# noisiest rate, then the one the dev task chose (CHOSEN) on the report tasks.
VALIDATE_SECOND = ("plateau_best", "plateau_p_best", "plateau_v3_best")
# Chosen on the dev task at 40 %, 3 seeds, by mean last-checkpoint accuracy (2026-12-07): plateau_v3_best 0.870,
# plateau_best 0.815, plateau_p_best 0.812 (docs/benchmarks.md, issue 27).
CHOSEN: tuple[str, ...] = ("plateau_v3_best",)
# The first design, which the chosen one replaced (its dev-task mean 0.807): in the first block only, so the other rates
# finish a session sooner (2026-12-07).
SUPERSEDED = ("plateau",)


# ----------------------------------------------------------------------------- data


def eval_rows(task: NoiseTask, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The task's fixed evaluation set (distinct prompts of the evaluation stream)."""
    return CT.eval_rows(CT.StudyTask(task.name, task.task, 0.0, task.role, task.why), _num_eval(task, args))


def _num_eval(task: NoiseTask, args: argparse.Namespace) -> int:
    return min(task.num_eval or args.num_eval, args.num_eval) if args.quick else (task.num_eval or args.num_eval)


def _num_train(task: NoiseTask, args: argparse.Namespace) -> int:
    return min(task.num_train or args.num_train, args.num_train) if args.quick else (task.num_train or args.num_train)


def candidate_rows(task: NoiseTask, n: int, exclude: set[str]) -> list[dict[str, Any]]:
    """Up to ``n`` distinct prompts of the task's pool stream, none in ``exclude`` (the evaluation set)."""
    rows, seen = [], set(exclude)
    for row in TASKS[task.task].generate(max(50 * n, 4000), 7919 * 999):
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
            if len(rows) == n:
                break
    return rows


def pool(task: NoiseTask, args: argparse.Namespace, out: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The rows seeds draw from: self-phrased (the base model's right answers, built once and cached in
    ``out``) or canonical; built under a file lock so that shards started together build it once."""
    path = os.path.join(out, "pools", f"{task.name}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(path):
            exclude = {r["prompt"] for r in eval_rows(task, args)}
            n = max(8, round(task.pool * args.pool_scale)) if task.self_phrased else 4 * _num_train(task, args)
            rows = candidate_rows(task, n, exclude)
            counts = {"asked": len(rows), "kept": len(rows)}
            if task.self_phrased and not args.canonical_targets:
                tokenizer, base = CT.StudyModule.base[args.model_path]
                encoder = SFTDataModule(train=f"builtin:{task.task}", tokenizer=tokenizer, val_fraction=0.0)
                rows, counts = self_phrased(base, tokenizer, rows, encoder.encode_prompt,
                                            max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size)
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps({"counts": counts}) + "\n")
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            os.replace(tmp, path)
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    return lines[1:], lines[0]["counts"]


def seed_rows(task: NoiseTask, seed: int, args: argparse.Namespace, out: str) -> tuple[str, str]:
    """This seed's training rows and clean held-out probe rows (disjoint draws from the pool), as files."""
    rows, _ = pool(task, args, out)
    n, k = _num_train(task, args), args.probe_rows
    if len(rows) < n + k:
        raise ValueError(f"{task.name}: the pool kept {len(rows)} rows, {n} training + {k} probe rows asked")
    order = list(range(len(rows)))
    random.Random(f"noise_study:{task.name}:{seed}").shuffle(order)
    paths = []
    for name, idx in (("train", order[:n]), ("probe", order[n:n + k])):
        path = os.path.join(out, "pools", f"{task.name}_seed{seed}_{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for i in sorted(idx):
                f.write(json.dumps(rows[i]) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def datamodule(path: str, seed: int, noise: float, tokenizer: Any, args: argparse.Namespace) -> SFTDataModule:
    return SFTDataModule(train=path, val_fraction=0.0, batch_size=args.batch_size, seed=seed, noise=noise,
                         max_length=args.max_length, tokenizer=tokenizer)  # fmt: skip


def validation_split(probe_path: str, seed: int, noise: float, tokenizer: Any, args: argparse.Namespace) -> SFTDataModule:
    """--validate: the seed's held-out probe rows as a user would have them, noised at the training rate (its
    own draw). Never an evaluation item: the probe rows come from the pool, which excludes them."""
    data = datamodule(probe_path, seed, noise, tokenizer, args)
    data.setup("fit")
    return data


def validation_loader(split: SFTDataModule, args: argparse.Namespace) -> DataLoader:
    """The validation split's rows in order."""
    # Its own generator: a loader without one draws its worker seed from the global generator at each validation.
    return DataLoader(split.train_dataset, batch_size=args.batch_size, shuffle=False, collate_fn=split.collator,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip


def best_checkpoint(dirpath: str, monitor: str, mode: str = "min", prefix: str = "best") -> ModelCheckpoint:
    """What a Lightning user does to keep the best model: the top-1 checkpoint by ``monitor`` (``mode`` min: lower
    is better), weights only (a finished run resumes nothing), named ``<prefix>-step=N.ckpt``."""
    return ModelCheckpoint(dirpath=dirpath, filename=prefix + "-{step}", monitor=monitor, mode=mode, save_top_k=1,
                           save_weights_only=True, save_last=False)  # fmt: skip


def best_by_validation(checkpoint: ModelCheckpoint) -> tuple[int, str]:
    """(optimizer step, path) of ``checkpoint``'s best: the step its monitored metric says (``ModelCheckpoint``
    keeps the top-1 file; its name carries the step)."""
    path = checkpoint.best_model_path
    if not path:
        raise RuntimeError(f"no checkpoint was kept by monitor {checkpoint.monitor!r}")
    return int(Path(path).stem.rsplit("step=", 1)[1]), path


# ----------------------------------------------------------------------------- one run


class Curve(L.Callback):
    """Per optimizer step: α, and the batch's mean, median and 10 % quantile of p and share under τ.
    At the end of each epoch in ``eval_epochs``: accuracy on the evaluation set and the clean held-out
    probe's NLL and mean p."""

    def __init__(self, eval_at: dict[int, int], evaluate) -> None:
        self.eval_at, self.evaluate = eval_at, evaluate  # step -> epoch; fn(module) -> dict
        self.alphas: list[float] = []
        self.trace: list[list[float]] = []
        self.points: list[dict[str, Any]] = []
        self.validations: list[dict[str, Any]] = []  # --validate: val/nll and val/mean_p after each epoch
        self.eval_seconds = 0.0

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self.validations.append({"step": trainer.global_step, "epoch": trainer.current_epoch + 1,
                                 "val_nll": float(metrics["val/nll"]), "val_mean_p": float(metrics["val/mean_p"])})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.objective.alpha is not None:
            self.alphas.append(float(pl_module.objective.alpha))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        logp = pl_module.last_target_logp
        if logp is not None and logp.numel():
            p = logp.exp().float()
            q10, q50 = torch.quantile(p, torch.tensor([0.1, 0.5])).tolist()
            self.trace.append([round(p.mean().item(), 4), round(q50, 4), round(q10, 4),
                               round((p < TAU).float().mean().item(), 4)])  # fmt: skip
        step = trainer.global_step
        if step in self.eval_at:
            start = time.perf_counter()
            point = {"step": step, "epoch": self.eval_at[step], **self.evaluate(pl_module)}
            self.eval_seconds += time.perf_counter() - start
            self.points.append(point)


def evaluate(module: Any, task: NoiseTask, probe_data: SFTDataModule, args: argparse.Namespace) -> dict[str, Any]:
    """Greedy accuracy on the evaluation set and the held-out probe's NLL and mean p (clean targets)."""
    nll = p = tokens = 0.0
    # Mid-training: the model goes back to its training mode after (answer() alone leaves it in eval).
    with eval_mode(module.model), torch.no_grad():
        result, _ = CT.answer(module, module.tokenizer, eval_rows(task, args), probe_data, args)
        for batch in probe_data.train_dataloader():
            logp, mask = module.target_logprobs(batch)
            nll += float(-(logp[mask]).sum())
            p += float(logp[mask].exp().sum())
            tokens += float(mask.sum())
    return {"accuracy": result.accuracy, "items": CT._items(result), "probe_nll": nll / max(tokens, 1.0),
            "probe_mean_p": p / max(tokens, 1.0)}  # fmt: skip


def run_base(task: NoiseTask, args: argparse.Namespace, out: str) -> dict[str, Any]:
    """The base model: mean p of seed 0's clean training targets (probe) and accuracy on the eval set."""
    tokenizer, _ = CT.StudyModule.base[args.model_path]
    module = CT.StudyModule(model=args.model_path, histogram_every_n_steps=0)
    train_path, probe_path = seed_rows(task, 0, args, out)
    data = datamodule(train_path, 0, 0.0, tokenizer, args)
    data.setup("fit")
    figures = probe(module, data, max_batches=10**6, split="train", progress=False)
    probe_data = datamodule(probe_path, 0, 0.0, tokenizer, args)
    probe_data.setup("fit")
    start = time.perf_counter()
    point = evaluate(module, task, probe_data, args)
    _, counts = pool(task, args, out)
    return {
        "objective": BASE, "label": "base model", "seed": "", "noise": "", "accuracy": point["accuracy"],
        "correct": point["items"].count("1"), "n": len(point["items"]), "items": point["items"],
        "curve": json.dumps([{"step": 0, "epoch": 0, **point}]), "base_mean_p": figures["mean_p"],
        "base_geometric_mean_p": figures["geometric_mean_p"], "pool": json.dumps(counts), "steps": 0,
        "train_seconds": 0.0, "eval_seconds": time.perf_counter() - start,
    }  # fmt: skip


def run_one(task: NoiseTask, key: str, seed: int, noise: float, args: argparse.Namespace, out: str) -> dict[str, Any]:
    """Fine-tune a copy of the base model on ``task`` with ``ENTRIES[key]``, seed and noise rate; evaluate
    at the end of the epochs in ``--eval_epochs``."""
    entry = ENTRIES[key]
    train_path, probe_path = seed_rows(task, seed, args, out)
    steps_per_epoch = math.ceil(_num_train(task, args) / args.batch_size)
    steps = steps_per_epoch * args.epochs
    run_args = argparse.Namespace(**{**vars(args), "steps": steps})  # LinearAlpha ramps over the whole run
    L.seed_everything(seed, verbose=False)
    objective, controller = entry.make(run_args)
    module = CT.StudyModule(
        model=args.model_path, objective=objective, alpha_controller=controller, histogram_every_n_steps=0,
        optimizer=partial(torch.optim.AdamW, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01),
        warmup=args.warmup, warm_start_batches=args.probe_batches if entry.probe else 0,
    )  # fmt: skip
    data = datamodule(train_path, seed, noise, module.tokenizer, args)
    probe_data = datamodule(probe_path, seed, 0.0, module.tokenizer, args)
    probe_data.setup("fit")
    eval_at = {e * steps_per_epoch: e for e in args.eval_epochs if e <= args.epochs}
    curve = Curve(eval_at, lambda m: evaluate(m, task, probe_data, args))
    callbacks: list[L.Callback] = [curve]
    with tempfile.TemporaryDirectory(prefix="bnll_best_") as ckpt_dir:  # weights only, gone once the run is scored
        if args.validate:  # what a Lightning user does: keep the best checkpoint by the validation metric
            best = best_checkpoint(ckpt_dir, args.monitor)
            best_p = best_checkpoint(ckpt_dir, *SECOND_MONITOR, prefix="best_p")
            callbacks += [best, best_p]
        trainer = L.Trainer(
            accelerator=args.accelerator, devices=1, precision=args.precision, max_steps=steps,
            max_epochs=args.epochs, gradient_clip_val=1.0, logger=False, callbacks=callbacks,
            enable_checkpointing=args.validate, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=None if args.validate else 0, check_val_every_n_epoch=1, num_sanity_val_steps=0,
            default_root_dir=out,
        )  # fmt: skip
        start = time.perf_counter()
        if args.validate:
            val_loader = validation_loader(validation_split(probe_path, seed, noise, module.tokenizer, args), args)
            trainer.fit(module, train_dataloaders=data.train_dataloader(), val_dataloaders=val_loader)
        else:
            trainer.fit(module, data)
        seconds = time.perf_counter() - start
        selected = {}
        if args.validate:
            evaluated = {p["step"]: p for p in curve.points}  # steps scored so far: each is scored once
            selected = {**_selected(best, "best", evaluated, curve, module, task, probe_data, args),
                        **_selected(best_p, "best_p", evaluated, curve, module, task, probe_data, args)}
    last = curve.points[-1]
    alphas = curve.alphas
    return {**selected,
        "objective": key, "label": entry.label, "seed": seed, "noise": noise, "accuracy": last["accuracy"],
        "correct": last["items"].count("1"), "n": len(last["items"]), "items": last["items"],
        "curve": json.dumps(curve.points),
        "alpha_mean": entry.alpha if entry.alpha is not None else (sum(alphas) / len(alphas) if alphas else None),
        "alpha_end": alphas[-1] if alphas else entry.alpha, "alphas": ";".join(f"{a:.3f}" for a in alphas),
        "trace": json.dumps(curve.trace), "noisy_rows": data.stats["train"].get("noisy", 0),
        "num_train": _num_train(task, args), "steps": trainer.global_step,
        "train_seconds": seconds - curve.eval_seconds, "eval_seconds": curve.eval_seconds,
        "alpha_rises": json.dumps(getattr(controller, "rises", None)),
    }  # fmt: skip


def _selected(best: ModelCheckpoint, prefix: str, evaluated: dict[int, dict[str, Any]], curve: Curve, module: Any,
              task: NoiseTask, probe_data: SFTDataModule, args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """The best checkpoint by validation: its step and its held-out accuracy, as ``<prefix>_*`` columns (the
    score of that step in ``evaluated``, where it was scored; else its weights are loaded, scored and added)."""
    step, path = best_by_validation(best)
    point = evaluated.get(step)
    if point is None:
        start = time.perf_counter()
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
        point = evaluated[step] = evaluate(module, task, probe_data, args)
        curve.eval_seconds += time.perf_counter() - start
    epoch = next(v["epoch"] for v in curve.validations if v["step"] == step)
    return {"val_curve": json.dumps(curve.validations), f"{prefix}_step": step, f"{prefix}_epoch": epoch,
            f"{prefix}_accuracy": point["accuracy"], f"{prefix}_correct": point["items"].count("1"),
            f"{prefix}_items": point["items"]}


# ----------------------------------------------------------------------------- the CSV and the plan


def config_key(args: argparse.Namespace) -> str:
    fields = ("model", "epochs", "batch_size", "lr", "warmup", "num_train", "num_eval", "max_new_tokens", "max_length",
              "probe_batches", "precision", "probe_rows", "eval_epochs", "pool_scale", "canonical_targets")  # fmt: skip
    if args.validate:  # only then: the configurations before --validate keep their keys
        fields += ("validate", "monitor")
    blob = json.dumps({f: getattr(args, f) for f in fields}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def runs_csv(path: str) -> RunsCSV:
    """The study's CSV: the package's locked, resumable one (``bnll_lightning.study``)."""
    return RunsCSV(path, CSV_FIELDS, numeric=_FLOAT, integer=_INT)


def append_row(path: str, row: dict[str, Any]) -> None:
    """Append one run under an exclusive lock (processes share the file)."""
    runs_csv(path).append(row)


_FLOAT = {"accuracy", "alpha_mean", "alpha_end", "base_mean_p", "base_geometric_mean_p", "noise", "lr",
          "train_seconds", "eval_seconds", "best_accuracy", "best_p_accuracy"}  # fmt: skip
_INT = {"seed", "correct", "n", "noisy_rows", "num_train", "steps", "epochs", "batch_size", "best_step", "best_epoch",
        "best_correct", "best_p_step", "best_p_epoch", "best_p_correct"}  # fmt: skip


def read_csv(path: str, config: str | None = None) -> list[dict[str, Any]]:
    """The runs (of ``config`` if given), numbers parsed, empty cells None; a run rerun (:data:`RERUN`) once,
    its latest row."""
    latest = {(r["config"], r["task"], r["objective"], r["seed"], r["noise"]): r for r in runs_csv(path).read(config)}
    return list(latest.values())


RERUN = "best_p"  # a run's 5th element: rerun a validated run finished before the second monitor, to score it


def finished(rows: list[dict[str, Any]]) -> set[tuple]:
    """The runs ``rows`` hold, as the plan names them: (task, objective, seed, noise), and with :data:`RERUN`
    appended where the row has the second monitor's columns (no rerun needed)."""
    out = {(r["task"], r["objective"], r["seed"], r["noise"]) for r in rows}
    return out | {(r["task"], r["objective"], r["seed"], r["noise"], RERUN) for r in rows if r.get("best_p_items")}


def plan(args: argparse.Namespace) -> list[tuple[str, str, int | None, float | None]]:
    """Every run as (task, objective, seed, noise), most important first: the base models; the core
    objectives at the middle noise rate, every seed; the weak + long regime; then seed by seed the clean
    end of the noise grid, the rest of the objectives at the middle rate and the noisy end; last the
    candidates the dev task did not choose (v2 ``adaptive``, ``adaptive_median``) across the grid."""
    strong = [t for t in args.tasks if NOISE_TASKS[t].self_phrased]
    weak = [t for t in args.tasks if not NOISE_TASKS[t].self_phrased]
    mid = args.noises[len(args.noises) // 2]
    core = [k for k in args.objectives if k in CORE or k not in (*REST, *WEAK)]
    grid = [k for k in core if k not in NOT_CHOSEN]
    rest = [k for k in args.objectives if k not in core]
    low, high = [n for n in args.noises if n < mid], [n for n in args.noises if n > mid]
    runs: list[tuple[str, str, int | None, float | None]] = [(t, BASE, None, None) for t in args.tasks]
    seeds = range(args.seeds)
    if args.validate:
        return _validate_plan(args, runs, strong, weak)
    runs += [(t, k, s, mid) for s in seeds for t in strong for k in core]
    runs += [(t, k, s, 0.0) for s in seeds for t in weak for k in args.objectives if k in WEAK]
    for s in seeds:
        runs += [(t, k, s, n) for n in low for t in strong for k in grid]
        runs += [(t, k, s, mid) for t in strong for k in rest]
        runs += [(t, k, s, n) for n in high for t in strong for k in grid]
    runs += [(t, k, s, n) for s in seeds for n in (*low, *high) for t in strong for k in core if k not in grid]
    return list(dict.fromkeys(runs))


def _validate_plan(args: argparse.Namespace, runs: list[tuple], strong: list[str], weak: list[str]) -> list[tuple]:
    """--validate's order: the strong tasks at the noisiest rate, seed by seed, with the first objectives (the dev
    task first: it chooses the controller's settings) and the controller's candidates; then per group (the first
    objectives with the chosen controller, the rest of the list, the ramp) its weak + long regime, then its strong
    tasks per noise rate from the noisiest down."""
    first = [k for k in VALIDATE_FIRST if k in args.objectives]
    second = [k for k in VALIDATE_SECOND if k in args.objectives]
    then = [k for k in args.objectives if k not in (*first, *second)]
    noises = sorted(args.noises, reverse=True)
    dev = [t for t in strong if NOISE_TASKS[t].role == "dev"] + [t for t in strong if NOISE_TASKS[t].role != "dev"]
    runs += [(t, k, s, noises[0]) for s in range(args.seeds) for t in dev for k in first]
    runs += [(t, k, s, noises[0]) for t in dev[:1] for s in range(args.seeds) for k in second]
    runs += [(t, k, s, noises[0]) for s in range(args.seeds) for t in dev[1:] for k in second if k in CHOSEN]
    # Then the runs of that block finished before the val/mean_p monitor, again (same seed, same run) to score it.
    runs += [(t, k, s, noises[0], RERUN) for s in range(args.seeds) for t in dev for k in first]
    chosen = [k for k in second if k in CHOSEN]
    # Per group (the first with the chosen controller, the rest of the list, THEN_LAST), its weak end before its strong
    # tasks at the other rates: the default is the option with the lowest worst case, and the weak end is where a
    # prior-leaning option can fall furthest (α = 0.5 and ASFT there were queued by name since the noise study).
    last = [k for k in then if k in THEN_LAST]
    for group in (first + chosen, [k for k in then if k not in last], last):
        runs += [(t, k, s, 0.0) for s in range(args.seeds) for t in weak for k in group
                 if k in (*WEAK, "asft", *chosen)]  # fmt: skip
        runs += [(t, k, s, n) for n in noises for s in range(args.seeds) for t in dev for k in group
                 if n == noises[0] or k not in SUPERSEDED]  # fmt: skip
    return list(dict.fromkeys(runs))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_next(config: str, csv_path: str, runs: list[tuple]) -> tuple | None:
    """The first run of ``runs`` that is neither in the CSV nor claimed by a live process; claimed for this one.

    Processes started on the same ``--out`` share this queue (a claims file under a lock), so they work
    in the plan's order and a restarted process never repeats a run another has finished or is doing.
    """
    with open(csv_path + ".claims", "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            claims = [json.loads(line) for line in f if line.strip()]
            busy = {tuple(c["run"]) for c in claims if c["config"] == config and _alive(c["pid"])}
            done = finished(read_csv(csv_path, config))
            for run in runs:
                # A rerun only of a run finished before the second monitor, never while that run is running.
                early = len(run) > 4 and (run[:4] not in done or run[:4] in busy)
                if run not in done and run not in busy and not early:
                    f.write(json.dumps({"config": config, "run": list(run), "pid": os.getpid()}) + "\n")
                    f.flush()
                    return run
            return None
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_missing(args: argparse.Namespace, config: str, csv_path: str) -> None:
    from tqdm import tqdm

    tokenizer = load_tokenizer(args.model_path)
    CT.StudyModule.base[args.model_path] = (tokenizer, load_model(args.model_path).eval())
    done_rows = read_csv(csv_path, config)
    done = finished(done_rows)
    runs = plan(args)
    left = [run for run in runs if run not in done and (len(run) == 4 or run[:4] in done)]
    measured = [r["train_seconds"] + r["eval_seconds"] for r in done_rows if r["objective"] != BASE]
    per_run = sum(measured) / len(measured) if measured else 240.0  # a first guess until runs are measured
    print(f"[noise_study] {len(left)} of the {len(runs)} runs left ({len(done_rows)} in the CSV); projected"
          f" {len(left) * per_run / 60:.0f} min of run time at ~{per_run:.0f} s per run, divided among the"
          " processes started on this --out", file=sys.stderr, flush=True)  # fmt: skip
    bar = tqdm(total=len(left), desc="noise study", unit="run", file=sys.stderr, disable=args.quick)
    stop = os.path.join(args.out, "STOP")  # touch it to let every process finish its run and exit
    while not os.path.exists(stop) and (run := claim_next(config, csv_path, runs)) is not None:
        name, key, seed, noise = run[:4]  # a 5th element (RERUN): the same run again
        task = NOISE_TASKS[name]
        bar.set_postfix_str(f"{name} {key} seed {seed} noise {noise}")
        row = run_base(task, args, args.out) if key == BASE else run_one(task, key, seed, noise, args, args.out)
        gc.collect()
        row.update(config=config, task=name, role=task.role, epochs=args.epochs, batch_size=args.batch_size,
                   lr=args.lr, model=args.model, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))  # fmt: skip
        append_row(csv_path, row)
        bar.update(1)
        if not args.quick:
            tqdm.write(f"  {name:<15} {row['label']:<22} seed {row['seed']!s:<2} noise {noise!s:<4} accuracy"
                       f" {row['accuracy']:.3f} ({row['train_seconds']:.0f} + {row['eval_seconds']:.0f} s)",
                       file=sys.stderr)  # fmt: skip


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_arguments(parser)
    parser.set_defaults(threads=1)  # one thread per process, two processes on two cores (continuum.py's pilot)
    parser.add_argument("--model", default=None, help="model to fine-tune (default: embedded; --quick: tiny random)")
    parser.add_argument("--tasks", nargs="+", default=list(NOISE_TASKS), choices=tuple(NOISE_TASKS))
    parser.add_argument("--objectives", nargs="+", default=[*CORE, *REST], choices=tuple(ENTRIES))
    parser.add_argument("--noises", nargs="+", type=float, default=[0.0, 0.2, 0.4],
                        help="shares of training answers replaced by a wrong one (the middle one gets every objective)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (training rows, order and noise)")
    # Several epochs over a small set: long enough for NLL to memorise the wrong answers.
    parser.add_argument("--num_train", type=int, default=32, help="training rows per seed (a task may set its own)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs over the training rows")
    parser.add_argument("--eval_epochs", nargs="+", type=int, default=[1, 3, 6], help="epochs after which to evaluate")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate")
    parser.add_argument("--warmup", type=float, default=0.1, help="linear warm-up (fraction of steps), cosine to 0")
    parser.add_argument("--num_eval", type=int, default=200, help="held-out items per task (a task may set fewer)")
    parser.add_argument("--probe_rows", type=int, default=16, help="clean held-out rows whose loss is tracked")
    parser.add_argument("--pool_scale", type=float, default=1.0, help="scales each task's self-phrasing pool")
    parser.add_argument("--canonical_targets", action="store_true",
                        help="canonical answers instead of self-phrased ones (--quick: a random model answers nothing right)")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="generation budget per answer")
    parser.add_argument("--eval_batch_size", type=int, default=50, help="prompts generated together")
    parser.add_argument("--max_length", type=int, default=256, help="tokens per training row")
    parser.add_argument("--probe_batches", type=int, default=4, help="batches of the controllers' warm start")
    parser.add_argument("--bootstrap", type=int, default=4000, help="bootstrap resamples per interval")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--validate", action="store_true",
                        help="validate each epoch on the seed's probe rows noised at the training rate; keep the best"
                             " checkpoint by --monitor (ModelCheckpoint) and report it beside the last")  # fmt: skip
    parser.add_argument("--monitor", default="val/nll", help="--validate: the metric the best checkpoint minimises")
    parser.add_argument("--report", action="store_true", help="no runs: tables and plots from the CSV")
    parser.add_argument("--out", default=None, help="output directory (default: runs/noise_study; --quick: temp)")
    return parser


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    known = parser.parse_known_args(argv)[0]
    if known.validate:
        parser.set_defaults(objectives=[*VALIDATE_FIRST, *VALIDATE_SECOND, *VALIDATE_THEN])
    if known.quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    args.out = args.out or (tempfile.mkdtemp(prefix="bnll_noise_") if args.quick else "runs/noise_study")
    os.makedirs(args.out, exist_ok=True)
    threads = C.set_threads(args.threads)
    csv_path = os.path.join(args.out, "noise_study.csv")
    load0, start = C.load_average(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bnll_noise_") as work, C.quiet():
        args.model_path = args.model or ("embedded" if not args.quick else CT._tiny(work))
        args.model = CT.model_name(args)
        config = config_key(args)
        if not args.report:
            _run_missing(args, config, csv_path)
    from benchmarks import noise_report

    return noise_report.write(args, argv, config, csv_path, threads, (load0, C.load_average()),
                              time.perf_counter() - start)  # fmt: skip


if __name__ == "__main__":
    main()
