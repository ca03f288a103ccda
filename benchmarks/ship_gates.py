"""Copy a finished training run into the package as the shipped gates (fp16), with its provenance.

    python benchmarks/ship_gates.py runs/smollm2-gates smollm2-135m

Writes src/kvbound/shipped_gates/<name>/: gates.safetensors (fp16), gates.json (config, training metadata,
recommended sinks), train_log.jsonl, loss_curve.png, and README.md (command, config, data spec,
wall time) generated from the run's own records.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from kvbound.gates import RetentionGates
from kvbound.models import load_model

ROOT = Path(__file__).resolve().parents[1]


#: what one ListNet list ranks, per ``--rank-scope``
_RANK_LISTS = {"head": "KV head", "layer": "layer (all its KV heads' keys)",
               "model": "decision time over every gated layer's keys (the ranking a global "
                        "budget needs)"}


def main(run: str, name: str) -> None:
    run_dir = Path(run)
    model, _ = load_model(name)
    gates = RetentionGates.load(run_dir, model)
    dest = ROOT / "src" / "kvbound" / "shipped_gates" / name
    gates.save(dest, dtype=torch.float16)
    shutil.copy(run_dir / "train_log.jsonl", dest / "train_log.jsonl")
    log = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    plot(log, dest / "loss_curve.png")
    shutil.copy(dest / "loss_curve.png", ROOT / "docs" / "img" / f"loss_curve_{name}.png")
    t = gates.metadata.training
    cfg = t["config"]
    md = [
        f"# Shipped retention gates for {name}",
        "",
        "Trained by the project's own command (recorded by the trainer):",
        "",
        f"```\n{t.get('command')}\n```",
        "",
        f"- steps: {t['steps_done']}, tokens: {t['tokens']}, wall time (sum of step times): "
        f"{t['wall_seconds'] / 60:.1f} min"
        + (f" on {t['threads']} CPU thread(s)" if t.get("threads") else "")
        + (", bf16 autocast" if t.get("bf16_autocast") else ", fp32"),
        f"- data spec: `{cfg['data']}` (seed {cfg['seed']}), sequence length {cfg['seq_len']}",
        "- objective: " + ("attention-rank (the gates' eviction ranking fitted to the frozen "
                           f"model's future attention: horizon {cfg['rank_horizon']}, decision "
                           f"every {cfg['rank_stride']} tokens, every {cfg['rank_query_step']}th "
                           f"query, one list per {_RANK_LISTS[cfg.get('rank_scope', 'head')]}; "
                           "kvbound.train.rank_loss)"
                           if cfg.get("objective") == "attention-rank" else
                           "distillation through the soft decay (the paper's)"),
        f"- training memory M = {cfg['memory_size']}, gate width I = {cfg['intermediate_size']}, "
        f"bias init {cfg['bias_init']}, lr {cfg['lr']}, warmup {cfg['warmup_steps']}, "
        f"lambda_cap {cfg['lambda_cap']} ({cfg['cap_variant']} capacity loss), quality "
        f"{cfg['quality_reduction']}, train sinks {cfg['train_sinks']}, gate positions "
        f"{cfg.get('gate_positions', False)}"
        + (f" (position input at {cfg.get('position_lr_scale', 1.0)} x lr"
           + (", trained alone: every other weight frozen at the source gates"
              if cfg.get("train_position_only") else "") + ")"
           if cfg.get("gate_positions") else "")
        + f", eviction-aware {cfg.get('evict_aware', False)}"
        + (f" (tau {cfg['evict_tau']}, {cfg.get('evict_scale', 'absolute')}; budgets "
           f"{cfg.get('evict_budgets') or [cfg['memory_size']]} in turn"
           + ("" if cfg.get("evict_decay", True) else "; eviction mask alone, no soft decay")
           + ")"
           if cfg.get("evict_aware") else ""),
        *([f"- fine-tuned from gates {t['init_gates']['ref']} ({t['init_gates']['steps']} steps, "
           f"trained by `{t['init_gates']['command']}`; their README is in the git history of "
           "this directory)"] if t.get("init_gates") else []),
        f"- final losses (last step): {json.dumps(t['final'])}",
        f"- recommended at inference: {json.dumps(gates.metadata.recommended)}",
        f"- weights digest: {RetentionGates.load(dest, model).digest()} (of the fp16 weights "
        f"stored here, as results report it; {gates.digest()} in the run's fp32)",
        "",
        "![loss curve](loss_curve.png)",
        "",
        "Full config:",
        "",
        f"```json\n{json.dumps(cfg, indent=2)}\n```",
    ]
    (dest / "README.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def plot(log, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(xs, k=20):
        out = []
        for i in range(len(xs)):
            w = xs[max(0, i - k + 1) : i + 1]
            out.append(sum(w) / len(w))
        return out

    steps = [r["step"] for r in log]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    rank = "rank" in log[0]  # --objective attention-rank: listwise KL and ListNet loss, no NTP
    for ax, key in zip(axes, ("kl", "rank" if rank else "ntp", "cap")):
        ax.plot(steps, [r[key] for r in log], alpha=0.3)
        ax.plot(steps, smooth([r[key] for r in log]), linewidth=2)
        ax.set_title("listwise KL" if rank and key == "kl" else key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
