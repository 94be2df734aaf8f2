"""The evaluate stage's report: results.json, comparison.md, comparison.png, samples.jsonl.

Two tables. The comparison with GPT-4 holds only benchmarks where we measure GPT-4's metric:
each score with its 95% interval and n, the chance level, and a mark when the interval includes
chance. The progress measures (bits per byte of HumanEval's canonical solutions and of GSM8K's and
DROP's gold answers, held-out loss) have no GPT-4 number beside them: GPT-4 published a different
metric for those.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tasks.common import benchmarks as bm
from tasks.common.records import DataCard
from tasks.common.storage import atomic_dir
from tasks.common.summary import write_metrics

REFERENCES = Path(__file__).with_name("references.yaml")


def references() -> dict:
    return yaml.safe_load(REFERENCES.read_text())


def comparison_rows(results: dict) -> list[dict]:
    """One row per comparable benchmark in references.yaml: ours beside the published scores."""
    refs = references()
    rows = []
    for key, ref in refs["benchmarks"].items():
        if ref.get("comparable", True) is False:
            continue
        ours = results["benchmarks"].get(key, {"status": "not run: not in evaluate.benchmarks"})
        gpt4 = ref["scores"].get("GPT-4", {}).get("value")
        notes = []
        shots = ours.get("shots")
        for model, sc in ref["scores"].items():
            if shots is not None and sc.get("shots") != shots:
                notes.append(f"{model}: {sc['shots']}-shot vs our {shots}-shot")
            if sc.get("note"):
                notes.append(f"{model}: {sc['note']}")
        notes.append(f"ours: {ref['our_scoring']}")
        if key in bm.BENCHMARKS and bm.BENCHMARKS[key].data_note:
            notes.append(f"data: {bm.BENCHMARKS[key].data_note}")
        if ours.get("truncated"):
            notes.append(
                f"{ours['truncated']} of {ours['n']} prompts cut from the left to the "
                f"{ours['context']}-token context"
            )
        if ours.get("status") == "ran" and shots is not None and shots < ours.get("gpt4_shots", 0):
            notes.append(
                f"{shots} shots, not GPT-4's {ours['gpt4_shots']}: the largest count at which "
                f"most prompts fit the model's {ours['context']}-token context"
            )
        rows.append(
            {
                "key": key,
                "benchmark": ref["name"],
                "metric": ref["metric"],
                "status": ours["status"],
                "ours": ours.get("score"),
                "stderr": ours.get("stderr"),
                "ci95": ours.get("ci95"),
                "n": ours.get("n"),
                "chance": ours.get("chance"),
                "at_chance": ours.get("at_chance"),
                "shots": shots,
                "refs": {m: ref["scores"].get(m, {}).get("value") for m in refs["models"]},
                "live": (results.get("live") or {}).get("benchmarks", {}).get(key, {}).get("score"),
                "gap_to_gpt4": (ours["score"] - gpt4)
                if ours.get("score") is not None and gpt4 is not None
                else None,
                "notes": notes,
            }
        )
    return rows


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def _ours(r: dict) -> str:
    if r["status"] != "ran":
        return r["status"]
    lo, hi = r["ci95"]
    mark = " ≈chance" if r["at_chance"] else ""
    return f"**{r['ours']:.1f}** [{lo:.1f}, {hi:.1f}]{mark}"


def progress_rows(results: dict) -> list[dict]:
    """The measures without a GPT-4 number: bits per byte (lower is better)."""
    b, refs, rows = results["benchmarks"], references()["benchmarks"], []
    titles = {
        "humaneval_bpb": "HumanEval canonical solutions",
        "gsm8k": "GSM-8K gold answers",
        "drop": "DROP gold answers",
    }
    for key in bm.PROGRESS:
        if key not in b:
            continue
        r = b[key]
        ref = refs.get(key)
        gpt4 = (ref or {}).get("scores", {}).get("GPT-4")
        rows.append(
            {
                "key": key,
                "measure": f"{titles[key]}, bits per byte",
                "status": r["status"],
                "score": r.get("score"),
                "ci95": r.get("ci95"),
                "n": r.get("n"),
                "uniform": r.get("uniform_baseline"),
                "note": (
                    f"GPT-4 reports {ref['metric']} {gpt4['value']} ({gpt4['shots']}-shot), a "
                    "different metric: not compared"
                )
                if gpt4 and ref.get("comparable") is False
                else "",
                "truncated": r.get("truncated", 0),
            }
        )
    v = b.get("val_perplexity", {})
    rows.append(
        {
            "key": "val_perplexity",
            "measure": "held-out loss, bits per byte",
            "status": v.get("status", "not run"),
            "score": v.get("bits_per_byte"),
            "ci95": [
                v["bits_per_byte"] - 1.96 * v["bits_per_byte_stderr"],
                v["bits_per_byte"] + 1.96 * v["bits_per_byte_stderr"],
            ]
            if v.get("status") == "ran"
            and v.get("bits_per_byte_stderr") == v.get("bits_per_byte_stderr")
            else None,
            "n": v.get("windows"),
            "uniform": v.get("uniform_bits_per_byte"),
            "note": f"{v['loss']:.3f} nats/token over {v['tokens']:,} validation tokens"
            if v.get("status") == "ran"
            else "",
            "truncated": 0,
        }
    )
    return rows


def comparison_markdown(results: dict, rows: list[dict], card: DataCard | None = None) -> str:
    """comparison.md: the GPT-4 table, the progress measures, base vs chat, the live reference,
    the comparability notes, the corpus's decontamination and the gate."""
    sections = (
        comparison_table(results, rows),
        progress_table(results),
        chat_section(results),
        live_note(results.get("live")),
        comparability(results, rows),
        decontamination(card),
        gate_section(results["gate"]),
    )
    return "\n".join(line for section in sections for line in section) + "\n"


