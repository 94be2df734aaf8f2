"""The machinery of typed params, shared by every stage's section.

Each stage declares its ``params.yaml`` section as a :class:`Section` in its own package
(``tasks/<stage>/config.py``; the trainer's run in ``tasks/train/config.py``) and ``tasks/params.py``
puts them together. A key is declared once: its type, bounds, default and meaning in one
``Field(..., description=...)``. ``params.yaml`` holds only what differs from those defaults, and
``python -m flows params`` prints every key with its default and meaning.

Two declarations cover what would otherwise be written twice:

- :func:`follows`: a downstream stage's input path defaults to its upstream stage's output path
  (``tokenize.in_dir`` is ``data.out_dir`` unless set), so a path is written once;
- :func:`merged`: a mapping whose keys the user may give in part; the rest keep their defaults
  (``evaluate.limits: {mmlu: 57}`` leaves every other benchmark at its demo limit).

Unknown keys and wrong types are rejected before any work starts, with a message that names the
dotted key, the expected type and the value found (secrets never shown).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from tasks.common.errors import UserError
from tasks.common.redaction import redact_text, secrets_in


class ConfigError(UserError, ValueError):
    """Bad params: the message names the key and says what to change."""


class Section(BaseModel):
    """One ``params.yaml`` section (or a part of one): frozen, strict, no unknown keys, and no NaN
    or infinity in any number (an infinite timeout or learning rate is never meant)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)
    SECTION: ClassVar[str] = ""  # its name in params.yaml, for a top-level section

    @model_validator(mode="before")
    @classmethod
    def _merge_mappings(cls, data: Any) -> Any:
        """Fields declared with :func:`merged`: the given keys over the default mapping."""
        if not isinstance(data, dict):
            return data
        for name, info in cls.model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            given = data.get(name)
            if extra.get("merge") and isinstance(given, dict):
                data = {**data, name: {**info.get_default(call_default_factory=True), **given}}
        return data


def follows(upstream: type[Section], key: str, description: str) -> Any:
    """A field whose default is the upstream section's ``key`` (its default here, its value in a
    params file: ``tasks.params.Params`` fills it in when the user left it unset)."""
    info = upstream.model_fields[key]
    ref = f"{upstream.SECTION}.{key}"
    return Field(
        default=info.default,
        description=f"{description} (default: {ref})",
        json_schema_extra={"follows": ref},
    )


def merged(default: dict, description: str) -> Any:
    """A mapping field: keys the user gives replace the default's, the others keep it."""
    return Field(
        default_factory=lambda: dict(default),
        description=f"{description} Keys left out keep their defaults.",
        json_schema_extra={"merge": True},
    )


def follows_of(info: FieldInfo) -> str | None:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return extra.get("follows")  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ errors


def format_errors(err: ValidationError, origin: str, key_name: Callable[[str], str] = str) -> str:
    """One line per error, naming the dotted key (``key_name`` maps the key as pydantic sees it
    to the key the user wrote)."""
    lines = [f"invalid params in {origin}:"]
    for e in err.errors():
        key = key_name(".".join(str(p) for p in e["loc"] if p != "[key]") or "<root>")
        if e["type"] == "extra_forbidden":
            lines.append(
                f"  {key}: unknown key (check the spelling; `python -m flows params` lists them)"
            )
            continue
        if e["type"] == "value_error" and isinstance(e.get("input"), dict):
            # A section's own check: its message names the keys.
            lines.append(f"  {redact_text(e['msg'].removeprefix('Value error, '))}")
            continue
        got = e.get("input")
        shown = "a mapping" if isinstance(got, dict) else f"{type(got).__name__} {got!r}"
        lines.append(f"  {key}: {e['msg'].lower()} (got {redact_text(shown)})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- overrides


def apply_override(raw: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` override in place; ``value`` is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key.path=value")
    path, _, text = override.partition("=")
    keys = path.strip().split(".")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({exc})") from exc
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[_index(node, key, keys[: i + 1])]
        else:
            if node.get(key) is None:  # absent, or written empty (`run:`) in the YAML
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict | list):
                raise ConfigError(
                    f"override {override!r}: {'.'.join(keys[: i + 1])} is not a section"
                )
    last = keys[-1]
    if isinstance(node, list):
        node[_index(node, last, keys)] = value
    else:
        node[last] = value


def _index(node: list, key: str, keys: list[str]) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(
            f"override key {'.'.join(keys)}: {key!r} is not an index of a {len(node)}-item list"
        )
    return int(key)


def check_free_of_secrets(raw: dict, origin: str) -> None:
    """Refuse a secret given as a param: params travel into Prefect's run parameters, MLflow, logs
    and the model card. Credentials come from the environment or a secret store instead."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        _flatten(flat, str(key), value)
    found = secrets_in(flat)
    if found:
        lines = [f"secrets in {origin} (the values are not shown):"]
        lines += [
            f"  {k}: looks like a credential; params are stored in clear in Prefect, MLflow and "
            "the model card. Pass it through the environment (AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY / AWS_PROFILE for S3, HF_TOKEN, or the variable a *_env key "
            "names) or a Prefect Secret block"
            for k in found
        ]
        raise ConfigError("\n".join(lines))


# ------------------------------------------------------------------------ flat views of params


def to_flat_dict(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Flatten a config for MLflow params (``data.min_chars``: 100)."""
    out: dict[str, Any] = {}
    for key, value in model.model_dump(mode="json").items():
        _flatten(out, f"{prefix}{key}", value)
    return out


def _flatten(out: dict, key: str, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(out, f"{key}.{k}", v)
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        for i, v in enumerate(value):
            _flatten(out, f"{key}.{i}", v)
    else:
        out[key] = value


def reference(cls: type[BaseModel], prefix: str) -> list[tuple[str, str, str]]:
    """``(dotted key, default, meaning)`` of every key of a section, nested sections and the items
    of lists of sections included (``data.sources[].uri``): what ``python -m flows params`` and
    ``--help`` print."""
    rows: list[tuple[str, str, str]] = []
    for name, info in cls.model_fields.items():
        key = f"{prefix}.{name}"
        inner = section_of(info.annotation)
        if info.is_required():
            default = "(required)"
        else:
            value = info.get_default(call_default_factory=True)
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="json")
            elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
                value = [v.model_dump(mode="json", exclude_none=True) for v in value]
            default = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
            default = default.removesuffix("\n...").removesuffix("...").strip()
        rows.append((key, default, _meaning(info)))
        if inner is not None:
            item = "[]" if _is_list(info.annotation) else ""
            rows += reference(inner, f"{key}{item}")
    return rows


def _meaning(info: FieldInfo) -> str:
    bounds = [
        f"{sym} {getattr(m, attr)}"
        for m in info.metadata
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
        if getattr(m, attr, None) is not None
    ]
    text = info.description or ""
    return f"{text} [{', '.join(bounds)}]" if bounds else text


def section_of(annotation: Any) -> type[BaseModel] | None:
    """The Section class inside ``X``, ``X | None`` or ``list[X]``, if any."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = section_of(arg)
        if found is not None:
            return found
    return None


def _is_list(annotation: Any) -> bool:
    import typing

    return typing.get_origin(annotation) is list or any(
        typing.get_origin(a) is list for a in typing.get_args(annotation)
    )
