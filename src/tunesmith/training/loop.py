"""The training loop. Read it top to bottom: `train()` sets up, `_run_steps()` is the loop.

What it does that a generic trainer does not:
- the LM head and the loss run only at positions whose next token has a label (`logits_to_keep`), and in
  chunks when those are many (raw text), so full-vocabulary logits never exist at once (training/chunked_loss.py);
- a step's examples are packed into rows without padding by default (see data/batching.py);
- tokens that all examples of a micro-batch start with (a fixed system prompt) are encoded once per
  micro-batch, not once per example (see training/prefix.py);
- the loss of an optimizer step is the sum over its labelled tokens divided by their count, whatever the
  micro-batching (gradient accumulation normalised by loss tokens, not by micro-batches);
- the example order is a pure function of (seed, epoch), so a resumed run replays the same data.

Why one module of ~500 lines: the loop and the set-up it needs (data preparation, the plan, checkpoints, Ctrl-C)
are meant to be read top to bottom in one place (torchtune's recipes, nanoGPT's train.py); each side job is a
small named function, and what is reusable lives elsewhere (batching, prefix sharing, chunked loss, mitigations).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tunesmith import methods, models
from tunesmith.atomic import atomic_write_text
from tunesmith.config import Config, resolve_max_length, validate_config
from tunesmith.data.batching import make_batches, step_indices
from tunesmith.data.pairs import make_pair_batches
from tunesmith.errors import ConfigError, DataError, Interrupted, RunError, Stopped, TrainingError
from tunesmith.models import segments
from tunesmith.models import util as model_util
from tunesmith.models.functional import pair_batch_logits, sequence_logps, takes_custom_masks
from tunesmith.models.precision import Precision, cast_frozen_linears, resolve_training_precision
from tunesmith.progress import Progress
from tunesmith.run_dir import CONFIG, RunDir
from tunesmith.training import chunked_loss, distributed, objectives, prefix, reference
from tunesmith.training.auto import TrainingPlan, activation_bytes_per_token, available_memory, lr_at, plan_training
from tunesmith.training.checkpoint import LoopState, kill_point, latest_checkpoint, load_checkpoint, save_checkpoint
from tunesmith.training.metrics import MetricsLogger
from tunesmith.training.mitigations import KLToBase, frozen_base, mix_replay

# Packed row capacity. Attention over a packed row cost width^2 (the block-diagonal mask is dense on CPU),
# so several short rows beat one long one: measured on SmolLM2-135M with 16 tickets (1,335 tokens), LoRA
# forward+backward took 11.1 s as one 1,335-token row, 10.0 s in rows of 512 and 7.9 s in rows of 256. (Measured
# before attention ran per example, models/segments.py, which removes most of that cost; not re-tuned since.)
# A row is never narrower than the longest example it must hold.
ROW_TOKENS = 256
# With a shared prefix the rows hold only the suffixes, and fewer, wider rows win: one 8-ticket LoRA step
# (forward+backward, 2 threads, 6 alternated repeats) ran at a median 187 useful tok/s in rows of 256, 225 in
# rows of 512 and 226 in rows of 1024; without sharing, rows of 512 ran at 97 against 133 for rows of 256.
SHARED_ROW_TOKENS = 512


def train(
    config: Config,
    resume: bool = False,
    progress: Progress | None = None,
    log=print,
    hooks: "TrainHooks | None" = None,
    dry_run: bool = False,
    world_size: int | None = None,
) -> Path:
    """Fine-tune per `config`; returns the run directory. With resume=True, continue from its last checkpoint.

    `progress` is told the steps done and shown the validation results (default: no bar, those lines to `log`);
    `log` gets everything else (what is loaded, the data, the plan). Launched by torchrun, this process trains its
    share of each step (training/distributed.py) and only rank 0 logs and writes. dry_run: load, plan and print
    the estimated memory per process for `world_size` processes (default: this launch's), then stop. `hooks` (a
    TrainHooks) lets a caller such as `tunesmith sweep` choose when to validate and stop the run at a step boundary
    (raises Stopped); one process only."""
    progress = Progress(log) if progress is None else progress
    run_dir = config.run_dir()
    cfg = _saved_config(run_dir) if resume else config
    dist = distributed.setup(cfg, cfg.model.device)
    if not dist.is_main:  # rank 0 speaks and writes for the run
        log, progress = (lambda *_a, **_k: None), Progress(None)
    if dry_run:
        return _dry_run(cfg, world_size or dist.world_size, log)
    ckpt = dist.from_main(lambda: _starting_checkpoint(run_dir, resume, log))  # None: from step 0
    _set_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)

    device = dist.device if dist.enabled else models.pick_device(cfg.model.device)
    precision = resolve_training_precision(cfg.train.precision, device, cfg.method)
    log(f"loading {cfg.model.name} ({device}, precision {precision.name}: {precision.reason})")
    model, tokenizer = models.load(cfg.model.name, dtype="float32", device=str(device))
    data = _prepare_data(cfg, tokenizer, model, log)
    lengths = [len(e) for e in data.train]
    val_tokens = sum(len(e) for e in data.validation)
    free = available_memory(device)
    if free is not None and cfg.method in ("full", "freeze"):  # gradients and two AdamW moments, allocated later
        free -= 12 * sum(p.numel() for p in model.parameters())
    memory = None if free is None else (max(free, 0), activation_bytes_per_token(model.config))
    plan = plan_training(cfg.train, cfg.method, len(data.train), lengths, device.type, val_tokens, memory)
    cfg = _resolved(cfg, plan, data.max_length, precision)
    _print_plan(plan, log)
    pad_id = model_util.pad_id(tokenizer)
    # preference pairs: each prompt fed once, both answers scored on it (data/pairs.py), where the model's attention
    # takes a custom 4D mask; else the two sequences of a pair are packed side by side
    shared_pairs = takes_custom_masks(model)[0]
    ref = None
    if data.preference and objectives.NEEDS_REFERENCE[cfg.train.objective]:
        # before the method is applied: the reference is the starting model, for every method
        ref = _reference_logps(cfg, model, data, plan, pad_id, shared_pairs, precision, device, ckpt, progress, log)
        kill_point("after-reference")  # tests: a kill before the first checkpoint must not recompute it

    torch.manual_seed(cfg.train.seed)
    base_copy = frozen_base(model, cfg)  # train.kl_to_base with full/freeze/adapter: keep the base's predictions
    model = methods.apply_method(model, cfg, tokenizer=tokenizer)
    _apply_precision(model, base_copy, cfg, precision, log)
    log(methods.describe(model, cfg))
    if cfg.train.gradient_checkpointing:
        # transformers 5.23 renamed gradient_checkpointing_enable; non-reentrant is its default
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model = distributed.wrap(model, dist)  # DDP or FSDP2 when launched by torchrun; unchanged in one process
    optimizer = _optimizer(model, cfg)

    state = LoopState()
    if ckpt is not None and (dist.enabled or distributed.is_sharded(ckpt)):
        state = distributed.load_checkpoint(ckpt, model, optimizer, dist, cfg.method, log)
        log(f"resuming from {ckpt} (step {state.step} of {plan.total_steps})")
    elif ckpt is not None:
        trainable, optim_state, state = load_checkpoint(ckpt, device)
        methods.load_trainable_state_dict(model, trainable)
        optimizer.load_state_dict(optim_state)
        log(f"resuming from {ckpt} (step {state.step} of {plan.total_steps})")
    elif dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        where = {"device": str(device), "precision": precision.name, "precision_reason": precision.reason}
        if dist.enabled:
            where["distributed"] = {"world_size": dist.world_size, "strategy": dist.strategy}
        atomic_write_text(run_dir / "data.json", json.dumps(data.summary | {"plan": asdict(plan), **where}, indent=2))
    dist.barrier()

    if ckpt is not None:
        _check_same_objective(run_dir, cfg)
    metrics = _metrics_logger(run_dir, cfg, state.step if ckpt is not None else None, dist)
    # share a micro-batch's common prefix (a fixed system prompt) when that is exact for this model and method; not
    # across processes: it runs the model twice per micro-batch, which DDP's and FSDP's hooks do not allow
    shareable, _ = prefix.supports_prefix_sharing(model, cfg.method, cfg.train.gradient_checkpointing)
    shareable = shareable and not dist.enabled
    ctx = TrainingContext(
        cfg=cfg,
        plan=plan,
        model=model,
        optimizer=optimizer,
        train_set=data.train,
        validation=data.validation,
        device=device,
        precision=precision,
        metrics=metrics,
        run_dir=run_dir,
        pad_id=pad_id,
        kl=KLToBase.create(cfg, model, base_copy, precision.autocast_context(device)),
        virtual_tokens=cfg.prompt.num_virtual_tokens if cfg.method == "prompt" else 0,
        share_prefix=prefix.MIN_PREFIX_TOKENS if shareable and plan.batching == "pack" else 0,
        preference=data.preference,
        reference=ref,
        shared_pairs=shared_pairs,
        hooks=hooks,
        dist=dist,
    )
    try:
        _run_steps(ctx, state, progress)
    except RuntimeError as e:
        if dist.enabled:  # a collective failed: a peer died or hung (gloo/nccl say so in a RuntimeError)
            raise distributed.lost_peer(e, dist) from None
        raise
    finally:
        metrics.close()

    _save_final(model, cfg, run_dir, tokenizer, dist)
    if distributed.REPORT_MEMORY:
        distributed.report_memory(model, None, dist, "at the end")
    log(f"done: {run_dir}/model")
    return run_dir


def _dry_run(cfg: Config, world: int, log) -> Path:
    """`tunesmith train --dry-run`: the plan and the estimated memory per process of `world` processes; nothing is
    trained or written."""
    strategy = distributed.strategy(cfg, world)
    device = models.pick_device(cfg.model.device)
    precision = resolve_training_precision(cfg.train.precision, device, cfg.method)
    model, tokenizer = models.load(cfg.model.name, dtype="float32", device="cpu")
    data = _prepare_data(cfg, tokenizer, model, log)
    lengths = sorted(len(e) for e in data.train)
    val_tokens = sum(len(e) for e in data.validation)
    plan = plan_training(cfg.train, cfg.method, len(data.train), lengths, device.type, val_tokens, None)
    _print_plan(plan, log)
    per_token = activation_bytes_per_token(model.config)
    model = methods.apply_method(model, cfg, tokenizer=tokenizer)
    # a micro-batch of the longer examples (95th percentile), as the auto plan sizes it; each of `world` processes
    # holds at most its share of a step
    examples = min(plan.micro_batch_size, -(-plan.batch_size // world))
    tokens = examples * lengths[int(0.95 * (len(lengths) - 1))]
    act = per_token * tokens
    if cfg.train.gradient_checkpointing:  # only each layer's input is kept, one layer recomputed at a time
        act //= max(getattr(model.config, "num_hidden_layers", 1), 1)
    weight_bytes = 2 if precision.name == "bf16" else 4
    est = distributed.estimate_memory(model, strategy, world, weight_bytes, act)
    mode = {"none": "one process", "ddp": "DDP, replicated", "fsdp": f"FSDP2, sharded over {world}"}[strategy]
    mib = lambda n: f"{n / 2**20:10.1f} MiB"  # noqa: E731
    rows = [
        ("weights", est.weights, f"{'fp32' if weight_bytes == 4 else 'bf16'}, {mode}"),
        ("gradients", est.grads, "trainable weights only"),
        ("optimizer", est.optimizer, "AdamW: two fp32 moments per trainable weight"),
        (
            "activations",
            est.activations,
            f"one micro-batch: {plan.micro_batch_size} x {tokens // plan.micro_batch_size} tokens",
        ),
    ]
    if est.gathered:
        rows.append(("gathered", est.gathered, "FSDP: the root's weights (embeddings) and one layer's, all-gathered"))
    log(f"estimated memory per process ({world} process{'es' if world != 1 else ''}, {cfg.method}, {precision.name}):")
    for name, n, why in rows:
        log(f"  {name:<15}{mib(n)}  {why}")
    log(f"  {'total':<15}{mib(est.total)}  (estimate; allocator overhead and the framework itself come on top)")
    return cfg.run_dir()


def _save_final(model, cfg: Config, run_dir: Path, tokenizer, dist) -> None:
    """model/, written once (by rank 0; FSDP's shards gathered to it first)."""
    # FSDP: the weights gathered to rank 0 (a collective: every rank takes part)
    gathered = {"state_dict": distributed.full_state_dict(model, dist)} if dist.strategy == "fsdp" else {}
    if dist.is_main:
        try:
            methods.save_trained(distributed.unwrap(model), cfg, run_dir / "model", tokenizer, **gathered)
        except OSError as e:
            raise _save_failed(e, "the final model (model/)", run_dir) from None
    dist.barrier()


def _metrics_logger(run_dir: Path, cfg: Config, resume_step: int | None, dist):
    if dist.is_main:
        return MetricsLogger(run_dir, cfg.train.log, resume_step=resume_step)
    return distributed.NoMetrics()


@dataclass(frozen=True)
class TrainingContext:
    """What the steps of a run work with; built once in `train()`, never changed after."""

    cfg: Config  # resolved: no `auto` left in train.* or data.max_length
    plan: TrainingPlan
    model: torch.nn.Module  # the method applied
    optimizer: torch.optim.Optimizer
    train_set: list  # encoded examples (data.templates.Encoded), replay examples included
    validation: list  # encoded validation examples; empty: no validation
    device: torch.device
    precision: Precision  # fp32, bf16-mixed (autocast; fp32 weights, head and loss) or bf16 (all weights bf16)
    metrics: MetricsLogger
    run_dir: Path
    pad_id: int
    kl: KLToBase | None  # the train.kl_to_base penalty; None without it
    virtual_tokens: int  # prompt tuning prepends them to every row: the kept-positions mask must cover them too
    share_prefix: int  # encode a micro-batch's common prefix once when it has this many tokens (0: never)
    preference: bool = False  # train_set and validation hold data.templates.EncodedPair: a preference objective
    reference: dict | None = None  # {"train" | "validation": (n, 2) reference log-probs}; None: not needed
    shared_pairs: bool = True  # pairs in the tree layout (prompt fed once); else the two sequences packed
    hooks: "TrainHooks | None" = None  # a caller's schedule of validations and stop requests (tunesmith sweep)
    dist: distributed.Dist = field(default_factory=distributed.Dist)  # this process's rank; one process: a no-op


class TrainHooks:
    """What a caller may change in a run without changing its config: when to validate, and when to stop.

    `tunesmith sweep` validates every trial at the same fractions of an epoch, so that a pruner compares trials
    at equal progress whatever their batch size, and stops a trial whose validation loss says it is not worth
    finishing, or that would overrun the sweep's time budget. The default methods change nothing."""

    def eval_steps(self, plan: TrainingPlan) -> set[int] | None:
        """The optimizer steps after which to validate and checkpoint (the last step always is); None: the plan's
        eval_every and save_every."""
        return None

    def on_eval(self, step: int, plan: TrainingPlan, result: dict) -> str | None:
        """After each validation: a reason to stop the run now (its checkpoint is saved first), or None."""
        return None

    def stop_reason(self, step: int, plan: TrainingPlan) -> str | None:
        """After each optimizer step: a reason to stop now (e.g. a time budget), or None."""
        return None


def _run_steps(ctx: TrainingContext, state: LoopState, progress: Progress) -> None:
    cfg, plan, model, optimizer = ctx.cfg, ctx.plan, ctx.model, ctx.optimizer
    lengths = [len(e) for e in ctx.train_set]
    trainable = [p for p in model.parameters() if p.requires_grad]
    bar = progress.start("train", plan.total_steps, completed=state.step)
    stop = distributed.StopFlag(ctx.dist.is_main) if ctx.dist.enabled else _StopFlag()
    epoch_steps: dict[int, list[list[int]]] = {}
    window_tokens, window_time = 0, 0.0
    eval_at = ctx.hooks.eval_steps(plan) if ctx.hooks is not None else None
    first_step = state.step
    model.train()
    try:
        while state.step < plan.total_steps:
            step = state.step
            epoch, in_epoch = divmod(step, plan.steps_per_epoch)
            if epoch not in epoch_steps:
                epoch_steps = {epoch: step_indices(lengths, plan.batch_size, cfg.train.seed, epoch, plan.batching)}
            indices = epoch_steps[epoch][in_epoch]
            examples = [ctx.train_set[i] for i in indices]

            t0 = time.perf_counter()
            lr = lr_at(step, plan, cfg.train.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            pair_stats = None
            if ctx.preference:
                # the loss of a step is the mean over its pairs, whatever the micro-batching
                batches = _pair_batches(ctx, examples)
                n_targets = sum(int(b.target_seq.numel()) for b in batches)
                pair_stats = _PairStats()
                ref = ctx.reference["train"][indices] if ctx.reference is not None else None
                at = 0
                for batch in batches:
                    part = None if ref is None else ref[at : at + batch.n_pairs]
                    batch_loss = _pair_forward(ctx, batch.to(ctx.device), part, pair_stats)
                    (batch_loss / len(examples)).backward()
                    at += batch.n_pairs
                loss = pair_stats.loss / len(examples)
                n_tokens = sum(b.n_tokens for b in batches)
            else:
                # this process's share of the step (all of it in one process); counts summed over the processes
                mine, weight = ctx.dist.share(indices)
                batches = _batches(ctx, [ctx.train_set[i] for i in mine])
                local = weight * sum(b.n_targets for b in batches), weight * sum(b.n_tokens for b in batches)
                n_targets, n_tokens = (int(v) for v in ctx.dist.sum(*local))
                loss_sum = 0.0
                for batch, w in ctx.dist.accumulate(ctx.model, batches, weight):
                    batch_loss, _ = _forward(ctx, batch.to(ctx.device))
                    # normalise by the step's label tokens, not per micro-batch: every labelled token weighs the same
                    # (grad_scale: DDP and FSDP average the processes' gradients, the loss is their sum)
                    (batch_loss * (w * ctx.dist.grad_scale) / max(n_targets, 1)).backward()
                    loss_sum += w * batch_loss.item()
                loss = ctx.dist.sum(loss_sum)[0] / max(n_targets, 1)
            if not math.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss} at step {step + 1}; lower train.lr (now {plan.lr:g}) or check the data"
                )
            if ctx.dist.enabled:
                grad_norm = ctx.dist.clip(trainable, cfg.train.max_grad_norm)
            else:
                grad_norm = _clip(trainable, cfg.train.max_grad_norm)
            optimizer.step()
            if distributed.REPORT_MEMORY and step == first_step:  # diagnostics: weights, gradients, AdamW state held
                distributed.report_memory(model, optimizer, ctx.dist, "after the first step")
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0

            state.step = step + 1
            state.tokens += n_tokens
            window_tokens, window_time = window_tokens + n_tokens, window_time + elapsed
            record = {
                "kind": "train",
                "step": step + 1,
                "epoch": round((step + 1) / plan.steps_per_epoch, 4),
                "loss": round(loss, 6),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": state.tokens,
                "label_tokens": n_targets,
                "tokens_per_s": round(n_tokens / elapsed, 1),
                "step_time": round(elapsed, 4),
            }
            if ctx.kl is not None:  # log the task loss and the KL term apart
                record.update(ctx.kl.pop(n_targets, loss))
            if pair_stats is not None:
                record.update(pair_stats.record())
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == plan.total_steps:
                ctx.metrics.log(record)
            info = f"loss {loss:.4f}"
            if pair_stats is not None:
                info += f"  reward acc {pair_stats.accuracy:.2f}"
            progress.update(
                bar, completed=state.step, info=f"{info}  {window_tokens / max(window_time, 1e-9):,.0f} tok/s"
            )

            last = state.step == plan.total_steps
            stop_early, stopped = False, None
            due_eval = state.step in eval_at if eval_at is not None else state.step % plan.eval_every == 0
            due_save = state.step in eval_at if eval_at is not None else state.step % plan.save_every == 0
            if ctx.validation and (due_eval or last):
                stop_early, result = _evaluate_and_track(ctx, state, progress)
                if ctx.hooks is not None:
                    stopped = ctx.hooks.on_eval(state.step, plan, result)
            if stopped is None and ctx.hooks is not None and not last:
                stopped = ctx.hooks.stop_reason(state.step, plan)
            stop_requested = ctx.dist.any(stop.requested)  # a signal on any process stops them all here
            if due_save or last or stop_early or stop_requested or stopped:
                _checkpoint(ctx, state)
            if stopped:
                raise Stopped(stopped, state.step)
            if stop_early:
                progress.print(
                    f"early stopping: validation loss has not improved for {cfg.train.early_stopping_patience} "
                    f"evaluations (best {state.best_val_loss:.4f})"
                )
                break
            if stop_requested:
                how = f" --nproc {ctx.dist.world_size}" if ctx.dist.enabled else ""
                error = Interrupted(
                    f"interrupted at step {state.step} of {plan.total_steps}; checkpoint saved.\n"
                    f"Resume with: tunesmith train --resume {ctx.run_dir}{how}"
                )
                error.all_ranks = True  # every process raises it; the command line prints it once
                raise error
            kill_point(f"after-step-{state.step}")  # tests: a kill between checkpoints (training/checkpoint.py)
    finally:
        stop.restore()
        progress.close()


