"""What a run leaves on disk: the bytes under each of its output places, as the console's last lines."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["by_place", "human", "one_line", "print_report", "report_lines"]


def _files(path: Path) -> list[Path]:
    """The regular files at or under ``path`` (links not followed: ``save_last: link``'s ``last.ckpt`` points at
    a checkpoint already counted)."""
    if path.is_symlink() or not path.exists():
        return []
    if path.is_file():
        return [path]
    return [Path(root, name) for root, _, names in os.walk(path) for name in names
            if not os.path.islink(os.path.join(root, name))]  # fmt: skip


def by_place(places: Mapping[str, str | os.PathLike[str] | None]) -> dict[str, int]:
    """Bytes (file sizes) under each place (name -> a folder or a file; None or missing: left out). A file under
    several places counts for the innermost only: the export and the checkpoints sit inside the log directory by
    default, and each is told apart."""
    # A walk of our own, not ``du``: apparent sizes (what the files add up to) and one count per file across
    # nested places.
    roots = {name: Path(os.path.abspath(p)) for name, p in places.items() if p is not None and os.path.lexists(p)}
    sizes = dict.fromkeys(roots, 0)
    for name, root in roots.items():
        for file in _files(root):
            holders = [n for n, r in roots.items() if file == r or r in file.parents]
            if max(holders, key=lambda n: len(roots[n].parts)) == name:
                sizes[name] += file.stat().st_size
    return sizes


def human(size: int) -> str:
    """``size`` bytes in decimal units, as ``du --si`` and the README write them: ``812 B``, ``61 kB``, ``1.6 GB``."""
    value, unit = float(size), "B"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 999.5 or unit == "TB":
            break
        value /= 1000
    return f"{value:.0f} {unit}" if unit == "B" or value >= 9.95 else f"{value:.1f} {unit}"


def report_lines(places: Mapping[str, str | os.PathLike[str] | None]) -> list[str]:
    """The console's lines: the total, then one per place that holds something (bytes, name, path), largest first."""
    sizes = by_place(places)
    if not sizes:
        return []
    width = max(len(name) for name in sizes)
    lines = [f"disk       {human(sum(sizes.values()))} in this run's folders:"]
    for name, size in sorted(sizes.items(), key=lambda item: -item[1]):
        lines.append(f"  {human(size):>7}  {name:<{width}}  {places[name]}")
    return lines


def one_line(places: Mapping[str, str | os.PathLike[str] | None]) -> str:
    """:func:`report_lines` in one line, for a line per run: ``2.1 kB in answers/x.jsonl``, or with several places
    ``14 kB: answers answers/x.jsonl 2.1 kB, run runs/x 12 kB``."""
    sizes = by_place(places)
    if not sizes:
        return "0 B"
    if len(sizes) == 1:
        ((name, size),) = sizes.items()
        return f"{human(size)} in {places[name]}"
    each = ", ".join(f"{name} {places[name]} {human(size)}" for name, size in sizes.items())
    return f"{human(sum(sizes.values()))}: {each}"


def print_report(places: Mapping[str, str | os.PathLike[str] | None]) -> None:
    """Print :func:`report_lines` on stdout, without tearing a progress bar (tqdm's write)."""
    from tqdm import tqdm

    lines = report_lines(places)
    if lines:
        tqdm.write("\n".join(lines), file=sys.stdout)
