"""``vldm benchmark``: the progress bar, and the comparison of a run against a previous one (``--baseline``).

The suite itself is scripts/benchmark.py (it needs torch and diffusers, which the package does not); this module
holds what does not time anything, so that it is tested in milliseconds: reading a results JSON (bad input is one
line and exit 2), pairing its rows with a baseline's by (size, item name), and the table of ratios that flags a
row slower than the baseline by more than the threshold.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from vldm_jax.errors import UserError

DEFAULT_THRESHOLD = 0.10


# ------------------------------------------------------------------------------------------- results files


def read_results(path: str | Path, what: str = "baseline") -> dict[str, Any]:
    """A results JSON written by the benchmark; a missing, unreadable or foreign file is a one-line UserError."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not (isinstance(data, dict) and isinstance(data.get("sizes"), dict)
            and all(isinstance(s, dict) and isinstance(s.get("items"), list) for s in data["sizes"].values())):
        raise UserError(f"{what} {path} is not a benchmark results file (no 'sizes' with 'items'; "
                        "write one with vldm benchmark --out)")
    for size, res in data["sizes"].items():
        for item in res["items"]:
            if not (isinstance(item, dict) and isinstance(item.get("name"), str)):
                raise UserError(f"{what} {path}: a row of size {size!r} has no name")
    return data


def _median(side: Any) -> float | None:
    v = side.get("median_s") if isinstance(side, dict) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v) \
        else None


def rows(results: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(size, item name) -> the row."""
    return {(size, item["name"]): item for size, res in results["sizes"].items() for item in res["items"]}


def compare(new: dict[str, Any], old: dict[str, Any], threshold: float = DEFAULT_THRESHOLD) -> list[dict[str, Any]]:
    """One entry per row present in both runs: our median time then and now, their ratio (now / then: above 1
    is slower), the speedup over diffusers then and now, and ``regression`` when the ratio exceeds
    ``1 + threshold``. A row of the loading item also compares its converted-folder time."""
    before = rows(old)
    out = []
    for key, item in rows(new).items():
        prev = before.get(key)
        if prev is None:
            continue
        for side, label in (("jax", ""), ("jax_converted", " (converted)")):
            t_new, t_old = _median(item.get(side)), _median(prev.get(side))
            if t_new is None or t_old is None:
                continue
            ratio = t_new / t_old
            sp = "speedup_vs_torch" if side == "jax" else "converted_speedup_vs_torch"
            out.append({"size": key[0], "name": key[1] + label, "old_s": t_old, "new_s": t_new, "ratio": ratio,
                        "old_speedup": prev.get(sp), "new_speedup": item.get(sp),
                        "regression": ratio > 1 + threshold})
    return out


def format_comparison(entries: list[dict[str, Any]], threshold: float, baseline: str) -> str:
    if not entries:
        return f"baseline {baseline}: no row in common with this run"
    head = "| size | item | baseline ms | now ms | now / baseline | speedup vs diffusers (baseline -> now) | |"
    lines = [f"against baseline {baseline} (regression: more than {100 * threshold:.0f} % slower)", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    sp = lambda v: f"{v:.2f}x" if isinstance(v, (int, float)) else "-"
    for e in entries:
        flag = "REGRESSION" if e["regression"] else ("faster" if e["ratio"] < 1 - threshold else "")
        lines.append(f"| {e['size']} | {e['name']} | {1e3 * e['old_s']:.1f} | {1e3 * e['new_s']:.1f} | "
                     f"{e['ratio']:.2f} | {sp(e['old_speedup'])} -> {sp(e['new_speedup'])} | {flag} |")
    n = sum(e["regression"] for e in entries)
    lines.append("")
    lines.append(f"{n} regression{'s' if n != 1 else ''} of {len(entries)} rows" + (
        ": " + ", ".join(f"{e['size']} {e['name']} {e['ratio']:.2f}x" for e in entries if e["regression"])
        if n else ""))
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- progress


class Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal): ``step(label)`` marks the
    start of the next of ``total`` steps; the bar shows the steps done, the elapsed time and the current step."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 24, enabled: bool = True):
        self.total = max(1, total)
        self.stream = stream or sys.stderr
        self.width = width
        self.enabled = enabled
        self.done = -1
        self.t0 = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def _line(self, label: str) -> str:
        done = max(0, min(self.done, self.total))
        fill = round(self.width * done / self.total)
        el = int(time.perf_counter() - self.t0)
        return (f"[{'#' * fill}{'.' * (self.width - fill)}] {done}/{self.total} "
                f"{el // 60}:{el % 60:02d} {label}")

    def step(self, label: str) -> None:
        self.done += 1
        self.total = max(self.total, self.done + 1)  # more steps than planned: grow, never overflow the bar
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[2K" + self._line(label))
        else:
            self.stream.write(self._line(label) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.done = self.total
        if self.enabled:
            self.stream.write(("\r\x1b[2K" if self.tty else "") + self._line("done") + "\n")
            self.stream.flush()


# ------------------------------------------------------------------------------------------------ the CLI


def add_parser(sub) -> None:
    """``vldm benchmark ARGS...``: every argument goes to scripts/benchmark.py's parser (``--help`` included)."""
    sub.add_parser("benchmark", add_help=False,
                       help="time vldm_jax against diffusers/PyTorch on the same weights; --baseline old.json "
                            "flags regressions (scripts/benchmark.py; vldm benchmark --help)")
    # No arguments here: cli.main passes everything after `benchmark` (parse_known_args) as args.bench_args.


def run(args) -> int:
    import runpy

    # The suite lives in the source tree's scripts/ (it needs torch and diffusers, which the package does not).
    script = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
    if not script.exists():
        raise UserError(f"{script} not found: `vldm benchmark` runs from a source checkout (pip install -e .)")
    bench = runpy.run_path(str(script), run_name="vldm_benchmark")
    return bench["main"](list(args.bench_args), prog="vldm benchmark")