def _forward(ctx: TrainingContext, batch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's labelled positions, and how many were predicted right."""
    keep = batch.keep
    if ctx.virtual_tokens:
        keep = torch.cat([keep.new_zeros(keep.shape[0], ctx.virtual_tokens), keep], dim=1)
    kwargs = {"input_ids": batch.input_ids, "logits_to_keep": keep, "use_cache": False}
    if batch.attention_mask is None:
        kwargs["position_ids"] = batch.position_ids  # packed rows: restarting positions separate the examples
        if not ctx.virtual_tokens:  # attention per example, not over the whole row (models/segments.py)
            kwargs.update(segments.keyword(ctx.model, batch.segments))
    else:
        kwargs["attention_mask"] = batch.attention_mask
    autocast = ctx.precision.autocast_context(ctx.device)
    # many labelled positions (raw text, long answers) and no KL term: the head and the loss run chunk by chunk
    module = distributed.unwrap(ctx.model)  # DDP's wrapper runs the forward; the module has the head
    if ctx.kl is None and chunked_loss.should_chunk(module, batch.targets.numel()):
        # outside autocast: the head and the loss in the weights' dtype (fp32 under bf16-mixed)
        hidden, head = chunked_loss.body_without_head(module, lambda: _model_outputs(ctx, batch, kwargs), autocast)
        return chunked_loss.chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head, batch.targets)
    logits = chunked_loss.logits_head_outside(module, lambda: _model_outputs(ctx, batch, kwargs), autocast)
    logits = logits.reshape(-1, logits.shape[-1]).float()
    loss = F.cross_entropy(logits, batch.targets, reduction="sum")
    if ctx.kl is not None and ctx.model.training:  # train.kl_to_base (training/mitigations.py); not in validation
        loss = loss + ctx.kl.penalty(batch, kwargs, logits)
    correct = int((logits.detach().argmax(-1) == batch.targets).sum())
    return loss, correct


