"""bnll_lightning/self_targets.py: the model's own right answers, in its own words, as training rows."""

import pytest

from bnll_lightning.data import SFTDataModule
from bnll_lightning.evaluate import generate
from bnll_lightning.models import load_model, load_tokenizer
from bnll_lightning.self_targets import answer_span, self_phrased
from bnll_lightning.tasks import TASKS, Task, noise


def test_answer_span_finds_the_last_whole_word_occurrence():
    text = "The number that comes after 347 is 348."
    assert answer_span(text, ["348"]) == (35, 38)
    assert answer_span(text, ["34"]) is None  # inside 347 and 348: not a whole word
    assert answer_span("Paris, not paris? PARIS.", ["paris"]) == (18, 23)  # case-insensitive, the last one
    # Any accepted spelling counts; the last occurrence of any wins.
    assert answer_span("Kiev, now Kyiv", ["Kyiv", "Kiev"]) == (10, 14)
    assert answer_span("no answer here", ["Oslo"]) is None


def test_noise_swaps_only_the_answer_of_a_self_phrased_row():
    rows = [{"prompt": f"Which number comes right after {n}? Reply with only the number.",
             "response": f"The number that comes after {n} is {n + 1}.", "answer": str(n + 1), "task": "successor",
             "answer_span": [len(f"The number that comes after {n} is "), len(f"The number that comes after {n} is {n + 1}")]}
            for n in range(100, 120)]  # fmt: skip
    out = noise(rows, 0.4, seed=3)
    noisy = [r for r in out if r["noisy"]]
    assert len(noisy) == 8  # round(0.4 x 20): the rate asked
    for r in noisy:
        n = int(r["answer"]) - 1
        head = f"The number that comes after {n} is "
        assert r["response"].startswith(head) and r["response"].endswith(".")  # the phrasing is kept
        wrong = r["response"][len(head):-1]
        assert wrong.isdigit() and wrong != r["answer"]  # only the answer changed, to a wrong number
        assert r["answer"] == str(n + 1)  # the truth stays for evaluation
    assert all(r["response"] == o["response"] for r, o in zip(out, rows) if not r["noisy"])


class _Echo(Task):
    """A test task: right when the answer appears in the prediction."""

    name = "echo"

    def check(self, prediction, row):
        return row["answer"] in prediction


def test_on_a_tiny_model_wrong_and_unfinished_answers_are_dropped_and_counted(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(TASKS, "echo", _Echo())
    tokenizer, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir).eval()
    data = SFTDataModule(train="builtin:successor", tokenizer=tokenizer, val_fraction=0.0)
    rows = [{**r, "task": "echo"} for r in TASKS["successor"].generate(6, seed=0)]
    outputs = generate(model, tokenizer, [data.encode_prompt(r) for r in rows], max_new_tokens=4, batch_size=6)
    assert all(len(o[0]) == 4 for o in outputs)  # a random model does not end its turn within 4 tokens
    texts = [tokenizer.decode(o[0], skip_special_tokens=True) for o in outputs]
    for i in range(6):  # rows 0-2: the truth is what the model says; rows 3-5: a string it never writes
        rows[i]["answer"] = texts[i] if i < 3 else "\x00never"
    kept, counts = self_phrased(model, tokenizer, rows, data.encode_prompt, max_new_tokens=4, batch_size=6)
    assert counts == {"asked": 6, "kept": 0, "wrong": 3, "unfinished": 3, "no_span": 0} and kept == []


@pytest.fixture(scope="module")
def embedded():
    return load_tokenizer("embedded"), load_model("embedded").eval()


@pytest.mark.slow  # generation with the real 135M model: seconds idle, a minute on a busy machine
def test_on_the_embedded_model_only_right_answers_are_kept_in_its_own_words(embedded):
    tokenizer, model = embedded
    data = SFTDataModule(train="builtin:successor", tokenizer=tokenizer, val_fraction=0.0)
    rows = TASKS["successor"].generate(12, seed=5)
    kept, counts = self_phrased(model, tokenizer, rows, data.encode_prompt, max_new_tokens=16, batch_size=12)
    outputs = generate(model, tokenizer, [data.encode_prompt(r) for r in rows], max_new_tokens=16, batch_size=12)
    texts = [tokenizer.decode(o[0], skip_special_tokens=True).strip() for o in outputs]
    expected = [i for i, (t, r) in enumerate(zip(texts, rows)) if TASKS["successor"].check(t, r) and len(outputs[i][0]) < 16]
    assert 0 < len(expected) < 12  # the base model is right on some and wrong on others
    assert counts["kept"] == len(kept) == len(expected)
    assert counts["kept"] + counts["wrong"] + counts["unfinished"] + counts["no_span"] == 12
    by_prompt = {r["prompt"]: r for r in kept}
    for i in expected:
        row = by_prompt[rows[i]["prompt"]]
        assert row["response"] == texts[i]  # its own phrasing, e.g. "The number that comes after 212 is 213."
        start, end = row["answer_span"]
        assert row["response"][start:end] == row["answer"] == rows[i]["answer"]


@pytest.mark.parametrize("span", [[5, 3], [0, 99], ["0", "1"], [1]])
def test_a_bad_answer_span_in_a_data_file_is_one_clear_error(tmp_path, tokenizer, span):
    import json

    from bnll_lightning.sources import DataError

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response": "It is 5.", "answer_span": span}) + "\n")
    data = SFTDataModule(train=str(path), tokenizer=tokenizer, val_fraction=0.0)
    with pytest.raises(DataError, match=r"rows.jsonl.*'answer_span' must be \[start, end\] inside the response"):
        data.setup("fit")
