"""Evaluation by generation: checkers, batched generation, the callback and the CLI."""

import json
import math
from pathlib import Path

import pytest
import torch

from bnll_lightning.callbacks import GenerationEval
from bnll_lightning.cli import evaluate_main
from bnll_lightning.evaluate import evaluate_generation, generate, get_checker, stop_token_ids
from bnll_lightning.tasks import get_task

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    """A tiny random Llama whose greedy output varies with the context (a tied tiny model just
    repeats its last input token, which would hide padding and position bugs)."""
    from benchmarks._common import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("untied") / "model"), hidden_size=32, num_layers=2,
                           num_heads=2, intermediate_size=64, tie_word_embeddings=False, seed=1)


@pytest.fixture(scope="module")
def untied(untied_dir):
    from bnll_lightning.models import load_model, load_tokenizer

    return load_model(untied_dir, dtype="float32"), load_tokenizer(untied_dir)


# ------------------------------------------------------------------ checkers


@pytest.mark.parametrize(
    "checker, prediction, row, expected",
    [
        ("exact", " Paris\n", {"answer": "Paris"}, True),
        ("exact", "paris", {"answer": "Paris"}, False),
        ("exact", "Paris", {"prompt": "q", "response": "Paris"}, True),  # no answer field: the response
        ("normalized", "  PARIS.  ", {"answer": "Paris"}, True),
        ("normalized", "New   york!", {"answer": "new york"}, True),
        ("normalized", "Paris, France", {"answer": "Paris"}, False),
        ("task", "The sum is 81.", {"answer": "81", "task": "add"}, True),
        ("task", "80", {"answer": "81", "task": "add"}, False),
        ("math", "so the answer is \\boxed{1/2}", {"answer": "0.5"}, True),
        ("math", "\\boxed{0.5}", {"answer": "\\frac{1}{2}"}, True),
        ("math", "\\boxed{2/3}", {"answer": "0.5"}, False),
        ("math", "no answer here", {"answer": "0.5"}, False),
        (None, "The sum is 81.", {"answer": "81", "task": "add"}, True),  # auto: the task's checker
        (None, "paris.", {"answer": "Paris"}, True),  # auto without a task: normalized
        (None, "Lyon", {"answer": "Paris"}, False),
    ],
)
def test_checkers(checker, prediction, row, expected):
    assert get_checker(checker)(prediction, row) is expected


def test_task_checker_is_the_tasks_own():
    row = get_task("uppercase").generate(1, seed=3)[0]
    check = get_checker("task")
    assert check(row["answer"], row) and not check(row["answer"].lower(), row)


def test_checker_errors():
    with pytest.raises(ValueError, match="valid checkers"):
        get_checker("nope")
    with pytest.raises(ValueError, match="built-in task"):
        get_checker("task")("x", {"answer": "x"})


# ------------------------------------------------------------------ generation


def test_stop_tokens_include_end_of_turn(tokenizer):
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer)


def test_generation_one_prediction_per_row_within_budget(untied, tokenizer):
    from bnll_lightning.data import SFTDataModule

    model, tok = untied
    data = SFTDataModule("builtin:add", num_train=4, num_val=5, tokenizer=tok)
    rows = data.raw_rows("val")
    model.train()
    result = evaluate_generation(model, tok, rows, data, "task", max_new_tokens=5, batch_size=2)
    assert model.training  # train mode restored
    assert result.n == len(rows) == len(result.predictions) == 5
    assert [p["index"] for p in result.predictions] == list(range(5))
    assert all(0 <= p["new_tokens"] <= 5 for p in result.predictions)
    assert any(p["new_tokens"] == 5 for p in result.predictions)  # a random model rarely stops early
    assert [p["answer"] for p in result.predictions] == [r["answer"] for r in rows]
    assert result.accuracy == sum(p["correct"] for p in result.predictions) / 5


