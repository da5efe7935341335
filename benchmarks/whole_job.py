"""A whole job, phase by phase: ``fit`` on ``configs/demo.yaml``, TRL ``SFTTrainer`` and the floor on the same batches.

Every run is a fresh Python process, so interpreter start and imports count. The sides:

- **ours**: the CLI a user runs, ``python -m bnll_lightning fit --config configs/demo.yaml`` (export on), with
  ``--trainer.max_steps``, ``--data.num_train``, ``--model.model`` and the logger's folder set from the options;
- **ours, no validation**: the same with ``--trainer.limit_val_batches=0``;
- **TRL** ``SFTTrainer`` (the ``bench`` extra), when importable: the same model (loaded by ``bnll_lightning.models``),
  tokenized rows, batches (``train_sampling_strategy="sequential"`` over the rows in our batch order), steps, lr,
  betas, weight decay, warm-up and cosine schedule, clipping, precision, threads and checkpoint steps (one kept,
  as ours keeps one; TRL also saves at its last step), fused AdamW, no activation checkpointing, no evaluation,
  its default logging; then ``save_model`` and ``create_model_card`` (export on);
- **the floor**: a plain loop, no Lightning: the HF model's forward, the same objective's loss
  (``bnll_lightning.objectives.AlphaFamily`` at the config's α, static: the controller is not run) with log p
  computed as the config's ``model.streaming`` says (streamed from the body's hidden states by the package's
  ``streamed_token_stats``; ``--floor-logp full``: from the model's full logits), backward, clipping, the same
  fused AdamW and schedule, a ``torch.save`` of weights + optimizer + schedule at the steps ours checkpoints,
  ``save_pretrained`` of model and tokenizer and a README at the end.

The harness tokenizes the rows once, as the config's data module does (this also converts the embedded model
if it is not cached yet, so no timed run pays for that), and checks that every side trained on those batches.

Phases, from ``time.monotonic()`` (CLOCK_MONOTONIC on Linux: one clock for every process; it is what
``time.perf_counter()`` reads there) marked without changing the package:

- interpreter start: the parent's spawn to the child's first line;
- imports: from there to the side's libraries imported (ours: ``bnll_lightning.cli``; later lazy imports count in
  the phase that triggers them);
- model load or conversion: ``SFTModule.load_pretrained`` (ours, wrapped in the child), ``load_model`` +
  ``load_tokenizer`` (TRL, floor);
- data: ``SFTDataModule.read/setup/train_dataloader/val_dataloader`` (ours: generating and tokenizing the task);
  reading the harness's tokenized rows (TRL: JSON + ``Dataset``) or collated batches (floor);
- optimizer steps: the span from the first step's start to the last step's end (data fetch, logging and the
  loop's own work included), less what falls in a phase below;
- each validation with its generation: ``on_validation_start`` to ``on_validation_end`` of a ``PhaseTimer``
  callback that the run gets with ``--trainer.callbacks+=benchmarks.whole_job.PhaseTimer``; generation alone
  (``GenerationEval``'s hook, wrapped) is a row of its own, per answer, not added to the sum;
- checkpoint writes: ``trainer.save_checkpoint`` (ours), ``Trainer._save_checkpoint`` (TRL), ``torch.save``
  (floor), each wrapped;
- export and the model card: ``HFExport.on_train_end`` + ``on_fit_end`` (with the disk report; ours),
  ``save_model`` + ``create_model_card`` (TRL), ``save_pretrained`` + a README (floor);
- other: the rest before the first step (CLI, config, trainer and loop set-up; TRL: the trainer's construction)
  and after the last (teardown, process exit).

Each instant of a run belongs to one phase, so the phases add up to the run's wall time (spawn to exit).
**Start-up** (spawn to the first step's start) is reported as its own row. Runs alternate ours / ours without
validation / TRL / the floor, the order reversed every other pair; ratios are per pair, reported as the median
[min-max]. The rows of TRL and the floor start tokenized, so their data phase is a floor for that phase.

    python benchmarks/whole_job.py [--quick] [--pairs 3] [--steps 16] [--rows 128] [--model embedded] [--threads N]
"""

from __future__ import annotations

import argparse
import atexit
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

# Only the standard library at the top: a child's import phase is its own side's imports, not this harness's.

