"""``kvbound chat``: a conversation in bounded memory that lives in a session directory."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import typer

from kvbound import cli_args as arg
from kvbound.cli import _fail, app, console
from kvbound.errors import KVBoundError

#: session settings fixed when the session starts: option name -> (settings key, default)
_FIXED = {"--method": ("method", "trimkv"), "--budget": ("budget", 256),
          "--buffer": ("buffer", 32), "--sinks": ("sinks", None)}


@app.command()
def chat(
    session: Path = typer.Option(..., help="Session directory (created on the first turn)."),
    message: str | None = typer.Option(None, "--message", "-m",
                                       help="One turn from a script; else read turns from stdin."),
    model: str | None = typer.Option(None, help="Model (default: the session's, else embedded)."),
    method: str | None = typer.Option(None, help="Bounded method (new session; default trimkv)."),
    gates: str | None = typer.Option(None, help="Gate directory or shipped name."),
    budget: int | None = typer.Option(None, min=1, help="M (new session; default 256)."),
    buffer: int | None = typer.Option(None, min=0, help="b (new session; default 32)."),
    sinks: int | None = typer.Option(None, min=0, help="Protected first tokens (new session)."),
    positions: Literal["auto", "absolute", "rolling"] = typer.Option(
        "auto", help="RoPE positions (new session): auto switches to rolling past the context."),
    max_new_tokens: int = typer.Option(256, min=1, help="Most tokens per reply."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.7, min=0.0, help="Sampling temperature (> 0)."),
    top_p: float = typer.Option(0.9, min=0.0, max=1.0, help="Nucleus sampling mass (0, 1]."),
    repetition_penalty: float = typer.Option(1.0, min=0.0, help="> 1 discourages repeats."),
    seed: int = typer.Option(0, min=0, help="Sampling seed (turn n uses seed + n)."),
    no_chat: bool = typer.Option(False, "--no-chat", help="Plain text turns, no chat template."),
):
    """Chat with bounded memory; the conversation persists in --session and resumes in constant
    memory and load time however long it gets."""
    from kvbound.chat import SESSION_FILE, Conversation
    from kvbound.models import load_model

    try:
        arg.writable(session, "--session", directory=True)
        if message is not None:
            arg.nonempty(message, "--message")
        if method is not None:
            arg.methods(method, "--method")
            if method == "full":
                raise arg.OptionError("--method", "a persistent chat needs a bounded method "
                                                  "(the full cache grows with every token).")
        arg.decoding(sample, temperature, top_p, repetition_penalty)
        arg.gates_source(gates, "--gates")
        path = session / SESSION_FILE
        given = {"--method": method, "--budget": budget, "--buffer": buffer, "--sinks": sinks}
        if path.exists():
            conv = _resume(path, given, model, gates)
        else:
            s = {opt: default if given[opt] is None else given[opt]
                 for opt, (_, default) in _FIXED.items()}
            if s["--sinks"] is not None and s["--sinks"] >= s["--budget"]:
                raise arg.OptionError("--sinks", f"must be smaller than --budget ({s['--budget']}).")
            m, tok = load_model(arg.model_name(model, "--model"))
            conv = Conversation.start(m, tok, method=s["--method"], budget=s["--budget"],
                                      buffer=s["--buffer"], sinks=s["--sinks"], gates=gates,
                                      chat=False if no_chat else None, positions=positions)
        decoding = dict(max_new_tokens=max_new_tokens, sample=sample, temperature=temperature,
                        top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)
        turns = [message] if message is not None else _stdin_turns()
        for text in turns:
            reply = conv.say(text, **decoding)
            size = conv.save(path).stat().st_size
            print(reply, flush=True)
            st = conv.cache.stats()
            console.print(f"[dim]turn {conv.state.turns}: {st.seen_tokens} tokens seen, "
                          f"{max(st.resident_tokens.values(), default=0)} kept per head; session "
                          f"{size / 1e6:.2f} MB (a full cache: {st.full_kv_bytes / 1e6:.2f} MB)[/]")
    except (KVBoundError, OSError) as exc:
        _fail(exc)


def _resume(path: Path, given: dict, model: str | None, gates: str | None):
    from kvbound.cache.persist import read_metadata
    from kvbound.chat import Conversation
    from kvbound.models import load_model

    meta = read_metadata(path)
    settings = meta["settings"]
    for opt, (key, _) in _FIXED.items():
        have = settings["policy"]["policy"] if key == "method" else settings[key]
        if given[opt] is not None and given[opt] != have:
            raise arg.OptionError(opt, f"this session runs with {opt} {have}; leave the option "
                                       "out, or start a new --session directory.")
    saved_model = meta.get("extra", {}).get("conversation", {}).get("model")
    m, tok = load_model(arg.model_name(model if model is not None else saved_model, "--model"))
    return Conversation.load(path, m, tok, gates=gates)


def _stdin_turns():
    """User turns typed (or piped) on stdin, until EOF or ``/exit``."""
    while True:
        if sys.stdin.isatty():
            console.print("[bold]you>[/] ", end="")
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if line.strip():
            yield line.rstrip("\n")
