"""A small client of the files and fine-tuning jobs API, on the standard library alone (urllib), for
`tunesmith jobs` and for scripts without the openai package. Errors are TunesmithErrors carrying the server's
OpenAI-format message, so the CLI prints them in one line."""

from __future__ import annotations

import json
import mimetypes
import secrets
import time
import urllib.error
import urllib.request
from pathlib import Path

from tunesmith.errors import TunesmithError

DEFAULT_URL = "http://127.0.0.1:8000"
FINAL = ("succeeded", "failed", "cancelled")


class ServiceError(TunesmithError):
    """The server refused a request (4xx: exit code 2) or could not be reached."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code
        if status is not None and status >= 500:
            self.exit_code = 1


class JobsClient:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60):
        self.url = (url or DEFAULT_URL).rstrip("/").removesuffix("/v1")
        self.api_key, self.timeout = api_key, timeout

    # ---- files ---------------------------------------------------------------------------------------------------

    def upload(self, path: str | Path, purpose: str = "fine-tune") -> dict:
        path = Path(path)
        try:
            content = path.read_bytes()
        except OSError as e:
            raise ServiceError(f"{path}: cannot read it ({e.strerror})") from None
        boundary = f"tunesmith-{secrets.token_hex(8)}"
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        body = b"".join(
            [
                f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'.encode(),
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'.encode(),
                f"Content-Type: {kind}\r\n\r\n".encode(),
                content,
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        return self._request("POST", "/v1/files", body, f"multipart/form-data; boundary={boundary}")

    def wait_for_file(self, file_id: str, poll: float = 0.5, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            f = self._request("GET", f"/v1/files/{file_id}")
            if f["status"] in ("processed", "error"):
                return f
            if time.monotonic() > deadline:
                raise ServiceError(f"{file_id} is still {f['status']} after {timeout:.0f} s")
            time.sleep(poll)

    # ---- jobs ----------------------------------------------------------------------------------------------------

    def create_job(self, **body) -> dict:
        return self._request("POST", "/v1/fine_tuning/jobs", {k: v for k, v in body.items() if v is not None})

    def list_jobs(self, limit: int = 20, after: str | None = None) -> dict:
        return self._request("GET", "/v1/fine_tuning/jobs" + _query(limit=limit, after=after))

    def job(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/fine_tuning/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel", {})

    def events(self, job_id: str, after: str | None = None, limit: int = 1000) -> list[dict]:
        """Every event after `after`, oldest first (the API pages newest first)."""
        out, cursor = [], None
        while True:
            page = self._request("GET", f"/v1/fine_tuning/jobs/{job_id}/events" + _query(limit=limit, after=cursor))
            fresh = []
            for event in page["data"]:
                if event["id"] == after:
                    return list(reversed(out + fresh))
                fresh.append(event)
            out += fresh
            if not page["has_more"]:
                return list(reversed(out))
            cursor = page["last_id"]

    # ---- transport -----------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body=None, content_type: str = "application/json"):
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", content_type)
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            try:
                error = json.loads(e.read())["error"]
                message, code = error["message"], error.get("code")
            except (ValueError, KeyError, TypeError):
                message, code = f"{e.code} {e.reason}", None
            raise ServiceError(f"{message} (HTTP {e.code})", status=e.code, code=code) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServiceError(
                f"cannot reach the server at {self.url} ({reason}); start one with "
                "`tunesmith serve --base MODEL --jobs-dir DIR` or point --url (TUNESMITH_URL) at it"
            ) from None


def _query(**values) -> str:
    from urllib.parse import urlencode

    values = {k: v for k, v in values.items() if v is not None}
    return "?" + urlencode(values) if values else ""