CONFIG = ROOT / "configs" / "demo.yaml"
SIDES = ("ours", "ours_noval", "trl", "floor")
SIDE_NAMES = {"ours": "ours, demo.yaml", "ours_noval": "ours, no validation", "trl": "TRL SFTTrainer",
              "floor": "floor (plain loop)"}
# (key, row label) in table order; "validation" expands to one row per validation.
PHASES = [
    ("interpreter", "interpreter start"),
    ("imports", "imports"),
    ("model", "model load or conversion"),
    ("data", "data"),
    ("steps", "optimizer steps"),
    ("validation", "validation {k}, with its generation"),
    ("checkpoint", "checkpoint writes"),
    ("export", "export and model card"),
    ("setup", "other before the first step (CLI, config, set-up)"),
    ("teardown", "other after the last step (teardown, exit)"),
]
# An instant inside several marked intervals belongs to the first of these (a checkpoint inside a validation
# is a checkpoint; data fetched in the training span is a step).
PRIORITY = ["checkpoint", "export", "validation", "model", "data", "imports", "interpreter", "steps"]
WALL, STARTUP, GENERATION, DISK = ("whole job (wall: spawn to exit)", "start-up: process start to the first step",
                                   "generation per answer (part of its validation)", "left on disk (GB)")

MIN_SECONDS = 0.05  # phases shorter than this on either side get no ratio
clock = time.monotonic

# --------------------------------------------------------------------------- in the child process

_RUN: dict[str, Any] = {"marks": {}, "intervals": [], "steps": [], "batches": [], "info": {}}


def _interval(label: str, start: float, **extra: Any) -> None:
    _RUN["intervals"].append({"label": label, "start": start, "end": clock(), **extra})


def _timed(label: str, fn, after=None):
    """``fn`` recording each call as a ``label`` interval (``after(*args)``: extra fields for it)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            _interval(label, start, **(after(*args) if after else {}))

    return wrapper


def _wrap_method(cls: type, name: str, label: str) -> None:
    setattr(cls, name, _timed(label, getattr(cls, name)))


def _answers(*_: Any) -> dict[str, int]:
    return {"answers": _RUN["info"].pop("answers", 0)}


def _patch_trainer(trainer: Any) -> None:
    """Time what the Lightning hooks cannot separate: checkpoint writes, the export, generation."""
    trainer.save_checkpoint = _timed("checkpoint", trainer.save_checkpoint)
    for callback in trainer.callbacks:
        name = type(callback).__name__
        if name == "HFExport":
            callback.on_train_end = _timed("export", callback.on_train_end)
            callback.on_fit_end = _timed("export", callback.on_fit_end)
        elif name == "GenerationEval":
            hook = callback.on_validation_epoch_end

            def generate(trainer, pl_module, _hook=hook, _callback=callback):
                before = _callback.last_result
                _hook(trainer, pl_module)
                if _callback.last_result is not before and _callback.last_result is not None:
                    _RUN["info"]["answers"] = len(_callback.last_result.predictions)

            callback.on_validation_epoch_end = _timed("generation", generate, after=_answers)


def _phase_timer() -> type:
    import lightning.pytorch as L

    class PhaseTimer(L.Callback):
        """Marks a fit's phases (``--trainer.callbacks+=benchmarks.whole_job.PhaseTimer``) for the harness."""

        def setup(self, trainer, pl_module, stage):
            _patch_trainer(trainer)

        def on_fit_start(self, trainer, pl_module):
            _RUN["marks"]["fit_start"] = clock()

        def on_train_start(self, trainer, pl_module):
            _RUN["marks"]["train_start"] = clock()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _RUN["steps"].append([clock(), None])
            _RUN["batches"].append(batch)  # hashed at exit: the same batches as the floor's?

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _RUN["steps"][-1][1] = clock()

        def on_validation_start(self, trainer, pl_module):
            _RUN["marks"]["validation_start"] = clock()

        def on_validation_end(self, trainer, pl_module):
            _interval("validation", _RUN["marks"].pop("validation_start"))

        def on_train_end(self, trainer, pl_module):
            _RUN["marks"]["train_end"] = clock()

        def on_fit_end(self, trainer, pl_module):
            _RUN["marks"]["fit_end"] = clock()
            _RUN["info"]["global_step"] = trainer.global_step

    PhaseTimer.__module__, PhaseTimer.__qualname__ = __name__, "PhaseTimer"
    return PhaseTimer


