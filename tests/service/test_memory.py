"""The memory a server may use: its memory cgroup's limit (v1 or v2), else physical RAM."""

from __future__ import annotations

from pathlib import Path

from vqsearch.service._memory import memory_limit, physical_memory


def _tree(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, tuple[Path, ...]]:
    root = tmp_path / "cg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (tmp_path / "cgroup").write_text(proc)
    return tmp_path / "cgroup", (root,)


def test_v1_memory_controller_limit(tmp_path):
    proc, roots = _tree(
        tmp_path,
        "4:memory:/jobs/a\n3:cpuset:/\n0::/\n",
        {"memory/jobs/a/memory.limit_in_bytes": "1073741824\n"},
    )
    assert memory_limit(proc, roots) == min(1 << 30, physical_memory())


def test_v2_memory_max_and_no_limit(tmp_path):
    proc, roots = _tree(tmp_path, "0::/svc\n", {"svc/memory.max": "536870912\n"})
    assert memory_limit(proc, roots) == min(512 << 20, physical_memory())
    proc, roots = _tree(tmp_path, "0::/other\n", {"other/memory.max": "max\n"})
    assert memory_limit(proc, roots) == physical_memory()


def test_unreadable_cgroup_files_fall_back_to_physical_memory(tmp_path):
    assert memory_limit(tmp_path / "absent", (tmp_path,)) == physical_memory()
    proc, roots = _tree(tmp_path, "4:memory:/gone\n", {})
    assert memory_limit(proc, roots) == physical_memory()


def test_this_process_is_bounded_by_physical_memory():
    assert 0 < memory_limit() <= physical_memory()
