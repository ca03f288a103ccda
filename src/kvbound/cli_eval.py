"""``kvbound eval``: fidelity to the full cache on any text, and task accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer
from rich.console import Console

from kvbound import cli_args as arg
from kvbound.cli import _command_line, _fail, console
from kvbound.errors import KVBoundError

eval_app = typer.Typer(no_args_is_help=True, help="Evaluate methods x budgets (fidelity, tasks).")


@eval_app.command("fidelity")
def eval_fidelity(
    text_file: list[Path] = typer.Option([], help="Text file(s) to score (repeatable)."),
    self_generated: int = typer.Option(0, min=0,
                                       help="Also score N texts the model writes itself."),
    model: str | None = typer.Option(None),
    gates: str | None = typer.Option(None, help="Gates for trimkv (default: shipped)."),
    methods: str = typer.Option("full,trimkv,streaming", help="Comma-separated methods."),
    budgets: str = typer.Option("64,128", help="Comma-separated budgets M."),
    buffer: int = typer.Option(16, min=0),
    sinks: int | None = typer.Option(None, min=0,
                                     help="Protected first tokens (default: per method)."),
    budget_scopes: str = typer.Option(
        "head", help="Comma-separated budget scopes (head, layer, global), each a row per "
                     "method (labelled METHOD@SCOPE); same bytes per budget in all."),
    seq_len: int = typer.Option(1024, min=2, help="Window length in tokens."),
    max_windows: int = typer.Option(8, min=1, help="Windows scored at most."),
    protocol: Literal["decode", "context"] = typer.Option("decode",
                                 help="decode (evict throughout) or context (kvpress)."),
    context_len: int | None = typer.Option(None, min=1,
                                           help="context protocol: tokens compressed."),
    seed: int = typer.Option(0, min=0),
    json_out: Path | None = typer.Option(None, "--json", help="Write results JSON here."),
    quiet: bool = typer.Option(False),
):
    """KL / top-1 agreement / perplexity ratio of each method vs the full cache on any text."""
    from rich.table import Table

    from kvbound.eval.fidelity import make_windows, run_fidelity
    from kvbound.eval.textpool import self_generated_eval_texts
    from kvbound.io import atomic_write_json
    from kvbound.models import load_model

    try:
        meths = scoped_methods(arg.methods(methods, "--methods"),
                               arg.csv(budget_scopes, "--budget-scopes"))
        buds = arg.csv(budgets, "--budgets", int, minimum=1)
        if not text_file and not self_generated:
            raise arg.OptionError("--text-file", "give --text-file F (repeatable) and/or "
                                                 "--self-generated N.")
        texts = [(str(f), arg.read_text(f, "--text-file")) for f in text_file]
        if sinks is not None and sinks >= min(buds):
            raise arg.OptionError("--sinks", f"must be smaller than every budget, got {sinks}.")
        if json_out is not None:
            arg.writable(json_out, "--json", directory=False)
        arg.gates_source(gates, "--gates")
        m, tok = load_model(arg.model_name(model, "--model"))
        if self_generated:

            texts += [(f"self-generated/{i}", t) for i, t in
                      enumerate(self_generated_eval_texts(m, tok, self_generated, seq_len, seed))]
        windows = make_windows(tok, texts, seq_len, max_windows)
        result = run_fidelity(m, tok, windows, methods=meths, budgets=buds, buffer=buffer,
                              sinks=sinks, gates=gates, protocol=protocol, context_len=context_len,
                              seed=seed, progress=not quiet)
        from kvbound.eval.stats import check_same_rules
        from kvbound.eval.sweep import add_intervals

        check_same_rules(result["results"])
        for row in result["results"]:
            add_intervals(row)
    except (KVBoundError, OSError) as exc:
        _fail(exc)
    result["command"] = _command_line()
    if json_out:
        atomic_write_json(json_out, result)
        from kvbound.eval.report import fidelity_plots

        fidelity_plots(result, json_out.with_suffix(""))
    table = Table(title=f"fidelity ({protocol}, {result['windows']} windows of {seq_len})")
    for col in ("method", "M", "sinks", "KL", "KL 95% CI", "top-1", "ppl ratio", "peak/head"):
        table.add_column(col)
    for r in sorted(result["results"], key=lambda r: (r["budget"], r["method"])):
        ci = f"[{r['kl_ci'][0]:.4f}, {r['kl_ci'][1]:.4f}]"
        table.add_row(r["label"], str(r["budget"]), str(r["sinks"]), f"{r['kl_mean']:.4f}", ci,
                      f"{r['top1_agreement']:.3f}", f"{r['ppl_ratio']:.3f}",
                      str(r["peak_tokens_per_head"]))
    Console().print(table)


def scoped_methods(methods: list[str], scopes: list[str]) -> list:
    """``run_fidelity`` entries: every bounded method once per budget scope (``METHOD@SCOPE``
    beyond ``head``); the full cache once."""
    from kvbound.cache.pooled import POOLED_POLICIES, SCOPES

    for scope in scopes:
        if scope not in SCOPES:
            raise arg.OptionError("--budget-scopes", f"unknown scope {scope!r}; choose from "
                                                     f"{', '.join(SCOPES)}.")
        bad = [m for m in methods if scope != "head" and m != "full" and m not in POOLED_POLICIES]
        if bad:
            raise arg.OptionError("--budget-scopes", f"scope {scope!r} supports "
                                                     f"{', '.join(POOLED_POLICIES)}; not "
                                                     f"{', '.join(bad)}.")
    out = []
    for m in methods:
        if m == "full":
            out.append(m)
            continue
        for scope in scopes:
            out.append(m if scope == "head" else (f"{m}@{scope}", m, {"budget_scope": scope}))
    return out


@eval_app.command("tasks")
def eval_tasks(
    tasks: str = typer.Option("syn_needle,syn_kv_lookup,syn_conversation,syn_arithmetic",
                              help="Comma-separated task names (see `kvbound eval list`)."),
    model: str | None = typer.Option(None),
    gates: str | None = typer.Option(None, help="Gates for trimkv (default: shipped)."),
    methods: str = typer.Option("full,trimkv,streaming,snapkv", help="Comma-separated methods."),
    budgets: str = typer.Option("64,128", help="Comma-separated budgets M."),
    buffer: int = typer.Option(16, min=0),
    chunk: int = typer.Option(128, min=1, help="Prefill chunk for bounded methods."),
    sinks: int | None = typer.Option(None, min=0,
                                     help="Protected first tokens (default: per method)."),
    limit: int = typer.Option(10, min=1, help="Examples per task."),
    context_tokens: int = typer.Option(1024, min=16, help="Context length of synthetic tasks."),
    prefill: Literal["chunked", "full"] = typer.Option("chunked",
                                help="chunked (query-agnostic) or full (query-aware)."),
    data: list[str] = typer.Option([], help="TASK=PATH local file for a benchmark (repeatable)."),
    batch_size: int = typer.Option(8, min=1),
    seed: int = typer.Option(0, min=0),
    out: Path = typer.Option(Path("eval_out"), help="Results directory."),
    quiet: bool = typer.Option(False),
):
    """Task accuracy per method and budget; kvpress-style result directories, table, plots."""
    from kvbound.eval.report import task_table
    from kvbound.eval.runner import EvalConfig, run_eval
    from kvbound.eval.tasks import get_task
    from kvbound.models import load_model

    try:
        data_map = {}
        for item in data:
            if "=" not in item:
                raise arg.OptionError("--data", f"expects TASK=PATH, got {item!r}.")
            k, v = item.split("=", 1)
            arg.check("--data", get_task, k)
            if not Path(v).exists():
                raise arg.OptionError("--data", f"no file {v!r} for task {k}.")
            data_map[k] = v
        task_names = arg.csv(tasks, "--tasks")
        for t in task_names:
            arg.check("--tasks", get_task, t)
        cfg = EvalConfig(tasks=task_names, methods=arg.methods(methods, "--methods"),
                         budgets=arg.csv(budgets, "--budgets", int, minimum=1),
                         buffer=buffer, chunk=chunk, sinks=sinks, gates=gates, limit=limit,
                         seed=seed, context_tokens=context_tokens, prefill=prefill,
                         batch_size=batch_size, data=data_map)
        cfg.validate()
        if sinks is not None and sinks >= min(cfg.budgets):
            raise arg.OptionError("--sinks", f"must be smaller than every budget, got {sinks}.")
        arg.writable(out, "--out", directory=True)
        arg.gates_source(gates, "--gates")
        m, tok = load_model(arg.model_name(model, "--model"))
        summary = run_eval(m, tok, cfg, out, progress=not quiet)
    except (KVBoundError, OSError) as exc:
        _fail(exc)
    print(task_table(summary))
    console.print(f"results in {out}/ (results.json, results.md, one PNG per task)")


@eval_app.command("list")
def eval_list():
    """List the evaluation tasks."""
    from kvbound.eval.tasks import TASKS

    for name, spec in TASKS.items():
        print(f"{name}\t{spec.metric}\t{spec.description}")
