"""Training on several processes with torch.distributed: DDP for adapters, FSDP2 for full fine-tuning, DCP checkpoints.

A run launched by torchrun (`tunesmith train ... --nproc N`, or `torchrun ... -m tunesmith train ...` on several
machines; see training/launch.py) finds RANK / WORLD_SIZE / MASTER_ADDR in its environment, and `setup()` joins the
process group (gloo on CPU, nccl on CUDA). Everything else of the loop stays as in one process:

- each optimizer step still takes the `batch_size` examples that `step_indices` (a pure function of seed and epoch)
  gives it; rank r trains on its contiguous share of them (`share`), so the global batch is the configured
  batch_size whatever the number of processes, and the examples a step sees do not depend on it;
- the loss is normalised by the label tokens of the whole step, all-reduced (`sum`), and DDP / FSDP average the
  gradients over the ranks, so each rank scales its loss by the world size: N processes compute the gradient one
  process computes for the same step, to float32 rounding;
- every rank runs the same number of forward/backward passes per step (FSDP all-gathers in each forward): a rank
  with fewer micro-batches repeats its last one with weight 0 (`accumulate`); gradients are synchronised only in the
  last pass of a step (DDP `no_sync`, FSDP `set_requires_gradient_sync`);
- checkpoints are written with torch.distributed.checkpoint (DCP): each rank writes its shard, and DCP re-shards on
  load, so a run resumes with another number of processes; a one-process checkpoint (trainable.safetensors +
  optimizer.pt) loads into N processes and a DCP one into one process;
- only rank 0 logs, draws the progress bar, writes metrics.jsonl, config.yaml, data.json and the final model/ (the
  FSDP weights gathered to it first).

Validation runs the whole validation set on every rank (the same passes, so FSDP's collectives line up and every
rank takes the same early-stopping decision); it is not sped up by more processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from tunesmith.atomic import TMP, _fsync_dir, remove_dir
from tunesmith.errors import ConfigError, RunError, TrainingError, TunesmithError
from tunesmith.run_dir import CHECKPOINT_PREFIX, CHECKPOINTS

# How long a rank waits in one collective before giving up. A rank that dies closes its sockets, and gloo fails the
# others' next collective with "Connection closed by peer" (the test that kills a rank sees that message); this
# bounds the case of a rank that hangs without dying. The first step of a
# big model (loading, data encoding on every rank) must fit in it, hence minutes, not seconds.
TIMEOUT_S = int(os.environ.get("TUNESMITH_DIST_TIMEOUT", 600))

# Methods FSDP2 shards here: their trainable weights are the model's own (full) or a subset of them (freeze). The
# peft and bottleneck-adapter methods train a few MB of weights: replicating them (DDP) costs nothing and keeps
# peft's modules unsharded.
FSDP_METHODS = ("full", "freeze")

DCP_DIR = "dcp"  # checkpoints/step-N/dcp/: the DCP files (one per rank, and .metadata)
DIST_INFO = "distributed.json"  # checkpoints/step-N/distributed.json: world size and strategy that wrote it


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets the torch.distributed env)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    return int(os.environ.get("RANK", 0))


@dataclass
class Dist:
    """This process's place in the run; the one-process default does nothing (every helper is then a no-op)."""

    rank: int = 0
    world_size: int = 1
    strategy: str = "none"  # none (one process) | ddp | fsdp
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.strategy != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- agreeing on values -----------------------------------------------------------------------------------
    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64, so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t.tolist()

    def max(self, value: int) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (a stop request, a non-finite loss)."""
        return bool(self.max(int(flag)))

    def from_main(self, compute):
        """`compute()` run on rank 0 only, its result (or its TunesmithError) handed to every rank."""
        if not self.enabled:
            return compute()
        box: list = [None]
        if self.is_main:
            try:
                box[0] = ("ok", compute())
            except TunesmithError as e:
                box[0] = ("error", e)
        torch.distributed.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            value.all_ranks = True  # every rank raises it; cli.main prints it once (rank 0)
            raise value
        return value

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    # ---- the data of a step -----------------------------------------------------------------------------------
    def share(self, indices: list[int]) -> tuple[list[int], float]:
        """This rank's contiguous share of a step's examples and its weight (0.0: the rank has no example of this
        step, a short last step, and trains on the step's first example with weight 0 to keep pace)."""
        if not self.enabled:
            return indices, 1.0
        n, k = len(indices), self.world_size
        start, end = self.rank * n // k, (self.rank + 1) * n // k
        if start == end:
            return indices[:1], 0.0
        return indices[start:end], 1.0

    def accumulate(self, model, batches: list, weight: float = 1.0):
        """(batch, weight) for each forward/backward pass of a step; gradients synchronise only in the last.

        Every rank makes as many passes as the rank with the most micro-batches: the extra ones repeat the last
        batch with weight 0 (FSDP all-gathers in every forward, DDP all-reduces in the last backward)."""
        if not self.enabled:
            for b in batches:
                yield b, weight
            return
        passes = self.max(len(batches))
        plan = [(b, weight) for b in batches] + [(batches[-1], 0.0)] * (passes - len(batches))
        for i, item in enumerate(plan):
            last = i == passes - 1
            if self.strategy == "fsdp":
                model.set_requires_gradient_sync(last)
                yield item
            else:
                with nullcontext() if last else model.no_sync():
                    yield item

    @property
    def grad_scale(self) -> float:
        """DDP and FSDP average gradients over the ranks; the step's loss is a sum over them."""
        return float(self.world_size) if self.enabled else 1.0

    def clip(self, params: list[torch.Tensor], max_norm: float | None) -> float:
        """The global gradient norm (clipped to max_norm as torch.nn.utils.clip_grad_norm_ does)."""
        from torch.distributed.tensor import DTensor

        local, replicated = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for p in params:
            if p.grad is None:
                continue
            g = p.grad
            if isinstance(g, DTensor):  # FSDP: each rank holds a shard; the squares add up over ranks
                local += g.to_local().detach().double().pow(2).sum()
            else:  # DDP: every rank holds the whole, synchronised gradient
                replicated += g.detach().double().pow(2).sum()
        if self.strategy == "fsdp":
            torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.SUM)
        norm = float((local + replicated).sqrt())
        if max_norm is not None:
            coef = min(max_norm / (norm + 1e-6), 1.0)
            if coef < 1.0:
                for p in params:
                    if p.grad is not None:
                        p.grad.detach().mul_(coef)
        return norm


