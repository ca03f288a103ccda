"""``kvbound demo``: what TRIM-KV is worth on the embedded model, end to end, in a few minutes.

1. Loads SmolLM2-135M-Instruct and the gates shipped for it.
2. Fidelity on held-out text (never seen in gate training): KL to the full cache's next-token
   distribution and top-1 agreement, for the full cache, TRIM-KV and three baselines at a tight
   budget, with eviction throughout (the decode protocol).
3. A long generation with each method at the same budget: agreement with the full cache's output,
   peak KV memory, decode speed.
4. Prints a table and writes a bar plot and a retention picture (median token half-life per
   layer and KV head) into ``out``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kvbound.errors import KVBoundError

DEMO_METHODS = ("full", "trimkv", "streaming", "snapkv", "knorm")
DEMO_PROMPT = ("Write a long, detailed story about a lighthouse keeper who finds a message in a "
               "bottle. Describe the keeper, the island, the storm and what happens next.")


def _agreement(reference: list[int], tokens: list[int]) -> float:
    """Share of positions where the two greedy outputs agree, up to the shorter length."""
    n = min(len(reference), len(tokens))
    return sum(a == b for a, b in zip(reference[:n], tokens[:n])) / n if n else 0.0


def _prefix(reference: list[int], tokens: list[int]) -> int:
    n = 0
    for a, b in zip(reference, tokens):
        if a != b:
            break
        n += 1
    return n


def run_demo(*, budget: int = 64, buffer: int = 16, quick: bool = False,
             out: Path = Path("demo_out"), model_name: str | None = None,
             dtype: str = "auto") -> dict:
    from kvbound.analysis import gate_log_betas, median_half_life
    from kvbound.eval.fidelity import make_windows, run_fidelity
    from kvbound.eval.textpool import eval_text_pool
    from kvbound.generation import generate, resolve_gates
    from kvbound.models import load_model
    from kvbound.policies import POLICIES

    console = Console()
    console.print(f"[bold]kvbound demo[/]: budget M={budget}, buffer b={buffer}")
    from kvbound.models.dtype import resolve_dtype

    model, tok = load_model(model_name, dtype=resolve_dtype(dtype))
    try:
        gates = resolve_gates(model, None)
        gates_note = f"shipped gates {gates.ref()}"
    except KVBoundError:
        from kvbound.gates import RetentionGates

        gates = RetentionGates.for_model(model)
        gates_note = "UNTRAINED gates (no gates shipped for this model)"
    gates.attach(model)
    console.print(f"model: {getattr(model, 'kvbound_model_name', '?')} "
                  f"({str(model.dtype).removeprefix('torch.')}); {gates_note}")
    methods = [m for m in DEMO_METHODS if m == "full" or m in POLICIES]
    seq_len, n_windows, new_tokens = (256, 1, 48) if quick else (768, 4, 320)
    budget_eff = min(budget, seq_len // 2)

    # 1. fidelity on held-out text
    windows = make_windows(tok, [("held-out", "\n\n".join(eval_text_pool()))], seq_len, n_windows)
    fid = run_fidelity(model, tok, windows, methods=methods, budgets=[budget_eff], buffer=buffer,
                       progress=not quick)
    from kvbound.eval.stats import check_same_rules

    check_same_rules(fid["results"])  # same sinks, buffer and budget accounting for all
    by = {r["label"]: r for r in fid["results"]}
    sinks = next(r["sinks"] for r in fid["results"] if r["label"] != "full")

    # 2. long generation
    gens = {}
    for method in methods:
        gens[method] = generate(model, tok, DEMO_PROMPT, method=method, budget=budget_eff,
                                buffer=buffer, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, gates=gates)
    ref = gens["full"].token_ids

    table = Table(title=f"kvbound demo - SmolLM2-135M, KV budget {budget_eff} tokens/head, "
                        f"buffer {buffer}, {sinks} protected sinks for every method")
    for col in ("method", "KL", "top-1", "gen=full", "prefix", "KV", "tok/s"):
        table.add_column(col, justify="right" if col != "method" else "left")
    rows = []
    for method in methods:
        g, f = gens[method], by[method]
        row = {
            "method": method,
            "kl": f["kl_mean"],
            "top1": f["top1_agreement"],
            "gen_agreement": _agreement(ref, g.token_ids),
            "same_prefix": _prefix(ref, g.token_ids),
            "peak_kv_bytes": g.peak_kv_bytes,
            "peak_tokens_per_head": g.peak_tokens_per_head,
            "decode_tok_s": g.decode_tokens_per_second,
            "sinks": f.get("sinks"),
        }
        rows.append(row)
        table.add_row(method, f"{row['kl']:.3f}", f"{row['top1']:.1%}",
                      f"{row['gen_agreement']:.1%}", f"{row['same_prefix']} tok",
                      f"{row['peak_kv_bytes'] / 1e6:.2f} MB", f"{row['decode_tok_s']:.1f}")
    console.print(table)
    console.print("KL / top-1: next-token KL and top-1 agreement with the full cache on held-out "
                  "text; gen=full / prefix: share of greedy tokens equal to the full cache's and "
                  "length of the identical prefix in a long generation; KV: peak KV cache.")
    console.print("[bold]Full cache:[/] " + gens["full"].text[:300].replace("\n", " ") + " ...")
    console.print("[bold]TRIM-KV:[/]    " + gens["trimkv"].text[:300].replace("\n", " ") + " ...")

    # 3. pictures
    out.mkdir(parents=True, exist_ok=True)
    log_betas = gate_log_betas(model, gates, windows[0].ids[None])
    half = median_half_life(log_betas)
    _plots(rows, half, sorted(log_betas), out, budget_eff)
    summary = {"budget": budget_eff, "buffer": buffer, "sinks": sinks, "gates": gates_note,
               "rows": rows,
               "fidelity_windows": fid["windows"], "seq_len": seq_len}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    console.print(f"wrote {out / 'demo_methods.png'}, {out / 'demo_retention.png'}, "
                  f"{out / 'demo.json'}")
    gates.detach(model)
    return summary


def _plots(rows, half: torch.Tensor, layers, out: Path, budget: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [r["method"] for r in rows if r["method"] != "full"]
    axes[0].bar(names, [r["kl"] for r in rows if r["method"] != "full"], color="tab:blue")
    axes[0].set_ylabel("KL to full cache (nats)")
    axes[0].set_title(f"Held-out text, M={budget}")
    axes[1].bar(names, [r["gen_agreement"] for r in rows if r["method"] != "full"],
                color="tab:green")
    axes[1].set_ylabel("greedy tokens equal to full cache")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("Long generation")
    fig.tight_layout()
    fig.savefig(out / "demo_methods.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4 + 0.2 * half.shape[1], 6))
    im = ax.imshow(half.clamp(max=1e4).log10().numpy(), aspect="auto", cmap="viridis")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers))[::2], [str(x) for x in layers][::2])
    ax.set_title("median token half-life (log10 tokens)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "demo_retention.png", dpi=120)
    plt.close(fig)
