"""What the device can do and the defaults that follow from it, in one place.

The CPU dtype policy is a pure function of the CPU's capabilities (`cpu_dtype`), so it is tested
without the hardware: bf16 where the CPU computes it natively (AVX-512 BF16 or AMX: CrossEncoder
in bf16 ran 3.2x its fp32 speed on a 2-core Xeon with avx512_bf16, about 1.6x on a 2-core EPYC), fp32
elsewhere (bf16 there is converted to fp32 and back around every op: slower than fp32, and not the
reference). A dtype the caller names always wins.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch

from packing import is_cuda

REASON_ASKED = "asked for"


@dataclass(frozen=True)
class CpuCapabilities:
    """What the CPU offers torch. isa: torch's vector kernel level ("AVX512", "AVX2", "DEFAULT", ...)."""

    isa: str
    avx512_bf16: bool
    amx: bool  # AMX tiles; every CPU with them (Sapphire Rapids on) has AMX-BF16


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@functools.cache
def cpu_capabilities() -> CpuCapabilities:
    """Read once per process: from torch (the same cpuinfo its kernels dispatch on), the kernel's
    CPU flags where this torch lacks the query."""
    flags = None

    def has(query: str, flag: str) -> bool:
        nonlocal flags
        if hasattr(torch.cpu, query):
            return bool(getattr(torch.cpu, query)())
        flags = _cpu_flags() if flags is None else flags
        return flag in flags

    return CpuCapabilities(isa=torch.backends.cpu.get_cpu_capability(),
                           avx512_bf16=has("_is_avx512_bf16_supported", "avx512_bf16"),
                           amx=has("_is_amx_tile_supported", "amx_bf16"))


def describe_cpu(capabilities: CpuCapabilities | None = None) -> str:
    """e.g. "AVX512, avx512_bf16, no AMX: dtype bfloat16 (CPU has avx512_bf16)", for the output."""
    caps = capabilities or cpu_capabilities()
    dtype, why = cpu_dtype(caps)
    have = [caps.isa, "avx512_bf16" if caps.avx512_bf16 else "no avx512_bf16", "AMX" if caps.amx else "no AMX"]
    return f"{', '.join(have)}: default dtype {str(dtype).removeprefix('torch.')} ({why})"


def _as_dtype(requested) -> torch.dtype | None:
    """None / "auto" -> None; a torch.dtype or its name ("bfloat16", "torch.float32") -> the dtype."""
    if requested is None or requested == "auto":
        return None
    if isinstance(requested, torch.dtype):
        return requested
    dtype = getattr(torch, str(requested).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be 'auto', a torch.dtype or its name, got {requested!r}")
    return dtype


def cpu_dtype(capabilities: CpuCapabilities, requested=None) -> tuple[torch.dtype, str]:
    """The CPU dtype policy -> (dtype, why). requested: None / "auto" for the policy, else it wins."""
    if (asked := _as_dtype(requested)) is not None:
        return asked, REASON_ASKED
    if capabilities.amx:
        return torch.bfloat16, "CPU has AMX"
    if capabilities.avx512_bf16:
        return torch.bfloat16, "CPU has avx512_bf16"
    return torch.float32, f"CPU has no native bf16 ({capabilities.isa}): bf16 would be emulated"


def model_dtype(device, requested=None) -> tuple[torch.dtype | str, str]:
    """(dtype for from_pretrained, why) on `device`. On CUDA "auto": the checkpoint's own dtype
    (bf16 for jina), which the GPU runs natively."""
    if is_cuda(device):
        asked = _as_dtype(requested)
        return ("auto", "the checkpoint's dtype") if asked is None else (asked, REASON_ASKED)
    return cpu_dtype(cpu_capabilities(), requested)


def device_defaults(device) -> dict:
    """DynamicCrossEncoder's device-dependent defaults, in one place (the benchmark prints them)."""
    cuda = is_cuda(device)
    return {
        # max-autotune: the original's choice on CUDA; inductor's CPU autotuning only costs time
        "compile_mode": "max-autotune" if cuda else "default",
        # CPU: the default batch (8 pairs) at max_length 512 is never cut by the budget (a cut adds a
        # batch, and each batch's fixed cost shows on a small model)
        "max_tokens_per_batch": 16384 if cuda else 4096,
        # CPU: the packed path. On the CPU bucket padding does not beat the baseline (README command
        # 1, the full-size twin: bucketed 0.95x, packed 1.20x; README "CPU"): without padding the GEMMs,
        # which are most of the time there, shrink, and the grid attention costs what padded attention does.
        # CUDA: the original's x16 buckets (no GPU measurement of the packed path on record).
        "packed": not cuda,
        "dtype": model_dtype(device)[0],
    }


def cpu_threads(torch_threads: int, usable_cores: int) -> int | None:
    """Threads torch should use when its default is wrong, else None. torch sizes its pool by the
    machine's cores; a process pinned to fewer (taskset, a container's cpuset) then runs more
    threads than cores, and each GEMM waits for the slowest, descheduled one."""
    return usable_cores if torch_threads > usable_cores else None


def match_cpu_threads() -> str:
    """Apply cpu_threads() to this process; -> what it did, for the output."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = cpu_threads(torch.get_num_threads(), usable)
    if threads is None:
        return f"{torch.get_num_threads()} torch threads for {usable} usable cores"
    torch.set_num_threads(threads)
    return f"torch threads lowered to {threads}, the cores this process may use"


# Inductor options added on the CPU, for inference (measured on the full-size twin, README "CPU
# speed"): freezing turns the weights into constants of the graph, so inductor folds what depends
# only on them and prepacks the GEMM weights into oneDNN's blocked layout once, instead of
# reordering them on every call. The compiled graph then keeps its own copy of the weights: change
# the model's weights and compile again.
CPU_INDUCTOR_OPTIONS = {"freezing": True}


def inductor_settings(device_type: str):
    """A context manager with the inductor settings of `device_type` (CPU_INDUCTOR_OPTIONS on the CPU),
    around each model call (an eager one ignores them): compiles happen inside calls. Not
    torch.compile `options`: those reach inductor only, and dynamo reads `freezing` while it traces
    (to make the weights constants); without it the weights stay graph inputs and nothing is frozen.
    Not set globally: torch 2.13 keeps config overrides per thread, and the calls run on the
    instance's own thread."""
    if device_type != "cpu" or not CPU_INDUCTOR_OPTIONS:
        return contextlib.nullcontext()
    return torch._inductor.config.patch(CPU_INDUCTOR_OPTIONS)