def comparison_table(results: dict, rows: list[dict]) -> list[str]:
    refs = references()
    models = refs["models"]
    live = results.get("live")
    columns = ([f"{live['label']} (live)"] if live else []) + models
    lines = [
        "# Evaluation: our model vs GPT-4",
        "",
        f"Model: `{results['model_dir']}`, context {results.get('context', '?')} tokens, on "
        f"{results.get('device', '?')} ({results.get('dtype', '?')}); "
        + (
            "full evaluation sets"
            if results.get("full_sets")
            else "demo subsets (evaluate.limits; evaluate.full_sets=true scores every item)"
        )
        + ". Reference numbers: "
        + "; ".join(refs["sources"].values())
        + ".",
        "",
        "Ours: score with its 95% interval [low, high] (Wilson); *≈chance*: the interval includes "
        "the chance level.",
        "",
        "| benchmark | metric | ours [95% CI] | n | shots | chance | "
        + " | ".join(columns)
        + " | gap to GPT-4 |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(columns) + "---:|",
    ]
    for r in rows:
        gap = f"{r['gap_to_gpt4']:+.1f}" if r["gap_to_gpt4"] is not None else "–"
        n = r["n"] if r["n"] is not None else "–"
        shots = r["shots"] if r["shots"] is not None else "–"
        refs_cells = ([_fmt(r["live"])] if live else []) + [_fmt(r["refs"][m]) for m in models]
        lines.append(
            f"| {r['benchmark']} | {r['metric']} | {_ours(r)} | {n} | {shots} | "
            f"{_fmt(r['chance'])} | " + " | ".join(refs_cells) + f" | {gap} |"
        )
    return lines


def progress_table(results: dict) -> list[str]:
    lines = [
        "",
        "## Progress measures (no comparable GPT-4 number)",
        "",
        "Bits per byte, lower is better; *uniform*: a model that puts equal mass on every token.",
        "",
        "| measure | ours [95% CI] | n | uniform | note |",
        "|---|---:|---:|---:|---|",
    ]
    for p in progress_rows(results):
        if p["status"] != "ran":
            ours = p["status"]
        elif p["ci95"]:
            ours = f"**{p['score']:.3f}** [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]"
        else:
            ours = f"**{p['score']:.3f}**"
        note = p["note"] + (
            f"; {p['truncated']} prompts cut from the left to the context" if p["truncated"] else ""
        )
        uni = f"{p['uniform']:.3f}" if p["uniform"] is not None else "–"
        lines.append(f"| {p['measure']} | {ours} | {p['n'] or '–'} | {uni} | {note} |")
    return lines


def live_note(live: dict | None) -> list[str]:
    if not live:
        return []
    lines = [
        "",
        f"Live reference **{live['label']}**: `{live['model']}` at {live['base_url']}, "
        f"{live['status']} (the same HumanEval tasks through lm-eval's API models).",
    ]
    live_bpb = live.get("benchmarks", {}).get("humaneval_bpb")
    if live_bpb:
        lines.append(f"Live HumanEval bits per byte: {live_bpb['score']:.3f}.")
    return lines