def _model_outputs(ctx: TrainingContext, batch, kwargs: dict) -> torch.Tensor:
    """The model's output at the batch's kept positions: logits, or hidden states with the head swapped out."""
    if batch.prefix_ids is not None:
        return prefix.forward_shared_prefix(ctx.model, batch)
    return ctx.model(**kwargs).logits


def _batches(ctx: TrainingContext, examples) -> list:
    """`examples` cut into micro-batches as the plan says (packed or padded rows, a shared prefix when exact)."""
    return make_batches(
        examples,
        ctx.plan.batching,
        ctx.plan.micro_batch_size,
        ctx.pad_id,
        ROW_TOKENS,
        ctx.share_prefix,
        SHARED_ROW_TOKENS,
        _width_multiple(ctx),
    )


def _width_multiple(ctx: TrainingContext) -> int:
    """Rows in widths of 16 tokens where bf16 matmuls run on a CPU (data.batching.round_width says why)."""
    return 16 if ctx.device.type == "cpu" and ctx.precision.compute_dtype == torch.bfloat16 else 1


def _pair_batches(ctx: TrainingContext, pairs) -> list:
    row = SHARED_ROW_TOKENS if ctx.shared_pairs else ROW_TOKENS
    # a system prompt every pair starts with is fed once per micro-batch (training/prefix.py), when exact
    return make_pair_batches(
        pairs, ctx.plan.micro_batch_size, ctx.pad_id, row, ctx.shared_pairs, ctx.share_prefix, _width_multiple(ctx)
    )


