"""Bad input gets a clear error and nothing is lost: malformed data, missing fields, out-of-range config
values, skipped rows, NaN losses, remote code."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnll_lightning import module as module_lib
from bnll_lightning.cli import main
from bnll_lightning.data import SFTDataModule
from bnll_lightning.module import LoadingArgs, SFTModule
from bnll_lightning.objectives import NLL


def run_main(args, capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_info.value.code, [line for line in err.splitlines() if "error" in line.lower()]


# ----------------------------------------------------------------------------- bad data


def test_malformed_json_line_exits_2_with_one_line_naming_file_and_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.delenv("BNLL_DEBUG", raising=False)
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"prompt": "2+2", "response": "4"}\n\n{"prompt": "3+3", "response": "6"\n')
    code, err = run_main(["fit", "--model.model", tiny_model_dir, "--data.train", str(bad), "--trainer.max_steps", "1",
                          "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")], capsys)
    assert code == 2
    assert len(err) == 1, err
    # 1-based, the blank line counted
    assert err[0].startswith("bnll_lightning: data error: ") and f"{bad}: line 3: malformed JSON" in err[0]


def test_missing_field_names_field_and_row(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.delenv("BNLL_DEBUG", raising=False)
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "answer": "d"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code, err = run_main(["fit", "--model.model", tiny_model_dir, "--data.train", str(data), "--trainer.max_steps", "1",
                          "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")], capsys)
    assert code == 2
    assert len(err) == 1 and "missing field 'response'" in err[0] and "row 1 (line 2)" in err[0] and str(data) in err[0]


def test_debug_env_gives_the_traceback(tmp_path, tiny_model_dir, monkeypatch):
    from bnll_lightning.sources import DataError

    data = tmp_path / "train.jsonl"
    data.write_text("[1, 2]\n")
    monkeypatch.setenv("BNLL_DEBUG", "1")
    with pytest.raises(DataError, match="line 1"):
        main(["fit", "--model.model", tiny_model_dir, "--data.train", str(data), "--trainer.max_steps", "1",
              "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])


@pytest.mark.parametrize(("args", "key"), [
    (["--model.objective", "bnll_lightning.objectives.AlphaFamily", "--model.objective.alpha", "-0.5"], "alpha"),
    (["--model.objective", "bnll_lightning.objectives.ThresholdedNLL", "--model.objective.tau", "1.0"], "tau"),
    (["--model.objective", "bnll_lightning.objectives.TopFraction", "--model.objective.fraction", "0"], "fraction"),
    (["--model.objective", "bnll_lightning.objectives.AlphaFamily",
      "--model.alpha_controller", "bnll_lightning.alpha.AdaptiveAlpha", "--model.alpha_controller.ema_decay", "1.0"], "ema_decay"),
    (["--model.objective", "bnll_lightning.objectives.AlphaFamily",
      "--model.alpha_controller", "bnll_lightning.alpha.AdaptiveAlpha", "--model.alpha_controller.low", "0"], "low"),
])
def test_out_of_range_config_fails_at_parse_time(args, key, capsys, monkeypatch):
    monkeypatch.delenv("BNLL_DEBUG", raising=False)
    # A model that does not exist: the error must come from parsing, before anything is loaded.
    code, err = run_main(["fit", "--model.model", "/nonexistent/model", *args, "--print_config"], capsys)
    assert code == 2
    assert len(err) == 1 and f".{key}:" in err[0] and "does not conform" in err[0], err


def test_invalid_combination_is_a_one_line_config_error(capsys, monkeypatch, tiny_model_dir):
    monkeypatch.delenv("BNLL_DEBUG", raising=False)
    code, err = run_main(["fit", "--model.model", tiny_model_dir, "--model.objective", "bnll_lightning.objectives.NLL",
                          "--model.alpha_controller", "bnll_lightning.alpha.AdaptiveAlpha"], capsys)
    assert code == 2 and len(err) == 1 and "alpha_controller" in err[0]


def test_empty_and_fully_truncated_rows_are_skipped_counted_and_logged(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"{i} + {i} = ?", "response": str(2 * i)} for i in range(8)]
    rows += [{"prompt": "empty", "response": ""}, {"prompt": "blank", "response": "   "}]
    rows += [{"prompt": "word " * 200, "response": "cut away"}]  # the prompt alone exceeds max_length
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="skipped_empty_response=2, skipped_truncated=1"):
        main(["fit", "--model.model", tiny_model_dir, "--data.train", str(data), "--data.val_fraction", "0",
              "--data.max_length", "64", "--data.batch_size", "4", "--trainer.max_steps", "2",
              "--trainer.log_every_n_steps", "1",
              "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--model.histogram_every_n_steps", "0"])
    (log_dir,) = (tmp_path / "runs").glob("*/version_*")
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("data/skipped")] == [3.0]
    assert [e.value for e in acc.Scalars("data/skipped_truncated")] == [1.0]
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


# ----------------------------------------------------------------------------- NaN / Inf losses


class PoisonedNLL(NLL):
    """NLL whose loss (and so every gradient) is NaN while ``poison`` is set."""

    poison = False

    def per_token(self, logp):
        out = super().per_token(logp)
        return out * float("nan") if self.poison else out


class PoisonAt(L.Callback):
    """Poison the steps in ``steps`` (global step before the update); remember the weights after each step."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.objective.poison = trainer.global_step in self.steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({n: p.detach().clone() for n, p in pl_module.model.named_parameters()})


