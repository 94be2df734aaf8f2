import tasks.common.dvc as dvc


def test_clear_outs_removes_stale_outputs_but_not_persisted_ones(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  train:\n    cmd: x\n    outs:\n      - models/ckpt\n      - models/keep:\n          persist: true\n"
        "      - reports/a.md:\n          cache: false\n"
    )
    (tmp_path / "models/ckpt/step-00000060").mkdir(parents=True)
    (tmp_path / "models/keep").mkdir(parents=True)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/a.md").write_text("old")
    monkeypatch.setattr(dvc, "REPO_ROOT", tmp_path)
    assert dvc.clear_outs("train") == ["models/ckpt", "reports/a.md"]
    assert not (tmp_path / "models/ckpt").exists() and (tmp_path / "models/keep").exists()
    assert dvc.clear_outs("train") == []
