"""What a compiled call needs around it: which modes record CUDA graphs, dynamo's counters, one
code object per instance, CUDA timing on the right stream, and the per-call record of timings.

Kept apart from dynamic_cross_encoder.py so the class file holds the CrossEncoder glue only.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch

# torch.compile modes that capture CUDA graphs: a graph is recorded per input shape, and every
# replay writes its outputs into the same memory.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def uses_cuda_graphs(device_type: str, compile: bool, mode: str) -> bool:
    return compile and device_type == "cuda" and mode in CUDA_GRAPH_MODES


def compile_count() -> int:
    """Graphs compiled so far in this process (dynamo's counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def cudagraph_skips() -> int:
    """Times inductor fell back from CUDA graphs so far in this process (it logs each reason)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


@dataclass
class CallTimings:
    """What one `predict` call did (`last_timings`). forward_s is device time between CUDA events
    around each launch (idle gaps inside a launch included); wall time on the CPU."""

    tokenize_s: float = 0.0
    pack_s: float = 0.0
    forward_s: float = 0.0
    real_tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    new_shapes: list = field(default_factory=list)  # batch shapes first met after warm-up


def own_code(method):
    """The bound method on a private copy of its code object. Dynamo keeps compiled graphs, and counts
    its recompile limit, per code object: without this, graphs of every instance in the process
    would count against each one's limit (and the limit, once hit, runs that code eager for good)."""
    f = method.__func__
    own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(own, method.__self__)


def timing_event(device: torch.device):
    """A CUDA event recorded now on `device`'s stream: Event.record() alone records on the current
    device's stream (torch/cuda/streams.py), which on another device times nothing."""
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
