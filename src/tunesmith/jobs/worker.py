"""The worker: runs queued fine-tuning jobs, each as a normal tunesmith run in its own subprocess.

A dispatcher thread moves jobs from validating_files to queued (or failed) as their files are checked, and starts
up to `workers` jobs at once, one thread per job. The job's thread starts `python -m tunesmith.jobs.runner`, turns
its stdout lines into events, follows its run directory (metrics.jsonl -> `metrics` events with OpenAI's names,
checkpoints/ -> checkpoint rows) and records the outcome. A crash of the subprocess fails that job only.

Cancel: the job's thread sends SIGINT; training stops at the next step boundary with a checkpoint (exit 130).
Server stopped gracefully: the same, and the job stays `running`. Server killed (SIGKILL): the subprocess dies
with it (Linux's parent-death signal), the job is still `running` in the store, and the next server start
resumes it from its last checkpoint. Metrics events carry a per-step key, so reading metrics.jsonl again after a
restart adds only the steps not yet recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tunesmith.atomic import atomic_write_text
from tunesmith.jobs import store as st

log = logging.getLogger("tunesmith.jobs")

POLL_S = 0.25


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: a killed server leaves the run going, and a restart would start a second one
        pass


class Worker:
    def __init__(
        self,
        store: st.Store,
        jobs_dir: Path,
        base_model: str,
        overrides: dict | None = None,
        workers: int = 1,
        on_success=None,
    ):
        self.store, self.jobs_dir, self.base_model = store, Path(jobs_dir), base_model
        self.overrides = dict(overrides or {})
        self.workers = workers
        self.on_success = on_success  # job row -> fine_tuned_model id (serves the model); raises to fail the job
        self._threads: dict[str, threading.Thread] = {}
        self._stop = threading.Event()
        self._dispatcher = threading.Thread(target=self._dispatch, name="tunesmith-jobs", daemon=True)

    def start(self) -> None:
        self._dispatcher.start()

    def stop(self, timeout: float = 60) -> None:
        """Stop the running jobs at a step boundary (they stay `running` and resume at the next start)."""
        self._stop.set()  # each job's thread sends its process one SIGINT (a second one would stop it at once)
        self._dispatcher.join(timeout)
        for thread in list(self._threads.values()):
            thread.join(timeout)

    @property
    def busy(self) -> int:
        return sum(t.is_alive() for t in self._threads.values())

    # ---- dispatching ---------------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        # jobs left running by a server that stopped or was killed: resume them first
        for row in self.store.jobs_with_status(st.RUNNING):
            self._launch(row)
        while not self._stop.is_set():
            try:
                self._validate_files()
                while self.busy < self.workers and not self._stop.is_set():
                    row = self.store.claim_next()
                    if row is None:
                        break
                    self._launch(row)
            except Exception:  # a bug of ours must not stop the queue for good
                log.exception("job dispatcher")
            self._stop.wait(POLL_S)

    def _launch(self, row) -> None:
        thread = threading.Thread(target=self._run_job, args=(row["id"],), name=f"job-{row['id']}", daemon=True)
        self._threads = {k: t for k, t in self._threads.items() if t.is_alive()}
        self._threads[row["id"]] = thread
        thread.start()

    def _validate_files(self) -> None:
        for job in self.store.jobs_with_status(st.VALIDATING):
            statuses = []
            for param in ("training_file", "validation_file"):
                if job[param] is None:
                    continue
                try:
                    f = self.store.file_row(job[param], job["tenant"])
                except st.NotFound:
                    self._fail(job["id"], f"{param} {job[param]} was deleted", param, "invalid_file")
                    break
                statuses.append(f["status"])
                if f["status"] == "error":
                    message = f"{param} {f['id']} ({f['filename']}) is invalid: {f['status_details']}"
                    self._fail(job["id"], message, param, f"invalid_{param}")
                    break
            else:
                if all(s == "processed" for s in statuses):
                    self.store.update_job(job["id"], status=st.QUEUED)
                    self.store.add_event(job["id"], "info", "Files validated; job queued", dedupe="queued")

    def _fail(self, job_id: str, message: str, param: str | None = None, code: str = "job_failed") -> None:
        self.store.update_job(
            job_id,
            status=st.FAILED,
            finished_at=int(time.time()),
            error={"code": code, "message": message, "param": param},
        )
        self.store.add_event(job_id, "error", message)

    # ---- one job -------------------------------------------------------------------------------------------------

    def _run_job(self, job_id: str) -> None:
        try:
            self._run_job_inner(job_id)
        except Exception as e:  # a bug of ours: this job fails, the worker goes on
            log.exception("job %s", job_id)
            self._fail(job_id, f"internal error: {type(e).__name__}: {e}")

    def _run_job_inner(self, job_id: str) -> None:
        job = self.store.job_row(job_id)
        job_dir = self.jobs_dir / "jobs" / job_id
        job_dir.mkdir(parents=True, exist_ok=True)
        if not (job_dir / "spec.json").is_file():
            atomic_write_text(job_dir / "spec.json", json.dumps(self._spec(job), indent=2))
        attempt = job["attempts"] + 1
        self.store.update_job(job_id, attempts=attempt)
        if attempt > 1:
            self.store.add_event(job_id, "info", f"Resuming the job after a server restart (attempt {attempt})")
        else:
            self.store.add_event(job_id, "info", "Fine-tuning job started")
        for stale in ("outcome.json", "error.json"):
            (job_dir / stale).unlink(missing_ok=True)
        with open(job_dir / "stderr.log", "ab") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tunesmith.jobs.runner", str(job_dir)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
                start_new_session=True,  # a Ctrl-C at the server's terminal reaches the job through us, once
                env={
                    **os.environ,
                    "TOKENIZERS_PARALLELISM": "false",
                    "TUNESMITH_EVAL_CACHE_DIR": self._eval_cache(job),
                },
            )
        reader = threading.Thread(target=self._read_events, args=(job_id, proc), daemon=True)
        reader.start()
        follower = _RunFollower(self.store, job_id, job_dir / "run")
        signalled = False
        while proc.poll() is None:
            follower.poll()
            if not signalled and (self._stop.is_set() or self.store.job_row(job_id)["cancel_requested"]):
                _signal(proc, signal.SIGINT)
                signalled = True
            time.sleep(POLL_S)
        reader.join(10)
        follower.poll()
        self._finish(job_id, job_dir, proc.returncode, follower)

    def _eval_cache(self, job) -> str:
        """Where the job's evaluations store and reuse measurements (evaluation/memo.py): one folder per tenant, so no
        tenant's evaluation can tell from a reused measurement that another evaluated the same data."""
        tenant = hashlib.sha256(str(job["tenant"]).encode()).hexdigest()[:16]
        return str(self.jobs_dir / "eval-cache" / tenant)

    def _spec(self, job) -> dict:
        method = json.loads(job["method"])
        hyper = method.get(method["type"], {}).get("hyperparameters", {})
        values = {
            "model.name": self.base_model,
            "data.train": self.store.file_row(job["training_file"], None, deleted_too=True)["path"],
            "train.seed": job["seed"],
            "name": job["id"],
            **self.overrides,
        }
        if job["validation_file"]:
            values["data.validation"] = self.store.file_row(job["validation_file"], None, deleted_too=True)["path"]
        if hyper.get("n_epochs", "auto") != "auto":
            values["train.epochs"] = hyper["n_epochs"]
        if hyper.get("batch_size", "auto") != "auto":
            values["train.batch_size"] = hyper["batch_size"]
        if method["type"] == "dpo":
            values["train.objective"] = "dpo"
            if hyper.get("beta", "auto") != "auto":
                values["dpo.beta"] = hyper["beta"]
        multiplier = hyper.get("learning_rate_multiplier", "auto")
        return {
            "overrides": values,
            "lr_multiplier": None if multiplier == "auto" else multiplier,
            "validation": values.get("data.validation"),
        }

    def _read_events(self, job_id: str, proc: subprocess.Popen) -> None:
        for raw in proc.stdout:
            try:
                line = json.loads(raw)
                level, message = line["level"], line["message"]
            except (ValueError, KeyError, TypeError):
                level, message = "info", raw.decode("utf-8", "replace").rstrip()
            if message:
                self.store.add_event(job_id, level, message)

    def _finish(self, job_id: str, job_dir: Path, code: int, follower: "_RunFollower") -> None:
        job = self.store.job_row(job_id)
        now = int(time.time())
        if code == 0:
            outcome = json.loads((job_dir / "outcome.json").read_text(encoding="utf-8"))
            result_files = []
            if outcome.get("eval"):
                result_files.append(self._result_file(job, Path(outcome["eval"])))
            try:
                model = self.on_success(job) if self.on_success else None
            except Exception as e:
                self._fail(job_id, f"training succeeded but the model cannot be served: {e}", code="serve_failed")
                return
            self.store.update_job(
                job_id,
                status=st.SUCCEEDED,
                finished_at=now,
                fine_tuned_model=model,
                result_files=result_files,
                trained_tokens=follower.tokens,
            )
            self.store.add_event(job_id, "info", f"The job has successfully completed: {model}")
        elif code in (130, -signal.SIGINT) and job["cancel_requested"]:  # -SIGINT: cancelled while starting up
            self.store.update_job(job_id, status=st.CANCELLED, finished_at=now, trained_tokens=follower.tokens)
            self.store.add_event(job_id, "info", f"Job cancelled at step {follower.step}; checkpoint saved")
        elif self._stop.is_set():
            # stopped with the server: still running, resumed at the next start
            self.store.add_event(job_id, "info", f"Job paused at step {follower.step}: the server is stopping")
        elif code < 0:  # killed from outside (the OOM killer, a user): this job fails, the server goes on
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            self._fail(
                job_id,
                f"the training process was killed by {name} at step {follower.step} (out of memory?); "
                f"{_tail(job_dir / 'stderr.log', 3)}",
                code="training_failed",
            )
        else:
            error = _read_json(job_dir / "error.json") or {"message": _tail(job_dir / "stderr.log")}
            self._fail(job_id, error["message"], code="training_failed")

    def _result_file(self, job, task_json: Path) -> str:
        file_id = st.new_id("file")
        dest = self.jobs_dir / "files" / f"{file_id}.json"
        task = json.loads(task_json.read_text(encoding="utf-8"))
        if isinstance(task.get("data"), dict) and job["validation_file"]:  # the upload's name, not the server's path
            task["data"]["path"] = self.store.file_row(job["validation_file"], None)["filename"]
        atomic_write_text(dest, json.dumps(task, indent=2))
        self.store.add_file(
            file_id,
            job["tenant"],
            f"{job['id']}-eval.json",
            "fine-tune-results",
            dest.stat().st_size,
            dest,
            "processed",
        )
        return file_id


