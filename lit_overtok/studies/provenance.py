"""Where a study's number came from: the commit its code was at and the CPU it ran on (issue 20 item 7: every study
names its commit and CPU flags). The sweep records both with each attempt of a point; the report gathers them.

CPU flags matter for CPU timings: bf16 is native with ``avx512_bf16``/``amx_bf16`` and emulated (slow and useless) on
AVX2-only machines, so a CPU-hours figure says little without them.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any, Optional

# The flags that change how fast (or whether) our CPU kernels run; the rest of /proc/cpuinfo's list is noise here.
TIMING_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def commit(folder: str | Path) -> Optional[str]:
    """The git commit checked out at ``folder``, with ``+dirty`` when tracked files differ from it; None outside git."""
    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if head is None:
        return None
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def cpu(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU's model name and which of ``TIMING_FLAGS`` it has (an empty list: an AVX2-less or non-Linux machine)."""
    model, flags = platform.processor() or platform.machine(), set()
    path = Path(cpuinfo)
    if path.is_file():
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return {"model": model, "flags": [flag for flag in TIMING_FLAGS if flag in flags]}


def describe(records: list[dict[str, Any]]) -> str:
    """One line for a report: the distinct commits and CPUs of ``records`` (each {'commit', 'cpu'}, either absent
    for points run before the sweep recorded them)."""
    commits = sorted({r["commit"] or "not in git" for r in records if "commit" in r})
    cpus = sorted({f"{r['cpu']['model']} ({', '.join(r['cpu']['flags']) or 'none of ' + '/'.join(TIMING_FLAGS)})"
                   for r in records if r.get("cpu")})
    unrecorded = sum("commit" not in r for r in records)
    parts = [f"commit {', '.join(c[:12] + c[40:] for c in commits)}" if commits else "commit not recorded",
             f"CPU {'; '.join(cpus)}" if cpus else "CPU not recorded"]
    if unrecorded and commits:
        parts.append(f"{unrecorded} attempt(s) ran before the sweep recorded either")
    return "; ".join(parts)
