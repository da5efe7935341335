"""The benchmark harnesses (benchmarks/*.py) in --quick mode: each prints a well-formed table of finite
positive numbers. This checks the harness, not the timings (tiny models, shared machine)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder of scripts, not an installed package

from benchmarks import _common as C  # noqa: E402
from benchmarks import checkpoint_write, generation, gpu_mfu, memory, objective_overhead, throughput, whole_job  # noqa: E402

HAS_TRL = importlib.util.find_spec("trl") is not None


def number(cell: str) -> float:
    """The first number in a table cell ('0.171', '>= 512 (search cap)', '1.60 (at least)')."""
    for token in cell.replace(",", " ").split():
        try:
            return float(token)
        except ValueError:
            continue
    raise AssertionError(f"no number in cell {cell!r}")


def positive(cell: str) -> float:
    x = number(cell)
    assert math.isfinite(x) and x > 0, cell
    return x


@pytest.mark.slow
def test_objective_overhead_quick_and_append(tmp_path):
    docs = tmp_path / "bench.md"
    text = objective_overhead.main(["--quick", "--append", "--docs", str(docs)])
    headers, rows = C.parse_markdown_table(text)
    assert headers[0] == "objective" and len(headers) == 4
    names = [row[0] for row in rows]
    expected = [name for name, _, _ in objective_overhead.objectives()]
    at = expected.index(objective_overhead.ASFT_NAME) + 1
    assert names == expected[:at] + [objective_overhead.REFERENCE_ROW] + expected[at:]  # the reference apart
    assert "AlphaFamily + AdaptiveAlpha" in names and names[0] == "NLL"
    assert {"EAFT(k=20)", "TokenAlpha(1), signal entropy", "TokenAlpha + AdaptiveAlpha"} <= set(names)
    assert rows[0][1] == "1 (reference)"
    for row in rows[1:]:
        positive(row[1])
        low, high = (positive(x) for x in row[2].split(" - "))
        assert low <= high
        assert row[3] in ("yes", "**no**", "(part of the row above)")
    asft, reference = rows[at - 1], rows[at]
    assert number(reference[1]) < number(asft[1])  # the reference's forward is a part of ASFT's step
    written = docs.read_text()
    assert "python benchmarks/objective_overhead.py --quick --append --docs" in written
    assert f"torch {torch.__version__}" in written and "cores" in written and "UTC" in written
    assert written.count("| NLL |") == 1


def test_objective_schedule_interleaves_every_objective_once_per_round():
    order = objective_overhead.schedule(5, rounds=3, seed=1)
    assert order[:5] == [0, 1, 2, 3, 4]  # warm-up round in table order
    for r in range(1, 4):
        assert sorted(order[5 * r: 5 * (r + 1)]) == [0, 1, 2, 3, 4]
    assert order[5:10] != order[10:15] or order[10:15] != order[15:20]  # shuffled rounds


def test_largest_fitting_search():
    calls = []

    def fits(n):
        calls.append(n)
        return n <= 1000

    assert memory.largest_fitting(fits, start=256, cap=8192, granularity=256)[:2] == (768, False)
    assert memory.largest_fitting(lambda n: True, 256, 8192, 256)[:2] == (8192, True)
    assert memory.largest_fitting(lambda n: n <= 5000, 256, 3000, 256)[:2] == (3000, True)  # cap off the doubling
    assert memory.largest_fitting(lambda n: False, 256, 8192, 256)[:2] == (0, False)
    assert all(n % 256 == 0 for n in calls)


@pytest.mark.slow
def test_memory_quick():
    text = memory.main(["--quick"])
    headers, rows = C.parse_markdown_table(text)
    assert headers == ["measure", "naive (full logits)", "streamed", "streamed / naive", "target"]
    assert rows[0][0].startswith("peak memory") and rows[1][0].startswith("longest sequence")
    naive, streamed, ratio = (positive(c) for c in rows[0][1:4])
    assert ratio == pytest.approx(streamed / naive, rel=0.05)  # the ratio of the printed, rounded values
    for cell in rows[1][1:4]:
        positive(cell)
    objective_rows = rows[2:]
    for name in memory.objectives():  # one peak row per objective beyond log p, ASFT's reference weights apart
        (row,) = [r for r in objective_rows if r[0].startswith(f"peak memory of a step, {name}")]
        naive_o, streamed_o, ratio_o = (positive(c) for c in row[1:4])
        assert ratio_o == pytest.approx(streamed_o / naive_o, rel=0.05)
    (weights,) = [r for r in objective_rows if "reference's weights" in r[0]]
    assert positive(weights[1]) == pytest.approx(positive(weights[2]))
    assert len(objective_rows) == len(memory.objectives()) + 1
    assert "VmHWM" in text or "ru_maxrss" in text


@pytest.mark.slow  # processes of their own: in `make test`, not in the fast loop
def test_memory_measurement_in_a_fresh_process(tiny_model_dir):
    """The default path, a measurement in a subprocess: a naive step holds at least its float32 logits."""
    out = memory.measure_isolated(tiny_model_dir, 2, 256, streamed=False, chunk_size=64, threads=1)
    logits = 2 * 256 * 49152 * 4
    assert logits < out["delta"] < 20 * logits
    assert out["attention"] and not out["streamed"]


@pytest.mark.slow
def test_throughput_quick():
    text = throughput.main(["--quick"])
    headers, rows = C.parse_markdown_table(text)
    assert headers[0] == "objective" and headers[4] == "ours tokens/s" and headers[5] == "TRL tokens/s"
    assert [row[0].split(" (TRL")[0] for row in rows] == [label for label, _, _ in throughput.PAIRS]
    for row in rows:
        positive(row[4])
        if HAS_TRL:
            ratio, peer = positive(row[1]), positive(row[5])
            assert ratio == pytest.approx(number(row[4]) / peer, rel=0.05)
        else:  # the peer is an optional extra: said so in the table, not hidden
            assert row[1] == "n/a" and "TRL not installed" in row[5]


def test_throughput_without_trl_runs_our_side_and_says_so(monkeypatch):
    monkeypatch.setattr(throughput, "trl_version", lambda: None)  # as on a machine without the bench extra
    text = throughput.main(["--quick", "--objectives", "NLL"])
    _, rows = C.parse_markdown_table(text)
    assert len(rows) == 1 and rows[0][1] == "n/a" and "TRL not installed" in rows[0][5]
    positive(rows[0][4])
    assert "TRL not run" in text


@pytest.mark.filterwarnings("ignore:SFTDataModule train split")  # every row is cut at seq_len: on purpose
def test_throughput_rows_are_uniform(tmp_path, tiny_model_dir):
    """Both sides see exactly batch x seq_len tokens per step: every row is cut at seq_len."""
    path = str(tmp_path / "rows.jsonl")
    throughput.write_rows(path, 6, 96)
    rows = throughput.tokenized_rows(tiny_model_dir, path, 96)
    assert len(rows) == 6 and {len(r["input_ids"]) for r in rows} == {96}
    assert all(-100 in r["labels"] and r["labels"][-1] != -100 for r in rows)  # prompt masked, response kept


def test_gpu_mfu_without_cuda_exits_with_a_message(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        gpu_mfu.main(["--quick"])


def test_gpu_mfu_harness_on_cpu():
    text = gpu_mfu.main(["--quick", "--device", "cpu"])
    headers, rows = C.parse_markdown_table(text)
    assert headers == ["log p", "micro-batch", "tokens/s", "MFU %", "peak memory GiB"]
    assert [r[0] for r in rows] == ["naive (full logits)", "streamed"]  # same largest micro-batch: one streamed row
    for row in rows:
        positive(row[1]), positive(row[2])
        assert row[3] == "n/a"  # no MFU without a known peak


@pytest.mark.parametrize("size, params", [("0.5b", 494_032_768), ("1.5b", 1_543_714_304)])
def test_gpu_mfu_model_shapes_and_flops(size, params):
    """The configs give the published Qwen2.5 parameter counts; FLOPs follow 6N + 12 L d T."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(gpu_mfu.qwen2_config(size))
    assert sum(p.numel() for p in model.parameters()) == params
    cfg = model.config
    norms_and_biases = sum(p.numel() for p in model.parameters() if p.ndim == 1)
    n = params - norms_and_biases  # tied head: the embedding is the head's matmul, counted once
    assert gpu_mfu.matmul_params(model) == n
    width = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    assert gpu_mfu.flops_per_token(model, 2048) == 6 * n + 12 * cfg.num_hidden_layers * width * 2048