def test_left_padding_matches_unbatched_generation(untied):
    model, tok = untied
    prompts = [[1, 5, 6, 7, 8, 9, 10, 300, 400, 500], [1, 11, 12], [1, 700, 800, 900, 1000], [1, 42]]
    batched = generate(model, tok, prompts, max_new_tokens=8, batch_size=4)
    single = [generate(model, tok, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert len({tuple(s[0]) for s in single}) == len(prompts)  # the outputs differ, so order matters


def test_generation_uses_the_kv_cache_although_training_turned_it_off(untied):
    model, tok = untied
    model.config.use_cache = False  # what SFTModule does for training
    widths = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        generate(model, tok, [[1, 5, 6, 7]], max_new_tokens=4)
    finally:
        hook.remove()
    assert widths == [4, 1, 1, 1]  # the prompt once, then one new token per step


def test_generation_stops_at_a_stop_token(untied, monkeypatch):
    import bnll_lightning.evaluate as evaluate

    model, tok = untied
    free = generate(model, tok, [[1, 5, 6, 7]], max_new_tokens=8)[0][0]
    stop = free[3]  # pretend the 4th generated token ends the turn
    monkeypatch.setattr(evaluate, "stop_token_ids", lambda tokenizer: [stop])
    assert generate(model, tok, [[1, 5, 6, 7]], max_new_tokens=8)[0][0] == free[: free.index(stop)]


def test_generation_uses_the_chat_prompt_of_training(untied):
    """The prompt generation sees is the training row's masked prefix, token for token."""
    from bnll_lightning.data import SFTDataModule

    _, tok = untied
    data = SFTDataModule("builtin:capital", num_train=2, num_val=2, tokenizer=tok)
    row, feature = data.raw_rows("train")[0], data.train_dataset[0]
    prompt = data.encode_prompt(row)
    n_masked = next(i for i, label in enumerate(feature["labels"]) if label != -100)
    assert prompt == feature["input_ids"][:n_masked]
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")


def test_sampling_is_seeded_and_leaves_global_rng_alone(untied):
    model, tok = untied
    state = torch.random.get_rng_state()
    a = generate(model, tok, [[1, 5, 6]], max_new_tokens=6, temperature=1.0, num_samples=3, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())
    assert a == generate(model, tok, [[1, 5, 6]], max_new_tokens=6, temperature=1.0, num_samples=3, seed=7)
    assert len(a[0]) == 3 and len({tuple(s) for s in a[0]}) > 1
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tok, [[1, 5, 6]], num_samples=2)


# ------------------------------------------------------------------ callback and CLI


@pytest.fixture(scope="module")
def fitted(untied_dir, tmp_path_factory):
    """A 2-step fit (high LR, so the weights move) with GenerationEval; returns its log dir."""
    import lightning.pytorch as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from bnll_lightning.data import SFTDataModule
    from bnll_lightning.module import SFTModule

    root = tmp_path_factory.mktemp("fit")
    module = SFTModule(untied_dir, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), warmup=0)
    data = SFTDataModule("builtin:add", num_train=8, num_val=6, batch_size=4, seed=0)
    data.set_tokenizer(module.tokenizer)
    callback = GenerationEval(num_rows=5, max_new_tokens=6, batch_size=4)
    trainer = L.Trainer(
        max_steps=2, val_check_interval=2, num_sanity_val_steps=0, logger=TensorBoardLogger(str(root), name="run"),
        callbacks=[callback], enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )
    from bnll_lightning import callbacks

    said, info = [], callbacks.rank_zero_info
    callbacks.rank_zero_info = said.append  # what the console would print
    try:
        trainer.fit(module, data)
    finally:
        callbacks.rank_zero_info = info
    callback.said = said
    return trainer.log_dir, callback


