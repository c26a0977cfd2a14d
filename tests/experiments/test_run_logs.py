"""``ResumableCSVWriter``: the earlier attempt's rows up to the checkpoint survive, later ones are replaced."""

import csv

from experiments.run_logs import ResumableCSVWriter, checkpoint_logging_step


def rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]


def log(writer, *entries):
    for step, metrics in entries:
        writer.log_metrics(metrics, step)
    writer.save()


def test_resume_keeps_rows_up_to_the_checkpoint_and_replaces_the_rest(tmp_path):
    first = ResumableCSVWriter(str(tmp_path))
    log(first, *[(s, {"train/loss": float(s)}) for s in range(6)], (4, {"val/r1": 0.5}))
    log(first, (5, {"train/loss": 5.0}))  # appended
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("7,10")  # torn by the kill

    resumed = ResumableCSVWriter(str(tmp_path), resume_step=5)  # step 5 was logged after the checkpoint
    log(resumed, (5, {"train/loss": 50.0}), (6, {"train/loss": 60.0, "train/new": 1.0}))  # a new column
    got = rows(tmp_path / "metrics.csv")
    assert [(r["step"], r.get("train/loss"), r.get("val/r1")) for r in got] == [
        ("0", "0.0", None), ("1", "1.0", None), ("2", "2.0", None), ("3", "3.0", None), ("4", "4.0", None),
        ("4", None, "0.5"), ("5", "50.0", None), ("6", "60.0", None),
    ]  # fmt: skip
    assert got[-1]["train/new"] == "1.0"
    assert open(tmp_path / "metrics.csv").readline().strip() == "step,train/loss,train/new,val/r1"


def test_fresh_run_starts_the_file_afresh_and_finished_resume_leaves_it(tmp_path):
    log(ResumableCSVWriter(str(tmp_path)), (0, {"a": 1.0}), (1, {"a": 2.0}))
    text = (tmp_path / "metrics.csv").read_text()
    ResumableCSVWriter(str(tmp_path), resume_step=1).save()  # resumed at the end: nothing logged
    assert (tmp_path / "metrics.csv").read_text() == text
    log(ResumableCSVWriter(str(tmp_path)), (0, {"a": 3.0}))  # no checkpoint: a new run
    assert rows(tmp_path / "metrics.csv") == [{"step": "0", "a": "3.0"}]


def test_checkpoint_logging_step():
    assert checkpoint_logging_step({"global_step": 7, "loops": {"fit_loop": {"epoch_loop.state_dict": {"_batches_that_stepped": 9}}}}) == 9
    assert checkpoint_logging_step({"global_step": 7}) == 7