class _PairStats:
    """Sums over the pairs of a step (or of the validation set) of the loss and the rewards."""

    def __init__(self):
        self.pairs, self.loss, self.correct, self.chosen, self.rejected = 0, 0.0, 0, 0.0, 0.0

    def add(self, losses: objectives.PairLosses) -> None:
        self.pairs += int(losses.loss.numel())
        self.loss += float(losses.loss.detach().sum())
        self.correct += int((losses.chosen_reward > losses.rejected_reward).sum())
        self.chosen += float(losses.chosen_reward.sum())
        self.rejected += float(losses.rejected_reward.sum())

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.pairs, 1)

    def record(self) -> dict:
        n = max(self.pairs, 1)
        return {
            "reward_accuracy": round(self.accuracy, 6),
            "reward_margin": round((self.chosen - self.rejected) / n, 6),
            "reward_chosen": round(self.chosen / n, 6),
            "reward_rejected": round(self.rejected / n, 6),
        }


def _pair_forward(ctx: TrainingContext, batch, ref: torch.Tensor | None, stats: _PairStats) -> torch.Tensor:
    """Summed loss of the objective over the batch's pairs (differentiable); adds the pairs to `stats`."""
    autocast = ctx.precision.autocast_context(ctx.device)
    # the LM head and the log-softmax outside autocast: log-probabilities in fp32 under bf16-mixed
    logits = chunked_loss.logits_head_outside(ctx.model, lambda: pair_batch_logits(ctx.model, batch), autocast)
    logps = sequence_logps(logits, batch).view(-1, 2)
    counts = batch.tokens_per_seq.view(-1, 2)
    rc, rr = (None, None) if ref is None else (ref[:, 0].to(logps.device), ref[:, 1].to(logps.device))
    losses = objectives.pair_losses(ctx.cfg, logps[:, 0], logps[:, 1], counts[:, 0], counts[:, 1], rc, rr)
    stats.add(losses)
    return losses.loss.sum()


