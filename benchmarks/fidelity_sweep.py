"""Fidelity sweep: every method at budgets 32-256, same rules for all, two sink regimes, with CIs.

    python benchmarks/fidelity_sweep.py --write-results
    python benchmarks/fidelity_sweep.py --from-json --write-results     # re-render a saved run

Each (regime, method) is saved to ``runs/fidelity_sweep.partial.json`` when done; run the same
command again after a stop and it continues where it was (``--fresh`` starts over). On 2 cores,
run the regimes in two one-thread processes, each with its own ``--store`` and ``--regimes``, then
the whole command with ``--merge-store A --merge-store B``: it takes their finished results. The finished
run, every window's values included, is kept in the repository (``docs/data/fidelity_sweep.json``)
so that any clone can re-render, check or extend it. New gates for TRIM-KV need only its rows:
``--replace trimkv --write-results`` runs the full cache and TRIM-KV on the published windows
(the full cache's NLL must match the published run window by window), puts the new rows in
place of the old ones, keeps every baseline's and recomputes the comparisons.

Text: windows of ``--seq-len`` tokens from three domains training never used (docs/TRAINING.md):
the held-out half of the pydoc topics, libpng's manual (``/usr/share/doc/libpng16-16``) and text
the model writes itself from evaluation-only prompts (generated once and kept in
``benchmarks/data/``: sampling differs between CPU kernels, so every machine reads the same text).
Every method runs in each regime with the same protected sinks (0 for all, then 4 for all),
buffer, positions and budget accounting (checked); decode protocol. Per method and budget: mean
KL(full || method) with a 95% bootstrap CI over windows, top-1 agreement and perplexity ratio;
per budget: TRIM-KV minus the best other method window by window (mean, CI, wins) at the same
budget and at twice the budget. Writes the ``fidelity-sweep-<protocol>`` section of
docs/RESULTS.md, docs/img/fidelity_*.png and ``docs/data/fidelity_sweep.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command, machine, write_section  # noqa: E402

from kvbound.eval.fidelity import make_windows  # noqa: E402
from kvbound.eval.report import fidelity_plots  # noqa: E402
from kvbound.eval.sweep import fidelity_sweep, replace_rows  # noqa: E402
from kvbound.eval.textpool import eval_text_pool, self_generated_eval_texts  # noqa: E402
from kvbound.models import load_model  # noqa: E402
from kvbound.policies import METHODS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LIBPNG = Path("/usr/share/doc/libpng16-16/libpng-manual.txt.gz")
#: training-free baselines the field uses most get every window; the others may get fewer
STRONG = ("trimkv", "streaming", "tova", "h2o", "snapkv", "rkv")


def domain_texts(model, tok, seq_len: int, *, selfgen: int = 12, text_files=(),
                 tune_text=()) -> list[tuple[str, str]]:
    """``(name, text)`` per held-out source: the pydoc half kept for evaluation, the libpng
    manual, ``selfgen`` texts the model wrote (cached in benchmarks/data) and ``text_files``.
    With ``tune_text`` (``"prose"`` or files) only those training-source texts, for tuning."""
    if tune_text:  # tuning: training-source text, never the held-out
        from kvbound.train.data import prose_documents

        return [(f"tune/{i}", "\n\n".join(prose_documents()) if f == "prose"
                 else Path(f).read_text(errors="replace")) for i, f in enumerate(tune_text)]
    texts = [("pydoc-eval-half", "\n\n".join(eval_text_pool()))]
    if LIBPNG.exists():
        texts.append(("libpng-manual", gzip.decompress(LIBPNG.read_bytes()).decode("utf-8",
                                                                                   "replace")))
    cache = ROOT / "benchmarks" / "data" / f"eval_selfgen_{seq_len}.json"
    saved = json.loads(cache.read_text()) if cache.exists() else []
    if len(saved) < selfgen:
        saved = self_generated_eval_texts(model, tok, selfgen, seq_len, seed=0)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(saved))
    texts += [(f"self-generated/{i}", t) for i, t in enumerate(saved[:selfgen])]
    return texts + [(f, Path(f).read_text(errors="replace")) for f in text_files]


def windows_per_domain(tok, texts, seq_len: int, per_domain: int):
    """``per_domain`` windows from each domain (self-generated texts form one domain)."""
    out, taken = [], {}
    for name, text in texts:
        domain = name.split("/")[0]
        room = per_domain - taken.get(domain, 0)
        if room <= 0:
            continue
        try:
            got = make_windows(tok, [(name, text)], seq_len, room)
        except Exception:  # a self-generated text shorter than a window
            continue
        taken[domain] = taken.get(domain, 0) + len(got)
        out += got
    return out, taken


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--budgets", default="32,64,128,256")
    ap.add_argument("--buffer", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--per-domain", type=int, default=11, help="windows per text domain")
    ap.add_argument("--windows", type=int, default=32,
                    help="at most this many windows in all (the last domain gives up the rest)")
    ap.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    ap.add_argument("--selfgen", type=int, default=12, help="self-generated texts")
    ap.add_argument("--weak-windows", type=int, default=None,
                    help="windows for methods outside the strongest baselines (default: all)")
    ap.add_argument("--regimes", default="0,4", help="protected sinks, one regime each")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=GATES",
                    help="also run TRIM-KV with these gates (a directory or shipped name) under "
                         "LABEL, on every window; repeatable")
    ap.add_argument("--set", action="append", default=[], metavar="LABEL.KEY=VALUE",
                    help="a policy setting of a variant, e.g. la8.lookahead=8; repeatable")
    ap.add_argument("--focus", default="trimkv",
                    help="the entry compared with the best other method (a method or LABEL)")
    ap.add_argument("--protocol", default="decode")
    ap.add_argument("--text-file", action="append", default=[])
    ap.add_argument("--tune-text", action="append", default=[], metavar="FILE",
                    help="windows from these files only (one domain; 'prose': the training "
                         "prose of kvbound.train.data), to tune a setting on training-source "
                         "text away from the held-out texts; not with "
                         "--write-results or --replace")
    ap.add_argument("--json", type=Path, default=None,
                    help="the run's JSON (default: docs/data/fidelity_sweep.json with "
                         "--write-results or --from-json, else runs/fidelity_sweep.json)")
    ap.add_argument("--store", type=Path, default=ROOT / "runs" / "fidelity_sweep.partial.json",
                    help="where finished (regime, method) results wait for the rest of the run")
    ap.add_argument("--merge-store", action="append", default=[], type=Path, metavar="FILE",
                    help="add the finished results of another --store (same windows and "
                         "settings) to this run's store first; repeatable")
    ap.add_argument("--from-json", action="store_true")
    ap.add_argument("--fresh", action="store_true",
                    help="forget the (regime, method) results saved by a stopped run")
    ap.add_argument("--replace", default=None, metavar="METHOD",
                    help="re-measure only METHOD (e.g. trimkv with new gates) and put its rows "
                         "into the published --json run (same windows, checked), every other "
                         "row kept")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    if args.tune_text and (args.write_results or args.replace or args.from_json):
        ap.error("--tune-text runs are for tuning only: drop --write-results, --replace and "
                 "--from-json (published rows come from the held-out texts)")
    if args.json is None:
        args.json = (ROOT / "docs" / "data" if args.write_results or args.from_json
                     else ROOT / "runs") / "fidelity_sweep.json"
    published = None
    if args.replace:
        if args.from_json or not args.json.is_file():
            ap.error(f"--replace needs the published run in --json ({args.json} not found) and "
                     "no --from-json")
        published = json.loads(args.json.read_text())
        args.methods = f"full,{args.replace}"
        args.budgets = ",".join(str(b) for b in published["budgets"])
        args.regimes = ",".join(published["regimes"])
        args.buffer, args.protocol = published["buffer"], published["protocol"]
        args.seq_len, args.weak_windows = published["seq_len"], None
    if args.from_json:
        res = json.loads(args.json.read_text())
    else:
        model, tok = load_model(args.model)
        texts = domain_texts(model, tok, args.seq_len, selfgen=args.selfgen,
                             text_files=args.text_file, tune_text=args.tune_text)
        windows, _ = windows_per_domain(tok, texts, args.seq_len, args.per_domain)
        windows = windows[: args.windows]
        taken = {}
        for w in windows:
            taken[w.source.split("/")[0]] = taken.get(w.source.split("/")[0], 0) + 1
        variants = {}
        for v in args.variant:
            label, sep, gates = v.partition("=")
            if not sep or not label or not gates:
                ap.error(f"--variant takes LABEL=GATES, got {v!r}")
            variants[label] = {"method": "trimkv", "gates": gates}
        for item in args.set:
            target, sep, value = item.partition("=")
            label, dot, key = target.partition(".")
            if not sep or not dot or label not in variants or not key:
                ap.error(f"--set takes LABEL.KEY=VALUE for a --variant LABEL, got {item!r}")
            try:
                variants[label][key] = json.loads(value)
            except json.JSONDecodeError:
                variants[label][key] = value
        plain = []
        for m in args.methods.split(","):  # METHOD@SCOPE: that method with a shared budget
            base, at, scope = m.partition("@")
            if at:
                variants[m] = {"method": base, "budget_scope": scope}
            else:
                plain.append(m)
        methods = plain + list(variants)
        strong = STRONG + tuple(variants)
        fewer = ({m: args.weak_windows for m in methods if m not in strong + ("full",)}
                 if args.weak_windows else {})
        store = args.store
        if args.fresh and store.exists():
            store.unlink()
        if args.merge_store:
            merge_stores(store, args.merge_store)
        res = fidelity_sweep(model, tok, windows, methods=methods, store=store,
                             budgets=[int(b) for b in args.budgets.split(",")],
                             buffer=args.buffer, fewer_windows=fewer, protocol=args.protocol,
                             regimes=tuple(int(s) for s in args.regimes.split(",")),
                             batch_size=args.batch_size, variants=variants, focus=args.focus)
        res.update(command=command(), machine=machine(), windows_per_domain=taken,
                   protocol=args.protocol, seq_len=args.seq_len)
        if published is not None:
            rows = [r for reg in res["regimes"].values() for r in reg["results"]]
            gates = sorted({r.get("gates") or "-" for r in rows if r["label"] == args.replace})
            res = replace_rows(published, res, args.replace, note={
                "command": res["command"], "machine": res["machine"], "gates": gates})
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    md = render(res)
    print(md)
    if args.write_results:  # the plots belong to the section: written with it, never alone
        img = ROOT / "docs" / "img"
        img.mkdir(parents=True, exist_ok=True)
        for sinks, r in res["regimes"].items():
            fidelity_plots(r, img / f"fidelity_{res['protocol']}_sinks{sinks}")
        write_section(f"fidelity-sweep-{res['protocol']}", md)


def merge_stores(store: Path, others: list[Path]) -> None:
    """``--merge-store``: :func:`kvbound.eval.sweep.merge_stores`, its errors as CLI messages."""
    from kvbound.errors import KVBoundError
    from kvbound.eval.sweep import merge_stores as merge

    try:
        merge(store, others)
    except KVBoundError as e:
        sys.exit(str(e))


def _ci(x: float, ci: list[float], fmt: str = ".4f") -> str:
    return f"{x:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _comparison_table(comparisons: list[dict], name: str) -> list[str]:
    out = [f"| M | {name} KL | best other at M | its KL | difference [95% CI] | wins | "
           "best other at 2M | its KL | difference [95% CI] | wins |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        v = c["vs_best"]
        row = (f"| {c['budget']} | {c['kl']:.4f} | {v['other']} | {v['other_kl']:.4f} | "
               f"{_ci(v['mean'], v['ci'], '+.4f')} | {v['wins']}/{v['n']} |")
        d = c.get("vs_best_at_2m")
        row += (f" {d['other']} | {d['other_kl']:.4f} | {_ci(d['mean'], d['ci'], '+.4f')} | "
                f"{d['wins']}/{d['n']} |" if d else " - | - | - | - |")
        out.append(row)
    return out


def _verdict(comparisons: list[dict], name: str) -> str:
    """Per budget, from the CIs of the paired differences: at M, and against 2M where known."""
    def word(v, at):
        if v["ci"][1] < 0:
            return f"wins against {v['other']}{at} (CI below 0)"
        if v["ci"][0] > 0:
            return f"loses to {v['other']}{at} (CI above 0)"
        return f"no clear difference with {v['other']}{at}"

    parts = []
    for c in comparisons:
        text = f"M={c['budget']}: {name} {word(c['vs_best'], '')}"
        if c.get("vs_best_at_2m"):
            text += f", and {word(c['vs_best_at_2m'], ' given 2M')}"
        parts.append(text)
    return "; ".join(parts)


def render(res: dict) -> str:
    budgets, protocol = res["budgets"], res["protocol"]
    name = res.get("focus", "trimkv")
    any_regime = next(iter(res["regimes"].values()))
    domains = ", ".join(f"{k} ({v})" for k, v in res["windows_per_domain"].items())
    lines = [
        f"## Fidelity to the full cache, every method under the same rules ({protocol} protocol)",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']}  ",
        *(f"Rows of {r['method']} (gates {', '.join(r['gates'])}) re-measured on the same "
          f"windows by `{r['command']}` on {r['machine']}; the full cache's NLL matched the run "
          "above window by window.  " for r in res.get("replaced", [])),
        f"{any_regime['windows']} windows of {res['seq_len']} tokens from text training never "
        f"saw: {domains}. Buffer {res['buffer']}; every method in a regime has the same protected "
        "sinks, buffer, positions and budget accounting (checked by `check_same_rules`); SnapKV "
        "and PyramidKV observe the last min(32, M/2) queries, R-KV min(8, M/2). KL(full || "
        "method) in nats over positions past the budget, mean over windows with a 95% bootstrap "
        "CI; top-1 agreement; perplexity ratio (method / full)."
        + (f" Methods outside {', '.join(STRONG)} were scored on the first "
           f"{next(iter(res['fewer_windows'].values()))} windows only."
           if res.get("fewer_windows") else ""),
    ]
    for sinks, r in res["regimes"].items():
        by = {(x["label"], x["budget"]): x for x in r["results"]}
        labels = [m for m in dict.fromkeys(x["label"] for x in r["results"]) if m != "full"]
        best = {b: min(by[(m, b)]["kl_mean"] for m in labels) for b in budgets}
        lines += ["", f"### Protected sinks: {sinks} for every method", "",
                  "| method | windows | " + " | ".join(f"KL M={b} [95% CI]" for b in budgets)
                  + " | " + " | ".join(f"top-1 M={b}" for b in budgets) + " | "
                  + " | ".join(f"ppl x M={b}" for b in budgets) + " |",
                  "|---|---|" + "---|" * (3 * len(budgets))]
        for m in labels:
            cells = []
            for b in budgets:
                x = by[(m, b)]
                cell = _ci(x["kl_mean"], x["kl_ci"])
                cells.append(f"**{cell}**" if x["kl_mean"] == best[b] else cell)
            top = " | ".join(f"{by[(m, b)]['top1_agreement']:.3f}" for b in budgets)
            ppl = " | ".join(f"{by[(m, b)]['ppl_ratio']:.3f}" for b in budgets)
            lines.append(f"| {m} | {by[(m, budgets[0])]['windows']} | {' | '.join(cells)} | "
                         f"{top} | {ppl} |")
        lines += ["", f"{name} minus the best other method, window by window (sinks {sinks}; "
                  f"negative = {name} closer to the full cache; wins = windows where {name}'s "
                  "KL is lower):", "", *_comparison_table(r["comparisons"], name),
                  "", f"Verdict, sinks {sinks}: {_verdict(r['comparisons'], name)}.", "",
                  f"![KL vs budget, sinks {sinks}](img/fidelity_{protocol}_sinks{sinks}_kl_mean.png)"]
    variants = _variant_rows(res, name)
    if variants:
        lines += ["", "### Variants against their base (same windows, paired)", "",
                  "Each variant minus its base, window by window (negative = the variant is "
                  "closer to the full cache). `METHOD@layer` / `METHOD@global`: the heads of a "
                  "layer / of the whole model share one budget of the same total bytes as M per "
                  "head; attention scores are read per head as a distribution over the head's own "
                  "tokens (AdaKV's normalisation). Other labels: the focus's method with other "
                  "gates or settings.", "",
                  "| sinks | variant | base | M | its KL | difference [95% CI] | wins |",
                  "|---|---|---|---|---|---|---|", *variants]
    across = res.get("across")
    if across:
        a, b = across["focus_sinks"], across["others_sinks"]
        lines += ["", f"### {name} with {a} sinks against every other method with {b}", "",
                  f"{name} without the protection the others get (windows paired as above):", "",
                  *_comparison_table(across["comparisons"], name), "",
                  f"Verdict, {name} at sinks {a} vs the others at sinks {b}: "
                  f"{_verdict(across['comparisons'], name)}."]
    return "\n".join(lines)


def _variant_rows(res: dict, name: str) -> list[str]:
    """Table rows, per budget: every budget-scope entry (``METHOD@SCOPE``) against its method
    with per-head budgets, and every other variant of the focus's method against the focus."""
    from kvbound.eval.stats import paired_difference

    out = []
    for sinks, r in res["regimes"].items():
        by = {(x["label"], x["budget"]): x for x in r["results"]}
        kind = next((x["method"] for x in r["results"] if x["label"] == name), name)
        pairs = {}
        for x in r["results"]:
            label = x["label"]
            if "@" in label:
                pairs[label] = label.partition("@")[0]
            elif x["method"] == kind and label != name:
                pairs[label] = name
        for label, base_label in pairs.items():
            for m in res["budgets"]:
                mine, base = by.get((label, m)), by.get((base_label, m))
                if mine is None or base is None:
                    continue
                n = min(len(mine["kl_per_window"]), len(base["kl_per_window"]))
                d = paired_difference(mine["kl_per_window"][:n], base["kl_per_window"][:n])
                out.append(f"| {sinks} | {label} | {base_label} | {m} | {mine['kl_mean']:.4f} | "
                           f"{_ci(d['mean'], d['ci'], '+.4f')} | {d['wins']}/{d['n']} |")
    return out


if __name__ == "__main__":
    main()
