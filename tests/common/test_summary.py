"""What people read: units, ETA lines, DVC metrics files that hold numbers only."""

import json
import time

import pytest

from tasks.common.summary import Progress, eta_text, headline, human, write_metrics


def test_eta_text_and_units():
    assert [eta_text(s) for s in (0, 59.4, 75, 3599, 7300)] == [
        "0 s",
        "59 s",
        "1 min 15 s",
        "59 min 59 s",
        "2 h 01 min",
    ]
    assert eta_text(float("inf")) == "?"
    assert human("peak_flops", 163640069269.65872) == "163.64 GFLOP/s"  # a 2-core CPU
    assert human("peak_flops", 989.4e12) == "989.40 TFLOP/s"  # an H100's bf16 dense peak
    assert human("mfu", 0.3659) == "36.6 %"


def test_progress_eta_leaves_out_the_start():
    lines: list[str] = []
    p = Progress("ingest", 30e6, lines.append, every_s=0, unit=" MB", scale=1e-6)
    time.sleep(0.3)  # workers starting: not a measure of the rate to come
    p.advance(3e6)
    p.advance(3e6)
    assert lines[0].startswith("ingest: 3.0/30.0 MB (10%)") and lines[0].endswith("ETA ?")
    eta = lines[1].rsplit("ETA ", 1)[1]
    assert eta.endswith(" s") and int(eta.split()[0]) < 5, lines  # from the pace after the start
    p.advance(24e6)
    assert lines[-1].startswith("ingest: 30.0/30.0 MB (100%)") and lines[-1].endswith("ETA 0 s")


def test_metrics_files_hold_numbers_only(tmp_path):
    full = {"val_loss": 6.6, "tokens_per_s": 3051.1, "mfu": 0.36, "device": "cpu", "steps": 60}
    assert headline("train", full) == {"val_loss": 6.6, "tokens_per_s": 3051.1, "mfu": 0.36}
    write_metrics(tmp_path / "m.json", headline("train", full))
    assert json.loads((tmp_path / "m.json").read_text())["mfu"] == 0.36
    with pytest.raises(ValueError, match="numbers only.*device"):
        write_metrics(tmp_path / "m.json", {"device": "cpu"})