def _reference_logps(cfg, model, data, plan, pad_id, shared, precision, device, ckpt, progress, log) -> dict:
    """The starting model's log-probabilities of every train and validation pair (training/reference.py)."""
    splits = {"train": data.train, "validation": data.validation}
    key = reference.reference_key(model, splits, precision.name, shared)
    row = SHARED_ROW_TOKENS if shared else ROW_TOKENS
    autocast = precision.autocast_context(device)

    def compute(name, pairs):
        return reference.compute(
            model,
            pairs,
            pad_id,
            row,
            shared,
            autocast,
            device,
            progress,
            f"reference ({name})",
            prefix.MIN_PREFIX_TOKENS,
        )

    return reference.load_or_compute(cfg.run_dir(), key, splits, compute, resume=ckpt is not None, log=log)


@torch.no_grad()
def evaluate_loss(ctx: TrainingContext, examples) -> dict:
    """Validation loss (mean over labelled tokens) and token accuracy; for preference pairs the mean pair loss and
    the preference (reward) accuracy, margin and rewards."""
    was_training = ctx.model.training
    ctx.model.eval()
    if ctx.preference:
        stats = _PairStats()
        ref = ctx.reference["validation"] if ctx.reference is not None else None
        at = 0
        for batch in _pair_batches(ctx, examples):
            part = None if ref is None else ref[at : at + batch.n_pairs]
            _pair_forward(ctx, batch.to(ctx.device), part, stats)
            at += batch.n_pairs
        if was_training:
            ctx.model.train()
        out = {f"val_{k}": v for k, v in stats.record().items()}
        return {"val_loss": stats.loss / max(stats.pairs, 1), **out, "val_pairs": stats.pairs}
    total, correct, n = 0.0, 0, 0
    for batch in _batches(ctx, examples):
        loss, right = _forward(ctx, batch.to(ctx.device))
        total += loss.item()
        correct += right
        n += batch.n_targets
    if was_training:
        ctx.model.train()
    return {"val_loss": total / max(n, 1), "val_token_acc": correct / max(n, 1), "val_tokens": n}


