"""DPO training speed: tunesmith against TRL's DPOTrainer on the same preference pairs, in one invocation.

    make bench-venv                                       # once: .venv-bench with TRL (the project's venv stays clean)
    .venv/bin/python bench/dpo_speed.py                   # defaults: 6 steps x 2 repeats (~10 min on 2 cores)
    .venv/bin/python bench/dpo_speed.py --steps 10 --repeats 3 --pairs data.jsonl --json out.json

Every measured run is its own subprocess (so its peak RSS, `ru_maxrss`, is its own, model load included), and the
two sides are interleaved: TRL, tunesmith, TRL, tunesmith, ... so load that comes and goes on a shared machine hits
both alike. The TRL side runs under .venv-bench's python (`make bench-venv`: the same torch, transformers and peft as
the project, plus trl), the tunesmith side under this script's python.

What is held identical (shared/BENCHMARKING.md):
- model and tokenizer (the same local directory), fp32, the same number of torch threads, no gradient
  checkpointing, no evaluation, no checkpoint saving during the measured steps;
- the pairs and their order: plain {"prompt", "chosen", "rejected"} text rows; a chat prompt is rendered to text
  once, here, with the model's chat template and generation prompt (tunesmith's Renderer; with --system-prompt
  auto, the data card's system prompt, as recipes/safety-dpo.yaml gives it), so both tools get the same raw text
  (default pairs: data/safety-preferences/train.jsonl, else pairs built from data/ticket-triage). tunesmith
  shuffles with its seeded epoch order; TRL gets the pairs already in that order and trains with a sequential
  sampler, so every step holds the same 8 pairs on both sides;
- the token ids: tunesmith's plain-pair encoding ([BOS if the tokenizer adds one] + tokens(prompt) +
  tokens(answer) + [EOS], loss on answer + EOS). TRL tokenizes prompt + answer + eos text itself; its ids are
  checked against these for every pair, and replaced by them if any differ (the script says so);
- LoRA r=16, alpha=32, dropout 0 on every linear layer but the LM head, and its initial weights: one adapter is
  made here (peft after a fixed seed, then the B matrices set to small seeded random values so the policy is not
  the reference: with B = 0 the first loss would be log 2 whatever the code does) and loaded into both sides,
  every LoRA tensor matched by name;
- DPO: sigmoid loss, beta 0.1, the reference = the model without the adapter, its log-probs precomputed before
  training (TRL's precompute_ref_log_probs=True; tunesmith always does), timed apart from the steps;
- the optimizer step: batch 8 pairs (no accumulation), AdamW (torch; betas 0.9/0.999, eps 1e-8, no weight decay),
  the same constant learning rate without warmup, gradient clipping at 1.0.

Useful tokens of a step: for each of its pairs, len(prompt) + len(chosen) + len(prompt) + len(rejected) in the ids
above (the two sequences a user asked to train on; no padding; a prompt counted twice even where a tool encodes it
once). Per-step useful tokens/s are taken from step 2 on (step 1 is warm-up) and their median is the run's figure;
the table shows the median over repeats. The first-step loss is on identical weights and data, so the two must
agree (relative difference <= 1e-4 in fp32); the reference log-probs of every pair are compared too.

What each tool does with the same work, from their code (trl 1.16.0): TRL feeds prompt+chosen and prompt+rejected
as 2B padded rows; its fused LM head (trl/trainer/utils.py add_fused_lm_head) scores only the labelled positions
with a Triton kernel on CUDA/XPU, but on a CPU it runs the LM head, log-softmax, entropy and top-1 statistics in
torch ops over every position, prompt and padding included. tunesmith feeds each prompt once with both answers on
it (data/pairs.py), packed, and runs the LM head only where an answer token is predicted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEED = 42
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
B_INIT_STD = 0.01
SIDES = ("trl", "ts", "ts-noseg")
NAMES = {"trl": "TRL DPOTrainer", "ts": "tunesmith", "ts-noseg": "ts, row attn"}
# what the ticket-triage fallback pairs answer with: a label, then a sentence, so answers are several tokens long
LABEL_SENTENCES = {
    "billing": "The ticket is about charges, invoices, refunds or the subscription price.",
    "technical": "The ticket is about a product feature, an integration or an error that needs engineering help.",
    "account": "The ticket is about logging in, the profile, permissions or the account's settings.",
    "shipping": "The ticket is about a delivery, its tracking, the address or a parcel that went missing.",
    "other": "The ticket does not fit billing, technical, account or shipping, so it goes to the general queue.",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--pairs",
        help="preference pairs (.jsonl: plain prompt/chosen/rejected or chat form); default: "
        "data/safety-preferences/train.jsonl when present, else pairs built from data/ticket-triage",
    )
    parser.add_argument(
        "--system-prompt",
        default="auto",
        help="system message for chat prompts that have none: auto (the data card's, as the recipe gives it), none, "
        "or the text",
    )
    parser.add_argument(
        "--n-pairs", type=int, help="pairs used, the first N of the file (default: steps x batch, each trained once)"
    )
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (no accumulation)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (step 1 is warm-up)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-5, help="constant learning rate, both sides")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ts-micro-batch", default="auto", help="tunesmith's train.micro_batch_size (auto or N)")
    parser.add_argument(
        "--trl-python",
        default=os.environ.get("TRL_PYTHON", str(ROOT / ".venv-bench" / "bin" / "python")),
        help="python of the venv with trl (make bench-venv)",
    )
    parser.add_argument(
        "--sides", default="trl,ts", help="which sides to run (trl, ts, ts-noseg: tunesmith without segment attention)"
    )
    parser.add_argument("--json", default=str(ROOT / "bench" / "dpo_speed.json"), help="where to write every number")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n_pairs is None:
        args.n_pairs = args.steps * args.batch
    if args.worker:
        worker = {
            "prep": _prepare,
            "trl": _trl_run,
            "ts": _tunesmith_run,
            "ts-noseg": lambda a, w: _tunesmith_run(a, w, segment_attention=False),
        }[args.worker]
        result = worker(args, Path(args.workdir))
        result["peak_rss_mb"] = _peak_rss_mb()
        print("RESULT " + json.dumps(result), flush=True)
        return

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if unknown := [s for s in sides if s not in SIDES]:
        sys.exit(f"error: unknown side(s) {', '.join(unknown)}; choose from {', '.join(SIDES)}")
    if args.steps * args.batch > args.n_pairs:
        sys.exit(f"error: {args.steps} steps x {args.batch} pairs need --n-pairs >= {args.steps * args.batch}")
    if "trl" in sides and not Path(args.trl_python).exists():
        sys.exit(f"error: {args.trl_python} not found: run `make bench-venv` first (or pass --trl-python)")
    print(f"load average before: {_load()}", flush=True)
    ceiling = matmul_gflops(args.threads)
    print(f"CPU: {cpu_name()}; {args.threads} threads; fp32 2048x2048 matmul {ceiling:.1f} GFLOP/s", flush=True)
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="tunesmith-dpobench-") as tmp:
        work = Path(tmp)
        prep = spawn("prep", args, work, work)
        print(
            f"pairs: {prep['n_pairs']} from {prep['source']}; steps use {prep['step_useful_tokens']} useful tokens; "
            f"initial adapter: {prep['adapter_tensors']} LoRA tensors, B ~ N(0, {B_INIT_STD}) (seed {SEED})",
            flush=True,
        )
        print(f"system prompt for chat prompts without one: {prep['system_prompt']!r}")
        _print_ids("reference encoding (tunesmith's plain-pair layout)", prep["pair0"])
        for rep in range(args.repeats):
            for side in sides:
                result = spawn(side, args, work, work / f"{side}-{rep}")
                runs[side].append(result)
                print(
                    f"repeat {rep + 1} {side:<4} {result['tokens_per_s']:7.1f} useful tok/s  "
                    f"peak RSS {result['peak_rss_mb']:6.0f} MB  first loss {result['first_loss']:.6f}  "
                    f"ref precompute {result['precompute_s']:.1f} s  ({result['wall_s']:.0f} s)",
                    flush=True,
                )
                if rep == 0:
                    _report_tokens(side, result, prep)
    ceiling_after = matmul_gflops(args.threads)
    print(f"fp32 matmul again at the end: {ceiling_after:.1f} GFLOP/s; load average after: {_load()}", flush=True)
    summary = print_table(runs, args)
    out = {
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "workdir")},
        "cpu": cpu_name(),
        "matmul_gflops": [ceiling, ceiling_after],
        "versions": {s: runs[s][0]["versions"] for s in sides if runs[s]},
        "prep": {k: v for k, v in prep.items() if k != "pair0"},
        "summary": summary,
        "runs": runs,
    }
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


# ----------------------------------------------------------------------------------------------------
# The parent: spawn, check, summarise, print


def spawn(worker: str, args, work: Path, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    python = args.trl_python if worker == "trl" else sys.executable
    cmd = [python, __file__, "--worker", worker, "--workdir", str(work if worker == "prep" else workdir)]
    keys = ("model", "pairs", "n_pairs", "batch", "steps", "lr", "beta", "threads", "ts_micro_batch", "system_prompt")
    for key in keys:
        if getattr(args, key) is not None:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env |= {"HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "BENCH_WORK": str(work)}
    if worker == "trl":
        env.pop("PYTHONPATH", None)  # the TRL side imports nothing of tunesmith
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(
            f"error: the {worker} run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    result = json.loads(lines[-1][len("RESULT ") :])
    result["wall_s"] = time.perf_counter() - t0
    return result


def _print_ids(what: str, ids: dict) -> None:
    print(f"{what}, pair 0 (the first of step 1):")
    for key in ("prompt", "chosen", "rejected"):
        print(f"  {key:<8} ({len(ids[key])}) {ids[key]}")


def _report_tokens(side: str, result: dict, prep: dict) -> None:
    """Pair 0's ids as the side saw them, whether every pair's ids match the reference encoding, the step order."""
    if "pair0" in result:
        _print_ids(f"{NAMES[side]} ids", result["pair0"])
    same0 = result.get("pair0") == prep["pair0"]
    print(f"{NAMES[side]}: pair 0 ids identical to the reference encoding: {same0}; {result.get('token_note', '')}")
    if "micro_batch_size" in result:
        print(f"{NAMES[side]}: micro-batch {result['micro_batch_size']} pairs, batching {result['batching']}")
    if result.get("step_useful_tokens") is not None:
        ok = result["step_useful_tokens"] == prep["step_useful_tokens"][: len(result["step_useful_tokens"])]
        print(f"{NAMES[side]}: useful tokens of every step as expected: {ok}")
    if result.get("step_pairs") is not None:
        order, batch = prep["order"], len(result["step_pairs"][0])
        expected = [order[s * batch : (s + 1) * batch] for s in range(len(result["step_pairs"]))]
        print(
            f"{NAMES[side]}: every step held the expected pairs in the expected order: {result['step_pairs'] == expected}"
        )


def print_table(runs: dict[str, list[dict]], args) -> dict:
    def med(side, key):
        return statistics.median(r[key] for r in runs[side])

    print()
    print(
        f"{'side':<15} {'runs':>4} {'useful tok/s':>12} {'vs TRL':>6} {'peak RSS MB':>11} {'vs TRL':>6} "
        f"{'RSS to ref MB':>13} {'first loss':>11} {'ref precompute s':>16} {'step s':>7}"
    )
    summary: dict = {}
    for side, rs in runs.items():
        if not rs:
            continue
        tps, rss = med(side, "tokens_per_s"), med(side, "peak_rss_mb")
        base = runs.get("trl")
        ratio_tps = tps / med("trl", "tokens_per_s") if base else None
        ratio_rss = rss / med("trl", "peak_rss_mb") if base else None
        step_s = statistics.median(t for r in rs for t in r["step_times"][1:] or r["step_times"])
        summary[side] = {
            "tokens_per_s": tps,
            "peak_rss_mb": rss,
            "tokens_per_s_vs_trl": ratio_tps,
            "peak_rss_vs_trl": ratio_rss,
            "peak_rss_after_ref_mb": med(side, "peak_rss_after_ref_mb"),
            "first_loss": rs[0]["first_loss"],
            "precompute_s": med(side, "precompute_s"),
            "step_s": step_s,
        }
        row = summary[side]
        print(
            f"{NAMES[side]:<15} {len(rs):>4} {tps:>12.1f} {_x(ratio_tps):>6} {rss:>11.0f} {_x(ratio_rss):>6} "
            f"{row['peak_rss_after_ref_mb']:>13.0f} {row['first_loss']:>11.6f} {row['precompute_s']:>16.1f} "
            f"{step_s:>7.2f}"
        )
    print(
        "(peak RSS: the whole run, model load included; RSS to ref: the peak until the reference log-probs were done; "
        "step s: median step time from step 2)"
    )
    if runs.get("trl") and runs.get("ts"):
        ref_a, ref_b = runs["trl"][0]["ref_logps"], runs["ts"][0]["ref_logps"]
        diff = max(abs(x - y) for ra, rb in zip(ref_a, ref_b) for x, y in zip(ra, rb))
        summary["ref_logps_max_abs_diff"] = diff
        print(f"reference log-probs (summed over each answer), {len(ref_a)} pairs: largest difference {diff:.2e}")
        a, b = runs["trl"][0]["first_loss"], runs["ts"][0]["first_loss"]
        rel = abs(a - b) / abs(a)
        summary["first_loss_rel_diff"] = rel
        print(f"first-step loss: TRL {a:.8f}, tunesmith {b:.8f}, relative difference {rel:.2e} (required <= 1e-4)")
        tps, rss = summary["ts"]["tokens_per_s_vs_trl"], summary["ts"]["peak_rss_vs_trl"]
        print(
            f"target (issue #16): >= 1.5x TRL's useful tok/s at <= 0.8x its peak RSS: {tps:.2f}x, {rss:.2f}x "
            f"({'met' if tps >= 1.5 and rss <= 0.8 else 'not met'})"
        )
    return summary


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    import platform

    return platform.processor() or "unknown CPU"


def matmul_gflops(threads: int, n: int = 2048, reps: int = 5) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


# ----------------------------------------------------------------------------------------------------
# Preparation (this script's python, with tunesmith): the pairs, their ids and order, the initial adapter


def _prepare(args, work: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.config import validate_config
    from tunesmith.data.batching import epoch_order
    from tunesmith.data.example import Example
    from tunesmith.data.templates import IGNORE, Renderer

    torch.set_num_threads(args.threads)
    model_path = _model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    cfg = validate_config({"model": {"name": args.model}})
    system_prompt = _system_prompt(args)
    renderer = Renderer(tokenizer, cfg.model.chat_template, system_prompt)
    pairs, source = _load_pairs(args, renderer)
    if len(pairs) < args.n_pairs:
        raise SystemExit(f"{source} has {len(pairs)} pairs; {args.n_pairs} asked for")
    pairs = pairs[: args.n_pairs]

    encoded = []
    for p in pairs:  # tunesmith's encoding of a plain pair: prompt, then each answer + EOS, every answer token trained
        e = renderer.encode_pair(Example(kind="preference", **p), truncation="error")
        if any(t == IGNORE for t in e.chosen_labels + e.rejected_labels):
            raise SystemExit("an answer token is not trained in tunesmith's encoding; the layouts would differ")
        encoded.append({"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected})
    order = epoch_order(len(pairs), SEED, 0)  # tunesmith's order for epoch 0 (data/batching.py)
    useful = [_useful(e) for e in encoded]
    step_useful = [sum(useful[i] for i in order[s * args.batch : (s + 1) * args.batch]) for s in range(args.steps)]

    with open(work / "pairs.jsonl", "w") as f:  # tunesmith reads these, in file order, and shuffles them itself
        for p in pairs:
            f.write(json.dumps({"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}) + "\n")
    with open(work / "pairs-ordered.jsonl", "w") as f:  # TRL reads these in step order, with the reference ids
        for i in order:
            f.write(json.dumps({"index": i, **pairs[i], "ids": encoded[i]}) + "\n")

    # The initial adapter: peft's LoRA after a fixed seed, then B ~ N(0, std) from its own seeded generator
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    torch.manual_seed(SEED)
    model = get_peft_model(model, _lora_config(LoraConfig))
    gen = torch.Generator().manual_seed(SEED + 1)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * B_INIT_STD)
            n += "lora_" in name
    model.save_pretrained(str(work / "init-adapter"))
    prep = {
        "model_path": str(model_path),
        "source": source,
        "n_pairs": len(pairs),
        "order": order,
        "step_useful_tokens": step_useful,
        "adapter_tensors": n,
        "pair0": encoded[order[0]],  # the first pair of step 1
        "system_prompt": system_prompt,
        "adds_bos": renderer.adds_bos,
        "eos_token_id": tokenizer.eos_token_id,
    }
    (work / "prep.json").write_text(json.dumps(prep))
    return prep


def _useful(ids: dict) -> int:
    return 2 * len(ids["prompt"]) + len(ids["chosen"]) + len(ids["rejected"])


def _model_dir(name: str) -> Path:
    """The model's local directory; a built-in that is not in the cache is an error here, never a download."""
    from tunesmith.models.cache import builtin_dir, is_complete
    from tunesmith.models.registry import BUILTINS

    if name in BUILTINS:
        path = builtin_dir(name)
        if not is_complete(path):
            raise SystemExit(f"{name} is not in the cache ({path}); run `tunesmith models pull {name}` first")
        return path
    return Path(name).expanduser()


