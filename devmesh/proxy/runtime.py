"""Process-wide tuning for a process that runs the proxy: the event loop and the allocator.

Why a module: both the standalone proxy (``python -m devmesh.proxy``) and the agent, which
runs the proxy in-process, should make the same two choices, and both are measured wins
(bench/proxy.py, docs/proxy.md "Performance"):

- uvloop, when installed (an optional extra, never required), takes about a sixth off the
  proxy's CPU per small request.
- glibc's allocator fights the proxy's 256 KiB body chunks: with its defaults it returns
  freed heap to the kernel (``brk``) whenever 128 KiB is free at the top, so under uvloop
  nearly every chunk freed shrank the heap and the next one grew it again (half the bulk
  throughput); and once the trim threshold is set, its mmap threshold stops adapting and
  every chunk becomes an mmap/munmap pair with 64 page faults (a sixth of the throughput,
  seen after a burst of small requests). Fixed thresholds above the chunk size keep a few
  MiB of heap around instead; memory stays flat.

Neither is required for correctness; each is a no-op where it does not apply.
"""

from __future__ import annotations

import asyncio
import ctypes
import sys
from collections.abc import Callable

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
KEEP_HEAP_BYTES = 8 << 20
"""Free heap glibc may keep before trimming: a few dozen 256 KiB chunks."""


def loop_factory(*, allow_uvloop: bool = True) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when it is installed (and allowed), else None (asyncio's own).

    For anyio: ``anyio.run(main, backend_options={"use_uvloop": uvloop_available()})``.
    """
    if not allow_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def uvloop_available() -> bool:
    return loop_factory() is not None


def keep_freed_heap(nbytes: int = KEEP_HEAP_BYTES) -> bool:
    """Ask glibc to serve body-sized blocks from the heap and keep up to nbytes of it freed.

    True when the setting took effect; False on other C libraries and platforms.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return (
        bool(mallopt(M_MMAP_THRESHOLD, nbytes // 2))
        and bool(mallopt(M_TRIM_THRESHOLD, nbytes))
        and bool(mallopt(M_TOP_PAD, nbytes // 2))
    )