def test_callback_logs_accuracy_and_writes_predictions(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir, callback = fitted
    lines = [json.loads(line) for line in open(f"{log_dir}/predictions/step_2.jsonl")]
    assert len(lines) == 5 and [p["index"] for p in lines] == list(range(5))
    assert {"prompt", "prediction", "answer", "correct"} <= set(lines[0])
    events = EventAccumulator(log_dir)
    events.Reload()
    logged = events.Scalars("val/accuracy")
    assert [e.step for e in logged] == [e.step for e in events.Scalars("val/nll")]  # once, with the val loss
    assert logged[0].value == pytest.approx(sum(p["correct"] for p in lines) / 5)
    assert callback.last_result.predictions == lines
    assert callback.last_step == logged[0].step == 1  # TensorBoard files it under the step before
    # ...but the console names the step the predictions file does (it said "at step 1" beside step_2.jsonl)
    (line,) = [m for m in callback.said if m.startswith("[bnll] val/accuracy")]
    assert " after step 2, " in line and line.endswith(f"predictions: {log_dir}/predictions/step_2.jsonl")


def test_evaluate_cli_reproduces_the_checkpoint(fitted, untied_dir, tmp_path, capsys):
    log_dir, callback = fitted
    ckpt = next((Path(log_dir) / "checkpoints").glob("*.ckpt"))
    common = [
        "--config", DEMO, "--model.model", untied_dir, "--data.train", "builtin:add",
        "--data.num_train", "8", "--data.num_val", "6", "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--num_rows", "5", "--max_new_tokens", "6", "--batch_size", "4",
    ]
    evaluate_main([*common, "--ckpt_path", str(ckpt), "--output", str(tmp_path / "ckpt.jsonl")])
    assert "accuracy:" in capsys.readouterr().out
    from_ckpt = [json.loads(line) for line in open(tmp_path / "ckpt.jsonl")]
    # The checkpoint's weights, the callback's rows and settings: the callback's own predictions.
    assert [p["prediction"] for p in from_ckpt] == [p["prediction"] for p in callback.last_result.predictions]
    evaluate_main([*common, "--output", str(tmp_path / "base.jsonl")])
    base = [json.loads(line) for line in open(tmp_path / "base.jsonl")]
    assert [p["prediction"] for p in base] != [p["prediction"] for p in from_ckpt]  # the weights were loaded


def test_evaluate_cli_without_rows_exits_with_a_message(untied_dir, tmp_path):
    with pytest.raises(SystemExit, match="no val rows"):
        evaluate_main(["--config", DEMO, "--model.model", untied_dir, "--data.num_train", "4",
                       "--data.num_val", "0", "--trainer.logger.init_args.save_dir", str(tmp_path)])


# ------------------------------------------------------------------ pass@k and maj@k

from bnll_lightning.cli import generation_settings  # noqa: E402
from bnll_lightning.constraints import ConfigError  # noqa: E402
from bnll_lightning.evaluate import EvalResult, majority_index, pass_at_k  # noqa: E402


@pytest.mark.parametrize("n, c, k, expected", [
    (1, 0, 1, 0.0), (1, 1, 1, 1.0),
    (4, 1, 1, 1 / 4), (4, 2, 1, 2 / 4),  # pass@1 = c / n
    (4, 1, 2, 1 - 3 / 6),  # 1 - C(3,2)/C(4,2): 3 of the 6 pairs miss the correct one
    (4, 2, 2, 1 - 1 / 6),  # only the pair of the two wrong answers misses
    (5, 2, 3, 1 - 1 / 10),  # C(3,3)/C(5,3)
    (16, 0, 16, 0.0), (16, 1, 16, 1.0), (16, 3, 14, 1.0),  # n - c < k: every draw has a correct one
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-15)


def test_pass_at_k_is_stable_for_large_n_and_matches_the_product_form():
    # Chen et al.'s numerically stable form: 1 - prod_{i=n-c+1}^{n} (1 - k / i).
    for n, c, k in [(200, 3, 10), (1000, 1, 1), (1000, 999, 500), (5000, 7, 100)]:
        product = 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
        assert pass_at_k(n, c, k) == pytest.approx(product, rel=1e-12)
    assert pass_at_k(10_000, 1, 1) == pytest.approx(1e-4, rel=1e-12)  # no cancellation for tiny values
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_majority_vote_by_hand():
    assert majority_index(["A", "b", " a.", "B", "b"]) == 1  # "b" has 3 votes (normalized), "a" 2
    assert majority_index(["x", "y"]) == 0  # a tie goes to the answer seen first
    assert majority_index([]) is None
    assert majority_index(["Paris", "paris"], "exact") == 0  # exact: the two differ, tie -> first
    # math: equivalence classes, not strings; answers without a parsable result do not vote
    maths = ["\\boxed{1/2}", "no idea", "\\boxed{0.5}", "\\boxed{3}", "\\boxed{3}", "\\boxed{\\frac{1}{2}}"]
    assert majority_index(maths, "math") == 0
    assert majority_index(["nothing here", "still nothing"], "math") is None


def test_sample_metrics_of_a_result():
    preds = []
    # row 0: 1 of 4 correct, majority wrong; row 1: 3 of 4 correct, majority right
    for index, answers, truth in [(0, ["7", "8", "8", "9"], "7"), (1, ["5", "5", "4", "5"], "5")]:
        for s, a in enumerate(answers):
            preds.append({"index": index, "sample": s, "prediction": a, "correct": a == truth})
    from bnll_lightning.evaluate import _sample_metrics

    pass_at, maj = _sample_metrics(preds, 4, [1, 2, 4], "normalized")
    assert pass_at[1] == pytest.approx((1 / 4 + 3 / 4) / 2)
    assert pass_at[2] == pytest.approx(((1 - 3 / 6) + 1.0) / 2)
    assert pass_at[4] == 1.0 and maj == 0.5
    result = EvalResult(0.5, 8, 4, preds, 2, pass_at, maj)
    assert result.sample_metrics() == {"pass@1": 0.5, "pass@2": 0.75, "pass@4": 1.0, "maj@4": 0.5}
    assert EvalResult(0.5, 2, 1, [], 2).sample_metrics() == {}  # one sample per row: nothing beyond accuracy


def test_sampled_evaluation_reports_pass_and_maj(untied, tokenizer):
    from bnll_lightning.data import SFTDataModule

    model, tok = untied
    data = SFTDataModule("builtin:add", num_train=2, num_val=3, tokenizer=tok)
    rows = data.raw_rows("val")
    check = lambda prediction, row: len(prediction) % 2 == 0  # noqa: E731 - a checker that some samples pass
    result = evaluate_generation(model, tok, rows, data, check, max_new_tokens=3, temperature=1.0, num_samples=4,
                                 pass_k=[1, 4])
    assert result.rows == 3 and result.n == 12 and set(result.pass_at) == {1, 4}
    assert result.pass_at[1] == pytest.approx(result.accuracy)  # unbiased pass@1 is the mean accuracy
    assert result.pass_at[1] <= result.pass_at[4] <= 1 and result.maj is not None


def test_generation_eval_validates_pass_k():
    with pytest.raises(ValueError, match="pass_k"):
        GenerationEval(temperature=1.0, num_samples=4, pass_k=[8])


def test_evaluate_takes_generation_settings_from_the_configs_callback():
    from types import SimpleNamespace

    callback = GenerationEval(checker="math", temperature=1.0, num_samples=16, max_new_tokens=100, pass_k=[1, 16])
    cli = SimpleNamespace(max_new_tokens=None, batch_size=None, checker=None, temperature=None, top_p=None,
                          num_samples=None, pass_k=None)
    settings = generation_settings(cli, [callback])
    assert settings == {"max_new_tokens": 100, "batch_size": 16, "checker": "math", "temperature": 1.0,
                        "top_p": 1.0, "num_samples": 16, "pass_k": [1, 16]}
    cli.temperature, cli.num_samples = 0.0, 1  # the command line wins
    assert generation_settings(cli, [callback])["num_samples"] == 1
    assert generation_settings(cli, [callback])["pass_k"] is None  # one answer a prompt: the config's pass@k is moot
    assert generation_settings(cli, [])["max_new_tokens"] == 64
    cli.pass_k = 3  # a plain number is one k; more than the samples drawn is an error, not a metric left out
    with pytest.raises(ConfigError, match=r"--pass_k \[3\]: each k must lie in \[1, num_samples = 1\]"):
        generation_settings(cli, [callback])
    cli.pass_k, cli.num_samples, cli.temperature = None, 4, None
    with pytest.raises(ConfigError, match=r"--pass_k \[1, 16\] \(the config's GenerationEval\)"):
        generation_settings(cli, [callback])
    cli.pass_k = 2
    assert generation_settings(cli, [callback])["pass_k"] == [2]


def test_paper_math_protocol_config_layers_on_the_maths_job(capsys):
    """configs/eval_math_paper.yaml: 16 samples at temperature 1, the math checker, pass@k and maj@16."""
    import yaml

    from bnll_lightning.cli import main as cli_main

    configs = Path(__file__).resolve().parents[1] / "configs"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(configs / "math_qwen.yaml"), "--config", str(configs / "eval_math_paper.yaml"),
                  "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    (callback,) = [c for c in printed["trainer"]["callbacks"] if c["class_path"].endswith("GenerationEval")]
    args = callback["init_args"]
    assert (args["num_samples"], args["temperature"], args["top_p"], args["checker"]) == (16, 1.0, 1.0, "math")
    assert 16 in args["pass_k"]
    assert any(c["class_path"].endswith("ModelCheckpoint") for c in printed["trainer"]["callbacks"])
    assert printed["model"]["model"] == "Qwen/Qwen2.5-Math-1.5B"


def test_callback_logs_pass_and_maj_with_sampling(untied_dir, tmp_path):
    import lightning.pytorch as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bnll_lightning.data import SFTDataModule
    from bnll_lightning.module import SFTModule

    module = SFTModule(untied_dir, histogram_every_n_steps=0)
    data = SFTDataModule("builtin:add", num_train=4, num_val=3, batch_size=4, seed=0)
    data.set_tokenizer(module.tokenizer)
    callback = GenerationEval(num_rows=3, max_new_tokens=3, temperature=1.0, num_samples=2, pass_k=[1, 2])
    trainer = L.Trainer(max_steps=1, val_check_interval=1, num_sanity_val_steps=0, accelerator="cpu",
                        logger=TensorBoardLogger(str(tmp_path), name="run"), callbacks=[callback],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    events = EventAccumulator(trainer.log_dir)
    events.Reload()
    logged = {tag: events.Scalars(tag)[-1].value for tag in ("val/accuracy", "val/pass@1", "val/pass@2", "val/maj@2")}
    result = callback.last_result
    assert logged["val/pass@1"] == pytest.approx(logged["val/accuracy"])
    assert logged["val/pass@2"] == pytest.approx(result.pass_at[2]) and logged["val/maj@2"] == pytest.approx(result.maj)


def test_pass_k_beyond_the_samples_is_an_error_not_a_metric_left_out():
    with pytest.raises(ValueError, match=r"pass_k must lie in \[1, num_samples=2\]"):
        evaluate_generation(None, None, [], None, None, num_samples=2, temperature=1.0, pass_k=[4])


def test_evaluate_takes_pass_k_as_a_plain_number(capsys, monkeypatch):
    from bnll_lightning.cli import main as cli_main

    monkeypatch.delenv("BNLL_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:  # parsed: what stops it is the model, which does not exist
        cli_main(["evaluate", "--model.model", "/nonexistent/model", "--pass_k", "2", "--num_samples", "2"])
    assert exit_info.value.code == 2
    assert "model '/nonexistent/model': no such directory" in capsys.readouterr().err
