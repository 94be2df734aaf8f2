from pathlib import Path

import pytest

from tasks.config import ConfigError, load_params, params_from_dict


def test_defaults_load_from_repo_params():
    p = load_params("params.yaml")
    assert p.data.sources[0].uri == "stdlib"
    assert p.data.sources[0].license == "PSF-2.0"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"data\.min_charz: unknown key"):
        params_from_dict({"data": {"min_charz": 5}})


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match=r"trian: unknown key"):
        params_from_dict({"trian": {}})


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError) as e:
        params_from_dict({"data": {"min_chars": "lots"}})
    assert (
        "data.min_chars" in str(e.value) and "integer" in str(e.value) and "'lots'" in str(e.value)
    )


def test_strict_types_reject_string_bool():
    with pytest.raises(ConfigError, match=r"data\.scrub_emails"):
        params_from_dict({"data": {"scrub_emails": "yes"}})


def test_dotted_override_is_validated_like_the_file():
    raw = {"data": {"sources": [{"uri": "stdlib"}]}}
    p = params_from_dict(raw, ["data.min_chars=50", "data.sources.0.license=MIT"])
    assert p.data.min_chars == 50 and p.data.sources[0].license == "MIT"
    with pytest.raises(ConfigError, match=r"data\.min_chars"):
        params_from_dict({}, ["data.min_chars=abc"])


def test_override_must_have_equals_and_valid_index():
    with pytest.raises(ConfigError, match="key.path=value"):
        params_from_dict({}, ["data.min_chars"])
    with pytest.raises(ConfigError, match="not an index"):
        params_from_dict({"data": {"sources": [{"uri": "stdlib"}]}}, ["data.sources.3.uri=x"])


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_no_number_may_be_infinite_or_nan(value):
    """An infinite sandbox or S3 timeout would switch the limit off; an infinite learning rate
    would only show as a NaN loss. Every number is refused so, from an override as from the file,
    with the key named."""
    for key in ("evaluate.sandbox_timeout_s", "infra.s3_read_timeout_s", "train.lr"):
        with pytest.raises(ConfigError, match=rf"{key}: input should be a finite number"):
            params_from_dict({}, [f"{key}={value}"])


def test_cross_field_check():
    with pytest.raises(ConfigError, match="min_chars"):
        params_from_dict({"data": {"min_chars": 10, "max_chars": 5}})


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_params_yaml_shows_every_parameter():
    """DVC tracks what params.yaml says, not the defaults in tasks/config.py: a parameter missing
    from the file could change without `dvc repro` noticing. Only optional blocks may be absent."""
    import yaml

    raw = yaml.safe_load(Path("params.yaml").read_text())
    params = load_params("params.yaml")
    for section, value in raw.items():
        model = getattr(params, section)
        missing = [
            name
            for name, field in type(model).model_fields.items()
            if name not in value and field.default is not None
        ]
        assert not missing, f"{section}: {missing} not in params.yaml"
