"""Pictures and summaries of what the retention gates keep (``kvbound viz``); the numbers come
from :mod:`kvbound.analysis`, this module only runs the passes and renders.

:func:`run_viz` runs one text (optionally followed by a greedy continuation) through the model
twice: once with the full cache to read every token's log retention ``log beta`` per (layer, KV
head), and once through a memory-bounded TRIM-KV cache (budget ``M``, buffer ``b``) fed in chunks of
``b`` tokens, which reproduces token-by-token decoding exactly (evictions only ever happen when a
new chunk arrives). After every chunk it records which positions each (layer, KV head) still holds.
From that it writes into ``out``:

``half_life.png``
    Median token half-life (``ln(1/2) / log beta``, log10 tokens) per gated layer x KV head, with
    each head's role letter (S sink, G gist, W sliding window, C content).
``timeline_L{l}_H{h}.png``
    Decoding step x position for a few (layer, head) pairs: kept / evicted / not yet seen, like
    the paper's eviction matrices (section 9 of the research notes).
``retention.html``
    The text, each token coloured by its half-life in one (layer, head); underlined tokens are
    still in that head's cache at the end of the bounded run.
``survivors.html``
    The text coloured by how many (layer, KV head) pairs still hold each token at the end.
``head_roles.json`` / ``head_roles.md``
    An automatic role per (layer, KV head) (:func:`classify_head`), per-layer sparsity and role
    counts.

Everything is also returned as data (tensors, dicts) so tests assert on numbers, not pixels.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from kvbound.analysis import (
    ROLE_LETTERS,
    ROLES,
    UNDETERMINED,
    HeadRole,
    RoleThresholds,
    bounded_snapshots,
    budget_allocation,
    classify_head,
    gate_log_betas,
    half_lives,
    is_punctuation,
    json_safe,
    median_half_life,
    timeline_from_snapshots,
)
from kvbound.errors import KVBoundError


def run_viz(
    model,
    tokenizer,
    gates=None,
    *,
    text: str | None = None,
    ids: torch.Tensor | None = None,
    out: Path,
    budget: int = 64,
    buffer: int = 16,
    sinks: int = 0,
    heads: list[tuple[int, int]] | None = None,
    max_new_tokens: int = 0,
    html_head: tuple[int, int] | None = None,
    thresholds: RoleThresholds | None = None,
) -> dict:
    """Write the retention pictures and head-role summary for one text into ``out``.

    ``gates``: :class:`~kvbound.gates.RetentionGates`, a directory / shipped name, or ``None`` (the
    gates attached to the model, else the ones shipped for it). They are attached for the run and
    the model's previous hook state is restored afterwards. Give exactly one of ``text`` (tokenized
    as is, no chat template) and ``ids`` ((T,) or (1, T)). With ``max_new_tokens > 0`` the model
    first continues the text greedily (full cache); everything below then covers text +
    continuation, the continuation being fed (teacher-forced) through the bounded cache.

    ``heads``: (layer, KV head) pairs to draw timelines for; default: up to 4 gated layers spread
    over depth (cycling over heads), plus one example of each role found. ``html_head``: the pair
    coloured in ``retention.html``; default: the first gist head, else the pair whose token
    half-lives vary most. ``sinks``: protected first tokens (0 lets sink heads show up).

    Returns a dict: ``ids`` (T,), ``n_text``, ``n_generated``, ``layers`` (gated layers),
    ``log_betas`` {layer: (H_kv, T)}, ``half_life`` (layers, H_kv) median half-lives, ``punct``
    (T,) bool, ``snapshots`` {layer: [(t, (H_kv, n))]}, ``timelines`` {(l, h): (T, T) bool},
    ``heads``, ``html_head``, ``survivors`` (T,) count of (layer, head) pairs holding each token at
    the end, ``head_roles`` [HeadRole], ``roles`` (the head_roles.json content), ``stats`` (cache
    statistics), ``files`` {name: Path}.
    """
    from kvbound.generation import resolve_gates
    from kvbound.hooks import detach, get_state

    if (text is None) == (ids is None):
        raise KVBoundError("Give exactly one of text or ids.")
    if tokenizer is None:
        raise KVBoundError("run_viz needs the tokenizer (to show and classify tokens).")
    if text is not None:
        if not text:
            raise KVBoundError("The text is empty.")
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    ids = torch.as_tensor(ids).long().view(1, -1).cpu()
    if ids.shape[1] == 0:
        raise KVBoundError("No tokens to visualise.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise KVBoundError(f"max_new_tokens must be >= 0, got {max_new_tokens!r}.")
    if not isinstance(sinks, int) or not 0 <= sinks < budget:
        raise KVBoundError(f"sinks must be in [0, budget), got {sinks!r}.")

    state = get_state(model)
    prev = (state.gates, state.mode) if state is not None else None
    gates = resolve_gates(model, gates)
    gates.attach(model)
    get_state(model).mode = "inference"
    try:
        return _run(model, tokenizer, gates, ids, out=Path(out), budget=budget, buffer=buffer,
                    sinks=sinks, heads=heads, max_new_tokens=max_new_tokens,
                    html_head=html_head, thresholds=thresholds or RoleThresholds())
    finally:
        if prev is None:
            detach(model)
        else:
            st = get_state(model)
            st.gates, st.mode = prev


def _run(model, tokenizer, gates, ids, *, out, budget, buffer, sinks, heads, max_new_tokens,
         html_head, thresholds) -> dict:
    n_text = ids.shape[1]
    if max_new_tokens:
        ids = _continue(model, tokenizer, ids, max_new_tokens)
    total = ids.shape[1]
    layers = sorted(int(i) for i in gates.config.gated_layers)
    n_heads = int(gates.config.num_kv_heads)
    for pair in list(heads or []) + ([html_head] if html_head is not None else []):
        if len(pair) != 2 or pair[0] not in layers or not 0 <= pair[1] < n_heads:
            raise KVBoundError(f"(layer, head) {tuple(pair)!r} is not a gated layer and KV head: "
                              f"layers {layers}, heads 0..{n_heads - 1}.")

    log_betas = gate_log_betas(model, gates, ids)
    half = median_half_life(log_betas)
    punct = is_punctuation(tokenizer, ids[0]).bool()
    snaps, cache = bounded_snapshots(model, ids, budget=budget, buffer=buffer, sinks=sinks)

    roles: list[HeadRole] = []
    for li, layer in enumerate(layers):
        for h in range(n_heads):
            r = classify_head([(t, p[h]) for t, p in snaps[layer]], punct, sinks=sinks,
                              thresholds=thresholds, layer=layer, head=h)
            r.median_half_life = float(half[li, h])
            roles.append(r)
    by_pair = {(r.layer, r.head): r for r in roles}

    chosen = [tuple(p) for p in heads] if heads else _default_heads(layers, n_heads, roles)
    timelines = {(l, h): timeline_from_snapshots(snaps[l], h, total) for l, h in chosen}
    if html_head is None:
        html_head = _default_html_head(log_betas, roles)
    html_head = tuple(html_head)

    survivors = torch.zeros(total, dtype=torch.long)
    final = {}
    for layer in layers:
        pos = snaps[layer][-1][1]
        final[layer] = pos
        for h in range(n_heads):
            p = pos[h]
            survivors += torch.bincount(p[p >= 0], minlength=total)

    summary = _summary(roles, layers, log_betas, snaps, budget=budget, buffer=buffer, sinks=sinks,
                       total=total, n_text=n_text, thresholds=thresholds)
    allocation = {scope: budget_allocation(model, ids, budget=budget, buffer=buffer, sinks=sinks,
                                           scope=scope) for scope in ("layer", "global")}

    out.mkdir(parents=True, exist_ok=True)
    files = {"half_life": out / "half_life.png"}
    _plot_half_life(half, layers, by_pair, files["half_life"])
    for (l, h), grid in timelines.items():
        path = out / f"timeline_L{l}_H{h}.png"
        _plot_timeline(grid, l, h, by_pair[(l, h)], budget, buffer, n_text, path)
        files[f"timeline_L{l}_H{h}"] = path
    files["budget_allocation"] = out / "budget_allocation.png"
    _plot_allocation(allocation, layers, budget, files["budget_allocation"])
    tokens = [_token_text(tokenizer, i) for i in ids[0].tolist()]
    l, h = html_head
    resident_end = torch.zeros(total, dtype=torch.bool)
    p = final[l][h]
    resident_end[p[p >= 0]] = True
    files["retention"] = out / "retention.html"
    files["retention"].write_text(_retention_html(tokens, log_betas[l][h], resident_end, l, h,
                                                  by_pair[(l, h)].role, n_text), encoding="utf-8")
    files["survivors"] = out / "survivors.html"
    files["survivors"].write_text(_survivors_html(tokens, survivors, len(layers) * n_heads,
                                                  budget, buffer, sinks, n_text), encoding="utf-8")
    files["head_roles_json"] = out / "head_roles.json"
    files["head_roles_json"].write_text(json.dumps(summary, indent=2), encoding="utf-8")
    files["head_roles_md"] = out / "head_roles.md"
    files["head_roles_md"].write_text(_roles_markdown(summary), encoding="utf-8")

    return {
        "ids": ids[0], "n_text": n_text, "n_generated": total - n_text, "layers": layers,
        "log_betas": log_betas, "half_life": half, "punct": punct, "snapshots": snaps,
        "timelines": timelines, "heads": list(timelines), "html_head": html_head,
        "survivors": survivors, "final_resident": final, "head_roles": roles, "roles": summary,
        "stats": cache.stats().to_dict(), "budget_allocation": allocation, "files": files,
    }


@torch.no_grad()
def _continue(model, tokenizer, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation with the full cache; returns prompt + new ids (1, T)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                  top_k=None, attention_mask=torch.ones_like(ids).to(model.device))
    if pad is not None:
        kwargs["pad_token_id"] = pad
    out = model.generate(ids.to(model.device), **kwargs)
    return out.cpu()


def _default_heads(layers: list[int], n_heads: int, roles: list[HeadRole]) -> list[tuple]:
    """Up to 4 layers spread over depth (head cycling), then one example per role not shown."""
    k = min(4, len(layers))
    idx = sorted({round(j * (len(layers) - 1) / max(k - 1, 1)) for j in range(k)})
    chosen = [(layers[i], j % n_heads) for j, i in enumerate(idx)]
    shown = {r.role for r in roles if (r.layer, r.head) in chosen}
    for role in ROLES:
        if role in shown or len(chosen) >= 8:
            continue
        example = next((r for r in roles if r.role == role), None)
        if example is not None:
            chosen.append((example.layer, example.head))
            shown.add(role)
    return chosen


def _default_html_head(log_betas: dict[int, torch.Tensor], roles: list[HeadRole]) -> tuple:
    gist = next((r for r in roles if r.role == "gist"), None)
    if gist is not None:
        return (gist.layer, gist.head)
    best, spread = None, -1.0
    for layer in sorted(log_betas):
        hl = half_lives(log_betas[layer]).clamp(min=1e-3, max=1e9).log10()
        for h in range(hl.shape[0]):
            s = float(hl[h].std()) if hl.shape[1] > 1 else 0.0
            if s > spread:
                best, spread = (layer, h), s
    return best


def _summary(roles, layers, log_betas, snaps, *, budget, buffer, sinks, total, n_text,
             thresholds) -> dict:
    per_layer = []
    k = thresholds.first_tokens
    for layer in layers:
        mine = [r for r in roles if r.layer == layer]
        hl = half_lives(log_betas[layer])
        late = [(t, p) for t, p in snaps[layer] if t - int((p[0] >= 0).sum()) >= k]
        per_layer.append({
            "layer": layer,
            "median_half_life": float(hl.median()),
            "mean_log10_half_life": float(hl.clamp(min=1e-3, max=1e9).log10().mean()),
            "long_lived_share": float((hl >= budget).float().mean()),
            "resident_share": float(np.mean([int((p[0] >= 0).sum()) / t for t, p in late]))
            if late else 1.0,
            "outside_window_share": float(np.mean([1 - r.window_coverage for r in mine])),
            "roles": {role: sum(r.role == role for r in mine) for role in
                      (*ROLES, UNDETERMINED) if any(r.role == role for r in mine)},
        })
    counts = {role: sum(r.role == role for r in roles) for role in (*ROLES, UNDETERMINED)}
    warnings = []
    if counts[UNDETERMINED]:
        warnings.append(f"{total} tokens never overflowed budget + buffer ({budget} + {buffer}) "
                        "by enough to tell heads apart: give a longer text or a smaller budget.")
    return json_safe({
        "budget": budget, "buffer": buffer, "sinks": sinks, "tokens": total,
        "text_tokens": n_text, "generated_tokens": total - n_text,
        "thresholds": asdict(thresholds),
        "counts": counts,
        "layers": per_layer,
        "heads": [r.to_dict() for r in roles],
        "warnings": warnings,
        "notes": {
            "half_life": "tokens until beta^age = 1/2, from the gates on the full-cache pass",
            "long_lived_share": "share of (token, head) pairs with half-life >= budget; lower = "
                                "sparser layer",
            "resident_share": "resident tokens / tokens seen, averaged over late snapshots",
            "outside_window_share": "mean share of a head's cache spent on tokens older than its "
                                    "recent window",
        },
    })


def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e5 else f"{x:.2e}"
    return str(x)


def _roles_markdown(summary: dict) -> str:
    th = summary["thresholds"]
    lines = [
        "# Retention head roles",
        "",
        f"TRIM-KV bounded run: budget M={summary['budget']}, buffer b={summary['buffer']}, "
        f"protected sinks {summary['sinks']}; {summary['tokens']} tokens "
        f"({summary['text_tokens']} text + {summary['generated_tokens']} generated).",
        "",
        "Counts: " + ", ".join(f"{k} {v}" for k, v in summary["counts"].items() if v),
        "",
        "## Per layer",
        "",
        "| layer | median half-life | long-lived share (>= M) | resident share | "
        "outside-window share | roles |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for row in summary["layers"]:
        roles = ", ".join(f"{k} {v}" for k, v in row["roles"].items())
        lines.append(f"| {row['layer']} | {_fmt(row['median_half_life'], 1)} | "
                     f"{_fmt(row['long_lived_share'])} | {_fmt(row['resident_share'])} | "
                     f"{_fmt(row['outside_window_share'])} | {roles} |")
    lines += [
        "",
        "## Per head",
        "",
        "| layer | head | role | traits | median half-life | window | window coverage | "
        "first-token keep | old-token keep | punct share | punct base |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["heads"]:
        lines.append(
            f"| {r['layer']} | {r['head']} | {r['role']} | {', '.join(r['traits']) or '-'} | "
            f"{_fmt(r['median_half_life'], 1)} | {_fmt(r['window'], 0)} | "
            f"{_fmt(r['window_coverage'])} | {_fmt(r['first_keep'])} | "
            f"{_fmt(r['background_keep'])} | {_fmt(r['punct_share'])} | {_fmt(r['punct_base'])} |"
        )
    lines += [
        "",
        "## How roles are assigned",
        "",
        f"Measured on snapshots after each chunk of b tokens, once >= {th['first_tokens']} tokens "
        "were evicted. The recent window is the run of resident tokens from the newest backwards "
        f"with holes of <= {th['max_hole']} tokens; first tokens = positions < "
        f"{th['first_tokens']}.",
        "",
        f"- **gist**: punctuation share of resident tokens >= {th['gist_ratio']}x its base rate "
        f"and >= {th['gist_min_share']}.",
        f"- **sink**: (no protected sinks) a first token resident in >= {th['sink_keep']} of "
        f"snapshots and >= {th['sink_enrichment']}x the retention of other old tokens.",
        f"- **sliding_window**: the recent window holds >= {th['window_coverage']} of the resident "
        "tokens (its width cannot exceed M + b).",
        "- **content**: none of the above. Precedence: gist > sink > sliding_window > content.",
        "",
    ]
    for w in summary["warnings"]:
        lines.append(f"> warning: {w}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_half_life(half: torch.Tensor, layers: list[int], by_pair: dict, path: Path) -> None:
    plt = _plt()
    n_layers, n_heads = half.shape
    data = half.clamp(min=1e-2, max=1e9).log10().numpy()
    fig, ax = plt.subplots(figsize=(3.2 + 0.55 * n_heads, 1.6 + 0.28 * n_layers))
    im = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    every = max(1, n_layers // 16)
    ax.set_yticks(range(n_layers)[::every], [str(x) for x in layers][::every])
    if n_layers * n_heads <= 400:
        mid = (np.nanmin(data) + np.nanmax(data)) / 2
        for i, layer in enumerate(layers):
            for h in range(n_heads):
                letter = ROLE_LETTERS[by_pair[(layer, h)].role]
                ax.text(h, i, letter, ha="center", va="center", fontsize=7,
                        color="white" if data[i, h] < mid else "black")
    ax.set_title("median token half-life\n(log10 tokens; G gist S sink W window C content)",
                 fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_allocation(allocation: dict[str, torch.Tensor], layers: list[int], budget: int,
                     path: Path) -> None:
    """Tokens held per (layer, KV head) when heads share the budget (one panel per scope)."""
    plt = _plt()
    n_layers, n_heads = next(iter(allocation.values())).shape
    fig, axes = plt.subplots(1, len(allocation), squeeze=False,
                             figsize=(1.2 + (2.0 + 0.55 * n_heads) * len(allocation),
                                      1.6 + 0.28 * n_layers))
    top = max(float(a.max()) for a in allocation.values()) or 1.0
    for ax, (scope, held) in zip(axes[0], allocation.items()):
        im = ax.imshow(held.float().numpy(), aspect="auto", cmap="magma", vmin=0, vmax=top)
        ax.set_xlabel("KV head")
        ax.set_xticks(range(n_heads))
        every = max(1, n_layers // 16)
        ax.set_yticks(range(n_layers)[::every], [str(x) for x in layers][::every])
        ax.set_title(f"budget_scope={scope}\n(M={budget} per head on average)", fontsize=9)
        if n_layers * n_heads <= 400:
            for i in range(n_layers):
                for h in range(n_heads):
                    v = int(held[i, h])
                    ax.text(h, i, str(v), ha="center", va="center", fontsize=6,
                            color="white" if v < top / 2 else "black")
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="tokens held")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot_timeline(grid: torch.Tensor, layer: int, head: int, role: HeadRole, budget: int,
                   buffer: int, n_text: int, path: Path) -> None:
    from matplotlib.colors import ListedColormap

    plt = _plt()
    total = grid.shape[0]
    img = torch.zeros(total, total, dtype=torch.uint8)
    img[torch.ones(total, total, dtype=torch.bool).tril()] = 1  # seen, evicted
    img[grid] = 2  # kept
    fig, ax = plt.subplots(figsize=(6, 5.4))
    ax.imshow(img.numpy(), cmap=ListedColormap(["white", "#d9d9d9", "#08306b"]), vmin=0, vmax=2,
              interpolation="nearest", aspect="auto")
    if n_text < total:
        ax.axhline(n_text - 0.5, color="tab:red", lw=0.8, ls="--")
        ax.axvline(n_text - 0.5, color="tab:red", lw=0.8, ls="--")
    ax.set_xlabel("token position")
    ax.set_ylabel("decoding step")
    width = f", window ~{role.window:.0f}" if role.role == "sliding_window" else ""
    ax.set_title(f"layer {layer}, KV head {head}: {role.role}{width}\n"
                 f"TRIM-KV M={budget}, b={buffer} (dark = kept, grey = evicted)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
def _token_text(tokenizer, token_id: int) -> str:
    try:
        s = tokenizer.decode([token_id])
    except Exception:  # some tokenizers refuse lone special ids
        s = ""
    return s if s else f"[{token_id}]"


def _colour(value: float, cmap) -> tuple[str, str]:
    from matplotlib.colors import to_hex

    r, g, b, _ = cmap(min(max(value, 0.0), 1.0))
    luminance = 0.299 * r + 0.587 * g + 0.114 * b
    return to_hex((r, g, b)), "#000" if luminance > 0.55 else "#fff"


def _legend(cmap, lo: str, hi: str, label: str) -> str:
    from matplotlib.colors import to_hex

    stops = ", ".join(to_hex(cmap(i / 10)[:3]) for i in range(11))
    return (f'<div class="legend"><span>{html.escape(lo)}</span>'
            f'<span class="bar" style="background: linear-gradient(to right, {stops})"></span>'
            f'<span>{html.escape(hi)}</span> <em>{html.escape(label)}</em></div>')


def _page(title: str, intro: str, legend: str, spans: list[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>\n<style>\n"
        "body { font-family: sans-serif; margin: 2em; max-width: 60em; }\n"
        ".text { font-family: monospace; white-space: pre-wrap; line-height: 1.9; }\n"
        ".text span { border-radius: 2px; }\n"
        ".kept { border-bottom: 2px solid #d62728; }\n"
        ".gen { display: block; margin: 0.6em 0; color: #555; font-style: italic; }\n"
        ".legend { display: flex; align-items: center; gap: 0.5em; margin: 1em 0; }\n"
        ".bar { display: inline-block; width: 16em; height: 1em; }\n"
        "</style></head><body>\n"
        f"<h2>{html.escape(title)}</h2>\n<p>{intro}</p>\n{legend}\n"
        f"<div class=\"text\">{''.join(spans)}</div>\n</body></html>\n"
    )


def _span(token: str, bg: str, fg: str, tip: str, cls: str = "") -> str:
    klass = f' class="{cls}"' if cls else ""
    return (f'<span{klass} style="background:{bg};color:{fg}" title="{html.escape(tip)}">'
            f"{html.escape(token)}</span>")


def _gen_marker(i: int, n_text: int) -> str:
    return '<span class="gen">[generated continuation]</span>' if i == n_text and i else ""


def _retention_html(tokens: list[str], log_beta: torch.Tensor, kept: torch.Tensor, layer: int,
                    head: int, role: str, n_text: int) -> str:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    hl = half_lives(log_beta.float())
    val = hl.clamp(min=1e-2, max=1e9).log10()
    lo, hi = math.floor(float(val.min())), math.ceil(float(val.max()))
    hi = max(hi, lo + 1)
    spans = []
    for i, tok in enumerate(tokens):
        bg, fg = _colour((float(val[i]) - lo) / (hi - lo), cmap)
        tip = (f"pos {i}: log beta {float(log_beta[i]):.3g}, half-life {float(hl[i]):.3g} tokens, "
               f"{'kept' if kept[i] else 'evicted'} at the end")
        spans.append(_gen_marker(i, n_text) + _span(tok, bg, fg, tip, "kept" if kept[i] else ""))
    intro = (f"Each token coloured by its retention in layer {layer}, KV head {head} (role: "
             f"{html.escape(role)}): half-life = tokens until its importance beta^age halves. "
             "Underlined tokens are still in this head's cache at the end of the bounded run. "
             "Hover a token for its numbers.")
    legend = _legend(cmap, f"10^{lo}", f"10^{hi}", "half-life (tokens, log scale)")
    return _page(f"Retention, layer {layer} head {head}", intro, legend, spans)


def _survivors_html(tokens: list[str], survivors: torch.Tensor, pairs: int, budget: int,
                    buffer: int, sinks: int, n_text: int) -> str:
    import matplotlib

    cmap = matplotlib.colormaps["YlOrRd"]
    spans = []
    for i, tok in enumerate(tokens):
        c = int(survivors[i])
        bg, fg = _colour(c / max(pairs, 1), cmap)
        spans.append(_gen_marker(i, n_text)
                     + _span(tok, bg, fg, f"pos {i}: held by {c} of {pairs} (layer, head) pairs"))
    intro = (f"Each token coloured by how many of the {pairs} (layer, KV head) pairs still hold it "
             f"at the end of a TRIM-KV run with budget M={budget}, buffer b={buffer}, "
             f"{sinks} protected sinks. Hover a token for its count.")
    legend = _legend(cmap, "0", str(pairs), "(layer, head) pairs holding the token")
    return _page("Surviving tokens", intro, legend, spans)
