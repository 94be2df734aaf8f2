"""What people read: numbers with units and sensible rounding, and the pipeline's closing table.

Used by the Prefect artifacts (train, release) and by the pipeline's last log lines, so that a run
ends with what each stage did, how long it took, and where to look next."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from tasks.common.storage import atomic_write_text

# What each stage's DVC metrics file holds: a few headline numbers, so that `dvc metrics show`
# (one column per metric name, over all stages) fits a terminal. Every figure, settings and
# strings included, stays in the stage's own record (data card, token index, train summary,
# results.json) and in MLflow.
HEADLINE = {
    "ingest": ("docs_out", "bytes_out"),
    "tokenize": ("train_tokens", "bytes_per_token"),
    "train": ("val_loss", "tokens_per_s", "mfu"),
}

# metric name -> (unit, scale, decimals); the name's suffix decides when it is not listed
UNITS = {
    "peak_flops": ("FLOP/s", None, 2),  # None: SI prefix by magnitude (G on a CPU, T on a GPU)
    "flops_per_token": ("MFLOP", 1e-6, 1),
    "tokens_per_s": ("tokens/s", 1, 0),
    "mfu": ("%", 100, 1),
    "wall_s": ("s", 1, 1),
    "params": ("M", 1e-6, 2),
    "tokens_seen": ("", 1, 0),
    "bytes_in": ("MB", 1e-6, 1),
    "bytes_out": ("MB", 1e-6, 1),
    "export_max_logit_diff": ("", 1, 6),
}


def human(key: str, value) -> str:
    """``peak_flops 163640069269.65`` -> ``163.64 GFLOP/s``; integers get thousands separators."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    unit, scale, digits = UNITS.get(key, ("", 1, None))
    if scale is None:
        prefix, scale = next(
            ((p, s) for p, s in (("P", 1e-15), ("T", 1e-12), ("G", 1e-9)) if abs(value) * s >= 1),
            ("M", 1e-6),
        )
        unit = prefix + unit
    v = value * scale
    if digits is None:
        digits = 0 if isinstance(value, int) else (4 if abs(v) < 10 else 2)
    text = f"{v:,.{digits}f}"
    return f"{text} {unit}".strip()


def eta_text(seconds: float) -> str:
    """``75`` -> ``1 min 15 s``; ``7300`` -> ``2 h 02 min``."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """Labelled progress lines with rate and ETA for a long loop: at most one every ``every_s``
    seconds, and the last. Counts items, or any unit (``unit=" MB", scale=1e-6`` for bytes)."""

    def __init__(
        self,
        label: str,
        total: float,
        log: Callable[[str], None],
        every_s: float = 10.0,
        unit: str = "",
        scale: float = 1.0,
    ):
        self.label, self.total, self.log, self.every_s = label, total, log, every_s
        self.unit, self.scale = unit, scale
        self.t0 = self.last = time.monotonic()
        self.done = 0
        self.first: tuple[float, float] | None = None  # (time, amount) of the first advance

    def _fmt(self, v: float) -> str:
        v *= self.scale
        return f"{v:,.0f}" if self.scale == 1 and float(v).is_integer() else f"{v:,.1f}"

    def advance(self, n: float = 1, extra: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if self.first is None:
            self.first = (now, self.done)
        if now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        # the ETA leaves out the start (workers starting, indexes loading): it is the rate since
        # the first piece of work completed, unknown until a second one has
        t1, d1 = self.first
        recent = (self.done - d1) / (now - t1) if now > t1 and self.done > d1 else 0.0
        eta = (
            0.0
            if self.done >= self.total
            else (self.total - self.done) / recent
            if recent
            else float("inf")
        )
        self.log(
            f"{self.label}: {self._fmt(self.done)}/{self._fmt(self.total)}{self.unit} "
            f"({100 * self.done / max(self.total, 1e-9):.0f}%), {rate * self.scale:,.1f}{self.unit}/s, "
            f"ETA {eta_text(eta)}{extra}"
        )


def is_number(v) -> bool:
    """An int or float, not a bool: what a DVC or MLflow metric can hold."""
    return isinstance(v, int | float) and not isinstance(v, bool)


def headline(stage: str, metrics: dict) -> dict:
    """The stage's headline numbers, in the order of ``HEADLINE``; a missing or non-numeric one is
    left out (DVC warns about strings and lists)."""
    return {k: metrics[k] for k in HEADLINE[stage] if is_number(metrics.get(k))}


def write_metrics(path: str | Path, numbers: dict) -> None:
    """A DVC metrics file: numbers only, written atomically."""
    bad = {k: v for k, v in numbers.items() if not is_number(v)}
    if bad:
        raise ValueError(f"a DVC metrics file holds numbers only; not numbers: {bad}")
    atomic_write_text(path, json.dumps(numbers, indent=2) + "\n")


def markdown_table(rows: dict, title: str) -> str:
    return f"# {title}\n\n| | |\n|---|---:|\n" + "".join(
        f"| {k.replace('_', ' ')} | {human(k, v)} |\n" for k, v in rows.items()
    )


def key_figure(stage: str, out) -> str:
    """One line saying what a stage produced, from what its flow returned."""
    if not isinstance(out, dict):
        return ""
    try:
        if stage == "ingest":
            return f"{out['docs_out']:,} docs, {out['bytes_out'] / 1e6:.1f} MB"
        if stage == "tokenize":
            return f"{out['train_tokens']:,} train tokens"
        if stage == "train":
            return f"val loss {out['val_loss']:.3f}, {out['tokens_per_s']:,.0f} tokens/s"
        if stage == "finetune":
            return (
                f"{out['train_conversations']:,} conversations, chat val loss {out['val_loss']:.3f}"
            )
        if stage == "evaluate":
            gate = "passed" if out["gate"]["passed"] else "FAILED"
            return f"gate {gate}"
        if stage == "release":
            return out["bundle"] + (
                f" + {Path(out['chat']['bundle']).name}" if "chat" in out else ""
            )
    except (KeyError, TypeError):
        return ""
    return ""


def pipeline_summary(rows: list[dict], where: dict[str, str]) -> str:
    """The closing table: stage, ran or skipped, wall time, key figure; then where to look."""
    lines = [
        f"{'stage':<10} {'status':<8} {'time':>8}  key figure",
        f"{'-' * 10} {'-' * 8} {'-' * 8}  {'-' * 40}",
    ]
    for r in rows:
        t = f"{r['seconds']:.0f} s" if r["status"] == "ran" else "-"
        lines.append(f"{r['stage']:<10} {r['status']:<8} {t:>8}  {r['figure']}")
    lines += [f"{k}: {v}" for k, v in where.items()]
    return "\n".join(lines)


def mixture_table(mixture: dict) -> list[str]:
    """The training mixture's target and realised shares (tokenize.mixture), when one was set: the model card's
    and the tokenize run's Prefect artifact."""
    if not mixture:
        return []
    rows = [
        "Training mixture (share of training tokens, `tokenize.mixture`):",
        "",
        "| source | natural | target | realised | passes | cap |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s, r in mixture.items():
        rows.append(
            f"| {s} | {100 * r['natural_share']:.1f}% | {100 * r['target_share']:.1f}% | "
            f"{100 * r['realised_share']:.1f}% | {r['epochs']:.2f} | {r['max_epochs'] or '-'} |"
        )
    return [*rows, ""]