def setup(cfg, device_setting: str) -> Dist:
    """Join the process group when launched by torchrun; a one-process Dist otherwise."""
    check(cfg)  # a bad combination fails in one process too, before anything is loaded
    if not launched():
        return Dist()
    import torch.distributed as dist

    world, rank, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available() and device_setting in ("auto", "cuda"):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=TIMEOUT_S), device_id=None)
    return Dist(rank=rank, world_size=world, strategy=strategy(cfg, world), device=device)


def strategy(cfg, world_size: int) -> str:
    """ddp or fsdp for `cfg` (train.distributed; auto: fsdp for full fine-tuning, ddp for the rest); "none" for one
    process. A combination that cannot work is a ConfigError naming the alternative."""
    check(cfg)
    return resolved(cfg) if world_size > 1 else "none"


def resolved(cfg) -> str:
    """train.distributed with auto replaced: fsdp for full fine-tuning, ddp for the rest (config.yaml's value)."""
    if cfg.train.distributed != "auto":
        return cfg.train.distributed
    return "fsdp" if cfg.method == "full" else "ddp"


def check(cfg) -> None:
    """What cannot run on several processes, said before anything is loaded."""
    if cfg.train.distributed == "fsdp" and cfg.method not in FSDP_METHODS:
        raise ConfigError(
            f"train.distributed fsdp shards the model's own weights (methods {', '.join(FSDP_METHODS)}); method "
            f"{cfg.method} trains small adapter weights that are replicated instead: use train.distributed ddp "
            "(or auto)"
        )
    if not launched() or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return
    if cfg.train.objective != "sft":
        raise ConfigError(
            f"train.objective {cfg.train.objective} trains in one process only for now (its reference pass and "
            "pair statistics are not shared between processes); run it without --nproc / torchrun"
        )
    if cfg.train.kl_to_base:
        raise ConfigError(
            "train.kl_to_base trains in one process only for now (its frozen base copy is not sharded); "
            "set train.kl_to_base to 0 or run without --nproc / torchrun"
        )