def comparability(results: dict, rows: list[dict]) -> list[str]:
    lines = ["", "## Comparability", ""]
    lines += [f"- **{r['benchmark']}**: " + "; ".join(r["notes"]) for r in rows]
    for key in bm.PROGRESS:
        if key in results["benchmarks"] and key in bm.BENCHMARKS:
            lines.append(f"- **{bm.BENCHMARKS[key].title}**: {bm.BENCHMARKS[key].data_note}")
    lines.append(
        "- Scores marked *not run* were not measured (the reason is given); no number is filled "
        "in for them."
    )
    return lines


def decontamination(card: DataCard | None) -> list[str]:
    if card is None:
        return []
    dec = card.decontamination
    return [
        "",
        "## Decontamination of the training corpus",
        "",
        f"Documents dropped for sharing a {dec.ngram}-gram with a benchmark: "
        + ", ".join(f"{k} {dec.dropped_per_benchmark.get(k, 0):,}" for k in dec.benchmarks)
        + ".",
    ]


def gate_section(gate: dict) -> list[str]:
    return [
        "",
        "## Release gate",
        "",
        f"**{'PASSED' if gate['passed'] else 'FAILED'}**",
        *(f"- {reason}" for reason in gate["reasons"]),
    ]


def chat_section(results: dict) -> list[str]:
    """Base and chat model side by side on HumanEval (when the chat model was evaluated)."""
    chat = results.get("chat")
    if not chat:
        return []

    def cell(r: dict) -> tuple[str, str]:
        if r.get("status") != "ran":
            return r.get("status", "not run"), "–"
        return f"**{r['score']:.1f}%** [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]", str(r["n"])

    lines = [
        "",
        "## Base and chat model",
        "",
        f"The chat model `{chat['model_dir']}` (the finetune stage) gets each HumanEval prompt as "
        "a user turn through its own chat template and answers until the end of its turn; the "
        f"base model `{results['model_dir']}` continues the prompt as text.",
        "",
        "| model | HumanEval pass@1 [95% CI] | n | setting |",
        "|---|---:|---:|---|",
    ]
    for name, r in (
        ("base", results["benchmarks"].get("humaneval", {})),
        ("chat", chat["benchmarks"]["humaneval"]),
    ):
        score, n = cell(r)
        lines.append(f"| {name} | {score} | {n} | {r.get('setting', '')} |")
    return lines


def comparison_png(rows: list[dict], progress: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = ["ours", *references()["models"]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        vals = [(r["ours"] if m == "ours" else r["refs"][m]) for r in rows]
        xs = [j + i * width for j in range(len(rows))]
        if m == "ours":
            err = [
                [max(0.0, (r["ours"] or 0) - r["ci95"][0]) if r["ci95"] else 0 for r in rows],
                [max(0.0, r["ci95"][1] - (r["ours"] or 0)) if r["ci95"] else 0 for r in rows],
            ]
            ax.bar(
                xs,
                [v or 0 for v in vals],
                width,
                label="ours (95% CI)",
                color="black",
                yerr=err,
                capsize=3,
                ecolor="tab:red",
            )
            for x, v, r in zip(xs, vals, rows, strict=True):
                ax.text(
                    x,
                    (r["ci95"][1] if r["ci95"] else (v or 0)) + 1,
                    "n/r" if r["status"] != "ran" else f"{v:.1f}",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=90,
                )
        else:
            ax.bar(xs, [v or 0 for v in vals], width, label=m, alpha=0.8)
    for j, r in enumerate(rows):
        if r["chance"] is not None and r["chance"] > 0:
            ax.hlines(
                r["chance"],
                j - width / 2,
                j + 0.8 - width / 2,
                colors="grey",
                linestyles="dashed",
                label="chance" if j == 0 else None,
            )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r["benchmark"] for r in rows])
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 112)
    ax.set_title("Ours vs published scores (n/r: not run)")
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    ran = [p for p in progress if p["status"] == "ran"]
    ys = range(len(ran))
    ax2.barh(
        list(ys),
        [p["score"] for p in ran],
        color="black",
        label="ours",
        xerr=[
            [p["score"] - p["ci95"][0] if p["ci95"] else 0 for p in ran],
            [p["ci95"][1] - p["score"] if p["ci95"] else 0 for p in ran],
        ],
        ecolor="tab:red",
        capsize=3,
    )
    ax2.scatter(
        [p["uniform"] for p in ran if p["uniform"]],
        [y for y, p in zip(ys, ran, strict=True) if p["uniform"]],
        marker="|",
        s=300,
        color="grey",
        label="uniform (untrained)",
    )
    ax2.set_yticks(list(ys), [p["measure"].replace(", bits per byte", "") for p in ran], fontsize=8)
    ax2.set_xlabel("bits per byte (lower is better)")
    ax2.set_title("Progress measures")
    ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def numeric_metrics(results: dict) -> dict[str, float]:
    """Every number of results.json's benchmarks and gate, flattened for MLflow metrics."""
    out: dict[str, float] = {}
    for name, r in results["benchmarks"].items():
        for k, v in r.items():
            if isinstance(v, int | float) and v == v:  # bools too; NaN is not a metric
                out[f"eval.{name}.{k}"] = float(v)
            elif k == "ci95" and isinstance(v, list):
                out[f"eval.{name}.ci95_low"], out[f"eval.{name}.ci95_high"] = map(float, v)
    out["eval.gate_passed"] = float(results["gate"]["passed"])
    for name, r in results.get("chat", {}).get("benchmarks", {}).items():
        for k, v in r.items():
            if isinstance(v, int | float) and v == v:
                out[f"eval.chat.{name}.{k}"] = float(v)
    for k, v in results.get("timings", {}).items():
        out[f"eval.time.{k}" if k.endswith("_per_s") else f"eval.seconds.{k}"] = float(v)
    return out


