"""benchmarks/gpu_check.py: the prepared GPU check passes its CPU dry run (tiny model, CUDA-only steps parse)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _common as C  # noqa: E402


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    headers, rows = C.parse_markdown_table(proc.stdout)
    assert headers == ["check", "status", "result", "seconds"] and len(rows) == 9
    assert all(r[1] == "ok" for r in rows), rows
    assert (tmp_path / "bf16").is_dir()  # the fits wrote where they were told


def test_gpu_check_commands_name_the_documented_configs():
    from benchmarks import gpu_check

    commands = [c for _, c, _ in gpu_check.checks("/out", dry=False, model=None) if c]
    flat = [" ".join(c) for c in commands]
    for config in ("configs/fsdp.yaml", "configs/fsdp2.yaml", "configs/adamw8bit.yaml", "configs/qlora.yaml"):
        assert sum(config in c for c in flat) == 1
    assert sum("--model.streaming.head_float32 true" in c for c in flat) == 1
    assert sum("--size 1.5b" in c for c in flat) == 1 and sum("--size 0.5b" in c for c in flat) == 1
    assert all("--print_config" not in c for c in flat)  # on a GPU every step really runs