def test_default_optimizer_is_fused_where_torch_has_the_kernel():
    """The fix the throughput benchmark found: one fused AdamW kernel instead of a loop over tensors."""
    from bnll_lightning.optim import default_optimizer

    cpu = torch.nn.Parameter(torch.zeros(3))
    norm = torch.nn.Parameter(torch.zeros(2))
    optimizer = default_optimizer([{"params": [cpu]}, {"params": [norm], "weight_decay": 0.0}])
    assert all(group["fused"] is True for group in optimizer.param_groups)
    assert optimizer.param_groups[1]["weight_decay"] == 0.0 and optimizer.param_groups[0]["lr"] == 2e-5
    cpu.grad = torch.ones(3)
    optimizer.step()  # the fused kernel runs on CPU
    assert cpu.abs().sum() > 0
    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    assert default_optimizer([meta]).param_groups[0]["fused"] is None  # no kernel there: torch's default


@pytest.mark.slow
def test_profile_step_quick_phases_add_up():
    from benchmarks import profile_step

    text = profile_step.main(["--quick", "--top", "5"])
    tables = text.split("\n\n| op")
    headers, rows = C.parse_markdown_table(tables[0])
    assert headers[0] == "configuration" and [r[0] for r in rows] == [n for n, _ in profile_step.configurations()]
    for row in rows:
        step = positive(row[1])
        parts = [number(c) for c in row[2:-1]]
        assert all(x >= -1e-3 for x in parts)  # no phase is negative beyond rounding
        # Per step every phase is a part of the step, so its median is at most the step's median.
        assert all(x <= step + 1e-3 for x in parts)
        assert number(row[2]) > 0 and number(row[3]) > 0  # forward and backward were timed
    assert number(rows[0][-1]) == 1.0
    _, ops = C.parse_markdown_table("| op" + tables[1])
    assert len(ops) == 5 and any(r[0] == "aten::mm" for r in ops)
    shares = [number(r[2]) for r in ops]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.5


