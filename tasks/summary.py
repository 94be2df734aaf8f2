"""What people read: numbers with units and sensible rounding, and the pipeline's closing table.

Used by the Prefect artifacts (train, release) and by the pipeline's last log lines, so that a run
ends with what each stage did, how long it took, and where to look next."""

from __future__ import annotations

import math

# metric name -> (unit, scale, decimals); the name's suffix decides when it is not listed
UNITS = {
    "peak_flops": ("TFLOP/s", 1e-12, 2),
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
    """``peak_flops 163640069269.65`` -> ``163.64 TFLOP/s``; integers get thousands separators."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    unit, scale, digits = UNITS.get(key, ("", 1, None))
    v = value * scale
    if digits is None:
        digits = 0 if isinstance(value, int) else (4 if abs(v) < 10 else 2)
    text = f"{v:,.{digits}f}"
    return f"{text} {unit}".strip()


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
        if stage == "evaluate":
            gate = "passed" if out["gate"]["passed"] else "FAILED"
            return f"gate {gate}"
        if stage == "release":
            return out["bundle"]
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
