"""A 100-turn conversation in bounded memory: the session file stays flat, a full cache grows.

Each turn is one ``kvbound chat``-style step (:class:`kvbound.chat.Conversation`): say, save the
session file, and at some turns load it back in a fresh ``Conversation`` (timed) and check that
the reloaded cache has the same statistics. The user turns are short questions built from a fixed
list of generic topics (not tuned to any benchmark text).

    python benchmarks/chat_session.py --write-results
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command, machine, publish  # noqa: E402

from kvbound.cache import kv_bytes  # noqa: E402
from kvbound.chat import Conversation  # noqa: E402
from kvbound.models import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["rivers", "bridges", "bread", "clocks", "bees", "maps", "glass", "tides", "paper",
          "volcanoes", "trains", "salt", "owls", "kites", "copper", "forests", "lamps", "snow"]
ASKS = ["Tell me one fact about {t}.", "Why do people care about {t}?",
        "Give a short tip related to {t}.", "How would you explain {t} to a child?"]
REPORT_AT = (1, 10, 25, 50, 75, 100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--method", default="trimkv")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--buffer", type=int, default=32)
    ap.add_argument("--turns", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--json", type=Path, default=ROOT / "runs" / "chat_session.json")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    conv = Conversation.start(model, tok, method=args.method, budget=args.budget,
                              buffer=args.buffer)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "conversation.safetensors"
        for turn in range(1, args.turns + 1):
            topic = TOPICS[(turn - 1) % len(TOPICS)]
            ask = ASKS[((turn - 1) // len(TOPICS)) % len(ASKS)].format(t=topic)
            t0 = time.perf_counter()
            conv.say(ask, max_new_tokens=args.max_new_tokens, repetition_penalty=1.1)
            t1 = time.perf_counter()
            conv.save(path)
            t2 = time.perf_counter()
            if turn in REPORT_AT or turn == args.turns:
                t3 = time.perf_counter()
                again = Conversation.load(path, model, tok)
                load_s = time.perf_counter() - t3
                st, st2 = conv.cache.stats(), again.cache.stats()
                assert st2 == st, "the reloaded cache differs"
                shape = {"batch": 1, "kv_heads": conv.cache._kv_heads,
                         "head_dim": conv.cache._head_dim, "element_size": 2}
                rows.append({
                    "turn": turn, "seen_tokens": st.seen_tokens,
                    "resident_per_head": max(st.resident_tokens.values()),
                    "file_bytes": path.stat().st_size,
                    "full_kv_bytes": st.full_kv_bytes,
                    "full_kv_bytes_bf16": kv_bytes(len(st.resident_tokens) * st.seen_tokens,
                                                   **shape),
                    "turn_seconds": round(t1 - t0, 2), "save_seconds": round(t2 - t1, 3),
                    "load_seconds": round(load_s, 3)})
                print(json.dumps(rows[-1]), flush=True)
    res = {"rows": rows, "method": args.method, "budget": args.budget, "buffer": args.buffer,
           "max_new_tokens": args.max_new_tokens, "dtype": str(next(model.parameters()).dtype),
           "gates": conv.cache.policy.needs_gates and _gates(model),
           "command": command(), "machine": machine()}
    publish(res, args.json, "chat-session", render, args.write_results)


def _gates(model) -> str:
    from kvbound.hooks import get_state

    return get_state(model).gates.ref()


def render(res: dict) -> str:
    last = res["rows"][-1]
    lines = [
        "## A long conversation in bounded memory (`kvbound chat`)", "",
        f"Command: `{res['command']}`  ", f"Machine: {res['machine']}  ",
        f"{res['method']} (gates {res['gates'] or '-'}), M = {res['budget']}, buffer "
        f"{res['buffer']}, replies of at most {res['max_new_tokens']} tokens (greedy, repetition "
        f"penalty 1.1), model in {res['dtype'].removeprefix('torch.')}. The session file (one "
        "safetensors file: the bounded cache and the conversation's state) is saved after every "
        "turn and loaded back in a fresh conversation at the turns shown. After "
        f"{last['turn']} turns ({last['seen_tokens']} tokens) it is "
        f"**{last['file_bytes'] / 1e6:.1f} MB**; a full cache of the same conversation would "
        f"hold {last['full_kv_bytes'] / 1e6:.1f} MB "
        f"({last['full_kv_bytes_bf16'] / 1e6:.1f} MB in bf16), and grows with every token.", "",
        "| turn | tokens seen | kept per head | session file MB | full cache MB | save s | "
        "load s |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['turn']} | {r['seen_tokens']} | {r['resident_per_head']} | "
                     f"{r['file_bytes'] / 1e6:.2f} | {r['full_kv_bytes'] / 1e6:.2f} | "
                     f"{r['save_seconds']:.3f} | {r['load_seconds']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