def __getattr__(name: str) -> Any:
    # PhaseTimer is a Lightning callback, built on first use so that importing this module stays light.
    if name == "PhaseTimer":
        cls = globals()["PhaseTimer"] = _phase_timer()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def batch_hash(batch: dict) -> str:
    """The batch's real tokens, row by row (padding left out: each side pads with its own token)."""
    ids = batch["input_ids"].detach().cpu()
    if batch.get("attention_mask") is not None:
        ids = ids[batch["attention_mask"].detach().cpu().bool()]
    return hashlib.sha1(ids.contiguous().numpy().tobytes()).hexdigest()[:16]


def _write_result(path: str) -> None:
    out = {k: _RUN[k] for k in ("marks", "intervals", "steps", "info")}
    out["batch_hashes"] = [batch_hash(b) for b in _RUN["batches"]]
    with open(path, "w") as f:
        json.dump(out, f)


def child(t0: float, spec_path: str) -> None:
    """A run's process: ``t0`` is the time at its first line."""
    with open(spec_path) as f:
        spec = json.load(f)
    _RUN["marks"]["main"] = t0
    atexit.register(_write_result, spec["out"])
    {"ours": _child_ours, "ours_noval": _child_ours, "trl": _child_trl, "floor": _child_floor}[spec["side"]](spec)


def _child_ours(spec: dict) -> None:
    import bnll_lightning.cli as cli  # what `python -m bnll_lightning` imports
    import torch

    torch.set_num_threads(spec["threads"])
    _RUN["marks"]["imported"] = clock()
    from bnll_lightning.data import SFTDataModule
    from bnll_lightning.module import SFTModule

    _wrap_method(SFTModule, "load_pretrained", "model")
    for name in ("read", "setup", "train_dataloader", "val_dataloader"):
        _wrap_method(SFTDataModule, name, "data")
    sys.argv = [str(ROOT / "bnll_lightning" / "__main__.py"), *spec["argv"]]  # as `python -m` sets it
    cli.main()