def _lora_config(cls):
    """tunesmith's LoRA as peft sees it (methods/peft_methods._lora_config with lora.target all-linear)."""
    return cls(
        task_type="CAUSAL_LM",
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
    )


def _default_pairs_file() -> Path | None:
    path = ROOT / "data" / "safety-preferences" / "train.jsonl"
    return path if path.exists() else None


def _system_prompt(args) -> str | None:
    """--system-prompt: none, literal text, or auto: the data card's (a ```-fenced block under "## System prompt" in
    the README.md beside the pairs file, as data/safety-preferences has and recipes give as data.system_prompt)."""
    if args.system_prompt == "none":
        return None
    if args.system_prompt != "auto":
        return args.system_prompt
    path = Path(args.pairs) if args.pairs else _default_pairs_file()
    card = path.parent / "README.md" if path is not None else None
    if card is None or not card.exists():
        return None
    text = card.read_text()
    if "## System prompt" not in text:
        return None
    block = text.split("## System prompt", 1)[1].split("```")
    return block[1].strip() if len(block) > 2 else None


def _load_pairs(args, renderer) -> tuple[list[dict], str]:
    """Plain {"prompt", "chosen", "rejected"} text pairs. A chat prompt (`messages`, or `prompt` as a list of turns)
    is rendered with the chat template and its generation prompt; an answer may be a string, an assistant message
    or a list holding one."""
    path = Path(args.pairs) if args.pairs else _default_pairs_file()
    if path is None:
        return _ticket_pairs(renderer), "data/ticket-triage/train.jsonl (built pairs)"
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        turns = row.get("messages", row.get("prompt"))
        if isinstance(turns, str):
            prompt = turns
        elif isinstance(turns, list):
            prompt = renderer.prompt_text(turns, add_generation_prompt=True)
        else:
            raise SystemExit(f"{path}:{n}: no prompt (a `prompt` string or chat `messages`)")
        pairs.append({"prompt": prompt, "chosen": _answer(row, "chosen"), "rejected": _answer(row, "rejected")})
    return pairs, str(path)


