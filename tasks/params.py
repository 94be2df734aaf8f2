"""The whole of ``params.yaml``: one section per stage plus ``infra``, each declared in its stage's
package (``tasks/<stage>/config.py``), put together, loaded and checked here.

Where a value lives: **in the code**, once. Each key's type, bounds, default and meaning are one
``Field`` of its section; the defaults are the embedded CPU demo. ``params.yaml`` holds only what a
run changes from them (nanoGPT's config files carry only their deltas; torchtitan's and OLMo-core's
config classes carry each field's default and help once). DVC still sees every value: each stage's
``deps`` in ``dvc.yaml`` include its package, config module and all, and its ``params`` the section
in ``params.yaml``. With DVC experiments, a key not yet in ``params.yaml`` is set with ``++``:
``dvc exp run -S '++train.lr=1e-3'``.

A downstream stage's input path is its upstream stage's output unless set
(:func:`tasks.common.config.follows`): ``data.out_dir: /scratch/clean`` moves ``tokenize.in_dir``,
``finetune.corpus_dir``, ``evaluate.data_dir`` and ``release.data_dir`` with it.
"""

from __future__ import annotations

import argparse
import copy
import textwrap
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from tasks.common.config import (
    ConfigError,
    Section,
    apply_override,
    check_free_of_secrets,
    follows_of,
    format_errors,
    reference,
    section_of,
)
from tasks.common.infra import InfraConfig
from tasks.evaluate.config import EvaluateConfig
from tasks.finetune.config import FinetuneConfig
from tasks.ingest.config import DataConfig
from tasks.release.config import ReleaseConfig
from tasks.tokenize.config import TokenizeConfig
from tasks.train.config import TrainConfig


class Params(Section):
    data: DataConfig = Field(default_factory=DataConfig, description="the ingest stage")
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig, description="tokenize")
    train: TrainConfig = Field(default_factory=TrainConfig, description="train")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="finetune")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="evaluate")
    release: ReleaseConfig = Field(default_factory=ReleaseConfig, description="release")
    infra: InfraConfig = Field(default_factory=InfraConfig, description="services")

    @model_validator(mode="before")
    @classmethod
    def _follow_upstream(cls, raw: Any) -> Any:
        """Every input path left unset takes the value of the upstream output it follows."""
        if not isinstance(raw, dict):
            return raw
        raw = {k: ({} if v is None else v) for k, v in raw.items()}
        for section, info in cls.model_fields.items():
            given = raw.get(section, {})
            if not isinstance(given, dict):
                continue  # the section's own validation reports it
            for key, field in info.annotation.model_fields.items():
                ref = follows_of(field)
                if ref and key not in given:
                    raw[section] = given = {**given, key: _value(raw, ref)}
        return raw


def _value(raw: dict, ref: str) -> Any:
    """The value of ``section.key`` in ``raw``, else its default (following further upstream)."""
    section, key = ref.split(".")
    given = raw.get(section, {})
    if isinstance(given, dict) and key in given:
        return given[key]
    field = Params.model_fields[section].annotation.model_fields[key]
    upstream = follows_of(field)
    return _value(raw, upstream) if upstream else field.get_default(call_default_factory=True)


SECTIONS = tuple(Params.model_fields)


def load_params(
    path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()
) -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"params file {path} not found (run from the repo root or pass --params PATH)"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    return params_from_dict(raw, overrides, origin=str(path))


def params_from_dict(
    raw: dict, overrides: list[str] | tuple[str, ...] = (), origin: str = "params"
) -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections")
    raw = copy.deepcopy(raw)
    for o in overrides:
        _seed_default_lists(raw, o.partition("=")[0].strip().split("."))
        apply_override(raw, o)
    origin += " with overrides" if overrides else ""
    check_free_of_secrets(raw, origin)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, origin)) from None


def _seed_default_lists(raw: dict, keys: list[str]) -> None:
    """An override into an item of a list the file leaves at its default
    (``data.sources.0.license=MIT`` with no ``data.sources`` in params.yaml) starts from that
    default list, as it would from one written in the file."""
    node, model = raw, Params
    for i, key in enumerate(keys[:-1]):
        if not isinstance(node, dict) or model is None or key not in model.model_fields:
            return
        info = model.model_fields[key]
        if key not in node and keys[i + 1].isdigit():
            default = info.get_default(call_default_factory=True)
            if isinstance(default, list):
                node[key] = [
                    d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in default
                ]
            return
        if node.get(key) is None:  # absent, or written empty in the YAML
            node[key] = {}
        node, model = node[key], section_of(info.annotation)


def reference_text(sections: tuple[str, ...] = SECTIONS) -> str:
    """Every key of these sections: its default and its meaning, as ``python -m flows params``
    and each stage's ``--help`` print them."""
    lines = []
    for name in sections:
        cls = Params.model_fields[name].annotation
        lines.append(f"{name}:  {(cls.__doc__ or '').strip().partition(chr(10))[0]}")
        for key, default, meaning in reference(cls, name):
            lines.append(f"  {key} = {default}")
            lines += textwrap.wrap(meaning, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def parse_cli(
    argv: list[str] | None,
    description: str,
    sections: tuple[str, ...] = (),
    stages: tuple[str, ...] = (),
    prog: str | None = None,
) -> tuple[Params, argparse.Namespace]:
    """``--params PATH`` plus ``key.path=value`` overrides, as every stage's entry point takes;
    ``--help`` lists the keys of ``sections``. ``stages``: a ``--stage`` choice too (model.train
    runs train and finetune)."""
    epilog = reference_text(sections) if sections else None
    ap = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog and f"keys (default, meaning):\n{epilog}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if stages:
        ap.add_argument("--stage", choices=stages, default=stages[0])
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.min_chars=50")
    args = ap.parse_args(argv)
    return load_params(args.params, args.overrides), args
