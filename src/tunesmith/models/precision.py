"""Numeric precision: which devices compute bfloat16 natively, what `auto` picks, and the bf16-mixed machinery.

Training precision (`train.precision`):
- `fp32`: weights, activations, gradients and optimizer state in float32.
- `bf16-mixed`: weights, gradients and AdamW state stay float32 (the "master" copy the optimizer updates); the
  forward and backward matmuls run under `torch.autocast(dtype=bfloat16)`; the LM head, the cross-entropy and the
  KL terms run in float32 (the loop takes the head out of autocast). Frozen linear weights that autocast would cast
  to bf16 at every use are cast once, in place, where the run saves only its trainable weights (LoRA and the other
  adapter methods): the same numbers as autocast's own cast, half their memory, and no cast per step. The fused
  LoRA layer adds its LoRA term to the base product in fp32 (methods/lora_fused.py says why). On a CPU, attention
  runs in fp32 (`models/attention.fp32_on_cpu`): torch's CPU flash-attention backward is slower in bf16 than in fp32.
- `bf16`: every weight, gradient and optimizer moment in bfloat16, no float32 copy (torchtune's `dtype: bf16`): the
  least memory for full fine-tuning, but an update smaller than half a bf16 step of its weight (1/256 of it) is
  rounded away, so small learning rates stall. The loss is still computed in float32.
- `auto`: bf16-mixed where the device computes bf16 natively, fp32 elsewhere; and fp32 for full and freeze
  fine-tuning on a CPU, where autocast casts every trained (or unsaved-frozen) fp32 weight at each step: measured
  0.90x the fp32 speed at 1.12x its memory for full fine-tuning at a batch of 8 (bench/RESULTS.md run 14).

Native bf16 means hardware bf16 matmuls: CUDA compute capability 8.0+ (A100, H100, RTX 30xx and later), and x86
CPUs with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake) or AMX-BF16 (Intel Sapphire Rapids and later),
which oneDNN uses for torch's bf16 matmuls. Elsewhere bf16 is emulated and slower than fp32: auto stays fp32 and
says why. `TUNESMITH_CPU_BF16=0` (or 1) overrides the CPU detection: 0 keeps auto at fp32 on any CPU (the test
suite sets it, so that its numbers do not depend on the machine), 1 treats the CPU as native (an ARM CPU with
bf16 support through oneDNN/ACL, say). Measured on a 2-core Xeon with AMX (bench/RESULTS.md run 14): a 2048x2048
matmul at 1,927-2,119 GFLOP/s in bf16 against 311-336 in fp32.
"""

from __future__ import annotations

import os
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunesmith.models.attention import fp32_on_cpu

PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16")


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` computes bfloat16 matmuls in hardware, and what was found."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            try:
                ok = torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # older torch has no including_emulation
                ok = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        return ok, f"{name}, compute capability {major}.{minor}" + ("" if ok else " (bf16 needs 8.0+)")
    if device.type == "cpu":
        override = os.environ.get("TUNESMITH_CPU_BF16", "").strip()
        if override in ("0", "1"):
            return override == "1", f"CPU, TUNESMITH_CPU_BF16={override}"
        found = cpu_bf16_features()
        if found:
            return True, "CPU with " + " and ".join(found)
        return False, "CPU without AVX512-BF16 or AMX-BF16 (bf16 would be emulated, slower than fp32)"
    return False, f"{device.type}: bf16 speed not established"


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (benchmarks and result records name the CPU they ran on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def cpu_bf16_features() -> list[str]:
    """The native bf16 instruction sets of this CPU that torch reports (empty: none)."""
    cpu = torch.cpu
    found = []
    for name, check in (("AMX-BF16", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        fn = getattr(cpu, check, None)
        try:
            if fn is not None and fn():
                found.append(name)
        except RuntimeError:
            pass
    return found


@dataclass(frozen=True)
class Precision:
    """A run's resolved training precision."""

    name: str  # fp32 | bf16-mixed | bf16
    reason: str  # why (auto's choice, or "set in the config")

    @property
    def autocast(self) -> bool:
        return self.name == "bf16-mixed"

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32 if self.name == "fp32" else torch.bfloat16

    def autocast_context(self, device: torch.device):
        """torch.autocast to bf16 for bf16-mixed (on a CPU with attention kept in fp32); nothing otherwise."""
        if not self.autocast:
            return nullcontext()
        if device.type != "cpu":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return _CpuAutocast()


class _CpuAutocast:
    """bf16 autocast with attention in fp32 (models/attention.fp32_on_cpu); reusable and reentrant like
    torch.autocast."""

    def __init__(self):
        self._open: list[ExitStack] = []

    def __enter__(self):
        stack = ExitStack()
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        stack.enter_context(fp32_on_cpu())
        self._open.append(stack)
        return self

    def __exit__(self, *exc):
        return self._open.pop().__exit__(*exc)


def resolve_training_precision(spec: str, device: torch.device, method: str = "lora") -> Precision:
    """`train.precision` resolved for `device` and the method: auto becomes bf16-mixed or fp32, with the reason."""
    if spec != "auto":
        if spec not in PRECISIONS:
            raise ValueError(f"unknown precision {spec!r}; use one of {', '.join(PRECISIONS)}")
        return Precision(spec, "set in the config")
    ok, found = native_bf16(device)
    if ok and device.type == "cpu" and method in ("full", "freeze"):
        return Precision(
            "fp32",
            f"native bf16 ({found}), but {method} fine-tuning on a CPU casts its fp32 weights every step and ran slower "
            "in bf16-mixed; set train.precision: bf16-mixed to try it",
        )
    if ok:
        return Precision("bf16-mixed", f"native bf16 ({found})")
    return Precision("fp32", f"no native bf16 ({found})")


def inference_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """What `model.dtype: auto` loads a model in for evaluation, generation and serving on `device`."""
    ok, found = native_bf16(device)
    if ok:
        return torch.bfloat16, f"native bf16 ({found})"
    if device.type == "cuda":
        return torch.float16, f"no native bf16 ({found}); float16"
    return torch.float32, f"no native bf16 ({found})"


def cast_frozen_linears(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store the weight and bias of every frozen `nn.Linear` in `dtype`, in place; returns how many parameters.

    Under autocast these are cast to bf16 at each use anyway, so results do not change. Linear layers whose weight
    is also an embedding (a tied LM head) are left alone: the lookup is not autocast, and the head runs in fp32.

    A model loaded from safetensors keeps its weights in the memory-mapped file: reading the fp32 weights to cast
    them makes their pages resident, and they stay counted as long as any tensor of the file is alive. So the
    parameters and buffers that stay in their dtype are copied out of the file too, which lets it be unmapped
    (measured on SmolLM2-135M with LoRA: 1,045 MB resident after the casts, 750 MB after the copies)."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    count = 0
    for module in model.modules():
        if type(module) is not nn.Linear or module.weight.requires_grad or id(module.weight) in tied:
            continue
        if module.bias is not None and module.bias.requires_grad:
            continue
        module.weight.data = module.weight.data.to(dtype)
        count += module.weight.numel()
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)
            count += module.bias.numel()
    if count:
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dtype != dtype and tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()
    return count
