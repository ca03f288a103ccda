"""The table of gate-training runs in docs/TRAINING.md: one row per run, with its numbers.

    python benchmarks/training_runs.py --add shipped-v1=src/kvbound/shipped_gates/smollm2-135m
    python benchmarks/training_runs.py --add evict-s0=runs/gates-evict-s0 --note evict-s0="..."

``--add LABEL=DIR`` reads the run's recorded command, configuration, wall time and training
losses (gates.json / train_log.jsonl in DIR, or its newest checkpoint) and, when the fidelity
sweep (docs/data/fidelity_sweep.json, ``--sweep`` files or the partial store in runs/) has rows
for the run's gates (matched by their digest: the shipped gates, or ``--variant LABEL=DIR``),
their mean KL per budget and sink regime. Rows are kept in docs/training_runs.json (written by this script only, so runs
stay listed after their directories are gone) and rendered between the ``training-runs`` markers
of docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import replace_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "docs" / "training_runs.json"
DOC = ROOT / "docs" / "TRAINING.md"
SWEEP = ROOT / "docs" / "data" / "fidelity_sweep.json"
PARTIAL = ROOT / "runs" / "fidelity_sweep.partial.json"
#: configuration fields that tell runs apart (the rest is in each run's command)
LEVERS = ("init_gates", "train_sinks", "gate_positions", "gate_log_alpha", "position_lr_scale",
          "train_position_only", "freeze_positions", "evict_aware", "evict_tau",
          "evict_scale", "evict_budgets", "evict_decay", "objective", "rank_horizon",
          "rank_stride", "rank_query_step", "rank_scope", "rank_listnet_weight",
          "rank_topm_weight", "rank_topm_tau", "rank_topm_sequential", "rank_topm_relative",
          "lambda_cap",
          "memory_size", "seq_len", "intermediate_size", "data", "steps", "lr")
#: levers whose default is True: named only when switched off
SHOWN_WHEN_FALSE = ("evict_decay",)
#: levers not named at their default value
HIDDEN_AT = {"position_lr_scale": 1.0, "objective": "distill", "lambda_cap": 1.0,
             "rank_listnet_weight": 1.0, "rank_topm_weight": 0.0, "rank_topm_tau": 1.0}
#: levers that only mean something with the eviction-aware objective (evict_budgets also cycles
#: the attention-rank top-M cut)
EVICT_ONLY = ("evict_tau", "evict_scale", "evict_budgets", "evict_decay")
#: levers that only mean something with the attention-rank objective
RANK_ONLY = ("rank_horizon", "rank_stride", "rank_query_step", "rank_scope",
             "rank_listnet_weight", "rank_topm_weight", "rank_topm_tau", "rank_topm_sequential",
             "rank_topm_relative")


def _run_record(directory: Path) -> dict:
    from kvbound.io import read_versioned

    meta_path = directory / "gates.json"
    if not meta_path.exists():
        ckpt = read_versioned(directory, "checkpoint")
        if ckpt is None or not (ckpt / "gates.json").exists():
            raise SystemExit(f"{directory}: no gates.json and no checkpoint")
        meta_path = ckpt / "gates.json"
    meta = json.loads(meta_path.read_text())
    training = meta.get("metadata", {}).get("training", {})
    log_path = directory / "train_log.jsonl"
    log = [json.loads(x) for x in log_path.read_text().splitlines()] if log_path.exists() else []
    log = [r for r in log if r["step"] < training.get("steps_done", len(log))]
    tail = log[-20:]
    from kvbound.gates import RetentionGates

    gates = RetentionGates.load(meta_path.parent)
    return {
        "ref": gates.ref(),
        "command": training.get("command"),
        "config": training.get("config", {}),
        "init_gates": training.get("init_gates"),
        "steps_done": training.get("steps_done"),
        "wall_minutes": round(training.get("wall_seconds", 0) / 60, 1),
        "train_kl_last20": round(sum(r["kl"] for r in tail) / len(tail), 4) if tail else None,
        "half_life_last20": (round(sum(r["half_life_median"] for r in tail) / len(tail), 1)
                             if tail else None),
    }


def _per_head(row: dict) -> bool:
    """The table's columns are per-head budgets: rows of a shared budget (a ``--set
    LABEL.budget_scope=...`` variant, same gates) are left out."""
    return (row.get("settings") or {}).get("budget_scope", "head") == "head"


def _sweep_rows(ref: str, extra: tuple[Path, ...] = ()) -> dict:
    """{sinks: {budget: (kl_mean, windows)}} of the rows run with gates ``ref``, in the finished
    sweep, the ``extra`` finished sweeps (e.g. a run of fewer budgets) or the partial sweep
    (whichever has more windows)."""
    out: dict = {}
    for path in (SWEEP, *extra):
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        for sinks, regime in res.get("regimes", {}).items():
            for r in regime["results"]:
                if r.get("gates") != ref or not _per_head(r):
                    continue
                cell = out.setdefault(str(sinks), {})
                if r["windows"] >= cell.get(str(r["budget"]), [0, 0])[1]:
                    cell[str(r["budget"])] = [r["kl_mean"], r["windows"]]
    if PARTIAL.exists():  # groups finished since the last render: windows add up
        from kvbound.eval.fidelity import merge_results

        done = json.loads(PARTIAL.read_text()).get("done", {})
        by_regime: dict = {}
        for key, part in done.items():
            _, group, sinks, _ = key.split("/", 3)
            if part.get("results") and part["results"][0].get("gates") == ref:
                by_regime.setdefault(sinks, []).append((int(group), part))
        for sinks, parts in by_regime.items():
            merged = merge_results([p for _, p in sorted(parts)])
            got = {str(r["budget"]): [r["kl_mean"], r["windows"]] for r in merged["results"]
                   if _per_head(r)}
            if sum(v[1] for v in got.values()) >= sum(v[1] for v in out.get(sinks, {}).values()):
                out[sinks] = got
    return out


def render(runs: dict) -> str:
    budgets = sorted({int(b) for r in runs.values() for s in r.get("sweep", {}).values()
                      for b in s}) or [32, 64, 128]
    head = ("| run | levers | steps | wall (min) | train KL (its own objective, last 20 steps) | "
            + " | ".join(f"sweep KL M={b} sinks {s}" for s in ("0", "4") for b in budgets)
            + " | note |")
    lines = ["Written by `benchmarks/training_runs.py` from each run's recorded configuration and "
             "log and the fidelity sweep's rows for its gates (`benchmarks/fidelity_sweep.py "
             "--variant LABEL=DIR`; mean KL over the sweep's windows, the count in brackets). "
             "Commands are in docs/training_runs.json.", "", head,
             "|" + "---|" * (6 + 2 * len(budgets))]
    for label, r in runs.items():
        cfg = r["config"]
        levers = ", ".join(f"{k}={cfg[k]}" for k in LEVERS if k in cfg and k != "steps"
                           and cfg[k] is not None and cfg[k] != []
                           and (cfg[k] is not False or k in SHOWN_WHEN_FALSE)
                           and not (k in SHOWN_WHEN_FALSE and cfg[k] is True)
                           and not (k in HIDDEN_AT and cfg[k] == HIDDEN_AT[k])
                           and not (k in EVICT_ONLY and not cfg.get("evict_aware")
                                    and not (k == "evict_budgets"
                                             and cfg.get("rank_topm_weight")))
                           and not (k in RANK_ONLY and cfg.get("objective") != "attention-rank"))
        cells = []
        for s in ("0", "4"):
            for b in budgets:
                v = r.get("sweep", {}).get(s, {}).get(str(b))
                cells.append(f"{v[0]:.3f} ({v[1]})" if v else "-")
        lines.append(f"| {label} | {levers} | {r['steps_done']} | {r['wall_minutes']} | "
                     f"{r['train_kl_last20']} | {' | '.join(cells)} | {r.get('note', '')} |")
    return "\n".join(lines)


def write(runs: dict) -> None:
    RUNS.write_text(json.dumps(runs, indent=1) + "\n")
    replace_block(DOC, "training-runs", render(runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--add", action="append", default=[], metavar="LABEL=DIR")
    ap.add_argument("--note", action="append", default=[], metavar="LABEL=TEXT")
    ap.add_argument("--sweep", action="append", default=[], type=Path, metavar="JSON",
                    help="another finished fidelity sweep to read rows from (repeatable)")
    args = ap.parse_args()
    runs = json.loads(RUNS.read_text()) if RUNS.exists() else {}
    for item in args.add:
        label, _, directory = item.partition("=")
        record = _run_record(Path(directory))
        record["note"] = runs.get(label, {}).get("note", "")
        runs[label] = record
    for r in runs.values():
        found = _sweep_rows(r["ref"], tuple(args.sweep))
        if found:
            r["sweep"] = found
    for item in args.note:
        label, _, text = item.partition("=")
        if label not in runs:
            sys.exit(f"--note {label}: no such run (add it first)")
        runs[label]["note"] = text
    write(runs)
    print(render(runs))


if __name__ == "__main__":
    main()
