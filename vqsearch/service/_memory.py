"""How much memory this server may use: its memory cgroup's limit (v1 or v2) where one is set,
else the machine's physical memory."""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))


def physical_memory() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _cgroup_limits(proc_cgroup: Path, roots: tuple[Path, ...]) -> list[int]:
    """The limits of the memory cgroups this process is in (v1 `memory` controller:
    memory.limit_in_bytes; v2: memory.max, 'max' for none)."""
    out: list[int] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if "memory" in controllers.split(","):
            files = [root / "memory" / rel / "memory.limit_in_bytes" for root in roots]
        elif controllers == "":
            files = [root / rel / "memory.max" for root in roots]
        else:
            continue
        for f in files:
            try:
                text = f.read_text().strip()
            except OSError:
                continue
            if text.isdigit():
                out.append(int(text))
    return out


def memory_limit(
    proc_cgroup: Path = Path("/proc/self/cgroup"), roots: tuple[Path, ...] = CGROUP_ROOTS
) -> int:
    """Bytes: the smallest of the cgroup limits and physical memory (v1 reports 'no limit'
    as a huge number, which the minimum drops)."""
    return min([physical_memory(), *_cgroup_limits(proc_cgroup, roots)])