def _evaluate_and_track(ctx: TrainingContext, state: LoopState, progress: Progress) -> tuple[bool, dict]:
    """Validate, log, and return (whether early stopping says stop, the validation result)."""
    result = evaluate_loss(ctx, ctx.validation)
    ctx.metrics.log({"kind": "eval", "step": state.step, **{k: round(v, 6) for k, v in result.items()}})
    if ctx.preference:
        shown = f"val_reward_accuracy {result['val_reward_accuracy']:.3f}  val_reward_margin {result['val_reward_margin']:.3f}"
    else:
        shown = f"val_token_acc {result['val_token_acc']:.3f}"
    progress.print(f"step {state.step}: val_loss {result['val_loss']:.4f}  {shown}")
    if state.best_val_loss is None or result["val_loss"] < state.best_val_loss - 1e-6:
        state.best_val_loss = result["val_loss"]
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    patience = ctx.cfg.train.early_stopping_patience
    return patience is not None and state.evals_without_improvement >= patience, result


def _checkpoint(ctx: TrainingContext, state: LoopState) -> None:
    try:
        if ctx.dist.enabled:  # every process writes its shard (torch.distributed.checkpoint)
            cfg = ctx.cfg
            distributed.save_checkpoint(
                ctx.run_dir, ctx.model, ctx.optimizer, state, cfg.train.keep_checkpoints, ctx.dist, cfg.method
            )
            return
        save_checkpoint(
            ctx.run_dir,
            methods.trainable_state_dict(ctx.model),
            ctx.optimizer,
            state,
            keep=ctx.cfg.train.keep_checkpoints,
        )
    except OSError as e:
        raise _save_failed(e, f"the checkpoint of step {state.step}", ctx.run_dir) from None


def _save_failed(error: OSError, what: str, run_dir: Path) -> TrainingError:
    """One line for a write that failed (a full disk, a quota, permissions): what was lost, what is safe, the fix.
    The writers are atomic, so the earlier checkpoints are whole and the half-written files already gone."""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        fix = "free some space"
    else:
        fix = f"fix that ({error.filename or run_dir})"
    last = latest_checkpoint(run_dir)
    if last is None:
        return TrainingError(
            f"could not save {what}: {reason}; no checkpoint is complete yet: {fix}, then start again with: "
            f"tunesmith train --resume {run_dir} (from step 0, with the saved config)"
        )
    return TrainingError(
        f"could not save {what}: {reason}; the last complete checkpoint ({last.name}) is intact: {fix}, then "
        f"continue with: tunesmith train --resume {run_dir}"
    )


# ----------------------------------------------------------------------------------------------------
# Set-up helpers


@dataclass
class PreparedData:
    """The encoded data of a run and what data.json says about it."""

    train: list  # data.templates.Encoded, replay examples (train.replay) after the task's
    validation: list
    summary: dict  # data.json without the plan and the device
    max_length: int  # data.max_length resolved (auto: the model's context, at most config.AUTO_MAX_LENGTH)
    preference: bool = False  # train/validation are EncodedPair (train.objective dpo, orpo or simpo)


def _prepare_data(cfg: Config, tokenizer, model, log) -> PreparedData:
    """Read, split and encode the data (`cfg` is left as it is: data.max_length auto is resolved in the result)."""
    from tunesmith.data.formats import read_file
    from tunesmith.data.split import split_train_val
    from tunesmith.data.templates import Renderer

    if not cfg.data.train:
        raise ConfigError("no training data: pass --data FILE or set data.train in the recipe")

    def read(path: str) -> list:
        data = read_file(path, cfg.data.format, strict=cfg.data.strict)
        for warning in data.warnings:  # unknown keys of rows (errors with data.strict)
            log(warning)
        return data.examples

    train_examples = read(cfg.data.train)
    if cfg.data.validation:
        val_examples = read(cfg.data.validation)
    elif cfg.data.val_fraction > 0 and len(train_examples) >= 10:
        train_examples, val_examples = split_train_val(train_examples, cfg.data.val_fraction, cfg.train.seed)
    else:
        val_examples = []
    preference = _check_objective(cfg, train_examples, val_examples)

    max_length = resolve_max_length(cfg.data.max_length, getattr(model.config, "max_position_embeddings", None))
    # encoding and replay read data.max_length: give them a copy with it resolved, not the caller's config
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_length": max_length})})
    renderer = Renderer(tokenizer, cfg.model.chat_template, cfg.data.system_prompt)
    encoded, summary = {}, {"template": renderer.template_name, "kind": train_examples[0].kind}
    summary["objective"] = cfg.train.objective
    if preference:  # how its prompts are given to the model: raw text or through the chat template
        summary["prompt_form"] = "chat" if train_examples[0].is_chat_pair else "raw"
    for split, examples in (("train", train_examples), ("validation", val_examples)):
        encode = _encode_pairs if preference else _encode_all
        encoded[split], summary[split] = encode(examples, renderer, cfg, log)
    if not encoded["train"]:
        raise DataError(f"{cfg.data.train}: no trainable example left after filtering")
    if cfg.train.replay:  # general examples against forgetting (training/mitigations.py); validation stays task-only
        encoded["train"], summary["replay"] = mix_replay(encoded["train"], cfg, tokenizer, log)
    summary["files"] = {
        k: {"path": v, "sha256": _sha256(v)}
        for k, v in (("train", cfg.data.train), ("validation", cfg.data.validation), ("test", cfg.data.test))
        if v
    }
    s = summary["train"]
    log(
        f"data: {s['examples']} train / {summary['validation']['examples']} validation examples, "
        f"{s['tokens']:,} train tokens ({s['label_tokens']:,} with loss), template {renderer.template_name}"
        + (f", {s['truncated']} truncated" if s["truncated"] else "")
        + (f", {s['dropped']} dropped (too long)" if s["dropped"] else "")
    )
    return PreparedData(
        train=encoded["train"],
        validation=encoded["validation"],
        summary=summary,
        max_length=max_length,
        preference=preference,
    )


