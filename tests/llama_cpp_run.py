"""llama.cpp for the tests: tunesmith.exporting.llama_cpp's runner, or a skip naming the wheel when xllamacpp is
missing (the [dev] extra installs it, so `make test` and CI run these checks)."""

from __future__ import annotations

import pytest

pytest.importorskip("xllamacpp", reason="llama.cpp's Python wheel (pip install xllamacpp)")

from tunesmith.exporting.llama_cpp import Completion, LlamaCpp  # noqa: E402

__all__ = ["Completion", "LlamaCpp"]
