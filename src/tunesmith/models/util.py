"""Small helpers shared by the models package: progress messages, timing, offline mode, quiet loading."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Union

Report = Callable[[str], None]
Progress = Union[bool, Report]


def reporter(progress: Progress) -> Report:
    """True: print to stderr; False: silent; a callable: called with each message."""
    if callable(progress):
        return progress
    if progress:
        return lambda msg: print(f"tunesmith: {msg}", file=sys.stderr, flush=True)
    return lambda msg: None


@contextmanager
def step(report: Report, what: str):
    """Report `what ...`, then `what: done in N s` (nothing more on failure: the error says it)."""
    report(f"{what} ...")
    started = time.perf_counter()
    yield
    report(f"{what}: done in {time.perf_counter() - started:.1f} s")


def force_offline() -> None:
    """Make sure no Hugging Face library ever reaches a model hub from this process.

    huggingface_hub reads HF_HUB_OFFLINE once, at import, so set the variable before transformers is
    imported and also patch the constant in case it already was.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


@contextmanager
def progress_bars(enabled: bool):
    """Show or hide transformers' tqdm bars ("Loading weights", "de-quantizing") for the duration."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def pad_id(tokenizer) -> int:
    """The id padding positions are filled with: the tokenizer's pad token (models.load gives every tokenizer one,
    its EOS if it had none), else 0 for a tokenizer made elsewhere. Padding is always masked, so its id only has to
    be a valid token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
