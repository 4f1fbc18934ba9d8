"""The job store: files, fine-tuning jobs, their events and checkpoints in one SQLite database.

One owner for the database (as simonw/llm keeps its schema in one migrations module): every read and write goes
through `Store`. WAL mode with synchronous=FULL: a row is on disk when its transaction commits, so a server killed
with SIGKILL loses no file, job or event it had acknowledged. The schema version is SQLite's `user_version`;
`MIGRATIONS` is the ordered list of functions that bring a database from version N-1 to N, applied at open.

Ids follow OpenAI's prefixes (file-, ftjob-, ftevent-, ftckpt-). Lists are ordered by insertion (rowid), and
paged like OpenAI's: `after` is the id of the last item of the previous page, `has_more` says whether more follow.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# job statuses, in OpenAI's words
VALIDATING, QUEUED, RUNNING = "validating_files", "queued", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
ACTIVE = (VALIDATING, QUEUED, RUNNING)
FINAL = (SUCCEEDED, FAILED, CANCELLED)

MIGRATIONS = []


def migration(fn):
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite3.Connection) -> None:
    # statement by statement: executescript() would commit the migration's transaction half-way
    script = """
        CREATE TABLE files (
            id TEXT PRIMARY KEY, tenant TEXT NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
            bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, status TEXT NOT NULL, status_details TEXT,
            path TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY, tenant TEXT NOT NULL, created_at INTEGER NOT NULL, model TEXT NOT NULL,
            training_file TEXT NOT NULL, validation_file TEXT, status TEXT NOT NULL, method TEXT NOT NULL,
            suffix TEXT, seed INTEGER NOT NULL, metadata TEXT, fine_tuned_model TEXT, error TEXT,
            started_at INTEGER, finished_at INTEGER, trained_tokens INTEGER, result_files TEXT NOT NULL DEFAULT '[]',
            cancel_requested INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX jobs_status ON jobs(status);
        CREATE TABLE events (
            id TEXT PRIMARY KEY, job_id TEXT NOT NULL, created_at INTEGER NOT NULL, level TEXT NOT NULL,
            message TEXT NOT NULL, type TEXT NOT NULL, data TEXT, dedupe TEXT,
            UNIQUE (job_id, dedupe)
        );
        CREATE INDEX events_job ON events(job_id);
        CREATE TABLE checkpoints (
            id TEXT PRIMARY KEY, job_id TEXT NOT NULL, step INTEGER NOT NULL, created_at INTEGER NOT NULL,
            metrics TEXT NOT NULL, UNIQUE (job_id, step)
        );
    """
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


@migration
def m002_job_attempts(db: sqlite3.Connection) -> None:
    # how many times a worker started the job's process: more than one means it was resumed after a restart
    db.execute("ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@dataclass
class Page:
    data: list[dict]
    has_more: bool

    def body(self) -> dict:
        return {
            "object": "list",
            "data": self.data,
            "has_more": self.has_more,
            "first_id": self.data[0]["id"] if self.data else None,
            "last_id": self.data[-1]["id"] if self.data else None,
        }


class NotFound(LookupError):
    pass


class Store:
    """Thread-safe: one connection, one lock (the server's requests, the workers and the file checker share it;
    every statement is short)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.migrate()

    @property
    def version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self) -> None:
        with self._lock:
            version = self.version
            if version > len(MIGRATIONS):
                from tunesmith.errors import ConfigError

                raise ConfigError(
                    f"{self.path}: job store schema version {version} is newer than this tunesmith knows "
                    f"({len(MIGRATIONS)}); upgrade tunesmith or point --jobs-dir elsewhere"
                )
            for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
                with self.transaction():
                    step(self.db)
                    self.db.execute(f"PRAGMA user_version={number}")

    def transaction(self):
        store = self

        class _Tx:
            def __enter__(self):
                store._lock.acquire()
                store.db.execute("BEGIN IMMEDIATE")
                return store.db

            def __exit__(self, kind, *_):
                try:
                    store.db.execute("ROLLBACK" if kind else "COMMIT")
                finally:
                    store._lock.release()

        return _Tx()

    def _one(self, sql: str, args=()) -> sqlite3.Row | None:
        with self._lock:
            return self.db.execute(sql, args).fetchone()

    def _all(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # ---- files ---------------------------------------------------------------------------------------------------

    def add_file(self, file_id: str, tenant: str, filename: str, purpose: str, size: int, path: Path, status: str):
        with self.transaction() as db:
            db.execute(
                "INSERT INTO files (id, tenant, filename, purpose, bytes, created_at, status, path) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (file_id, tenant, filename, purpose, size, int(time.time()), status, str(path)),
            )
        return self.file(file_id, tenant)

    def file_row(self, file_id: str, tenant: str | None, deleted_too: bool = False) -> sqlite3.Row:
        """The row of a file the tenant owns (tenant None: any owner); NotFound for others' and deleted files
        (deleted_too: a job that started before its file was deleted still reads it)."""
        row = self._one("SELECT * FROM files WHERE id = ?", (file_id,))
        if row is None or (tenant is not None and row["tenant"] != tenant) or (row["deleted"] and not deleted_too):
            raise NotFound(file_id)
        return row

    def file(self, file_id: str, tenant: str | None) -> dict:
        return file_object(self.file_row(file_id, tenant))

    def set_file_status(self, file_id: str, status: str, details: str | None = None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE files SET status = ?, status_details = ? WHERE id = ?", (status, details, file_id))

    def files_to_check(self) -> list[sqlite3.Row]:
        return self._all("SELECT * FROM files WHERE status = 'uploaded' AND deleted = 0 ORDER BY rowid")

    def list_files(self, tenant: str, after: str | None, limit: int, order: str, purpose: str | None) -> Page:
        where, args = "tenant = ? AND deleted = 0", [tenant]
        if purpose:
            where += " AND purpose = ?"
            args.append(purpose)
        return self._page("files", where, args, after, limit, order, file_object)

    def delete_file(self, file_id: str, tenant: str) -> Path:
        row = self.file_row(file_id, tenant)
        with self.transaction() as db:
            db.execute("UPDATE files SET deleted = 1 WHERE id = ?", (file_id,))
        return Path(row["path"])

    def queued_jobs(self, tenant: str) -> int:
        return self._one(
            "SELECT count(*) FROM jobs WHERE tenant = ? AND status IN (?, ?)", (tenant, VALIDATING, QUEUED)
        )[0]

    # ---- jobs ----------------------------------------------------------------------------------------------------

    def add_job(self, tenant: str, **fields) -> dict:
        job_id = new_id("ftjob")
        fields = {
            "id": job_id,
            "tenant": tenant,
            "created_at": int(time.time()),
            "status": VALIDATING,
            **fields,
            "method": json.dumps(fields["method"]),
            "metadata": json.dumps(fields.get("metadata")) if fields.get("metadata") is not None else None,
        }
        names = ", ".join(fields)
        with self.transaction() as db:
            db.execute(f"INSERT INTO jobs ({names}) VALUES ({', '.join('?' * len(fields))})", list(fields.values()))
            _add_event(db, job_id, "info", f"Created fine-tuning job: {job_id}", "message", None, None)
        return self.job(job_id, tenant)

    def job_row(self, job_id: str, tenant: str | None = None) -> sqlite3.Row:
        row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if row is None or (tenant is not None and row["tenant"] != tenant):
            raise NotFound(job_id)
        return row

    def job(self, job_id: str, tenant: str | None = None) -> dict:
        return job_object(self.job_row(job_id, tenant))

    def list_jobs(self, tenant: str, after: str | None, limit: int) -> Page:
        return self._page("jobs", "tenant = ?", [tenant], after, limit, "desc", job_object)

    def jobs_with_status(self, *statuses: str) -> list[sqlite3.Row]:
        marks = ", ".join("?" * len(statuses))
        return self._all(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY rowid", statuses)

    def update_job(self, job_id: str, **fields) -> None:
        if "error" in fields and fields["error"] is not None:
            fields["error"] = json.dumps(fields["error"])
        if "result_files" in fields:
            fields["result_files"] = json.dumps(fields["result_files"])
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", [*fields.values(), job_id])

    def claim_next(self) -> sqlite3.Row | None:
        """The oldest queued job, now marked running (atomically, so two workers never take one job)."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE status = ? AND cancel_requested = 0 ORDER BY rowid LIMIT 1", (QUEUED,)
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status = ?, started_at = coalesce(started_at, ?) WHERE id = ?",
                (RUNNING, int(time.time()), row["id"]),
            )
        return self.job_row(row["id"])

    def request_cancel(self, job_id: str, tenant: str) -> dict:
        """Mark the job to be cancelled: a job not yet running is cancelled now; a running one by its worker."""
        row = self.job_row(job_id, tenant)
        if row["status"] in FINAL:
            raise ValueError(f"the job is already {row['status']}")
        with self.transaction() as db:
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            if row["status"] in (VALIDATING, QUEUED):
                db.execute(
                    "UPDATE jobs SET status = ?, finished_at = ? WHERE id = ?", (CANCELLED, int(time.time()), job_id)
                )
                _add_event(db, job_id, "info", "Job cancelled before it started", "message", None, None)
        return self.job(job_id)

    # ---- events and checkpoints -----------------------------------------------------------------------------------

    def add_event(self, job_id: str, level: str, message: str, type: str = "message", data=None, dedupe=None) -> bool:
        """Add an event; with `dedupe`, only once per job (False when it was there already)."""
        with self.transaction() as db:
            return _add_event(db, job_id, level, message, type, data, dedupe)

    def list_events(self, job_id: str, after: str | None, limit: int) -> Page:
        return self._page("events", "job_id = ?", [job_id], after, limit, "desc", event_object)

    def metric_events(self, job_id: str) -> list[dict]:
        rows = self._all("SELECT * FROM events WHERE job_id = ? AND type = 'metrics' ORDER BY rowid", (job_id,))
        return [json.loads(r["data"]) for r in rows]

    def add_checkpoint(self, job_id: str, step: int, metrics: dict) -> bool:
        with self.transaction() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO checkpoints (id, job_id, step, created_at, metrics) VALUES (?, ?, ?, ?, ?)",
                (new_id("ftckpt"), job_id, step, int(time.time()), json.dumps(metrics)),
            )
            return cur.rowcount == 1

    def list_checkpoints(self, job_id: str, after: str | None, limit: int) -> Page:
        job = self.job_row(job_id)

        def shape(row):
            return checkpoint_object(row, job)

        return self._page("checkpoints", "job_id = ?", [job_id], after, limit, "desc", shape)

    # ---- paging --------------------------------------------------------------------------------------------------

    def _page(self, table: str, where: str, args: list, after: str | None, limit: int, order: str, shape) -> Page:
        direction, compare = ("DESC", "<") if order == "desc" else ("ASC", ">")
        if after is not None:
            anchor = self._one(f"SELECT rowid FROM {table} WHERE id = ? AND {where}", [after, *args])
            if anchor is None:
                raise NotFound(after)
            where += f" AND rowid {compare} ?"
            args = [*args, anchor[0]]
        rows = self._all(f"SELECT * FROM {table} WHERE {where} ORDER BY rowid {direction} LIMIT ?", [*args, limit + 1])
        return Page([shape(r) for r in rows[:limit]], len(rows) > limit)


def _add_event(db, job_id, level, message, type, data, dedupe) -> bool:
    cur = db.execute(
        "INSERT OR IGNORE INTO events (id, job_id, created_at, level, message, type, data, dedupe) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (new_id("ftevent"), job_id, int(time.time()), level, message, type, json.dumps(data), dedupe),
    )
    return cur.rowcount == 1


# ---- OpenAI object shapes ------------------------------------------------------------------------------------------


def file_object(row: sqlite3.Row) -> dict:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": row["status"],
        "status_details": row["status_details"],
        "expires_at": None,
    }


def job_object(row: sqlite3.Row) -> dict:
    method = json.loads(row["method"])
    hyper = method.get(method["type"], {}).get("hyperparameters", {})
    return {
        "id": row["id"],
        "object": "fine_tuning.job",
        "created_at": row["created_at"],
        "model": row["model"],
        "training_file": row["training_file"],
        "validation_file": row["validation_file"],
        "status": row["status"],
        "fine_tuned_model": row["fine_tuned_model"],
        "finished_at": row["finished_at"],
        "error": json.loads(row["error"]) if row["error"] else None,
        "hyperparameters": {k: hyper.get(k, "auto") for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
        "method": method,
        "organization_id": row["tenant"],
        "result_files": json.loads(row["result_files"]),
        "trained_tokens": row["trained_tokens"],
        "seed": row["seed"],
        "suffix": row["suffix"],
        "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
        "integrations": [],
        "estimated_finish": None,
        "user_provided_suffix": row["suffix"],
    }


def event_object(row: sqlite3.Row) -> dict:
    return {
        "id": row["id"],
        "object": "fine_tuning.job.event",
        "created_at": row["created_at"],
        "level": row["level"],
        "message": row["message"],
        "type": row["type"],
        "data": json.loads(row["data"]) if row["data"] else None,
    }


def checkpoint_object(row: sqlite3.Row, job: sqlite3.Row) -> dict:
    model = job["fine_tuned_model"] or f"ft:{job['model']}:{job['suffix'] or ''}:{job['id']}"
    return {
        "id": row["id"],
        "object": "fine_tuning.job.checkpoint",
        "created_at": row["created_at"],
        "fine_tuned_model_checkpoint": f"{model}:ckpt-step-{row['step']}",
        "fine_tuning_job_id": row["job_id"],
        "metrics": json.loads(row["metrics"]),
        "step_number": row["step"],
    }