def _check_objective(cfg: Config, train_examples: list, val_examples: list) -> bool:
    """Whether this is preference training; a ConfigError when the data and train.objective do not go together."""
    objective = cfg.train.objective
    kinds = {e.kind for e in train_examples + val_examples}
    if objective == "sft":
        if "preference" in kinds:
            raise ConfigError(
                f"{cfg.data.train}: the data holds preference pairs (prompt/chosen/rejected) but train.objective is "
                "sft; train on them with --objective dpo (or orpo, simpo), or give chat / prompt-completion examples"
            )
        return False
    if kinds != {"preference"}:
        found = ", ".join(sorted(kinds - {"preference"}))
        raise ConfigError(
            f"{cfg.data.train}: train.objective {objective} needs preference pairs (prompt/chosen/rejected, the chat "
            f"form messages/chosen/rejected, or OpenAI's input/preferred_output/non_preferred_output) but the data "
            f"holds {found} examples; give pair data, or train with --objective sft"
        )
    if cfg.method in ("prefix", "prompt"):
        raise ConfigError(
            f"method {cfg.method} cannot be trained with train.objective {objective}: its virtual tokens do not fit "
            "the shared-prompt pair layout; use lora, dora, ia3, adapter, freeze or full"
        )
    if cfg.train.kl_to_base:
        raise ConfigError(
            f"train.kl_to_base is for sft; with train.objective {objective} the objective itself holds the model "
            f"near its start ({'dpo.beta' if objective == 'dpo' else 'its SFT term'}); set train.kl_to_base to 0"
        )
    if cfg.train.replay:
        raise ConfigError(
            f"train.replay mixes chat examples into sft training; with train.objective {objective} set it to 0"
        )
    return True


