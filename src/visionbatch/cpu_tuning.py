"""CPU tuning for the model's forward pass: glibc's malloc kept from handing freed
memory back (``keep_freed_memory``), and float32 linear layers run on oneDNN with
weights packed once (``pack_linear_layers``). A leaf: torch and the C library only.
"""

from __future__ import annotations

import functools
import platform
from typing import Callable


# The largest allocation glibc's malloc serves from (and keeps in) its heap; see
# keep_freed_memory.
_HEAP_ALLOCATION_MAX = 1 << 30
# The size of a heap of a thread's arena (glibc's HEAP_MAX_SIZE on 64-bit), kept as the
# top pad; see keep_freed_memory.
_THREAD_HEAP_SIZE = 64 << 20


def keep_freed_memory() -> Callable[[int], int] | None:
    """Have glibc's malloc keep freed memory for the next allocation instead of handing
    it back to the kernel. A CPU forward pass allocates and frees tens of MB of
    activations; by default glibc serves the larger ones with a fresh mmap each time and
    trims its heap after frees, so every pass pays page faults for memory it just had.
    The same settings as the MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ variables,
    which take effect only at a process's start.

    A thread other than the main one (the local engine's lanes) allocates from an arena
    of 64 MB heaps, and glibc unmaps a heap as soon as it is all free, whatever the trim
    threshold, unless the top pad covers it: without the pad, a lane faults its pass's
    memory in again each pass.

    Kept that way, the heap grew without bound while a local job's first shards were in
    flight (nearly all of it free chunks), so the caller hands the free pages back now
    and then with the ``malloc_trim`` this returns.
    None where the C library is not glibc, or it refused the settings.

    Why, in figures (faults, ms an image, the driver's RSS, each with and without):
    benchmarks/RESULTS.md, "CPU tuning (cpu_tuning.py): the measurements"."""
    import ctypes

    if platform.libc_ver()[0] != "glibc":
        return None
    # The process's own symbols, libc's among them: find_library("c") would run ldconfig
    # in a subprocess, a fork of a process that holds torch.
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # malloc.h
    libc.mallopt(M_TOP_PAD, _THREAD_HEAP_SIZE)  # fewer faults where it takes; nothing else depends on it
    kept = (libc.mallopt(M_MMAP_THRESHOLD, _HEAP_ALLOCATION_MAX)
            and libc.mallopt(M_TRIM_THRESHOLD, 2 * _HEAP_ALLOCATION_MAX))
    return libc.malloc_trim if kept else None


# How far a packed model's outputs may sit from the plain model's (see
# pack_linear_layers), relative to the outputs' largest magnitude. The two GEMMs differ
# in summation order only: ViT-Ti and ViT-B/16 differ by ~1e-6 of it; a layer run on
# the wrong weights or input moves outputs by orders of magnitude more.
PACKED_TOLERANCE = 1e-4
_X86_64 = ("x86_64", "amd64")  # platform.machine() on Linux and macOS, on Windows


def _packed_linear(weight, bias, input):  # nn.Linear.forward's parameter name, for keyword calls
    import torch

    return torch.ops.mkldnn._linear_pointwise(input, weight, bias, "none", [], "")


def linear_packing_supported() -> bool:
    """torch has oneDNN, on x86-64: where its kernels were measured faster (on ARM torch
    builds oneDNN on other libraries, unmeasured here)."""
    import torch

    return torch.backends.mkldnn.is_available() and platform.machine().lower() in _X86_64


def pack_linear_layers(model, run: Callable[[], tuple]) -> int:
    """Run the model's float32 ``nn.Linear`` layers on oneDNN's GEMM with weights packed
    once into its blocked layout, where torch's default CPU path (MKL) repacks them in
    every call: faster on x86-64 (figures: benchmarks/RESULTS.md, "CPU tuning
    (cpu_tuning.py): the measurements").

    By hand because torch's own route to these kernels is torch.compile with freezing
    (tens of seconds to compile a model on a small CPU) and Intel's extension is an
    x86-only package pinned to torch versions; the ops are the ones torch's inductor calls.

    ``run()`` runs the model on a probe batch and returns its outputs (tensors or None).
    It runs once before packing, to see which layers a pass uses (only those are packed:
    not a zero-shot model's text tower), and once after; the packed model is kept only
    where it gave the same outputs (PACKED_TOLERANCE). A packed layer's weight is an
    empty tensor of its dtype and device: a model reading ``layer.weight.dtype`` still
    works, and one computing with the weight outside the layer fails the check. Left
    alone: layers whose weight is not a plain parameter (weight_norm, pruning) or whose
    forward is already replaced. Returns the layers packed: 0 where torch lacks the ops,
    or the check failed and the model was left as it was.

    Memory: the packed weights are a copy in the process's own memory; transformers maps
    the checkpoint's file, and its pages for the replaced weights stay in the page cache
    (reclaimable) until the kernel needs them. A packed model cannot be pickled."""
    import torch

    candidates = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in m.__dict__
                  and isinstance(m._parameters.get("weight"), torch.nn.Parameter)
                  and m.weight.dtype == torch.float32]
    if not candidates or not linear_packing_supported():
        return 0
    weights = [m._parameters["weight"] for m in candidates]
    ran: set = set()
    seen = [m.register_forward_hook(lambda module, args, output: ran.add(module)) for m in candidates]
    with torch.inference_mode():
        try:
            try:
                expected = run()
            finally:
                for handle in seen:
                    handle.remove()
            layers = [m for m in candidates if m in ran]
            for layer in layers:
                packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach())
                layer.forward = functools.partial(_packed_linear, packed, layer.bias)
                layer._parameters["weight"] = torch.nn.Parameter(layer.weight.new_empty(0), requires_grad=False)
            same = bool(layers) and all(_close(a, b) for a, b in zip(run(), expected, strict=True))
        except Exception:
            # The model fails on any input (the job reports that), torch lacks the ops, or
            # this model's code cannot run without a layer's weight.
            same = False
        if not same:
            for layer, weight in zip(candidates, weights):
                layer._parameters["weight"] = weight
                layer.__dict__.pop("forward", None)
            return 0
    return len(layers)


def _close(packed, plain) -> bool:
    if packed is None or plain is None:
        return packed is plain
    if packed.shape != plain.shape:
        return False
    if plain.numel() == 0:
        return True
    return float((packed - plain).abs().max()) <= PACKED_TOLERANCE * max(1.0, float(plain.abs().max()))
