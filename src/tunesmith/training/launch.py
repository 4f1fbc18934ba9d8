"""`tunesmith train ... --nproc N`: N local processes started by torch's own launcher (torch.distributed.run).

The launcher runs in this process: its elastic agent starts `python -m tunesmith train ARGS` N times with RANK,
WORLD_SIZE, MASTER_ADDR/PORT set (training/distributed.py joins the group), watches them, and when one dies stops
the others (SIGTERM, then SIGKILL after 30 s). What it reports is turned into one line here: which rank died and
how, or that the run was interrupted. On several machines torchrun is run by hand on each (README, "Scaling out");
it is the same agent.
"""

from __future__ import annotations

import logging
import os
import signal

from tunesmith.errors import ConfigError, Interrupted, TrainingError

# what a surviving rank exits with when a peer vanished (errors.PeerLost); the launcher looks past those
PEER_LOST_EXIT = 75


def check_nproc(nproc: int, log) -> None:
    """More processes than CUDA devices is an error; more than CPU cores a warning (each process then gets a share
    of a core, and gloo's collectives wait on the slowest)."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give at least 1 process")
    import torch

    if torch.cuda.is_available():
        devices = torch.cuda.device_count()
        if nproc > devices:
            raise ConfigError(
                f"--nproc {nproc} but this machine has {devices} CUDA device{'s' if devices != 1 else ''}; "
                f"give at most --nproc {devices} (one process per device)"
            )
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if nproc > cores:
        log(
            f"warning: --nproc {nproc} on {cores} CPU core{'s' if cores != 1 else ''}: the processes will share cores "
            "and run slower than fewer would; use at most one process per core (--train.threads 1 each)"
        )


def launch(nproc: int, argv: list[str], log=print) -> None:
    """Run `tunesmith ARGV` (a train command without --nproc) on `nproc` local processes; returns when all have
    finished; a rank's failure or a Ctrl-C becomes a TunesmithError naming the rank."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    check_nproc(nproc, log)
    # the agent logs each failure with a traceback-like record; the one line below says what happened instead
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # --standalone: a rendezvous on localhost with a free port; -m: run `python -m tunesmith ...` per rank
    args = parse_args(["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "-m", "tunesmith", *argv])
    # torchrun's default too, said here so it does not warn; training sets torch's thread count (train.threads,
    # else the cores shared out among the processes)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        run(args)
    except ChildFailedError as e:
        raise _failed(e) from None
    except SignalException as e:
        raise Interrupted(
            f"stopped by {signal.Signals(e.sigval).name}; each process saved a checkpoint at the same step if it "
            "could (see above)"
        ) from None


def _failed(error) -> Exception:
    """The rank that caused the stop and why, from torch's record of the failures."""
    failures = error.failures
    codes = {f.exitcode for f in failures.values()}
    # a rank that stopped on request (130) ends first; the agent then SIGTERMs the others, already past the checkpoint
    if Interrupted.exit_code in codes and codes <= {Interrupted.exit_code, -signal.SIGTERM, -signal.SIGINT}:
        return Interrupted("interrupted; every process saved the same checkpoint (see above)")
    followers = (-signal.SIGTERM, -signal.SIGINT, PEER_LOST_EXIT, Interrupted.exit_code)
    culprits = {r: f for r, f in failures.items() if f.exitcode not in followers} or failures
    rank = min(culprits)
    failure = culprits[rank]
    if failure.exitcode < 0:
        how = f"was killed by {signal.Signals(-failure.exitcode).name}"
    else:
        how = f"exited with code {failure.exitcode}"
    others = sorted(r for r in failures if r != rank)
    stopped = f"; the others ({', '.join(map(str, others))}) were stopped" if others else ""
    return TrainingError(
        f"rank {rank} (pid {failure.pid}) {how}{stopped}. The last complete checkpoint is intact: continue with "
        "tunesmith train --resume RUN_DIR [--nproc N]"
    )
