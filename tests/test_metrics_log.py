"""Training metrics log (`vitune.training.metrics_log`): one JSON line per step in OUT/metrics.jsonl,
truncation to the resumed step, reading back, and the optional TensorBoard mirror (a fake writer:
tensorboard is not a dependency)."""

import json
import sys
import types

import pytest

from vitune.training.metrics_log import MetricsLog, read_metrics


def row(step, stage="align", loss=None):
    return {"stage": stage, "step": step, "global_step": step, "loss": 1.0 / step if loss is None else loss}


def write_log(out, rows, truncate_after=0):
    log = MetricsLog(out, truncate_after)
    for r in rows:
        log.write(r)
    log.close()
    return out / "metrics.jsonl"


@pytest.fixture(autouse=True)
def no_tensorboard(monkeypatch):
    """Whatever is installed, importing TensorBoard fails (ImportError) unless a test gives it a writer."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def test_rows_round_trip_one_line_each(tmp_path):
    rows = [row(1), row(2, loss=0.25), {"stage": "instruct", "step": 1, "global_step": 3, "loss": 0.5, "lr": 1e-3}]
    path = write_log(tmp_path / "out", rows)  # the folder is created
    assert path == tmp_path / "out" / "metrics.jsonl"
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows)
    assert read_metrics(path) == rows


def test_each_row_is_on_disk_as_soon_as_it_is_written(tmp_path):
    log = MetricsLog(tmp_path)
    log.write(row(1))
    assert read_metrics(tmp_path / "metrics.jsonl") == [row(1)]  # flushed, before close
    log.close()


def test_a_fresh_run_starts_an_empty_log(tmp_path):
    write_log(tmp_path, [row(1), row(2)])
    path = write_log(tmp_path, [row(1)])  # truncate_after=0: not a resume
    assert read_metrics(path) == [row(1)]


@pytest.mark.parametrize("resumed_at, kept", [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (10, [1, 2, 3])])
def test_resume_drops_the_steps_past_the_saved_state(tmp_path, resumed_at, kept):
    write_log(tmp_path, [row(1), row(2), row(3)])
    path = write_log(tmp_path, [row(resumed_at + 1)], truncate_after=resumed_at)
    assert [r["global_step"] for r in read_metrics(path)] == kept + [resumed_at + 1]


def test_read_metrics_skips_blank_lines_and_missing_files(tmp_path):
    assert read_metrics(tmp_path / "absent.jsonl") == []
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(row(1)) + "\n\n  \n" + json.dumps(row(2)) + "\n")
    assert read_metrics(path) == [row(1), row(2)]


def test_resume_after_a_crash_mid_line_keeps_the_complete_rows(tmp_path):
    path = write_log(tmp_path, [row(1), row(2)])
    with path.open("a") as f:
        f.write('{"stage": "align", "step": 3, "glo')  # killed while writing step 3
    try:
        kept = read_metrics(write_log(tmp_path, [], truncate_after=2))
    except ValueError as e:
        assert "metrics.jsonl" in str(e)
    else:
        assert kept == [row(1), row(2)]


class FakeWriter:
    def __init__(self, logdir):
        self.logdir, self.scalars, self.closed = logdir, [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_gets_the_float_metrics_by_stage(tmp_path, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    log = MetricsLog(tmp_path)
    assert log.tb.logdir == str(tmp_path / "tensorboard")
    log.write({"stage": "instruct", "step": 2, "global_step": 7, "loss": 0.5, "lr": 0.001, "note": "x"})
    log.close()
    assert log.tb.scalars == [("instruct/loss", 0.5, 7), ("instruct/lr", 0.001, 7)]  # ints and strings: not scalars
    assert log.tb.closed and log.f.closed


def test_without_tensorboard_installed_the_log_still_works(tmp_path):
    log = MetricsLog(tmp_path)
    assert log.tb is None
    log.write(row(1))
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [row(1)]