def nan_fit(model_dir, tmp_path, poison_steps, max_steps, max_nonfinite_steps, **trainer_kwargs):
    module = SFTModule(model=model_dir, objective=PoisonedNLL(), max_nonfinite_steps=max_nonfinite_steps,
                       histogram_every_n_steps=0, export_dir=str(tmp_path / "export"))
    data = SFTDataModule(train="builtin:sort", num_train=16, num_val=0, batch_size=2, tokenizer=module.tokenizer)
    poison = PoisonAt(poison_steps)
    callbacks = [poison, *trainer_kwargs.pop("callbacks", [])]
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
                        default_root_dir=str(tmp_path), **trainer_kwargs)
    return module, data, poison, trainer


def test_nan_step_is_skipped_and_counted_training_goes_on(tmp_path, tiny_model_dir):
    module, data, poison, trainer = nan_fit(tiny_model_dir, tmp_path, poison_steps=[1], max_steps=4,
                                            max_nonfinite_steps=2)
    with pytest.warns(UserWarning, match="non-finite loss at step 1"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4 and module.nonfinite_steps == 1
    w = poison.weights
    for name in w[0]:
        assert torch.equal(w[0][name], w[1][name]), name  # the NaN step left every weight alone
        assert torch.isfinite(w[-1][name]).all()
    assert any(not torch.equal(w[1][n], w[2][n]) for n in w[0])  # the next step trained again


def test_consecutive_nan_steps_stop_the_run_keeping_the_last_good_checkpoint(tmp_path, tiny_model_dir):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=-1)
    module, data, poison, trainer = nan_fit(tiny_model_dir, tmp_path, poison_steps=range(2, 100), max_steps=8,
                                            max_nonfinite_steps=2, callbacks=[checkpoint])
    with pytest.raises(FloatingPointError, match="2 optimizer steps in a row"), pytest.warns(UserWarning):
        trainer.fit(module, datamodule=data)
    assert module.nonfinite_steps == 2 and not (tmp_path / "export").exists()  # a diverged run is not exported
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 3  # steps 1, 2 trained, step 3 skipped, step 4 stopped the run
    good = poison.weights[1]  # after the last finite step (global step 2)
    for name, value in good.items():
        assert torch.equal(state["state_dict"][f"model.{name}"], value), name


# ----------------------------------------------------------------------------- remote code