def wrap(model: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """The model to train on this rank: DDP around it, or FSDP2 applied to it in place (each decoder layer, then
    the root, so only one layer's full weights exist at a time); unchanged in one process."""
    if dist.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # no buffer sync per forward: the only buffers are the rotary frequencies, equal on every rank (DDP checks
        # them once at construction)
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
    if dist.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # explicit mesh: on CPU the default would be looked up from the CUDA device
        mesh = init_device_mesh(dist.device.type, (dist.world_size,))
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module DDP wraps (FSDP2 changes the model in place: it is its own module)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers causal LM (model.model.layers for Llama, Gemma, Qwen, ...)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers") and len(module) > 0:
            return list(module)
    raise ConfigError(
        f"train.distributed fsdp: no decoder layers found in {type(model).__name__} (no `layers` ModuleList); "
        "use train.distributed ddp"
    )


# ----------------------------------------------------------------------------------------------------
# Checkpoints (torch.distributed.checkpoint)


def _options(method: str, **more):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen weights are the base model's, read again from it on resume: only the trained ones are saved (and
    # loading is not strict, the frozen ones being absent; _check_loaded checks the trained ones all came back)
    return StateDictOptions(ignore_frozen_params=method != "full", strict=False, **more)


def _check_loaded(module, result, path: Path) -> None:
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    missing = sorted(k for k in result.missing_keys if k in trained)
    if missing:
        raise RunError(
            f"{path}: {len(missing)} trained weights of this run are not in the checkpoint (first: {missing[0]}); "
            "was it written with another method or model?"
        )


def save_checkpoint(run_dir: Path, model, optimizer, state, keep: int, dist: Dist, method: str) -> Path:
    """checkpoints/step-N/ with dcp/ (every rank's shard), state.json, rng/ and distributed.json, renamed into place
    by rank 0 once every rank has written (the same atomicity as one-process checkpoints)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from tunesmith.training.checkpoint import kill_point, prune

    target = Path(run_dir) / CHECKPOINTS / f"{CHECKPOINT_PREFIX}{state.step}"
    name = f"checkpoint-{state.step}"
    # rank 0 names the hidden folder; every rank writes into it (one filesystem shared by the ranks)
    tmp = Path(dist.from_main(lambda: tempfile.mkdtemp(prefix=f".{target.name}{TMP}", dir=_mkdir(target.parent))))
    try:
        model_sd, optim_sd = get_state_dict(unwrap(model), optimizer, options=_options(method))
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / DCP_DIR)
        kill_point(f"{name}-mid-write")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        from safetensors.torch import save_file

        (tmp / "rng").mkdir(exist_ok=True)
        save_file(rng, tmp / "rng" / f"rank-{dist.rank}.safetensors")
        dist.barrier()
        if dist.is_main:
            (tmp / "state.json").write_text(json.dumps(state.to_dict(), indent=2))
            info = {"world_size": dist.world_size, "strategy": dist.strategy, "method": method}
            (tmp / DIST_INFO).write_text(json.dumps(info, indent=2))
            _sync_tree(tmp)
            kill_point(f"{name}-before-rename")
            if target.exists():
                remove_dir(target)
            os.rename(tmp, target)
            _fsync_dir(target.parent)
            kill_point(f"{name}-after-rename")
            prune(run_dir, keep)
    except BaseException:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return target


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sync_tree(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def is_sharded(path: Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def checkpoint_info(path: Path) -> dict:
    """distributed.json of a DCP checkpoint; a one-process checkpoint is world size 1."""
    info = Path(path) / DIST_INFO
    return json.loads(info.read_text()) if info.is_file() else {"world_size": 1, "strategy": "none"}


def load_checkpoint(path: Path, model, optimizer, dist: Dist, method: str, log):
    """Restore a checkpoint of any world size into this run's (wrapped) model and optimizer; its LoopState."""
    from safetensors.torch import load_file

    from tunesmith.training.checkpoint import LoopState

    path = Path(path)
    info = checkpoint_info(path)
    if info.get("method", method) != method:
        raise RunError(f"{path} holds weights of method {info['method']}, this run trains {method}; cannot resume")
    if is_sharded(path):
        _load_dcp(path, model, optimizer, method)
    else:
        _load_full(path, model, optimizer, method, dist)
    if info["world_size"] != dist.world_size:
        log(
            f"resuming a checkpoint written by {info['world_size']} process{'es' if info['world_size'] != 1 else ''} "
            f"on {dist.world_size}: weights and optimizer state re-sharded; the data order is the same"
        )
    rng_dir = path / "rng"
    own = rng_dir / f"rank-{dist.rank}.safetensors"
    rng_file = own if own.is_file() else rng_dir / "rank-0.safetensors"
    if not rng_file.is_file():
        rng_file = path / "rng.safetensors"  # a one-process checkpoint
    rng = load_file(rng_file)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return LoopState.from_dict(json.loads((path / "state.json").read_text()))


def _load_dcp(path: Path, model, optimizer, method: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    module = unwrap(model)
    options = _options(method)
    model_sd, optim_sd = get_state_dict(module, optimizer, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():  # one process: DCP says it loads without a process group, which is the intent
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=path / DCP_DIR)  # into the templates, re-sharded to this world size
    result = set_state_dict(
        module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options
    )
    _check_loaded(module, result, path)


def _load_full(path: Path, model, optimizer, method: str, dist: Dist) -> None:
    """A one-process checkpoint: the whole trainable state on every rank, then sharded (FSDP) or copied (DDP)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_state_dict

    module = unwrap(model)
    trainable = load_file(path / "trainable.safetensors")
    optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    if not dist.enabled:
        from tunesmith import methods

        methods.load_trainable_state_dict(module, trainable)
        optimizer.load_state_dict(optim)
        return
    # optimizer.pt is keyed by position in the optimizer's parameter list; DCP's helpers want parameter names
    names = {id(p): n for n, p in module.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    optim_fqn = {
        "state": {order[i]: s for i, s in optim["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in optim["param_groups"]],
    }
    model_sd = _trainable_names(module, trainable)
    options = _options(method, full_state_dict=True)
    result = set_state_dict(module, optimizer, model_state_dict=model_sd, optim_state_dict=optim_fqn, options=options)
    _check_loaded(module, result, path)


def _trainable_names(module, trainable: dict) -> dict:
    """trainable.safetensors (keyed by parameter name, methods.trainable_state_dict) checked against the module."""
    params = {n for n, p in module.named_parameters() if p.requires_grad}
    if set(trainable) != params:
        raise RunError(
            f"the checkpoint's {len(trainable)} trainable weights do not match this run's {len(params)}: was it "
            "written with another method or model? Restore the run's config.yaml"
        )
    return dict(trainable)


# ----------------------------------------------------------------------------------------------------
# The final model, gathered


def full_state_dict(model, dist: Dist) -> dict | None:
    """FSDP: the whole model's weights gathered on rank 0 (on the CPU; None on the other ranks). A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main:
        return None
    # tied weights (lm_head = embed_tokens) come under both names; a transformers model dir stores them once
    kept = {n for n, _ in model.named_parameters()}
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - kept
    return {k: v for k, v in sd.items() if k not in tied}


class NoMetrics:
    """The metrics logger of ranks other than 0: metrics.jsonl has one writer."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------
# Stopping together


class StopFlag:
    """Ctrl-C or SIGTERM on any rank: every rank finishes the step, checkpoints and exits 130 (the loop agrees on the
    flag at each step boundary with `Dist.any`). torchrun forwards the signal it gets to the workers, so a terminal's
    Ctrl-C arrives twice; a second signal within GRACE_S counts as the same request."""

    GRACE_S = 3.0

    def __init__(self, announce: bool):
        self.requested = False
        self._at = 0.0
        self._announce = announce
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.requested and now - self._at > self.GRACE_S:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self._at = True, now
            if self._announce:
                print("\nstopping every process after this step to save a checkpoint", flush=True)

    def restore(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class PeerLost(TrainingError):
    """A collective failed on this rank because another one died or hung (training/launch.py names that one)."""

    exit_code = 75  # launch.PEER_LOST_EXIT


def lost_peer(error: Exception, dist: Dist) -> TrainingError:
    """A collective failed: another rank died or hung. One line instead of gloo's traceback."""
    detail = (str(error).splitlines() or ["no detail"])[0].split(". This is typically")[0]
    return PeerLost(
        f"rank {dist.rank} lost contact with the other processes ({type(error).__name__}: {detail}); another rank "
        "has died or hung. "
        "The last complete checkpoint is intact: continue with tunesmith train --resume RUN_DIR"
    )


# ----------------------------------------------------------------------------------------------------
# Memory estimate (tunesmith train --dry-run)


@dataclass
class MemoryEstimate:
    weights: int
    grads: int
    optimizer: int
    activations: int
    gathered: int  # FSDP: the root's weights and one decoder layer's, all-gathered while they run; 0 otherwise

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.gathered


def estimate_memory(model, strategy_name: str, world: int, weight_bytes: int, act_bytes: int) -> MemoryEstimate:
    """Per-process bytes of a plan: weights, gradients and AdamW's two moments (fp32) of the trainable weights, the
    activations of one micro-batch (`act_bytes`, from training/auto.py's per-token figure), and for FSDP the weights
    all-gathered at once (the root's and one layer's). FSDP divides weights, gradients and optimizer state by the world size; DDP replicates them."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shards = world if strategy_name == "fsdp" else 1
    gathered = 0
    if strategy_name == "fsdp":
        # the root's own weights (embeddings, final norm; the head when untied) are gathered for the whole forward,
        # each decoder layer's while it runs (backward: the same, in reverse)
        sizes = [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)]
        gathered = (total - sum(sizes) + max(sizes)) * weight_bytes
    return MemoryEstimate(
        weights=total * weight_bytes // shards,
        grads=trainable * weight_bytes // shards,
        optimizer=trainable * 8 // shards,
        activations=act_bytes,
        gathered=gathered,
    )


# diagnostics (bench/fsdp_memory.py): log what each process holds after its first step, and its peak RSS at the end
REPORT_MEMORY = os.environ.get("TUNESMITH_REPORT_MEMORY") == "1"


def report_memory(model, optimizer, dist: Dist, when: str) -> None:
    """Printed by rank 0, one line per rank: the weights, gradients and optimizer state it holds, its resident
    memory now and its peak so far (diagnostics, printed whatever --quiet says)."""
    import resource

    mine = local_state_bytes(model, optimizer) if optimizer is not None else {}
    with open("/proc/self/statm") as fh:  # Linux; resident pages are the second field
        mine["rss"] = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    mine["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    every = [None] * dist.world_size
    if dist.enabled:
        torch.distributed.all_gather_object(every, mine)
    else:
        every = [mine]
    if dist.is_main:
        for rank, got in enumerate(every):
            values = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in got.items())
            print(f"memory {when}, rank {rank}: {values}", flush=True)


def local_state_bytes(model, optimizer) -> dict:
    """What this process holds of weights, gradients and optimizer state (its shards under FSDP), in bytes."""
    from torch.distributed.tensor import DTensor

    def nbytes(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    optim = sum(nbytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    return {
        "weights": sum(nbytes(p) for p in params),
        "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
        "optimizer": optim,
    }
