"""Training metrics: `metrics.jsonl` (one line per logging step), TensorBoard event files when the
`tensorboard` package is installed (written through its own event writer: neither TensorFlow nor
PyTorch is needed), and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import os
import time
from typing import Any


class MetricsWriter:
    """`start_step`: the step the run starts from (0, or the checkpoint it resumes). TensorBoard
    then drops what an earlier run in the same directory logged after it (a crash after the last
    checkpoint), as `truncate_metrics` does for metrics.jsonl: a restart event at `start_step + 1`."""

    def __init__(self, out_dir: str, *, enabled: bool = True, tensorboard: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if tensorboard:
            try:
                from tensorboard.summary.writer.event_file_writer import EventFileWriter

                from tensorboard.compat.proto import event_pb2
            except ImportError:
                return
            self._tb = EventFileWriter(os.path.join(out_dir, "tensorboard"))
            # TensorBoard purges the points at and after a START event's step from older files.
            restart = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=start_step + 1, session_log=restart))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            from tensorboard.compat.proto import event_pb2, summary_pb2

            values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in record.items()
                      if isinstance(v, (int, float)) and k != "step"]
            self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(record["step"]),
                                               summary=summary_pb2.Summary(value=values)))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def end_line(stopped: bool, end_step: int, first: dict | None, last: dict | None, seconds: float) -> str:
    """Both trainers' line at the end of training (followed by train_jax.py's generated samples;
    train_torch.py prints its samples before it): where the run ended, the loss of its first and last logged steps
    (this run's: a resumed run starts after its checkpoint) and its time."""
    losses = (f", loss {first['loss']:.4f} at step {first['step']} -> {last['loss']:.4f} at step {last['step']}"
              if first and last else "")
    return f"{'stopped' if stopped else 'done'}: step {end_step}{losses} in {seconds:.1f} s"


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
    return records


def truncate_metrics(path: str, step: int) -> None:
    """Drop records after `step` (written by a run that crashed after its last checkpoint, or
    before its first: `step` 0) and a last line cut short by a kill (the next record would be
    appended to it), so that a resumed run's metrics have each step once."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
        cut = size > 0 and f.read(1) != b"\n"
    records = read_metrics(path)
    keep = [r for r in records if r.get("step", 0) <= step]
    if len(keep) != len(records) or cut:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(tmp, path)


def plot_loss_curve(metrics_path: str, png_path: str) -> str | None:
    """Loss (and learning rate) against step from metrics.jsonl; returns the PNG path, or None
    when there is nothing to plot or matplotlib is missing."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], label="loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in records], label="learning rate", color="tab:orange", alpha=0.6)
    ax2.set_ylabel("learning rate")
    lines = ax.get_lines() + ax2.get_lines()  # one legend, above the plot (a figure legend covered an axis label)
    ax.legend(lines, [line.get_label() for line in lines], loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2,
              frameon=False)
    fig.tight_layout()
    tmp = f"{png_path}.tmp{os.getpid()}"  # replaced whole: a kill never leaves half a picture
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
