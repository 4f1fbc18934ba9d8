"""Metric sinks: metrics.jsonl always, TensorBoard optionally. (Progress display: tunesmith.progress.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tunesmith.atomic import atomic_write_text
from tunesmith.errors import ConfigError


class MetricsLogger:
    """Appends one JSON object per record to RUN_DIR/metrics.jsonl (flushed per line, so a killed run keeps
    what it logged). On resume, records after the checkpoint's step are dropped first so the file reads as
    one uninterrupted run."""

    def __init__(self, run_dir: Path, sinks: list[str], resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [
                line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step
            ]
            # replaced whole (a kill here leaves the old file, never a truncated one); kept lines are copied
            # verbatim, which the jobs service's follower relies on (jobs/worker.py)
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if "tensorboard" in sinks:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "train.log includes tensorboard but the tensorboard package is not installed; "
                    "pip install tensorboard (or tunesmith[tensorboard])"
                ) from None
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            step = record["step"]
            prefix = "eval" if record.get("kind") == "eval" else "train"
            for k, v in record.items():
                if k not in ("step", "time", "kind", "epoch") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