def test_trust_remote_code_is_off_by_default(monkeypatch):
    seen = {}

    def fake_tokenizer(name, **kwargs):
        seen["tokenizer"] = kwargs["trust_remote_code"]
        return object()

    def fake_model(name, **kwargs):
        seen["model"] = kwargs["trust_remote_code"]
        raise RuntimeError("stop: nothing needs loading")

    monkeypatch.setattr(module_lib, "load_tokenizer", fake_tokenizer)
    monkeypatch.setattr(module_lib, "load_model", fake_model)
    for given, expected in (({}, False), ({"loading": LoadingArgs(trust_remote_code=True)}, True)):
        seen.clear()
        with pytest.raises(RuntimeError, match="stop"):
            SFTModule(model="org/model-with-remote-code", **given)
        assert seen == {"tokenizer": expected, "model": expected}


# ----------------------------------------------------------------------------- errors a user can act on


@pytest.mark.parametrize(
    "model, expected",
    [
        ("does/not/exist", "no such directory"),
        ("./no_model_here", "no such directory"),
        ("{empty}", "the directory holds no model (no config.json)"),
        ("nosuchorg/nosuchmodel", "not a local directory, and the hub is off (HF_HUB_OFFLINE=1)"),
    ],
)
def test_a_model_that_cannot_be_had_is_one_line_saying_which_case(model, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("BNLL_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = model.format(empty=tmp_path)
    code, err = run_main(["fit", "--model.model", model, "--trainer.max_steps", "1",
                          "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and len(err) == 1, err
    assert expected in err[0] and f"model {model!r}" in err[0] and "'embedded'" in err[0]


def test_a_class_that_rejects_its_values_is_the_line_the_user_sees(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.delenv("BNLL_DEBUG", raising=False)
    code, err = run_main(["fit", "--model.model", tiny_model_dir, "--model.objective", "AlphaFamily",
                          "--model.alpha_controller", "AdaptiveAlpha", "--model.alpha_controller.init_args.low", "0.995",
                          "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")], capsys)  # fmt: skip
    assert code == 2 and len(err) == 1, err
    assert "low must be < high" in err[0] and "Union" not in err[0]


def test_a_class_path_that_does_not_exist_lists_the_classes(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.delenv("BNLL_DEBUG", raising=False)
    code, err = run_main(["fit", "--model.model", tiny_model_dir, "--model.objective.class_path",
                          "bnll_lightning.objectives.NegativeP"], capsys)  # fmt: skip
    assert code == 2 and len(err) == 1, err
    assert "no class NegativeP in module bnll_lightning.objectives; it has: " in err[0]
    assert "NegProb" in err[0] and "ObjectiveOutput" not in err[0]


def test_malformed_json_reports_the_parsers_column(tmp_path):
    from bnll_lightning.sources import DataError, load_rows, resolve_sources

    bad = tmp_path / "train.jsonl"
    bad.write_text('{"prompt": "3+3", "response": "6" "x": 1}\n')
    with pytest.raises(DataError, match=r"line 1: malformed JSON: Expecting ',' delimiter \(column 35\)"):
        load_rows(resolve_sources(str(bad))[0])


def test_unknown_chat_roles_are_named(tmp_path):
    from bnll_lightning.sources import DataError, load_rows, resolve_sources

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "yo"}]}))
    with pytest.raises(DataError, match=r"row 0 \(line 1\): unknown role\(s\) 'bot', 'human'.*rename them"):
        load_rows(resolve_sources(str(data))[0])


def test_file_data_that_repeats_itself_is_warned_with_counts(tmp_path, tokenizer):
    rows = [{"prompt": f"q{i % 3}", "response": f"a{i % 3}"} for i in range(10)]  # 7 of 10 are repeats
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val.write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + [{"prompt": "new", "response": "x"}]))
    data = SFTDataModule(train=str(train), val=str(val), tokenizer=tokenizer)
    with pytest.warns(UserWarning) as record:
        data.setup("fit")
    messages = [str(w.message) for w in record]
    assert any("7 of 10 file rows are repeats" in m for m in messages)
    assert any("validation data: 2 of 3 rows are also training rows" in m for m in messages)