def headline_metrics(results: dict) -> dict[str, float]:
    """The numbers ``dvc metrics show`` and ``dvc metrics diff`` display: the score of each GPT-4
    benchmark that ran, the held-out bits per byte, and the gate (1 passed, 0 failed). Every other
    figure (intervals, progress measures, counts) is in results.json and MLflow."""
    out: dict[str, float] = {}
    for name, r in sorted(results["benchmarks"].items()):
        if r.get("status") != "ran" or name in bm.PROGRESS:
            continue
        if name == "val_perplexity":
            out["val_bpb"] = round(r["bits_per_byte"], 4)  # held-out bits per byte
        else:
            out[name] = round(r["score"], 2)
    chat = results.get("chat", {}).get("benchmarks", {}).get("humaneval", {})
    if chat.get("status") == "ran":
        out["chat_humaneval"] = round(chat["score"], 2)
    out["gate_passed"] = int(results["gate"]["passed"])
    return out


def artifact_table(rows: list[dict]) -> list[dict]:
    """The comparison as a Prefect table artifact and an MLflow table: rounded, one row each."""
    return [
        {
            "benchmark": r["benchmark"],
            "ours (%)": round(r["ours"], 1) if r["status"] == "ran" else r["status"],
            "95% CI": f"{r['ci95'][0]:.1f}-{r['ci95'][1]:.1f}" if r["ci95"] else "",
            "n": r["n"],
            "shots": r["shots"],
            "chance (%)": round(r["chance"], 1) if r["chance"] is not None else None,
            **{m: r["refs"][m] for m in r["refs"]},
            "gap to GPT-4": round(r["gap_to_gpt4"], 1) if r["gap_to_gpt4"] is not None else None,
        }
        for r in rows
    ]


def write_report(results: dict, out_dir: str, card: DataCard | None = None) -> list[dict]:
    """Everything the stage leaves behind, in ``out_dir`` whole or not at all; the decontamination
    of the training corpus from its ``card``."""
    rows = comparison_rows(results)
    with atomic_dir(out_dir) as tmp:
        # samples go to samples.jsonl; timings vary run to run and stay out of a DVC output
        clean = {k: v for k, v in results.items() if k not in ("samples", "timings")}
        clean["comparison"] = rows
        clean["progress"] = progress_rows(results)
        (tmp / "results.json").write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
        write_metrics(tmp / "metrics.json", headline_metrics(results))
        (tmp / "comparison.md").write_text(comparison_markdown(results, rows, card))
        comparison_png(rows, clean["progress"], tmp / "comparison.png")
        with open(tmp / "samples.jsonl", "w") as f:
            for smp in results["samples"]:
                f.write(json.dumps(smp, sort_keys=True) + "\n")
    return rows