def _child_floor(spec: dict) -> None:
    from functools import partial

    import torch
    import transformers  # noqa: F401  (load_model imports it lazily: here it counts as an import)
    from transformers import AutoModelForCausalLM  # noqa: F401

    from bnll_lightning.logp_head import target_labels
    from bnll_lightning.models import load_model, load_tokenizer
    from bnll_lightning.objectives import IGNORE_INDEX, AlphaFamily
    from bnll_lightning.optim import decay_groups, resolve_warmup, warmup_cosine
    from bnll_lightning.streaming import hidden_and_head, streamed_token_stats, streaming_head

    torch.set_num_threads(spec["threads"])
    _RUN["marks"]["imported"] = clock()
    job = spec["job"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as the config's accelerator: auto
    start = clock()
    model, tokenizer = load_model(spec["model"]).to(device), load_tokenizer(spec["model"])
    model.config.use_cache = False
    _interval("model", start)
    start = clock()
    batches = torch.load(spec["batches"])
    _interval("data", start)
    objective = AlphaFamily(alpha=job["alpha"])
    head, chunk = streaming_head(model), job["chunk_size"]
    decay, no_decay = decay_groups(model)
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=job["lr"],
                                  betas=tuple(job["betas"]), weight_decay=job["weight_decay"], fused=True)
    steps = job["steps"]
    schedule = partial(warmup_cosine, warmup_steps=resolve_warmup(job["warmup"], steps), total_steps=steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    params = [p for p in model.parameters() if p.requires_grad]
    for i, batch in enumerate(batches[:steps]):
        _RUN["steps"].append([clock(), None])
        _RUN["batches"].append(batch)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        labels = target_labels(batch)
        if spec["floor_logp"] == "streamed":  # the config's log p: chunk by chunk from the body's hidden states
            hidden, weight, bias = hidden_and_head(model, batch["input_ids"], batch["attention_mask"])
            stats = streamed_token_stats(hidden, weight, labels, IGNORE_INDEX, chunk, bias, head.scale, head.softcap)
            loss = objective.from_stats(stats).loss
        else:  # the HF model's forward: full logits
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            loss = objective(logits, labels).loss
        loss.backward()
        if job["clip"]:
            torch.nn.utils.clip_grad_norm_(params, job["clip"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()  # the step is done when the device is
        _RUN["steps"][-1][1] = clock()
        if job["checkpoint_every"] and (i + 1) % job["checkpoint_every"] == 0:
            start = clock()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": i + 1}, os.path.join(spec["work"], "last.ckpt"))
            _interval("checkpoint", start)
    start = clock()
    export = os.path.join(spec["work"], "hf_model")
    model.save_pretrained(export)
    tokenizer.save_pretrained(export)
    with open(os.path.join(export, "README.md"), "w") as f:
        f.write(f"# floor run\n\n{steps} optimizer steps of {job['objective']} from {spec['model']}\n")
    _interval("export", start)
    _RUN["info"]["global_step"] = len(_RUN["steps"])


def _child_trl(spec: dict) -> None:
    import dataclasses

    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from bnll_lightning.models import load_model, load_tokenizer

    torch.set_num_threads(spec["threads"])
    _RUN["marks"]["imported"] = clock()
    job = spec["job"]
    start = clock()
    model, tokenizer = load_model(spec["model"]), load_tokenizer(spec["model"])
    _interval("model", start)
    start = clock()
    with open(spec["rows"]) as f:
        dataset = datasets.Dataset.from_list(json.load(f))
    _interval("data", start)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            _RUN["steps"].append([clock(), None])

        def on_step_end(self, args, state, control, **kwargs):
            _RUN["steps"][-1][1] = clock()

    from bnll_lightning.optim import resolve_warmup

    every = job["checkpoint_every"]
    # Our batches in our order: the rows come in that order, read sequentially (older transformers: set below).
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    sequential = "train_sampling_strategy" in fields
    # No activation checkpointing (TRL turns it on by default; newer transformers name it activation_checkpointing).
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    no_checkpointing = {checkpointing: False}
    config = SFTConfig(
        output_dir=os.path.join(spec["work"], "trl"), per_device_train_batch_size=job["batch_size"],
        max_steps=job["steps"], num_train_epochs=1, learning_rate=job["lr"], adam_beta1=job["betas"][0],
        adam_beta2=job["betas"][1], weight_decay=job["weight_decay"], max_grad_norm=job["clip"] or 0.0,
        warmup_steps=resolve_warmup(job["warmup"], job["steps"]), lr_scheduler_type="cosine",
        bf16=False, fp16=False, optim="adamw_torch_fused", max_length=job["max_length"], **no_checkpointing,
        use_cpu=not torch.cuda.is_available(), report_to="none", eval_strategy="no",
        save_strategy="steps" if every else "no", save_steps=every or 500, save_total_limit=1,
        dataloader_num_workers=0, seed=0, **({"train_sampling_strategy": "sequential"} if sequential else {}),
    )
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=dataset,
                         callbacks=[StepTimer()])
    if not sequential:
        trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(trainer.train_dataset)
    collate = trainer.data_collator

    def recording_collator(features):  # hashed at exit: the batches ours trained on?
        batch = collate(features)
        _RUN["batches"].append(batch)
        return batch

    trainer.data_collator = recording_collator
    trainer._save_checkpoint = _timed("checkpoint", trainer._save_checkpoint)
    trainer.train()
    start = clock()
    trainer.save_model(os.path.join(spec["work"], "trl", "hf_model"))
    trainer.create_model_card()
    _interval("export", start)
    _RUN["info"]["global_step"] = trainer.state.global_step


BOOT = "import time; t0 = time.monotonic()\nimport sys; sys.path.insert(0, {root!r})\n" \
       "from benchmarks import whole_job; whole_job.child(t0, {spec!r})\n"

# --------------------------------------------------------------------------- the harness


def job_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What the demo config says, with the options applied: the job every side runs."""
    import yaml

    cfg = yaml.safe_load(CONFIG.read_text())
    model, trainer = cfg["model"], cfg["trainer"]
    opt = model["optimizer"]["init_args"]
    checkpoint = [c for c in trainer.get("callbacks") or [] if c["class_path"].endswith("ModelCheckpoint")]
    objective = model["objective"]
    alpha = (objective.get("init_args") or {}).get("alpha", 0.0)
    return {
        "steps": args.steps, "rows": args.rows, "lr": opt["lr"], "betas": list(opt.get("betas", (0.9, 0.999))),
        "weight_decay": opt.get("weight_decay", 0.01), "warmup": model.get("warmup", 0.1),
        "clip": trainer.get("gradient_clip_val") or 0.0, "precision": str(trainer.get("precision")),
        "batch_size": cfg["data"]["batch_size"], "max_length": cfg["data"]["max_length"], "alpha": alpha,
        "objective": f"{objective['class_path'].rsplit('.', 1)[-1]}(alpha={alpha})",
        "checkpoint_every": checkpoint[0]["init_args"].get("every_n_train_steps") if checkpoint else None,
        "streamed": (model.get("streaming") or {}).get("streamed", True),
        "chunk_size": (model.get("streaming") or {}).get("chunk_size", 1024),
        "data": {**cfg["data"], "num_train": args.rows},
    }


def prepare(work: str, args: argparse.Namespace, job: dict) -> dict[str, Any]:
    """The model (``--quick``: a tiny random one) and the job's batches in our training order, as the floor's
    collated batches (``batches.pt``) and TRL's tokenized rows (``rows.json``); their input ids' hashes."""
    import torch

    from benchmarks import _common as C
    from bnll_lightning.data import SFTDataModule
    from bnll_lightning.models import load_tokenizer

    model = args.model
    with C.quiet():
        if args.quick:
            model = os.path.join(work, "model")
            C.save_random_model(model, **C.TINY)
        data = SFTDataModule(**job["data"], tokenizer=load_tokenizer(model))
        data.setup("fit")
        loader = data.train_dataloader()
    size = job["batch_size"]
    if len(data.train_dataset) % size:
        raise SystemExit(f"--rows: {len(data.train_dataset)} usable rows is not a multiple of the batch size {size}: "
                         "TRL's batches would not be ours after the first epoch")
    order: list[list[int]] = []
    epoch = 0
    while len(order) < job["steps"]:  # an epoch's order is a function of (seed, epoch), as in the fit
        loader.sampler.set_epoch(epoch)
        indices = list(loader.sampler)
        order += [indices[i:i + size] for i in range(0, len(indices), size)]
        epoch += 1
    order = order[: job["steps"]]
    features = data.train_dataset.features
    batches = [data.collate([features[i] for i in chunk]) for chunk in order]
    paths = {"model": model, "batches": os.path.join(work, "batches.pt"), "rows": os.path.join(work, "rows.json")}
    torch.save(batches, paths["batches"])
    with open(paths["rows"], "w") as f:
        json.dump([{"input_ids": list(features[i]["input_ids"]), "labels": list(features[i]["labels"])}
                   for chunk in order for i in chunk], f)
    paths["hashes"] = [batch_hash(b) for b in batches]
    paths["tokens"] = sum(int(b["attention_mask"].sum()) for b in batches)
    return paths


def ours_argv(side: str, model: str, job: dict, run_dir: str) -> list[str]:
    argv = ["fit", "--config", str(CONFIG), f"--trainer.max_steps={job['steps']}",
            f"--data.num_train={job['rows']}", f"--model.model={model}",
            f"--trainer.logger.init_args.save_dir={os.path.join(run_dir, 'runs')}",
            "--trainer.callbacks+=benchmarks.whole_job.PhaseTimer"]
    return argv + (["--trainer.limit_val_batches=0"] if side == "ours_noval" else [])


def disk_bytes(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            p = os.path.join(folder, name)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def run_side(side: str, paths: dict, job: dict, work: str, tag: str, threads: int, keep: bool,
             floor_logp: str = "streamed") -> dict:
    """One run in a fresh process; its phases (seconds), wall, start-up, generation and disk."""
    run_dir = os.path.join(work, tag)
    os.makedirs(run_dir)
    spec = {"side": side, "model": paths["model"], "threads": threads, "work": run_dir, "job": job,
            "batches": paths["batches"], "rows": paths["rows"], "out": os.path.join(run_dir, "phases.json"),
            "floor_logp": floor_logp}
    if side.startswith("ours"):
        spec["argv"] = ours_argv(side, paths["model"], job, run_dir)
    spec_path = os.path.join(work, f"{tag}.spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = os.path.join(work, f"{tag}.log")
    with open(log, "w") as out:
        spawn = clock()
        proc = subprocess.run([sys.executable, "-c", BOOT.format(root=str(ROOT), spec=spec_path)],
                              stdout=out, stderr=subprocess.STDOUT, cwd=run_dir, env=env)
        end = clock()
    if proc.returncode != 0 or not os.path.exists(spec["out"]):
        with open(log) as f:
            raise RuntimeError(f"{tag} failed (exit {proc.returncode}):\n{f.read()[-4000:]}")
    with open(spec["out"]) as f:
        raw = json.load(f)
    result = account(raw, spawn, end)
    result["bytes"] = disk_bytes(run_dir)
    result["same_batches"] = raw["batch_hashes"][: len(paths["hashes"])] == paths["hashes"]
    result["global_step"] = raw["info"].get("global_step")
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def account(raw: dict, spawn: float, end: float) -> dict:
    """Each instant of [spawn, end] in one phase (``PRIORITY``; the rest before the first step is set-up,
    after it teardown): seconds per phase, which add up to the wall time."""
    marks = raw["marks"]
    steps = [(s, e) for s, e in raw["steps"] if e is not None]
    intervals: list[tuple[str, float, float]] = [("interpreter", spawn, marks["main"])]
    intervals.append(("imports", marks["main"], marks.get("imported", marks["main"])))
    validations = sorted((i for i in raw["intervals"] if i["label"] == "validation"), key=lambda i: i["start"])
    for k, item in enumerate(validations, 1):
        intervals.append((f"validation {k}", item["start"], item["end"]))
    intervals += [(i["label"], i["start"], i["end"]) for i in raw["intervals"]
                  if i["label"] not in ("validation", "generation")]
    if steps:
        intervals.append(("steps", steps[0][0], steps[-1][1]))
    first = steps[0][0] if steps else end
    last = steps[-1][1] if steps else end

    def rank(label: str) -> int:
        return PRIORITY.index(label.split(" ")[0])

    cuts = sorted({min(max(t, spawn), end) for _, a, b in intervals for t in (a, b)} | {spawn, end, first, last})
    phases: dict[str, float] = {}
    for a, b in zip(cuts, cuts[1:]):
        mid = (a + b) / 2
        covering = [label for label, s, e in intervals if s <= mid < e]
        label = min(covering, key=rank) if covering else "setup" if mid < first else "teardown"
        phases[label] = phases.get(label, 0.0) + (b - a)
    generation = [(i["end"] - i["start"], i.get("answers", 0)) for i in raw["intervals"] if i["label"] == "generation"]
    return {"phases": phases, "wall": end - spawn, "startup": first - spawn, "validations": len(validations),
            "generation": generation, "checkpoints": sum(i["label"] == "checkpoint" for i in raw["intervals"]),
            "steps": len(steps)}


# --------------------------------------------------------------------------- the table


def spread(xs: list[float], digits: int = 2) -> str:
    """'median [min-max]' (one value: itself)."""
    from benchmarks import _common as C

    if not xs:
        return "-"
    med = C.fmt(C.median(xs), digits)
    return med if len(xs) == 1 else f"{med} [{C.fmt(min(xs), digits)}-{C.fmt(max(xs), digits)}]"


def value(run: dict, key: str) -> float | None:
    if key == WALL:
        return run["wall"]
    if key == STARTUP:
        return run["startup"] if run["steps"] else None
    if key == DISK:
        return run["bytes"] / 1e9
    if key == GENERATION:
        seconds, answers = sum(s for s, _ in run["generation"]), sum(n for _, n in run["generation"])
        return seconds / answers if answers else None
    return run["phases"].get(key)


def table(results: dict[str, list[dict]], sides: list[str], job: dict) -> str:
    from benchmarks import _common as C

    validations = max((r["validations"] for runs in results.values() for r in runs), default=0)
    keys: list[tuple[str, str]] = []
    for key, label in PHASES:
        if key == "validation":
            keys += [(f"validation {k}", label.format(k=k)) for k in range(1, validations + 1)]
            if validations:
                keys.append((GENERATION, GENERATION))
        elif key == "steps":
            keys.append((key, f"{label} ({job['steps']})"))
        else:
            keys.append((key, label))
    keys += [(WALL, f"**{WALL}**"), (STARTUP, STARTUP), (DISK, DISK)]
    ratio_to = [s for s in ("trl", "floor") if s in sides]
    rows = []
    for key, label in keys:
        row: list[object] = [label]
        for side in sides:
            xs = [x for x in (value(r, key) for r in results[side]) if x is not None]
            row.append(spread(xs, 4 if key == GENERATION else 2))
        for other in ratio_to:  # per pair: ours (no validation) / the other side
            pairs = zip(results["ours_noval"], results[other])
            floor_ = 0.0 if key == DISK else MIN_SECONDS  # a ratio of two near-zero times says nothing
            ratios = [a / b for a, b in ((value(x, key), value(y, key)) for x, y in pairs)
                      if a is not None and b is not None and a >= floor_ and b > floor_]
            row.append(spread(ratios))
        rows.append(row)
    headers = ["phase (s)", *(SIDE_NAMES[s] for s in sides), *(f"ours no-val / {SIDE_NAMES[s]}" for s in ratio_to)]
    return C.markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> str:
    from benchmarks import _common as C
    from benchmarks.throughput import trl_version

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_arguments(parser)
    parser.add_argument("--model", default="embedded", help="model for every side (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    parser.add_argument("--rows", type=int, default=128, help="training rows (data.num_train)")
    parser.add_argument("--pairs", type=int, default=3, help="rounds of runs, each side once per round")
    parser.add_argument("--no-peer", action="store_true", help="leave TRL out even when it is installed")
    parser.add_argument("--floor-logp", choices=["config", "streamed", "full"], default="config",
                        help="the floor's log p: as the config's model.streaming says (default), streamed from the"
                             " body's hidden states, or from the HF model's full logits")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder (checkpoints, export, logs)")
    parser.add_argument("--work", help="folder for the runs (default: a temporary one, removed after)")
    parser.add_argument("--json", help="write every run's phases (seconds) to this file")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs = 1
    if args.steps < 1 or args.rows < 1 or args.pairs < 1:
        parser.error("--steps, --rows and --pairs must be >= 1")
    threads = C.set_threads(args.threads)
    peer = None if args.no_peer else trl_version()
    sides = [s for s in SIDES if s != "trl" or peer]
    job = job_settings(args)
    if job["precision"] != "32-true":  # the floor and TRL run float32
        raise SystemExit(f"{CONFIG.name} trains in {job['precision']}: this harness compares float32 runs only")
    floor_logp = args.floor_logp if args.floor_logp != "config" else "streamed" if job["streamed"] else "full"

    load0 = C.load_average()
    work = args.work or tempfile.mkdtemp(prefix="bnll_whole_job_")
    os.makedirs(work, exist_ok=True)
    try:
        paths = prepare(work, args, job)
        results: dict[str, list[dict]] = {s: [] for s in sides}
        for p in range(args.pairs):
            for side in sides if p % 2 == 0 else sides[::-1]:
                out = run_side(side, paths, job, work, f"pair{p}_{side}", threads, args.keep, floor_logp)
                print(f"[whole_job] pair {p}: {side}: wall {out['wall']:.1f} s, start-up {out['startup']:.1f} s",
                      file=sys.stderr)
                results[side].append(out)
    finally:
        if not args.work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    load1 = C.load_average()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"job": job, "sides": sides, "results": results}, f, indent=1)

    same = {s: all(r["same_batches"] for r in results[s]) for s in sides}
    steps_done = {s: sorted({r["global_step"] for r in results[s]}) for s in sides}
    writes = {s: sorted({r["checkpoints"] for r in results[s]}) for s in sides}
    conditions = [
        f"model: {'tiny random (--quick)' if args.quick else args.model}; {job['precision']}; {threads} torch threads"
        f" on every side; each run a fresh process",
        f"job: configs/demo.yaml with max_steps {job['steps']}, num_train {job['rows']} (batch {job['batch_size']},"
        f" {paths['tokens']} tokens in the {job['steps']} batches), {job['objective']} + the config's controller,"
        f" lr {job['lr']}, checkpoint every {job['checkpoint_every']} steps, export on; optimizer steps per side:"
        f" {steps_done}; checkpoints written per run: {writes}",
        f"peer: {'TRL ' + peer + ' SFTTrainer (loss nll, fused AdamW, its default logging)' if peer else 'TRL not run'}"
        f" on the same tokenized rows in our batch order; the floor on the same collated batches, log p {floor_logp}"
        f" (chunk {job['chunk_size']}); every step's real tokens equal to the harness's batches: "
        + ", ".join(f"{s} {'yes' if ok else '**no**'}" for s, ok in same.items()),
        f"{args.pairs} pair(s), sides alternating {' / '.join(sides)} (reversed every other pair); a cell is the"
        " median [min-max] over pairs, a ratio the median [min-max] of the per-pair ratios",
        "the phases of a run add up to its wall time; start-up, generation per answer and disk are not part of the"
        " sum",
    ]
    notes = ["Timed on a shared machine: compare the ratios within this run; absolute seconds are indicative only."]
    return C.report("Whole job: fit / TRL SFTTrainer / floor, phase by phase", "whole_job.py", args, argv, threads,
                    table(results, sides, job), conditions, notes, load=(load0, load1))


if __name__ == "__main__":
    main()
