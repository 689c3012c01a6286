"""Tradeoff reports as people read them: a markdown table and the ann-benchmarks style plot
(QPS, log scale, against recall; one curve per spec; exact as the reference; the Pareto frontier
highlighted). Needs numpy, and matplotlib for the PNG only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MEASURE = "recall_1_at_1"


Curve = list[tuple[float, float]]


def points(report: dict[str, Any], batch: int | None = None) -> dict[str, Curve]:
    """spec -> every measured (1-recall@1, QPS at `batch`), sorted."""
    key = str(batch or report["primary_batch"])
    out: dict[str, Curve] = {}
    for p in report["points"]:
        out.setdefault(p["spec"], []).append((p[MEASURE], p["qps"][key]))
    return {spec: sorted(pts) for spec, pts in out.items()}


def curves(report: dict[str, Any], batch: int | None = None) -> dict[str, Curve]:
    """spec -> its best settings (no point of the same spec beats them on both recall and QPS),
    by recall: the line drawn per spec, as ann-benchmarks draws one per algorithm."""
    out = {}
    for spec, pts in points(report, batch).items():
        best = {p for p in pts if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pts)}
        out[spec] = sorted(best)
    return out


def frontier(report: dict[str, Any], batch: int | None = None) -> list[tuple[float, float]]:
    key = str(batch or report["primary_batch"])
    return sorted((p[MEASURE], p["qps"][key]) for p in report["points"] if p["pareto"])


def table(report: dict[str, Any]) -> str:
    """Markdown: one row per point, QPS and p99 at every measured batch size."""
    sizes = list(report["points"][0]["qps"])
    head = [
        "setting",
        "1-R@1",
        "10-R@10",
        *[f"QPS b={b}" for b in sizes],
        *[f"p99 ms b={b}" for b in sizes],
        "build s",
        "bytes/vec",
        "frontier",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in report["points"]:
        cells = [
            p["label"],
            f"{p['recall_1_at_1']:.3f}",
            f"{p['recall_10_at_10']:.3f}",
            *[f"{p['qps'][b]:,.0f}" for b in sizes],
            *[f"{p['p99_ms'][b]:.2f}" for b in sizes],
            f"{p['build_seconds']:.2f}",
            f"{p['bytes_per_vector']:.1f}",
            "*" if p["pareto"] else "",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(
    report: dict[str, Any], path: str | Path, title: str = ""
) -> dict[str, list[tuple[float, float]]]:
    """Write the PNG; returns the curves it drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, every = curves(report), points(report)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    for spec, pts in data.items():
        r, q = zip(*pts, strict=True)
        if spec == "exact":
            ax.scatter(r, q, marker="*", s=220, color="black", zorder=5, label="exact (reference)")
            continue
        (line,) = ax.plot(r, q, marker="o", ms=4, lw=1.2, label=spec)
        ra, qa = zip(*every[spec], strict=True)
        ax.scatter(ra, qa, s=8, alpha=0.3, color=line.get_color())
    fr = frontier(report)
    if fr:
        r, q = zip(*fr, strict=True)
        ax.plot(
            r, q, color="red", lw=2.5, alpha=0.5, drawstyle="steps-pre", label="Pareto frontier"
        )
    ax.set_yscale("log")
    ax.set_xlabel("1-recall@1 (nearest-code agreement)")
    ax.set_ylabel(f"queries per second (batch {report['primary_batch']}, log)")
    src = report.get("query_source", "")
    where = f"nb={report['nb']} d={report['d']} {report['metric']}"
    ax.set_title(title or f"{where}, {report['n_queries']} {src} queries")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return data
