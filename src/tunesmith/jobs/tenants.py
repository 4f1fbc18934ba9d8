"""Tenants: who may use the server, and their limits, from a keys file.

    # keys.yaml
    defaults:                    # optional; these are the built-in defaults
      max_file_bytes: 50000000   # largest upload (bytes); larger ones get HTTP 413
      max_queued_jobs: 5         # jobs validating or queued at once per tenant; more get HTTP 429
    keys:
      - key: sk-team-a-1d9f...   # sent as `Authorization: Bearer sk-team-a-1d9f...`
        tenant: team-a           # files, jobs and fine-tuned models are seen by this tenant's keys only
      - key: sk-team-b-77ab...
        tenant: team-b
        max_queued_jobs: 1

Several keys may share a tenant. The base model and runs given on the command line are shared by all.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunesmith.errors import ConfigError

DEFAULT_TENANT = "default"


class _Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_file_bytes: int = Field(50_000_000, ge=1)
    max_queued_jobs: int = Field(5, ge=1)


class _Key(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(min_length=8)
    tenant: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    max_file_bytes: int | None = Field(None, ge=1)
    max_queued_jobs: int | None = Field(None, ge=1)


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    defaults: _Limits = _Limits()
    keys: list[_Key] = Field(min_length=1)


@dataclass(frozen=True)
class Tenant:
    name: str
    max_file_bytes: int = 50_000_000
    max_queued_jobs: int = 5


class Tenants:
    """API key -> Tenant. With no keys at all (a loopback server without --api-key), everyone is the default
    tenant."""

    def __init__(self, keys: dict[str, Tenant] | None = None, open_tenant: Tenant | None = None):
        self.keys = dict(keys or {})
        self.open_tenant = open_tenant if not self.keys else None

    @classmethod
    def build(cls, api_key: str | None = None, keys_file: str | Path | None = None, **limits) -> "Tenants":
        limits = {k: v for k, v in limits.items() if v is not None}
        keys: dict[str, Tenant] = {}
        if keys_file is not None:
            keys.update(load_keys_file(keys_file, **limits))
        if api_key:
            keys[api_key] = Tenant(DEFAULT_TENANT, **limits)
        return cls(keys, Tenant(DEFAULT_TENANT, **limits))

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def lookup(self, token: str | None) -> Tenant | None:
        if not self.keys:
            return self.open_tenant
        if not token:
            return None
        found = None
        for key, tenant in self.keys.items():  # compare with every key in constant time
            if secrets.compare_digest(token.encode(), key.encode()):
                found = tenant
        return found


def load_keys_file(path: str | Path, **overrides) -> dict[str, Tenant]:
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"--keys-file {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--keys-file {path}: not valid YAML: {e}") from None
    try:
        parsed = _KeysFile.model_validate(raw if raw is not None else {})
    except ValidationError as e:
        problems = [
            f"{path}: {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()
        ]
        raise ConfigError(f"--keys-file {path} is invalid (format: see `tunesmith serve --help`)", problems) from None
    seen: dict[str, str] = {}
    out = {}
    for entry in parsed.keys:
        if entry.key in seen:
            raise ConfigError(f"--keys-file {path}: a key is listed twice (tenants {seen[entry.key]}, {entry.tenant})")
        seen[entry.key] = entry.tenant
        defaults = parsed.defaults.model_dump() | overrides
        mine = {k: v for k, v in entry.model_dump(exclude={"key", "tenant"}).items() if v is not None}
        out[entry.key] = Tenant(entry.tenant, **(defaults | mine))
    return out
