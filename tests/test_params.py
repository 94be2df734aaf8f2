from pathlib import Path

import pytest

from tasks.common.config import ConfigError
from tasks.params import load_params, params_from_dict


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


def test_params_yaml_restates_no_default():
    """Each value lives once: in the code, as its key's default. params.yaml holds only what the
    run changes from it (the demo changes nothing), so a default can never drift from a copy."""
    import yaml

    from tasks.params import Params

    raw = yaml.safe_load(Path("params.yaml").read_text())
    restated = []
    for section, given in raw.items():
        fields = Params.model_fields[section].annotation.model_fields
        for key, value in (given or {}).items():
            default = fields[key].get_default(call_default_factory=True)
            if hasattr(default, "model_dump"):
                default = default.model_dump()
            if value == default:
                restated.append(f"{section}.{key}")
    assert restated == [], f"restated defaults: {restated}"
    assert set(raw) == set(Params.model_fields)  # every section present, for dvc.yaml's params


def test_every_key_is_described_once():
    """``python -m flows params`` prints each key with its default and meaning: no key without one."""
    from tasks.common.config import reference
    from tasks.params import SECTIONS, Params, reference_text

    rows = [r for s in SECTIONS for r in reference(Params.model_fields[s].annotation, s)]
    assert len(rows) > 150
    assert [key for key, _, meaning in rows if not meaning] == []
    text = reference_text()
    assert "train.seq_len = 1024" in text and "evaluate.limits.humaneval" not in text
    assert "tokenize.in_dir = data/clean" in text and "(default: data.out_dir)" in text


def test_downstream_inputs_follow_upstream_outputs():
    """An input path not set is its upstream stage's output path: moving one output moves every
    stage that reads it; a path set explicitly stays; null still means none where allowed."""
    p = params_from_dict({"data": {"out_dir": "/x/clean"}, "train": {"export_dir": "/m/hf"}})
    assert p.tokenize.in_dir == p.finetune.corpus_dir == "/x/clean"
    assert p.evaluate.data_dir == p.release.data_dir == "/x/clean"
    assert p.evaluate.model_dir == p.release.model_dir == p.finetune.base_model_dir == "/m/hf"
    assert p.finetune.train_config(p.train).init_from == "/m/hf"
    p = params_from_dict({"tokenize": {"tokens_dir": "/t"}, "evaluate": {"tokens_dir": "/e"}})
    assert (p.train.tokens_dir, p.evaluate.tokens_dir, p.release.tokens_dir) == ("/t", "/e", "/t")
    assert params_from_dict({"evaluate": {"chat_model_dir": None}}).evaluate.chat_model_dir is None
    d = load_params("params.yaml")
    assert (d.tokenize.in_dir, d.train.tokens_dir, d.release.chat_summary) == (
        "data/clean",
        "data/tokens",
        "models/chat_summary.json",
    )


def test_limits_are_bounded_and_a_benchmark_left_out_keeps_its_demo_limit():
    from tasks.common.benchmarks import BENCHMARKS

    p = params_from_dict({"evaluate": {"limits": {"mmlu": 57}}})
    assert p.evaluate.limit("mmlu") == 57
    assert p.evaluate.limit("hellaswag") == BENCHMARKS["hellaswag"].demo_limit == 100
    assert p.evaluate.limit("humaneval") is None  # the whole set: the demo's choice
    for bad in (-5, 0):
        with pytest.raises(ConfigError, match=r"evaluate\.limits\.humaneval: input should be"):
            params_from_dict({}, [f"evaluate.limits.humaneval={bad}"])
    with pytest.raises(ConfigError, match=r"evaluate\.limits\.arc: input should be"):
        params_from_dict({}, ["evaluate.limits.arc=5"])


def test_finetune_runs_trains_settings_with_its_own_values():
    """One run config: fine-tuning takes train's settings and replaces only finetune.run's keys."""
    p = params_from_dict({"train": {"beta2": 0.99}, "finetune": {"run": {"max_steps": 50}}})
    run = p.finetune.train_config(p.train)
    assert (run.beta2, run.max_steps, run.seq_len, run.lr) == (0.99, 50, 512, 1e-3)
    assert (run.tokens_dir, run.export_dir, run.ckpt_dir) == (
        "data/sft",
        "models/chat",
        "models/chat_ckpt",
    )
    with pytest.raises(ConfigError, match=r"finetune\.run\.lr: input should be a valid number"):
        params_from_dict({}, ["finetune.run.lr=fast"])
    with pytest.raises(ConfigError, match=r"finetune\.run\.lrr: not a train setting"):
        params_from_dict({}, ["finetune.run.lrr=1"])
    with pytest.raises(ConfigError, match=r"finetune\.run\.export_dir: set by the stage"):
        params_from_dict({}, ["finetune.run.export_dir=x"])


def test_an_override_reaches_into_a_default_list():
    p = params_from_dict({}, ["data.sources.0.license=MIT"])
    assert (p.data.sources[0].uri, p.data.sources[0].license) == ("stdlib", "MIT")
