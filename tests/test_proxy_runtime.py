"""Process tuning for the proxy: optional uvloop, glibc heap trimming."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from devmesh.proxy import runtime


def test_loop_factory_is_uvloop_only_when_installed_and_allowed() -> None:
    assert runtime.loop_factory(allow_uvloop=False) is None
    installed = importlib.util.find_spec("uvloop") is not None
    assert (runtime.loop_factory() is not None) is installed
    assert runtime.uvloop_available() is installed


def test_keep_freed_heap_takes_effect_on_linux_glibc() -> None:
    # In a child process: mallopt changes the whole process's allocator.
    code = "from devmesh.proxy import runtime; print(runtime.keep_freed_heap())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    glibc = sys.platform.startswith("linux") and bool(__import__("platform").libc_ver()[0])
    assert out == ("True" if glibc else "False")
