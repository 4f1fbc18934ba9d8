"""Fine-tuning as a service: the job store, the worker and the tenants behind the server's /v1/files and
/v1/fine_tuning/jobs routes (tunesmith.serving.jobs_routes), and the HTTP client of `tunesmith jobs`.

    store.py    SQLite (WAL, ordered migrations): files, jobs, events, checkpoints; OpenAI's object shapes
    worker.py   runs each job as a tunesmith run in its own subprocess; events from its output and metrics
    runner.py   the subprocess: train (or resume), evaluate on the validation file, write the report
    tenants.py  API keys -> tenants and their limits (the keys file)
    client.py   a small HTTP client of the API (for `tunesmith jobs`, without the openai package)

Layout of the jobs folder (`tunesmith serve --jobs-dir DIR`):

    DIR/jobs.db                 the store
    DIR/files/<file id>.jsonl   uploaded files
    DIR/jobs/<job id>/run/      the job's run directory (the usual contract: metrics.jsonl, checkpoints/, model/)
"""