class InfGradAt(L.Callback):
    """An Inf in one gradient at the given global steps, with a finite loss (an overflow in backward)."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.steps:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({n: p.detach().clone() for n, p in pl_module.model.named_parameters()})


def test_a_nonfinite_gradient_with_a_finite_loss_skips_the_step_and_the_schedule_keeps_counting(tmp_path, tiny_model_dir):
    from bnll_lightning.alpha import LinearAlpha
    from bnll_lightning.objectives import AlphaFamily

    schedule = LinearAlpha(0.0, 1.0, steps=4)
    module = SFTModule(model=tiny_model_dir, objective=AlphaFamily(0.0), alpha_controller=schedule,
                       histogram_every_n_steps=0, export_dir=str(tmp_path / "export"))  # fmt: skip
    data = SFTDataModule(train="builtin:sort", num_train=16, num_val=0, batch_size=2, tokenizer=module.tokenizer)
    inf = InfGradAt([1])
    trainer = L.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[inf], default_root_dir=str(tmp_path), gradient_clip_val=1.0)  # fmt: skip
    with pytest.warns(UserWarning, match="non-finite gradient at step 1"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4 and module.nonfinite_steps == 1
    w = inf.weights
    assert all(torch.equal(w[0][n], w[1][n]) for n in w[0])  # the skipped step left every weight alone
    assert all(torch.isfinite(w[-1][n]).all() for n in w[0])
    assert schedule.step == trainer.global_step and module.objective.alpha == schedule.alpha_at(4) == 1.0


def test_a_resumed_static_objective_keeps_the_configured_alpha():
    from bnll_lightning.objectives import AlphaFamily

    module = SFTModule.__new__(SFTModule)  # only the checkpoint hook is under test: no model needed
    L.LightningModule.__init__(module)
    module.objective, module.alpha_controller = AlphaFamily(10.0), None
    module.on_load_checkpoint({"bnll": {"alpha": 1.0, "alpha_controller": None}})
    assert module.objective.alpha == 10.0


def test_test_step_logs_under_test(tmp_path, tiny_model_dir):
    module = SFTModule(model=tiny_model_dir, histogram_every_n_steps=0)
    data = SFTDataModule(train="builtin:sort", num_train=8, num_val=4, batch_size=2, tokenizer=module.tokenizer)
    data.test_dataloader = data.val_dataloader
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    (metrics,) = trainer.test(module, datamodule=data, verbose=False)
    assert set(metrics) == {"test/nll", "test/mean_p", "test/token_accuracy"}


def test_a_value_error_from_outside_the_package_keeps_its_traceback(tmp_path, tiny_model_dir, monkeypatch):
    """Only our own validation is a one-line "config error"; torch's or transformers' ValueErrors surface."""
    import bnll_lightning.module as module_lib

    def load_tokenizer(*args, **kwargs):  # stands in for a library raising deep inside
        raise ValueError("something inside transformers")

    monkeypatch.delenv("BNLL_DEBUG", raising=False)
    monkeypatch.setattr(module_lib, "load_tokenizer", load_tokenizer)
    with pytest.raises(ValueError, match="something inside transformers"):
        main(["fit", "--model.model", tiny_model_dir, "--trainer.logger.init_args.save_dir", str(tmp_path)])


# ----------------------------------------------------------------------------- the bad-input table of docs/scaling.md
# Each case: the arguments of the command (from the test's folder, the tiny model and a model that cannot keep packed
# rows apart) and the one line it must print, exit code 2. docs/scaling.md's table is these rows, regenerated with
#   BNLL_WRITE_DOCS=1 python -m pytest tests/test_robustness.py -k bad_input_table
# The messages are compared with <tmp> for the test's folder and <model> for the model's.
NO_MODEL = "/nonexistent/model"  # the data and directories are checked before a model would load: none is needed


def _jsonl(tmp, text):
    (tmp / "train.jsonl").write_text(text)
    return str(tmp / "train.jsonl")


def _fit(tmp, *args):
    return ["fit", "--trainer.max_steps", "1", "--trainer.logger.init_args.save_dir", str(tmp / "runs"), *args]


def _fit_on(tmp, text, model=NO_MODEL):
    """fit on a train.jsonl of ``text``."""
    return _fit(tmp, "--model.model", model, "--data.train", _jsonl(tmp, text))


def _foreign_checkpoint(tmp, model):
    """A Lightning checkpoint of the tiny Llama, for a command about another model."""
    torch.save({"state_dict": SFTModule(model).state_dict()}, tmp / "llama.ckpt")
    return str(tmp / "llama.ckpt")


BAD_INPUT = [
    ("a malformed JSON line",
     lambda tmp, m: _fit_on(tmp, '{"prompt": "a", "response": "b"}\n{"prompt": "c"\n'),
     "data error: <tmp>/train.jsonl: line 2: malformed JSON: Expecting ',' delimiter (column 15)"),
    ("a row without its response",
     lambda tmp, m: _fit_on(tmp, '{"prompt": "a", "answer": "b"}\n'),
     "data error: <tmp>/train.jsonl: row 0 (line 1): missing field 'response' (found fields: ['answer', 'prompt'])"),
    ("a weight given as a string (JSON)",
     lambda tmp, m: _fit_on(tmp, '{"prompt": "a", "response": "b", "weight": "2"}\n'),
     "data error: <tmp>/train.jsonl: row 0 (line 1): field 'weight' must be a number, got the string '2' (write it "
     "unquoted)"),
    ("a conversation that opens with the assistant, with a chat template",
     lambda tmp, m: _fit_on(tmp, '{"messages": [{"role": "assistant", "content": "hi"}]}\n', m),
     "data error: <tmp>/train.jsonl: row 0 (line 1): the conversation opens with the assistant's turn, which a chat "
     "template renders after the turns before it: start it with a user (or system) turn, set data.system_prompt, or "
     "set data.use_chat_template: false to train it as plain text"),
    ("an out-of-range value",
     lambda tmp, m: _fit(tmp, "--model.model", NO_MODEL, "--model.objective", "ThresholdedNLL",
                         "--model.objective.tau", "1.5"),
     "config error: model.objective.tau: Not of type UnitIntervalClosedOpen: 1.5 does not conform to restriction "
     "v>=0 and v<1"),
    ("an out-of-range value of an optional argument",
     lambda tmp, m: _fit(tmp, "--model.model", NO_MODEL, "--model.objective", "AlphaFamily", "--model.alpha_controller",
                         "AdaptiveAlpha", "--model.alpha_controller.initial", "1.5"),
     "config error: model.alpha_controller.initial: Not of type ClosedUnitInterval: 1.5 does not conform to "
     "restriction v>=0 and v<=1"),
    ("a class that does not exist, on the command line",
     lambda tmp, m: _fit(tmp, "--model.model", NO_MODEL, "--model.objective",
                         "bnll_lightning.objectives.NoSuchObjective"),
     "config error: model.objective: no class NoSuchObjective in module bnll_lightning.objectives; it has: ASFT, "
     "AlphaFamily, DFT, EAFT, Focal, NLL, NegProb, ThresholdedNLL, TokenAlpha, TopFraction"),
    ("a model that does not exist",
     lambda tmp, m: _fit(tmp, "--model.model", NO_MODEL),
     "config error: model '/nonexistent/model': no such directory; pass a save_pretrained directory, a hub id the "
     "machine can reach, or 'embedded'"),
    ("an ASFT reference model that does not exist",
     lambda tmp, m: _fit(tmp, "--model.model", m, "--model.objective", "ASFT",
                         "--model.objective.reference", "/no/ref"),
     "config error: model.objective.init_args.reference, the reference model of ASFT: model '/no/ref': no such "
     "directory; pass a save_pretrained directory, a hub id the machine can reach, or 'embedded'"),
    ("an export directory that cannot be written",
     lambda tmp, m: _fit(tmp, "--model.model", NO_MODEL, "--model.export_dir", str(tmp / "read_only" / "model")),
     "config error: model.export_dir: <tmp>/read_only/model cannot be written (<tmp>/read_only: <why>)"),
    ("checkpointing off with a ModelCheckpoint in the callbacks (Lightning's check)",
     lambda tmp, m: _fit(tmp, "--model.model", m, "--trainer.enable_checkpointing", "false",
                         "--trainer.callbacks+=ModelCheckpoint"),
     "config error: Trainer was configured with `enable_checkpointing=False` but found `ModelCheckpoint` in callbacks "
     "list."),
    ("packing for a model whose attention crosses rows",
     lambda tmp, m: _fit(tmp, "--model.model", _mamba(tmp, m), "--data.packing", "true"),
     "config error: data.packing: a row packed after another differs from the row alone by <err>: attention crosses "
     "rows; set data.packing: false for this model"),
    ("`evaluate` with a checkpoint of another model",
     lambda tmp, m: ["evaluate", "--model.model", _mamba(tmp, m), "--ckpt_path", _foreign_checkpoint(tmp, m)],
     "config error: --ckpt_path <tmp>/llama.ckpt: a checkpoint of another model than model.model '<tmp>/mamba' "
     "(weights: 1 of other shapes, 22 missing, 20 unexpected; model.lm_head.weight is (49152, 32) there, (49152, 16) "
     "here)"),
    ("`evaluate` with pass@k for more samples than drawn",
     lambda tmp, m: ["evaluate", "--model.model", m, "--num_samples", "2", "--temperature", "1", "--pass_k", "4"],
     "config error: --pass_k [4]: each k must lie in [1, num_samples = 2] (pass@k draws k of a prompt's samples); "
     "raise --num_samples"),
]


def _mamba(tmp, model_dir):
    """A tiny random Mamba: its state runs on from one packed row into the next (packing_unsupported_reason)."""
    from transformers import MambaConfig, MambaForCausalLM

    from bnll_lightning.models import load_tokenizer

    out = tmp / "mamba"
    if not out.exists():
        tokenizer = load_tokenizer(model_dir)
        torch.manual_seed(0)
        MambaForCausalLM(MambaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, state_size=4,
                                     use_cache=False)).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return str(out)


def _normalized(line: str, tmp, model_dir) -> str:
    """The parts that vary from run to run as placeholders: folders, a float, the system's words for a
    read-only folder (Permission denied for a user, Read-only file system for root)."""
    line = line.removeprefix("bnll_lightning: ").replace(str(tmp), "<tmp>").replace(str(model_dir), "<model>")
    line = re.sub(r"(read_only): (Permission denied|Read-only file system)\)", r"\1: <why>)", line)
    return re.sub(r"differs from the row alone by [\d.e+-]+", "differs from the row alone by <err>", line)


@pytest.mark.parametrize("what, args, expected", BAD_INPUT, ids=[case[0] for case in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_leaves_no_run_behind(what, args, expected, tmp_path, tiny_model_dir, capsys,
                                                               monkeypatch, request):  # fmt: skip
    monkeypatch.delenv("BNLL_DEBUG", raising=False)
    if "<why>" in expected:
        request.getfixturevalue("read_only_dir")  # <tmp>/read_only
    monkeypatch.chdir(tmp_path)  # evaluate's default output, had it run
    code, err = run_main(args(tmp_path, tiny_model_dir), capsys)
    assert code == 2 and len(err) == 1, err
    assert _normalized(err[0], tmp_path, tiny_model_dir) == expected
    assert not (tmp_path / "runs").exists()  # nothing ran, so no empty version_N either


TABLE_START = "<!-- the bad-input table: generated from tests/test_robustness.py (BAD_INPUT) -->"
TABLE_END = "<!-- end of the bad-input table -->"


def test_bad_input_table_in_the_docs_is_the_tested_one():
    rows = [f"| {what} | `` {expected} `` |" for what, _, expected in BAD_INPUT]  # a message may hold backticks
    header = "| input | the line on stderr (after `bnll_lightning: `), exit code 2 |"
    table = "\n".join([TABLE_START, header, "|---|---|", *rows, TABLE_END])
    docs = Path(__file__).parents[1] / "docs" / "scaling.md"
    text = docs.read_text()
    start, end = text.index(TABLE_START), text.index(TABLE_END) + len(TABLE_END)
    if os.environ.get("BNLL_WRITE_DOCS"):
        docs.write_text(text[:start] + table + text[end:])
    assert text[start:end] == table, "docs/scaling.md's bad-input table is stale: BNLL_WRITE_DOCS=1 regenerates it"
