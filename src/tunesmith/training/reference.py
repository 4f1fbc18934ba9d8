"""The reference model's log-probabilities of every pair's answers, computed once before training.

DPO compares the policy with the model it started from. Keeping a second copy of the model in memory (as TRL does
unless told to precompute) doubles the weights' memory and adds a forward per step; but the reference never
changes, so its answer log-probabilities are computed once, in a no-grad pass over the training and validation
pairs before the method is applied (so the reference is the starting model for every method: full, freeze and the
adapters alike), and stored in the run directory as `reference_logps.safetensors`.

The file carries a key: a hash of the model (its config and a digest of its embedding and last weights), the
encoded pairs of each split (token ids and labels: the data, the template and data.max_length), the precision the
pass ran in and the pair layout. A resumed run reuses the file when the key matches and refuses to go on when it does
not (the data or the model changed under the run); a fresh start over an abandoned folder recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from tunesmith.atomic import TMP, _fsync_dir
from tunesmith.data.pairs import budget_batches
from tunesmith.errors import RunError
from tunesmith.models.functional import pair_batch_logits, sequence_logps
from tunesmith.run_dir import REFERENCE


def reference_key(model, splits: dict[str, list], precision: str, shared: bool) -> str:
    """The hash identifying a reference pass: model, encoded pairs of every split, precision and layout."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update((config.to_json_string(use_diff=False) if config is not None else "").encode())
    params = list(model.parameters())
    for p in (params[0], params[-1]):  # the embeddings and the last weights: different checkpoints differ there
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps({"precision": precision, "shared": shared}).encode())
    for split, pairs in sorted(splits.items()):
        h.update(split.encode())
        for p in pairs:
            h.update(json.dumps([p.prompt, p.chosen, p.chosen_labels, p.rejected, p.rejected_labels]).encode())
    return h.hexdigest()


FORWARD_TOKENS = 4096  # fed tokens per no-grad forward of the reference pass


@torch.no_grad()
def compute(
    model,
    pairs: list,
    pad_id: int,
    row_tokens: int,
    shared: bool,
    autocast,
    device,
    progress=None,
    label="reference",
    share_prefix: int = 0,
) -> torch.Tensor:
    """(n, 2) log-probabilities [chosen, rejected] of every pair under `model`, in pair order."""
    was_training = model.training
    model.eval()
    out = []
    bar = progress.start(label, len(pairs)) if progress is not None else None
    try:
        for _, batch in budget_batches(
            pairs, FORWARD_TOKENS, pad_id, row_tokens, shared, share_prefix if shared else 0
        ):
            batch = batch.to(device)
            with autocast:
                logits = pair_batch_logits(model, batch)
            out.append(sequence_logps(logits, batch).view(-1, 2).cpu())
            if bar is not None:
                progress.update(bar, advance=batch.n_pairs)
    finally:
        if was_training:
            model.train()
    return torch.cat(out) if out else torch.zeros((0, 2))


def load_or_compute(run_dir: Path, key: str, splits: dict[str, list], compute_split, resume: bool, log) -> dict:
    """{split: (n, 2) tensor}: the run's stored reference when its key matches, else computed (and stored).

    compute_split(name, pairs) -> tensor. resume=True and a stored file with another key -> RunError."""
    from safetensors.torch import load_file, save_file

    path = Path(run_dir) / REFERENCE
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            stored = (fh.metadata() or {}).get("key")
        if stored == key:
            tensors = load_file(str(path))
            log(f"reference log-probabilities: reused {path} ({sum(len(p) for p in splits.values())} pairs)")
            return {k: tensors[k] for k in splits}
        if resume:
            raise RunError(
                f"{path} was computed for other data, another model or precision than this run now has, so the "
                "run cannot go on against the same reference; restore the run's data and model, or start a new "
                "run with --output DIR"
            )
    t0 = time.perf_counter()
    result = {name: compute_split(name, pairs) for name, pairs in splits.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP}{time.time_ns()}")  # run_dir.clean_partial removes a leftover
    try:
        save_file({k: v.contiguous() for k, v in result.items()}, str(tmp), metadata={"key": key})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic: a run killed while writing leaves the old file or none
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    n = sum(len(p) for p in splits.values())
    log(f"reference log-probabilities: {n} pairs in {time.perf_counter() - t0:.1f} s, stored in {path}")
    return result