def test_step_trace_counts_the_package_calls_of_one_step(capsys):
    from benchmarks import step_trace

    text = step_trace.main([])
    assert text == capsys.readouterr().out.rstrip("\n")  # printed as returned
    _, calls = C.parse_markdown_table(text.split("\n\n")[2])
    assert ["module.SFTModule.training_step", "2"] in calls  # one step of 2 micro-batches
    assert ["module.SFTModule.on_before_optimizer_step", "1"] in calls
    _, measures = C.parse_markdown_table(text.split("\n\n")[3])
    counted = dict(measures)
    assert int(counted["package calls in the step"]) == sum(int(n) for _, n in calls)
    assert int(counted["package calls in the step"]) <= 60  # issue 28: from 126; a hop added to the step shows here
    assert int(counted["returns to module.py"]) >= 2


@pytest.mark.slow  # four fresh processes (three without TRL), each importing torch, Lightning and transformers
def test_whole_job_quick_phases_add_up_to_the_wall(tmp_path):
    raw = tmp_path / "runs.json"
    text = whole_job.main(["--quick", "--json", str(raw)])
    headers, rows = C.parse_markdown_table(text)
    sides = [whole_job.SIDE_NAMES[s] for s in whole_job.SIDES if s != "trl" or HAS_TRL]
    assert headers[1: 1 + len(sides)] == sides
    assert headers[1 + len(sides):] == [f"ours no-val / {s}" for s in sides[2:]]  # ratios to TRL and the floor
    labels = [row[0] for row in rows]
    for key, label in whole_job.PHASES:  # every phase has its row; demo.yaml validates once in 16 steps
        expected = label.format(k=1) if key == "validation" else label
        assert any(x.startswith(expected) for x in labels), expected
    for label in (whole_job.GENERATION, f"**{whole_job.WALL}**", whole_job.STARTUP, whole_job.DISK):
        assert label in labels
    table = {row[0]: row[1:] for row in rows}
    wall, startup = table[f"**{whole_job.WALL}**"], table[whole_job.STARTUP]
    for col in range(len(sides)):
        assert 0 < number(startup[col]) < number(wall[col])
        assert number(table["optimizer steps (16)"][col]) > 0
    assert table["validation 1, with its generation"][1] == "-" and positive(table[whole_job.GENERATION][0])
    positive(table["optimizer steps (16)"][len(sides) + len(sides) - 3])  # ours / floor steps: a ratio
    assert "every step's real tokens equal to the harness's batches: ours yes, ours_noval yes" in text
    assert "floor yes" in text and ("trl yes" in text) == HAS_TRL

    results = json.loads(raw.read_text())["results"]
    for side, runs in results.items():
        (run,) = runs  # --quick: one pair
        assert run["global_step"] == 16 and run["steps"] == 16, side
        assert all(x >= 0 for x in run["phases"].values()), side
        assert sum(run["phases"].values()) <= run["wall"] + 1e-6, side  # the phases split the wall time
        assert sum(run["phases"].values()) == pytest.approx(run["wall"], rel=1e-6), side
        assert {"interpreter", "imports", "model", "data", "steps", "export", "checkpoint"} <= set(run["phases"]), side
        assert run["checkpoints"] >= 1 and run["bytes"] > 0, side
    assert results["ours"][0]["validations"] == 1 and results["ours_noval"][0]["validations"] == 0
    assert results["ours"][0]["generation"][0][1] == 32  # GenerationEval's num_rows answers


