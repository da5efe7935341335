"""bnll_lightning/disk.py: the bytes a run leaves, per place, and the lines that say so."""

import os

from bnll_lightning import disk


def make(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def test_the_bytes_reported_are_the_files_sizes_each_counted_once_in_its_innermost_place(tmp_path):
    run = tmp_path / "runs" / "version_0"
    files = [make(run / "events.out.tfevents", 1234), make(run / "config.yaml", 56),
             make(run / "checkpoints" / "step=4.ckpt", 100_000), make(run / "hf_model" / "model.safetensors", 54_321),
             make(run / "hf_model" / "sub" / "tokenizer.json", 789),
             make(tmp_path / "elsewhere" / "model.bin", 4096)]  # fmt: skip
    os.symlink(run / "checkpoints" / "step=4.ckpt", run / "checkpoints" / "last.ckpt")  # save_last: link
    places = {"logs": run, "checkpoints": run / "checkpoints", "export": run / "hf_model",
              "other": tmp_path / "elsewhere", "none": None, "missing": tmp_path / "nothing"}  # fmt: skip
    sizes = disk.by_place(places)
    size = {f: os.path.getsize(f) for f in files}
    assert sizes == {"logs": size[files[0]] + size[files[1]], "checkpoints": size[files[2]],
                     "export": size[files[3]] + size[files[4]], "other": size[files[5]]}  # fmt: skip
    assert sum(sizes.values()) == sum(size.values())  # each file once, the link not at all
    assert disk.by_place({"one file": files[3]}) == {"one file": 54_321}

    lines = disk.report_lines(places)
    assert lines[0] == "disk       160 kB in this run's folders:"
    assert lines[1:] == [f"   100 kB  checkpoints  {run / 'checkpoints'}", f"    55 kB  export       {run / 'hf_model'}",
                         f"   4.1 kB  other        {tmp_path / 'elsewhere'}", f"   1.3 kB  logs         {run}"]  # fmt: skip
    assert disk.one_line({"answers": files[1]}) == f"56 B in {files[1]}"
    assert disk.one_line({"a": files[0], "b": files[1]}) == f"1.3 kB: a {files[0]} 1.2 kB, b {files[1]} 56 B"


def test_sizes_read_in_decimal_units():
    assert [disk.human(n) for n in (0, 999, 1000, 9_949, 61_000, 540_000_000, 1_600_000_000)] == [
        "0 B", "999 B", "1.0 kB", "9.9 kB", "61 kB", "540 MB", "1.6 GB"]  # fmt: skip