class _RunFollower:
    """Turns a run directory's new metrics.jsonl lines into `metrics` events and new checkpoints into rows."""

    def __init__(self, store: st.Store, job_id: str, run_dir: Path):
        self.store, self.job_id, self.run_dir = store, job_id, run_dir
        self.step, self.tokens, self.total_steps = 0, None, None
        self._offset = 0
        self._last_line = b""  # the last complete line read, which must still end at _offset to read on from there
        self._by_step: dict[int, dict] = {}

    def poll(self) -> None:
        # checkpoints listed before the metrics are read: training logs a step's records before it saves the step's
        # checkpoint, so every checkpoint listed has its metrics read by then (listed after, one saved while the
        # metrics were being read was recorded without its validation loss)
        found = self._list_checkpoints()
        self._read_metrics()
        self._add_checkpoints(found)

    def _read_metrics(self) -> None:
        try:
            fh = open(self.run_dir / "metrics.jsonl", "rb")
        except OSError:  # not written yet
            return
        with fh:
            # A resumed run rewrites the file with the records up to its checkpoint, then appends: the bytes at our
            # offset may then be the middle of a new line (read on from there, it would be skipped as unparsable,
            # and its step recorded late or never). Kept records are copied verbatim, so the file is still the one
            # we read exactly when our last line still ends at the offset (a shorter file fails that too); else read
            # it again from the start (events are deduplicated by step).
            if self._offset and not self._still_there(fh):
                self._offset, self._last_line = 0, b""
            fh.seek(self._offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written is read next time
        self._offset += len(complete)
        if complete:
            self._last_line = complete[complete.rfind(b"\n", 0, len(complete) - 1) + 1 :]
        if complete and self.total_steps is None:
            self.total_steps = _read_json(self.run_dir / "data.json", {}).get("plan", {}).get("total_steps")
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            self._record(record)

    def _still_there(self, fh) -> bool:
        fh.seek(self._offset - len(self._last_line))
        return fh.read(len(self._last_line)) == self._last_line

    def _record(self, r: dict) -> None:
        step = r.get("step")
        if not isinstance(step, int):
            return
        if r.get("kind") == "train":
            data = {"step": step, "train_loss": r["loss"], "learning_rate": r.get("lr"), "tokens": r.get("tokens")}
            message = f"Step {step}/{self.total_steps or '?'}: training loss={r['loss']:.4f}"
            self.step, self.tokens = max(self.step, step), r.get("tokens", self.tokens)
        elif r.get("kind") == "eval" and "val_loss" in r:
            data = {"step": step, "valid_loss": r["val_loss"], "full_valid_loss": r["val_loss"]}
            if "val_token_acc" in r:
                data["valid_mean_token_accuracy"] = data["full_valid_mean_token_accuracy"] = r["val_token_acc"]
            message = f"Step {step}/{self.total_steps or '?'}: validation loss={r['val_loss']:.4f}"
        else:
            return
        data["total_steps"] = self.total_steps
        self._by_step.setdefault(step, {}).update({k: v for k, v in data.items() if k not in ("tokens",)})
        self.store.add_event(self.job_id, "info", message, "metrics", data, dedupe=f"{r['kind']}:{step}")

    def _list_checkpoints(self) -> list[int]:
        folder = self.run_dir / "checkpoints"
        if not folder.is_dir():
            return []
        return [
            int(e.name[5:])
            for e in folder.iterdir()
            if e.name.startswith("step-") and e.name[5:].isdigit() and e.is_dir()
        ]

    def _add_checkpoints(self, found: list[int]) -> None:
        # in step order: two new in one poll (a periodic one and the cancel's) are listed newest first, as OpenAI does
        for step in sorted(found):
            metrics = {k: v for k, v in self._by_step.get(step, {"step": step}).items() if k != "total_steps"}
            if self.store.add_checkpoint(self.job_id, step, metrics):
                self.store.add_event(self.job_id, "info", f"Checkpoint saved at step {step}", dedupe=f"ckpt:{step}")


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "the training process ended without a message"
    return "training process crashed: " + " | ".join(text[-lines:]) if text else "the training process crashed"