def _answer(row: dict, key: str) -> str:
    value = row[key]
    if isinstance(value, list):
        (value,) = value
    return value["content"] if isinstance(value, dict) else value


def _ticket_pairs(renderer) -> list[dict]:
    """A ticket rendered as a chat prompt; chosen: its label and a sentence, rejected: another label and its sentence."""
    import random

    rng = random.Random(SEED)
    labels = list(LABEL_SENTENCES)
    pairs = []
    for line in (ROOT / "data" / "ticket-triage" / "train.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        label = messages[-1]["content"].strip()
        wrong = rng.choice([x for x in labels if x != label])
        pairs.append(
            {
                "prompt": renderer.prompt_text(messages[:-1], add_generation_prompt=True),
                "chosen": f"{label}. {LABEL_SENTENCES.get(label, '')}".strip(),
                "rejected": f"{wrong}. {LABEL_SENTENCES[wrong]}",
            }
        )
    return pairs


# ----------------------------------------------------------------------------------------------------
# Shared by both workers: the initial adapter into a peft model


def load_initial_adapter(model, adapter_dir: Path) -> int:
    """Copy the saved adapter's tensors into `model`'s LoRA parameters by name; every one on both sides must match."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    by_saved_name = {n.replace(".default.", "."): p for n, p in params.items()}
    missing = sorted(by_saved_name.keys() - state.keys())
    unexpected = sorted(state.keys() - by_saved_name.keys())
    if missing or unexpected or len(params) != len(state):
        raise SystemExit(
            f"initial adapter does not match the model's LoRA parameters: {len(missing)} missing "
            f"({missing[:3]}), {len(unexpected)} unexpected ({unexpected[:3]})"
        )
    with torch.no_grad():
        for name, p in by_saved_name.items():
            if p.shape != state[name].shape:
                raise SystemExit(f"{name}: shape {tuple(p.shape)} != saved {tuple(state[name].shape)}")
            p.copy_(state[name])
    return len(state)


def _read_prep(work: Path) -> tuple[dict, list[dict]]:
    prep = json.loads((work / "prep.json").read_text())
    ordered = [json.loads(line) for line in (work / "pairs-ordered.jsonl").read_text().splitlines()]
    return prep, ordered


def _summary(step_times: list[float], step_useful: list[int], first_loss: float, precompute_s: float) -> dict:
    rates = [u / t for u, t in zip(step_useful, step_times)]
    steady = rates[1:] or rates
    return {
        "tokens_per_s": statistics.median(steady),
        "step_tokens_per_s": rates,
        "step_times": step_times,
        "first_loss": first_loss,
        "precompute_s": precompute_s,
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------------------------------
# The TRL side (.venv-bench's python): DPOTrainer with a peft LoRA, precomputed reference log-probs


def _trl_run(args, workdir: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    import datasets
    import peft
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    work = Path(os.environ["BENCH_WORK"])
    prep, ordered = _read_prep(work)
    tokenizer = AutoTokenizer.from_pretrained(prep["model_path"])
    model = AutoModelForCausalLM.from_pretrained(prep["model_path"], dtype=torch.float32)
    expected = [p["ids"] for p in ordered]
    dataset = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in ordered])
    notes: list[str] = []

    class BenchDPOTrainer(DPOTrainer):
        losses: list[float] = []
        precompute_s = 0.0

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            out = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            own = [{k: list(row[f"{k}_ids"]) for k in ("prompt", "chosen", "rejected")} for row in out]
            differ = [i for i, (a, b) in enumerate(zip(own, expected)) if a != b]
            if len(own) != len(expected):
                raise SystemExit(f"TRL kept {len(own)} of {len(expected)} pairs")
            if differ:
                i = differ[0]
                notes.append(
                    f"TRL's own tokenization differed from the reference on {len(differ)} of {len(own)} pairs "
                    f"(first: step-order pair {i}: TRL {own[i]} vs {expected[i]}); the reference ids are used"
                )
                out = Dataset.from_list(
                    [{f"{k}_ids": e[k] for k in ("prompt", "chosen", "rejected")} for e in expected]
                )
            else:
                notes.append(f"TRL's own tokenization equals the reference on all {len(own)} pairs")
            return out

        def _precompute_ref_logps(self, *a, **k):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            type(self).precompute_s += time.perf_counter() - t
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append(float((out[0] if return_outputs else out).detach()))
            return out

    class Clock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    config = DPOConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        train_sampling_strategy="sequential",  # the pairs are already in tunesmith's epoch order
        beta=args.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=True,
        max_length=None,  # no truncation (tunesmith's data.truncation would error on an over-long pair)
        gradient_checkpointing=False,  # DPOConfig's default is True
        bf16=False,  # DPOConfig's default is True
        fp16=False,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=SEED,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    clock = Clock()
    trainer = BenchDPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=_lora_config(LoraConfig),
        callbacks=[clock],
    )
    # The reference (adapters disabled) is precomputed by now; the policy starts from the shared initial adapter
    rss_after_ref = _peak_rss_mb()
    load_initial_adapter(trainer.model, work / "init-adapter")
    seen: list[int] = []  # useful tokens of each batch the trainer draws
    seen_pairs: list[list[int]] = []  # and which pairs (file indices) it holds
    index_of = {json.dumps([p["ids"][k] for k in ("prompt", "chosen", "rejected")]): p["index"] for p in ordered}
    collate = trainer.data_collator

    def recording_collator(examples):
        seen.append(sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples))
        seen_pairs.append(
            [
                index_of.get(json.dumps([list(e[f"{k}_ids"]) for k in ("prompt", "chosen", "rejected")]))
                for e in examples
            ]
        )
        return collate(examples)

    trainer.data_collator = recording_collator
    t_train = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t_train
    row0 = trainer.train_dataset[0]
    result = _summary(clock.times, seen[: args.steps], trainer.losses[0], BenchDPOTrainer.precompute_s)
    return result | {
        "pair0": {k: list(row0[f"{k}_ids"]) for k in ("prompt", "chosen", "rejected")},
        "ref_logps": [[float(r["ref_chosen_logps"]), float(r["ref_rejected_logps"])] for r in trainer.train_dataset],
        "token_note": "; ".join(notes),
        "step_useful_tokens": seen[: args.steps],
        "step_pairs": seen_pairs[: args.steps],
        "losses": trainer.losses,
        "peak_rss_after_ref_mb": rss_after_ref,
        "setup_s": t_train - t_start,
        "train_s": train_s,
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "datasets": datasets.__version__,
            "torch": torch.__version__,
        },
    }


# ----------------------------------------------------------------------------------------------------
# The tunesmith side (this script's python): tunesmith.train with train.objective dpo


def _tunesmith_run(args, workdir: Path, segment_attention: bool = True) -> dict:
    """segment_attention False: attention over whole packed rows under their mask (what models/segments.py is
    worth; side ts-noseg)."""
    import torch

    torch.set_num_threads(args.threads)
    if not segment_attention:
        from tunesmith.models import segments

        segments.usable = lambda model: False
    import peft
    import transformers
    from safetensors.torch import load_file

    import tunesmith
    from tunesmith import methods
    from tunesmith.data import batching
    from tunesmith.data.templates import Renderer
    from tunesmith.run_dir import REFERENCE
    from tunesmith.training import loop, reference

    work = Path(os.environ["BENCH_WORK"])
    prep, ordered = _read_prep(work)

    # the initial adapter, right after tunesmith applies its LoRA (after the reference pass, which runs on the
    # starting model before any method is applied)
    apply_method = methods.apply_method
    loaded: list[int] = []

    def apply_with_initial_adapter(model, cfg, tokenizer=None):
        model = apply_method(model, cfg, tokenizer=tokenizer)
        loaded.append(load_initial_adapter(model, work / "init-adapter"))
        return model

    methods.apply_method = apply_with_initial_adapter  # training/loop.py calls methods.apply_method

    # the ids tunesmith trains on, as its Renderer encodes them (in file order)
    seen_pairs: list = []
    encode_pair = Renderer.encode_pair

    def recording_encode_pair(self, example, *a, **k):
        pair = encode_pair(self, example, *a, **k)
        seen_pairs.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
        return pair

    Renderer.encode_pair = recording_encode_pair

    # the reference pass, timed apart from the steps
    load_or_compute = reference.load_or_compute
    precompute: list[float] = []
    rss_after_ref: list[float] = []

    def timed_load_or_compute(*a, **k):
        t = time.perf_counter()
        out = load_or_compute(*a, **k)
        precompute.append(time.perf_counter() - t)
        rss_after_ref.append(_peak_rss_mb())
        return out

    reference.load_or_compute = timed_load_or_compute

    # which pairs each step holds (training/loop.py splits an epoch with step_indices)
    step_lists: list[list[int]] = []

    def recording_step_indices(*a, **k):
        steps = batching.step_indices(*a, **k)
        step_lists.extend(steps)
        return steps

    loop.step_indices = recording_step_indices

    steps = args.steps
    micro = args.ts_micro_batch if args.ts_micro_batch == "auto" else int(args.ts_micro_batch)
    config = {
        "model": {"name": args.model},
        "method": "lora",
        "lora": {**LORA, "target": "all-linear"},
        "data": {"train": str(work / "pairs.jsonl"), "val_fraction": 0.0, "truncation": "error"},
        "train": {
            "objective": "dpo",
            "batch_size": args.batch,
            "micro_batch_size": micro,
            "max_steps": steps,
            "lr": args.lr,
            "warmup": 0,
            "schedule": "constant",
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "seed": SEED,
            "save_every": steps,
            "threads": args.threads,
            "precision": "fp32",
        },
        "dpo": {"beta": args.beta, "loss": "sigmoid"},
        "output": str(workdir / "run"),
    }
    logged: list[str] = []
    t_start = time.perf_counter()
    run = tunesmith.train(config, quiet=True, log=lambda *a: logged.append(" ".join(map(str, a))))
    wall = time.perf_counter() - t_start
    if loaded != [prep["adapter_tensors"]]:
        raise SystemExit(f"the initial adapter was loaded {len(loaded)} times ({loaded}); expected once")
    run_dir = Path(run.path)
    plan = json.loads((run_dir / "data.json").read_text())["plan"]
    if plan["batching"] not in ("pack", "pad"):  # group reorders the steps; the TRL side follows the epoch order
        raise SystemExit(f"tunesmith planned batching {plan['batching']}; the step order would differ from TRL's")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    expected = [None] * len(ordered)
    for p in ordered:
        expected[p["index"]] = p["ids"]
    differ = [i for i, (a, b) in enumerate(zip(seen_pairs, expected)) if a != b]
    note = (
        f"tunesmith's encoding equals the reference on all {len(expected)} pairs"
        if len(seen_pairs) == len(expected) and not differ
        else f"tunesmith's encoding differs on {len(differ)} pairs ({len(seen_pairs)} encoded)"
    )
    ref = load_file(str(run_dir / REFERENCE))["train"]  # (n, 2) in file order
    result = _summary([r["step_time"] for r in train], prep["step_useful_tokens"], train[0]["loss"], sum(precompute))
    return (
        result
        | {
            "pair0": seen_pairs[ordered[0]["index"]],
            "token_note": note,
            "ref_logps": [ref[p["index"]].tolist() for p in ordered],  # step order, as TRL's
            "losses": [r["loss"] for r in train],
            "step_useful_tokens": [b["tokens"] - a for a, b in zip([0] + [r["tokens"] for r in train], train)],
            "step_pairs": step_lists[: len(train)],
            "reported_tokens_per_s": [r["tokens_per_s"] for r in train],
            "peak_rss_after_ref_mb": rss_after_ref[0],
            "micro_batch_size": plan["micro_batch_size"],
            "batching": plan["batching"],
            "train_s": wall,
            "log": logged,
            "versions": {
                "tunesmith": getattr(tunesmith, "__version__", "?"),
                "transformers": transformers.__version__,
                "peft": peft.__version__,
                "torch": torch.__version__,
            },
        }
    )


if __name__ == "__main__":
    main()
