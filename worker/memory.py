"""Keep freed memory in the worker process instead of handing it back to the kernel.

PyTorch on the CPU allocates every tensor with malloc and frees it when the last
reference goes. glibc serves blocks above its mmap threshold (128 KiB at first) with
fresh mappings, and trims the heap when its free top grows past the trim threshold, so
the activations of each training step, and the buffers of each metric evaluation, come
back as new pages that fault in one by one: on the digits MLP of bench/train.py that
is about 1,000 page faults per `collapse_metrics` call, half its time, and 15% of an
epoch. PyTorch's CPU performance guide recommends a caching allocator (jemalloc,
tcmalloc) for the same reason; glibc's own two settings do it without a preload.

Allocations above 32 MiB (glibc's largest mmap threshold), such as the whole-data-set
feature matrices of an evaluation pass, are still mapped and unmapped each time: they
are few, and their page faults are small next to the work done on them.
"""

import ctypes
import ctypes.util
import logging

log = logging.getLogger("nclab.worker")

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

LARGEST_HEAP_BLOCK = 32 * 2**20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc
RETAINED_FREE_MEMORY = 1 * 2**30


def retain_freed_memory() -> bool:
    """Serve blocks up to 32 MiB from the heap and keep up to 1 GiB of it when freed.

    Returns whether glibc took both settings; elsewhere (musl, macOS) it does nothing.
    """
    library = ctypes.util.find_library("c")
    if library is None:
        return False
    mallopt = getattr(ctypes.CDLL(library), "mallopt", None)
    if mallopt is None:
        return False
    applied = bool(mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK)) and bool(
        mallopt(M_TRIM_THRESHOLD, RETAINED_FREE_MEMORY)
    )
    if not applied:
        log.warning("mallopt refused the heap settings; freed memory goes back to the kernel")
    return applied
