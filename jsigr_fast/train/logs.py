"""The run folder's logs (rank 0 only): ``steps.csv``, ``epochs.csv`` and TensorBoard events in ``tb/``.

Columns are fixed when the run starts (the method declares its loss terms); a term a step did
not produce (the discriminator's, between its updates) is left empty. On resume, rows written
after the checkpoint by the interrupted run are dropped, and TensorBoard purges its events from
the resumed step on, so the logs read as one uninterrupted run. A run that starts over in a used
folder (``fresh``: ``--overwrite``) truncates the CSVs and purges every event.
"""
from __future__ import annotations

import csv
import os
import warnings

__all__ = ["RunLog", "LOG_FILES", "logged_rows"]

LOG_FILES = ("steps.csv", "epochs.csv")


def logged_rows(path: str) -> bool:
    """Whether the CSV log at ``path`` holds a row beyond its header."""
    try:
        with open(path, newline="") as f:
            return bool(f.readline()) and bool(f.readline().strip())
    except OSError:  # absent (or unreadable: then it is not ours to judge)
        return False


def _truncate_csv(path: str, keep) -> None:
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    kept = [r for r in body if keep(dict(zip(header, r)))]
    if len(kept) != len(body):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(kept)


class _Csv:
    def __init__(self, path: str, columns: list[str], fresh: bool = False):
        self.path, self.columns = path, columns
        if fresh and os.path.exists(path):
            os.unlink(path)
        if os.path.exists(path):
            with open(path, newline="") as f:
                header = next(csv.reader(f), None)
            if header != columns:  # a different run wrote here: keep it, start a new file
                os.replace(path, path + ".old")
        new = not os.path.exists(path)
        self.f = open(path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=columns, extrasaction="ignore")
        if new:
            self.w.writeheader()
            self.f.flush()

    def write(self, row: dict) -> None:
        self.w.writerow({k: _fmt(v) for k, v in row.items()})
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


class RunLog:
    """CSV + TensorBoard writer; every method is a no-op on ranks other than 0."""

    def __init__(self, out: str, terms: tuple, *, enabled: bool, tensorboard: bool, resume_step: int | None,
                 resume_epoch: int | None, fresh: bool = False):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        base = ["epoch", "batch", "global_step", "lr", "loss", *terms]
        self.step_cols = base + ["img_per_s", "nonfinite_total"]
        self.epoch_cols = (["epoch", "global_step", "seconds", "img_per_s", "loss", *terms, "eval_clean", "eval_adv",
                            "nonfinite_total", "overflow_skips"])
        steps_path, epochs_path = os.path.join(out, "steps.csv"), os.path.join(out, "epochs.csv")
        if resume_step is not None:
            def upto(key, last):
                return lambda r: r.get(key, "").isdigit() and int(r[key]) <= last

            _truncate_csv(steps_path, upto("global_step", resume_step))
            _truncate_csv(epochs_path, upto("epoch", resume_epoch))
        self.steps = _Csv(steps_path, self.step_cols, fresh)
        self.epochs = _Csv(epochs_path, self.epoch_cols, fresh)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                warnings.warn(f"TensorBoard logging is off: {exc} (pip install tensorboard); the CSV logs are written",
                              RuntimeWarning, stacklevel=2)
            else:
                self.tb = SummaryWriter(os.path.join(out, "tb"), purge_step=0 if fresh else resume_step)

    def step(self, row: dict) -> None:
        if not self.enabled:
            return
        self.steps.write(row)
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("epoch", "batch", "global_step") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, row["global_step"])

    def epoch(self, row: dict) -> None:
        if not self.enabled:
            return
        self.epochs.write(row)
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("epoch", "global_step") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"epoch/{k}", v, row["global_step"])
            self.tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.steps.close()
        self.epochs.close()
        if self.tb is not None:
            self.tb.close()
