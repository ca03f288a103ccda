"""Do the gates keep the attention sink? Per layer: how much attention the full model puts on the
first token, and where each set of gates ranks that token after a window (issue 17).

One held-out window (``eval_text_pool``, the pydoc half training never sees) of ``--seq-len``
tokens goes through the model once (eager attention, to read the weights). Per layer: the mean
attention weight on position 0 from the queries in the window's second half; and, per set of
gates, the retention score ``(T - 1) * log beta_0`` of position 0 at the last position, ranked
among all tokens' scores (1 = kept first) by the head that ranks it best, and that head's
``1 - beta_0``. A rank above M means every head of that layer has evicted the sink at budget M
(with no protected sinks).

    python benchmarks/sink_probe.py --gates shipped --gates runs/gates-evict-rel --write-results
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command, machine, publish  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def probe(args) -> dict:
    from kvbound.eval.textpool import eval_text_pool
    from kvbound.generation import resolve_gates
    from kvbound.models import load_model

    model, tok = load_model(args.model, attn_implementation="eager")
    ids = tok("\n\n".join(eval_text_pool()), add_special_tokens=False,
              return_tensors="pt").input_ids[:, : args.seq_len]
    t = ids.shape[1]
    hidden: dict[int, torch.Tensor] = {}
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda m, a, kw, i=i: hidden.__setitem__(i, kw["hidden_states"]), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    for h in hooks:
        h.remove()
    attention = [float(a[0, :, t // 2:, 0].mean()) for a in out.attentions]
    positions = torch.arange(t)[None]
    age = (t - 1 - torch.arange(t)).float()
    gates_rows = {}
    for name in args.gates:
        gates = resolve_gates(model, None if name == "shipped" else name)
        ranks, one_minus = [], []
        with torch.no_grad():
            for layer in sorted(hidden):
                lb = gates(layer, hidden[layer], positions if gates.uses_positions else None)[0]
                score = age * lb.float()  # (H, T)
                rank = (score > score[:, :1]).sum(-1) + 1  # 1 = kept first
                best = int(rank.argmin())
                ranks.append(int(rank[best]))
                one_minus.append(float(-torch.expm1(lb[best, 0].float())))
        gates_rows[name] = {"ref": gates.ref(), "rank": ranks, "one_minus_beta": one_minus}
        gates.detach(model)
    return {"tokens": t, "attention_on_first": attention, "gates": gates_rows}


def render(res: dict) -> str:
    names = list(res["gates"])
    lines = ["## Do the gates keep the attention sink?", "",
             f"Command: `{res['command']}`  ", f"Machine: {res['machine']}  ",
             f"One held-out window of {res['tokens']} tokens (pydoc eval half). Attention on token "
             "0: mean weight from the second half's queries (full model). Rank: where the head "
             "that ranks token 0 best puts its retention score at the last position (1 = kept "
             "first; above M = evicted by every head at budget M without protected sinks).", "",
             "| layer | attention on token 0 | "
             + " | ".join(f"rank / 1 - beta: {res['gates'][n]['ref']}" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for i, att in enumerate(res["attention_on_first"]):
        cells = [f"{res['gates'][n]['rank'][i]} / {res['gates'][n]['one_minus_beta'][i]:.0e}"
                 for n in names]
        lines.append(f"| {i} | {att:.2f} | " + " | ".join(cells) + " |")
    heavy = [i for i, a in enumerate(res["attention_on_first"]) if a >= 0.2]
    lines.append("")
    for n in names:
        kept = sum(res["gates"][n]["rank"][i] <= 32 for i in heavy)
        lines.append(f"- {res['gates'][n]['ref']}: token 0 within the top 32 in {kept} of the "
                     f"{len(heavy)} layers that put >= 20% of their attention on it.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--gates", action="append", default=None,
                    help="shipped, or a gate directory (repeatable)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--json", default=str(ROOT / "runs" / "sink_probe.json"))
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    args.gates = args.gates or ["shipped"]
    res = probe(args) | {"command": command(), "machine": machine()}
    publish(res, args.json, "sink-probe", render, args.write_results)


if __name__ == "__main__":
    main()
