"""The data card (``data/clean/card.json``): per source, what came in and went out and why, the
filters, PII replaced, decontamination; and its Markdown form (the Prefect artifact).
Downstream stages read it through ``tasks.common.records.DataCard``."""

from __future__ import annotations

from collections import Counter

import numpy as np

from tasks.ingest import filters
from tasks.ingest.config import DataConfig


def build_card(
    cfg: DataConfig, stats, dup, kept, n_exact, n_near, contamination, n_quarantined
) -> dict:
    """``kept``: the META of the documents that survive."""
    docs_by_source = np.bincount(kept["source"], minlength=len(cfg.sources)).tolist()
    bytes_by_source = np.zeros(len(cfg.sources), np.int64)
    np.add.at(bytes_by_source, kept["source"], kept["n_bytes"])
    sources = []
    for i, src in enumerate(cfg.sources):
        st = stats[i]
        sources.append(
            {
                "name": src.label,
                "uri": src.uri,
                "license": src.license,
                "docs_in": st.docs_in,
                "bytes_in": st.bytes_in,
                "quarantined": st.quarantined,
                "filtered": dict(sorted(st.filtered.items())),
                "exact_duplicates": dup[i]["exact"],
                "near_duplicates": dup[i]["near"],
                "pii_replaced": dict(sorted(st.pii.items())),
                "contaminated": st.contaminated,
                "encodings": dict(sorted(st.encodings.items())),
                "docs_out": docs_by_source[i],
                "bytes_out": int(bytes_by_source[i]),
            }
        )
    filtered = sum((st.filtered for st in stats.values()), Counter())
    pii = sum((st.pii for st in stats.values()), Counter())
    totals = {
        "docs_in": sum(s["docs_in"] for s in sources),
        "bytes_in": sum(s["bytes_in"] for s in sources),
        "docs_out": len(kept),
        "bytes_out": int(kept["n_bytes"].sum()),
        "quarantined": n_quarantined,
        "filtered": sum(filtered.values()),
        "exact_duplicates": n_exact,
        "near_duplicates": n_near,
        "pii_replaced": sum(pii.values()),
        "contaminated": len(contamination),
    }
    return {
        "stage": "ingest",
        "sources": sources,
        "totals": totals,
        "filters": {name: filtered.get(name, 0) for name in filters.FILTER_NAMES},
        "pii_replaced": dict(sorted(pii.items())),
        "decontamination": {
            "benchmarks": list(cfg.decontam_benchmarks),
            "ngram": cfg.decontam_ngram,
            "hits": contamination,
            "dropped_per_benchmark": {
                name: sum(
                    any(m.split("/", 1)[0] == name for m in h["matches"]) for h in contamination
                )
                for name in cfg.decontam_benchmarks
            },
        },
        "dedup": {
            "exact": "sha256 of the cleaned text",
            "near": f"MinHash LSH, word {cfg.dedup_ngram}-grams, {cfg.minhash_perm} permutations, "
            f"Jaccard >= {cfg.minhash_threshold}",
        },
        "licenses": {s["name"]: s["license"] for s in sources},
        "steps": "decode -> normalize -> filter -> scrub -> decontaminate -> exact dedup -> near dedup",
    }


def card_markdown(card: dict, mlflow_url: str | None = None) -> str:
    t = card["totals"]
    lines = [
        "# Ingest data card",
        "",
        f"**{t['docs_out']:,} documents, {t['bytes_out'] / 1e6:.1f} MB out** of {t['docs_in']:,} "
        f"read ({t['bytes_in'] / 1e6:.1f} MB).",
        "",
        "| source | license | docs in | quarantined | filtered | exact dup | near dup | contaminated | docs out | MB out |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in card["sources"]:
        lines.append(
            f"| {s['name']} | {s['license']} | {s['docs_in']:,} | {s['quarantined']:,} | "
            f"{sum(s['filtered'].values()):,} | {s['exact_duplicates']:,} | {s['near_duplicates']:,} | "
            f"{s['contaminated']:,} | {s['docs_out']:,} | {s['bytes_out'] / 1e6:.2f} |"
        )
    lines += ["", "| filter | dropped |", "|---|---:|"]
    lines += [f"| {k} | {v:,} |" for k, v in card["filters"].items()]
    lines += ["", "| PII / secret | replaced |", "|---|---:|"]
    lines += [f"| {k} | {v:,} |" for k, v in card["pii_replaced"].items()] or ["| (none) | 0 |"]
    hits = card["decontamination"]["hits"]
    lines += [
        "",
        f"Decontamination ({', '.join(card['decontamination']['benchmarks'])}, "
        f"{card['decontamination']['ngram']}-grams): {len(hits)} document(s) dropped"
        + (
            " ("
            + ", ".join(
                f"{k} {v:,}" for k, v in card["decontamination"]["dropped_per_benchmark"].items()
            )
            + ")."
            if card["decontamination"].get("dropped_per_benchmark")
            else "."
        ),
    ]
    lines += [f"- `{h['uri']}` matched {', '.join(h['matches'][:5])}" for h in hits[:20]]
    if mlflow_url:
        lines += ["", f"MLflow run: {mlflow_url}"]
    return "\n".join(lines) + "\n"