def test_whole_job_accounting_gives_each_instant_one_phase():
    """Nested and overlapping intervals: a checkpoint inside a validation inside the training span."""
    raw = {
        "marks": {"main": 1.0, "imported": 3.0},
        "steps": [[5.0, 6.0], [6.5, 7.0], [9.0, 10.0]],
        "intervals": [
            {"label": "model", "start": 3.5, "end": 4.0},
            {"label": "data", "start": 3.8, "end": 4.5},  # overlaps the model: counted once
            {"label": "validation", "start": 7.0, "end": 9.0},
            {"label": "generation", "start": 8.0, "end": 9.0, "answers": 4},  # inside the validation: not added
            {"label": "checkpoint", "start": 8.5, "end": 9.5},  # in the validation and the next step
            {"label": "export", "start": 10.5, "end": 11.0},
        ],
    }
    out = whole_job.account(raw, spawn=0.5, end=12.0)
    assert out["phases"] == pytest.approx({
        "interpreter": 0.5, "imports": 2.0, "model": 0.5, "data": 0.5, "setup": 1.0, "steps": 2.5,
        "validation 1": 1.5, "checkpoint": 1.0, "teardown": 1.5, "export": 0.5,
    })
    assert sum(out["phases"].values()) == pytest.approx(out["wall"]) and out["wall"] == 11.5
    assert out["startup"] == 4.5 and out["generation"] == [(1.0, 4)] and out["checkpoints"] == 1


def test_checkpoint_write_table_has_every_path_and_only_lightnings_copies(capsys, tmp_path):
    rows = checkpoint_write.main(["--params", "4000000", "--tensors", "8", "--repeats", "2", "--dir", str(tmp_path)])
    assert [r["side"] for r in rows] == ["Lightning TorchCheckpointIO", "ours, DirectCheckpointIO", "plain torch.save"]
    assert all(0 < r["min"] <= r["median"] <= r["max"] for r in rows)
    peaks = {r["side"]: r["peak_gb"] for r in rows}
    assert peaks["Lightning TorchCheckpointIO"] >= 0.048  # 3 x 16 MB in a buffer
    assert peaks["ours, DirectCheckpointIO"] < 0.005 and peaks["plain torch.save"] < 0.005
    assert "| ours, DirectCheckpointIO |" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # its folder removed


def test_generation_table_times_each_side_and_ours_answers_as_one_at_a_time():
    text = generation.main(["--quick"])
    headers, rows = C.parse_markdown_table(text)
    assert headers == ["side", "seconds per answer", "new tokens per answer", "speed-up over plain"]
    assert [r[0].split(":")[0] for r in rows] == ["plain", "one at a time, KV cache, stop at end of turn", "ours"]
    assert all(number(r[1].split(" ")[0]) > 0 for r in rows) and rows[0][3] == "1.0x"
    assert float(rows[0][2]) == 4.0  # plain runs every token of the budget
    assert "ours' answers equal to the one-at-a-time answers: 4 of 4" in text

