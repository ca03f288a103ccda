"""Markdown tables and plots (metric vs budget, one line per method) for eval results."""

from __future__ import annotations

from pathlib import Path

from kvbound.io import atomic_write_text


def _score_cell(m: dict) -> str:
    """Score with its 95% interval and N; cells with N < 32 are marked as not a basis for claims."""
    from kvbound.eval.stats import MIN_CLAIM_N

    cell = f"{m['score']:.1f}"
    if "ci95" in m:
        cell += f" [{m['ci95'][0]:.0f}, {m['ci95'][1]:.0f}]"
    if m.get("n", 0) < MIN_CLAIM_N:
        cell += f" (N={m.get('n')}, too few for a claim)"
    return cell


def task_table(summary: dict) -> str:
    """Markdown: one row per (task, method), one column per budget; full cache as reference.
    Cells: score [95% interval] and the share of answers identical to the full cache's."""
    results = summary["results"]
    budgets = sorted({r["budget"] for r in results if r["method"] != "full"})
    ns = sorted({r["metrics"].get("n") for r in results if r["metrics"].get("n") is not None})
    heads = [f"M={b}" for b in budgets] or ["score"]  # only the full cache: one column
    budgets = budgets or [None]
    lines = [f"N per cell: {', '.join(map(str, ns))}.", "",
             "| task | method | " + " | ".join(heads) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for task in dict.fromkeys(r["task"] for r in results):
        rows = [r for r in results if r["task"] == task]
        full = next((r for r in rows if r["method"] == "full"), None)
        if full:
            val = _score_cell(full["metrics"])
            lines.append(f"| {task} | full | " + " | ".join(val for _ in budgets) + " |")
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "full"):
            by = {r["budget"]: r for r in rows if r["method"] == method}
            cells = []
            for b in budgets:
                r = by.get(b)
                if r is None:
                    cells.append("")
                    continue
                m = r["metrics"]
                ref = m.get("reference", {})
                agree = f" ({ref['exact']:.0f}% = full)" if "exact" in ref else ""
                cells.append(f"{_score_cell(m)}{agree}")
            lines.append(f"| {task} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(summary: dict, out: Path) -> None:
    md = "# Task results\n\n" + task_table(summary) + "\n"
    atomic_write_text(out / "results.md", md)
    for task in dict.fromkeys(r["task"] for r in summary["results"]):
        rows = [r for r in summary["results"] if r["task"] == task]
        plot_lines(
            {m: sorted((r["budget"], r["metrics"]["score"]) for r in rows if r["method"] == m)
             for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "full")},
            reference=next((r["metrics"]["score"] for r in rows if r["method"] == "full"), None),
            ylabel="score", title=f"{task} ({summary.get('model')})", path=out / f"{task}.png")


def plot_lines(series: dict[str, list[tuple[int, float]]], *, reference: float | None,
               ylabel: str, title: str, path: Path, logy: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        if pts:
            xs, ys = zip(*pts)
            style = "-o" if name.startswith("trimkv") else "--."
            ax.plot(xs, ys, style, label=name, linewidth=2.2 if name.startswith("trimkv") else 1.2)
    if reference is not None:
        ax.axhline(reference, color="black", linestyle=":", label="full cache")
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("KV budget M (tokens per layer and KV head)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fidelity_plots(result: dict, out_prefix: Path) -> list[Path]:
    """KL and top-1 agreement vs budget, one line per method, from a fidelity result."""
    rows = [r for r in result["results"] if r["method"] != "full"]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    paths = []
    for key, ylabel, logy in (("kl_mean", "KL(full || method), nats", True),
                              ("top1_agreement", "top-1 agreement with full cache", False)):
        series = {lab: sorted((r["budget"], r[key]) for r in rows if r["label"] == lab)
                  for lab in labels}
        paths.append(plot_lines(series, reference=1.0 if key == "top1_agreement" else None,
                                ylabel=ylabel, title=f"fidelity ({result['protocol']})",
                                path=Path(f"{out_prefix}_{key}.png"), logy=logy))
    return paths
