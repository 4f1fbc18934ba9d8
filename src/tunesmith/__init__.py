"""tunesmith: fine-tune language models on your own examples and prove whether it beat prompting.

The public Python API lives in `tunesmith.api` and is re-exported here lazily, so `import tunesmith`
does not import torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {"train", "load", "Run", "generate", "check_data", "load_config", "evaluate", "report", "export", "serve"}


def __getattr__(name: str):
    if name in _API:
        from tunesmith import api

        return getattr(api, name)
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")