def _encode_pairs(examples, renderer, cfg: Config, log) -> tuple[list, dict]:
    """Encode preference pairs; pairs cut to fit data.max_length and pairs dropped are named, never silent."""
    from tunesmith.data.templates import TooLong

    out, dropped = [], []
    for ex in examples:
        try:
            pair = renderer.encode_pair(ex, max_length=cfg.data.max_length, truncation=cfg.data.truncation)
        except TooLong as e:
            if cfg.data.truncation == "error":
                raise
            dropped.append(e)
            continue
        out.append(pair)
    cut = [p.source for p in out if p.truncated]
    if cut:
        log(
            f"warning: {len(cut)} pair{'s' if len(cut) != 1 else ''} longer than data.max_length="
            f"{cfg.data.max_length}: answers cut to fit ({_lines(cut)}); raise data.max_length to keep them whole"
        )
    if dropped:
        log(
            f"warning: {len(dropped)} pair{'s' if len(dropped) != 1 else ''} dropped: "
            + "; ".join(str(e) for e in dropped[:5])
            + (f"; ... and {len(dropped) - 5} more" if len(dropped) > 5 else "")
        )
    lengths = sorted(len(p) for p in out) or [0]
    summary = {
        "examples": len(out),
        "dropped": len(dropped),
        "truncated": len(cut),
        "tokens": sum(p.tokens for p in out),
        "fed_tokens": sum(lengths),
        "label_tokens": sum(p.n_label_tokens for p in out),
        "length_p50": lengths[len(lengths) // 2],
        "length_p95": lengths[int(0.95 * (len(lengths) - 1))],
        "length_max": lengths[-1],
    }
    return out, summary


def _lines(sources: list[str], limit: int = 5) -> str:
    shown = ", ".join(sources[:limit])
    return shown + (f" and {len(sources) - limit} more" if len(sources) > limit else "")


def _encode_all(examples, renderer, cfg: Config, log=None) -> tuple[list, dict]:
    from tunesmith.data.templates import TooLong

    out, dropped = [], 0
    for ex in examples:
        try:
            enc = renderer.encode(ex, max_length=cfg.data.max_length, truncation=cfg.data.truncation)
        except TooLong:
            if cfg.data.truncation != "drop":
                raise
            dropped += 1
            continue
        if enc.n_label_tokens == 0:
            dropped += 1  # nothing to learn (e.g. every assistant turn has weight 0 or was truncated away)
            continue
        out.append(enc)
    lengths = sorted(len(e.input_ids) for e in out) or [0]
    summary = {
        "examples": len(out),
        "dropped": dropped,
        "truncated": sum(e.truncated for e in out),
        "tokens": sum(lengths),
        "label_tokens": sum(e.n_label_tokens for e in out),
        "length_p50": lengths[len(lengths) // 2],
        "length_p95": lengths[int(0.95 * (len(lengths) - 1))],
        "length_max": lengths[-1],
    }
    return out, summary


def _apply_precision(model, base_copy, cfg: Config, precision: Precision, log) -> None:
    """Put the weights in the dtypes `precision` asks for (the method already applied)."""
    if precision.name == "bf16":
        model.to(torch.bfloat16)  # weights, and so gradients and AdamW moments, in bf16
        if base_copy is not None:
            base_copy.to(torch.bfloat16)
    elif precision.autocast:
        # all but full/freeze save only their trainable weights: frozen ones can stay in the bf16 autocast uses
        if cfg.method not in ("full", "freeze"):
            n = cast_frozen_linears(model)
            log(f"bf16-mixed: {n:,} frozen linear weights stored in bf16 (autocast's cast, made once)")
        if base_copy is not None:  # the KL reference is never saved
            cast_frozen_linears(base_copy)


def _optimizer(model, cfg: Config) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # torch's fused AdamW (one kernel over all parameters) where it applies: on a CPU the default implementation
    # loops over the parameters in Python, ~10 small ops each: the demo's 420 LoRA matrices, 120 ms a step with the
    # default and 21 ms fused (a busy machine; the default was ~50 ms idle, ~10% of a bf16-mixed step); the same
    # update to 1.5e-8 (bench/RESULTS.md run 20). Sharded (FSDP2) parameters keep the default.
    fused = all(type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-8, betas=(0.9, 0.999), eps=1e-8, **kwargs)


def _clip(params: list[torch.Tensor], max_norm: float | None) -> float:
    if max_norm is None:
        norms = [p.grad.detach().norm() for p in params if p.grad is not None]
        return float(torch.stack(norms).norm()) if norms else 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def _resolved(cfg: Config, plan: TrainingPlan, max_length: int, precision: Precision) -> Config:
    """The config with every `auto` of training and data.max_length replaced by the value used (config.yaml)."""
    raw = cfg.model_dump(mode="json")
    raw["data"]["max_length"] = max_length
    raw["train"].update(
        precision=precision.name,
        epochs=plan.epochs,
        batch_size=plan.batch_size,
        micro_batch_size=plan.micro_batch_size,
        lr=plan.lr,
        warmup=plan.warmup_steps,
        eval_every=plan.eval_every,
        save_every=plan.save_every,
        batching=plan.batching,
        distributed=distributed.resolved(cfg),
    )
    raw["output"] = str(cfg.run_dir())
    return validate_config(raw, source="resolved config")


def _print_plan(plan: TrainingPlan, log) -> None:
    log(
        f"plan: {plan.total_steps} steps ({plan.epochs} epoch{'s' if plan.epochs > 1 else ''} x {plan.steps_per_epoch}), "
        f"batch {plan.batch_size} (micro {plan.micro_batch_size}), lr {plan.lr:g}, warmup {plan.warmup_steps}, "
        f"batching {plan.batching}"
    )
    for key, why in plan.reasons.items():
        log(f"  auto {key}: {why}")


def _starting_checkpoint(run_dir: Path, resume: bool, log) -> Path | None:
    """The checkpoint to continue from (None: step 0), after removing what a killed run left half-written.

    Checkpoints are renamed into place only when whole, so a run killed before its first one was whole left only
    config.yaml, data.json and a few logged steps: nothing to keep. Then --resume starts it over with its saved
    config and a fresh start may reuse the folder; both say so."""
    run = RunDir(run_dir)
    if not resume and run.holds_training:  # checked before cleaning: never touch a run we are told to leave
        raise _holds_a_run(run_dir)
    if not (run_dir / CONFIG).is_file():  # not a run (yet): nothing of ours to clean or to discard
        return None
    cleaned = run.clean_partial()
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None or run.has_model:  # training worth keeping
        if not resume:  # possible only when cleaning restored a folder that an interrupted rename had moved aside
            raise _holds_a_run(run_dir)
        if ckpt is None:
            raise RunError(
                f"{run_dir}: training has finished (model/ is there) and left no checkpoint; nothing to resume"
            )
        if cleaned:
            log(f"{run_dir}: {'; '.join(cleaned)}")
        return ckpt
    try:
        logged = sum(r.get("kind") == "train" for r in run.metrics)
    except ValueError:  # a line cut short by the kill; the count is only for the message
        logged = 0
    left = [f"{logged} logged step{'s' if logged != 1 else ''}"] if logged else []
    left += [c.removeprefix("removed the ") for c in cleaned]
    if (run_dir / "tensorboard").is_dir():
        shutil.rmtree(run_dir / "tensorboard")  # events of the discarded attempt
        left.append("its TensorBoard events")
    what = f" ({', '.join(left)})" if left else ""
    if resume:
        log(
            f"{run_dir}: no complete checkpoint to resume from: the run stopped before its first one was saved{what}. "
            "Starting it again from step 0 with its saved config."
        )
    else:
        log(f"{run_dir} held a run that stopped before its first checkpoint; discarding it{what} and starting afresh")
    return None


def _check_same_objective(run_dir: Path, cfg: Config) -> None:
    """A resumed run goes on with the objective it started with (data.json records it; config.yaml could be edited)."""
    started = RunDir(run_dir).objective
    if started != cfg.train.objective:
        raise RunError(
            f"{run_dir} was trained with train.objective {started} and its config.yaml now says "
            f"{cfg.train.objective}; a run cannot change objective half-way. Restore config.yaml, or start a new run "
            "with --output DIR"
        )


def _holds_a_run(run_dir: Path) -> RunError:
    return RunError(
        f"{run_dir} already holds a run. Continue it with: tunesmith train --resume {run_dir}\n"
        f"or write elsewhere with --output DIR (or delete {run_dir})"
    )


def _saved_config(run_dir: Path) -> Config:
    """The config a run to resume was trained with (its config.yaml)."""
    if not (run_dir / CONFIG).is_file():
        raise RunError(
            f"{run_dir}: not a run directory (no {CONFIG}); nothing to resume. Start the run without --resume"
        )
    return RunDir.open(run_dir).config


def _set_threads(threads: int | None) -> None:
    if threads is None:
        # processes started together on one machine (torchrun sets LOCAL_WORLD_SIZE) share its cores
        share = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        threads = int(os.environ.get("TUNESMITH_THREADS", 0)) or max(1, (os.cpu_count() or 1) // share)
    torch.set_num_threads(threads)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _StopFlag:
    """First Ctrl-C: finish the current step, checkpoint, exit cleanly. Second Ctrl-C: stop at once."""

    def __init__(self):
        self.requested = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step to save a checkpoint (Ctrl-C again to stop at once)", flush=True)

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
