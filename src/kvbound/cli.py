"""The ``kvbound`` command line: demo, generate, train, eval, bench, viz, models."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import typer
from rich.console import Console

from kvbound.errors import KVBoundError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="kvbound: memory-bounded KV cache for Hugging Face LLMs (TRIM-KV and baselines).",
)
console = Console(stderr=True)


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2)


def _command_line() -> str:
    return "kvbound " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@app.command()
def generate(
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Prompt text."),
    prompt_file: Path | None = typer.Option(None, help="Read the prompt from a file."),
    model: str | None = typer.Option(None, help="Model name, directory, .gguf or hub id."),
    method: str = typer.Option("trimkv", help="full|trimkv|streaming|h2o|tova|snapkv|..."),
    gates: str | None = typer.Option(None, help="Gate directory or shipped name."),
    budget: int = typer.Option(256, help="M: tokens kept per layer and KV head."),
    buffer: int = typer.Option(32, help="b: tokens accumulated between evictions."),
    chunk: int | None = typer.Option(None, help="Prefill chunk for long prompts (default 128)."),
    full_prefill: bool = typer.Option(False, "--full-prefill",
                                      help="Prefill the whole prompt, then cut to the budget."),
    sinks: int | None = typer.Option(None, help="Protect the first N tokens (inside M)."),
    compile: bool = typer.Option(False, "--compile",
                                 help="Decode with torch.compile on a static-shape cache."),
    max_new_tokens: int = typer.Option(128, help="Tokens to generate."),
    min_new_tokens: int | None = typer.Option(None, help="Generate at least this many."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.7),
    top_p: float = typer.Option(0.9),
    seed: int = typer.Option(0),
    no_chat: bool = typer.Option(False, "--no-chat", help="Do not apply the chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Generate text with the full cache or a bounded one."""
    from kvbound.generation import generate as run
    from kvbound.models import load_model

    try:
        if (prompt is None) == (prompt_file is None):
            raise KVBoundError("Give exactly one of --prompt or --prompt-file.")
        _check_budget_args(method, budget, buffer, chunk, sinks)
        text = prompt if prompt is not None else prompt_file.read_text()
        if not text.strip():
            raise KVBoundError("The prompt is empty: give some text (or --prompt-file).")
        m, tok = load_model(model)
        result = run(m, tok, text, method=method, gates=gates, budget=budget, buffer=buffer,
                     chunk=chunk, sinks=sinks, max_new_tokens=max_new_tokens, sample=sample,
                     temperature=temperature, top_p=top_p, seed=seed,
                     chat=False if no_chat else None, min_new_tokens=min_new_tokens,
                     full_prefill=full_prefill, compile=compile)
    except (KVBoundError, OSError) as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    print(result.text)
    console.print(
        f"[dim]{result.method}: {result.prompt_tokens} prompt + {result.new_tokens} new tokens, "
        f"{result.seconds:.2f}s ({result.decode_tokens_per_second:.1f} tok/s decode), peak "
        f"{result.peak_tokens_per_head} tokens/head, KV {result.peak_kv_bytes / 1e6:.2f} MB "
        f"(full {result.full_kv_bytes / 1e6:.2f} MB)[/]"
    )


def _check_budget_args(method: str, budget: int, buffer: int, chunk: int | None,
                       sinks: int | None) -> None:
    """Fail fast (before loading a model) on arguments the cache would refuse."""
    from kvbound.policies import check_method

    check_method(method)
    if budget <= 0:
        raise KVBoundError(f"budget must be >= 1, got {budget}.")
    if buffer < 0:
        raise KVBoundError(f"buffer must be >= 0, got {buffer}.")
    if chunk is not None and chunk <= 0:
        raise KVBoundError(f"chunk must be a positive integer, got {chunk}.")
    if sinks is not None and not 0 <= sinks < budget:
        raise KVBoundError(f"sinks must be in [0, budget), got {sinks}.")


@app.command()
def train(
    model: str | None = typer.Option(None, help="Model to train gates for (default: embedded)."),
    out: Path = typer.Option(..., help="Output directory (gates, checkpoints, log)."),
    memory_size: int = typer.Option(64, help="M used by the capacity loss."),
    seq_len: int = typer.Option(1024, help="Training sequence length."),
    steps: int = typer.Option(500, help="Optimizer steps."),
    data: str = typer.Option("prose", help="Mixture, e.g. 'prose:0.8,synthetic:0.2,file:x.txt:1'."),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint."),
    batch_size: int = typer.Option(1),
    grad_accum: int = typer.Option(1),
    lr: float = typer.Option(1e-3),
    weight_decay: float = typer.Option(0.01),
    warmup_steps: int = typer.Option(20),
    intermediate_size: int = typer.Option(128, help="Gate hidden width I."),
    bias_init: float = typer.Option(8.0, help="Initial gate bias (beta ~ sigmoid(b))."),
    lambda_cap: float = typer.Option(1.0, help="Weight of the capacity loss."),
    cap_variant: str = typer.Option("paper", help="paper|official capacity loss."),
    quality_reduction: str = typer.Option("sum", help="sum (paper) or mean of KL and NTP."),
    train_sinks: int = typer.Option(4, help="First N tokens never decay in training."),
    bf16: bool = typer.Option(True, help="bf16 autocast where supported."),
    grad_checkpointing: bool = typer.Option(False, help="Recompute activations in backward."),
    save_every: int = typer.Option(50, help="Checkpoint every N steps."),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """Train retention gates (distillation + capacity loss); only the gates change."""
    from kvbound.train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(
        model=model, out=str(out), memory_size=memory_size, seq_len=seq_len, steps=steps,
        data=data, seed=seed, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        weight_decay=weight_decay, warmup_steps=warmup_steps, intermediate_size=intermediate_size,
        bias_init=bias_init, lambda_cap=lambda_cap, cap_variant=cap_variant,
        quality_reduction=quality_reduction, train_sinks=train_sinks, bf16=bf16,
        grad_checkpointing=grad_checkpointing, save_every=save_every,
        extra={"resume": resume},
    )
    try:
        gates = Trainer(cfg, progress=not quiet, command=_command_line()).run()
    except KVBoundError as exc:
        _fail(exc)
    console.print(f"gates written to {out} (digest {gates.digest()})")


eval_app = typer.Typer(no_args_is_help=True, help="Evaluate methods x budgets (fidelity, tasks).")
app.add_typer(eval_app, name="eval")


def _csv(value: str, cast=str) -> list:
    try:
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise KVBoundError(f"Cannot parse {value!r}: {exc}") from None


@eval_app.command("fidelity")
def eval_fidelity(
    text_file: list[Path] = typer.Option([], help="Text file(s) to score (repeatable)."),
    self_generated: int = typer.Option(0, help="Also score N texts the model writes itself."),
    model: str | None = typer.Option(None),
    gates: str | None = typer.Option(None, help="Gates for trimkv (default: shipped)."),
    methods: str = typer.Option("full,trimkv,streaming", help="Comma-separated methods."),
    budgets: str = typer.Option("64,128", help="Comma-separated budgets M."),
    buffer: int = typer.Option(16),
    sinks: int | None = typer.Option(None, help="Protected first tokens (default: per method)."),
    seq_len: int = typer.Option(1024, help="Window length in tokens."),
    max_windows: int = typer.Option(8, help="Windows scored at most."),
    protocol: str = typer.Option("decode", help="decode (evict throughout) or context (kvpress)."),
    context_len: int | None = typer.Option(None, help="context protocol: tokens compressed."),
    seed: int = typer.Option(0),
    json_out: Path | None = typer.Option(None, "--json", help="Write results JSON here."),
    quiet: bool = typer.Option(False),
):
    """KL / top-1 agreement / perplexity ratio of each method vs the full cache on any text."""
    from rich.table import Table

    from kvbound.eval.fidelity import make_windows, run_fidelity
    from kvbound.io import atomic_write_json
    from kvbound.models import load_model
    from kvbound.policies import check_method

    try:
        meths, buds = _csv(methods), _csv(budgets, int)
        for mth in meths:
            check_method(mth)
        if any(b <= 0 for b in buds):
            raise KVBoundError("Budgets must be positive integers.")
        if not text_file and not self_generated:
            raise KVBoundError("Give --text-file F (repeatable) and/or --self-generated N.")
        m, tok = load_model(model)
        texts = [(str(f), f.read_text(errors="replace")) for f in text_file]
        if self_generated:

            texts += [(f"self-generated/{i}", t) for i, t in
                      enumerate(_self_generated(m, tok, self_generated, seq_len, seed))]
        windows = make_windows(tok, texts, seq_len, max_windows)
        result = run_fidelity(m, tok, windows, methods=meths, budgets=buds, buffer=buffer,
                              sinks=sinks, gates=gates, protocol=protocol, context_len=context_len,
                              seed=seed, progress=not quiet)
    except (KVBoundError, OSError) as exc:
        _fail(exc)
    result["command"] = _command_line()
    if json_out:
        atomic_write_json(json_out, result)
        from kvbound.eval.report import fidelity_plots

        fidelity_plots(result, json_out.with_suffix(""))
    table = Table(title=f"fidelity ({protocol}, {result['windows']} windows of {seq_len})")
    for col in ("method", "M", "sinks", "KL", "top-1", "ppl ratio", "peak/head"):
        table.add_column(col)
    for r in sorted(result["results"], key=lambda r: (r["budget"], r["method"])):
        table.add_row(r["label"], str(r["budget"]), str(r["sinks"]), f"{r['kl_mean']:.4f}",
                      f"{r['top1_agreement']:.3f}", f"{r['ppl_ratio']:.3f}",
                      str(r["peak_tokens_per_head"]))
    Console().print(table)


@eval_app.command("tasks")
def eval_tasks(
    tasks: str = typer.Option("syn_needle,syn_kv_lookup,syn_conversation,syn_arithmetic",
                              help="Comma-separated task names (see `kvbound eval list`)."),
    model: str | None = typer.Option(None),
    gates: str | None = typer.Option(None, help="Gates for trimkv (default: shipped)."),
    methods: str = typer.Option("full,trimkv,streaming,snapkv", help="Comma-separated methods."),
    budgets: str = typer.Option("64,128", help="Comma-separated budgets M."),
    buffer: int = typer.Option(16),
    chunk: int = typer.Option(128, help="Prefill chunk for bounded methods."),
    sinks: int | None = typer.Option(None, help="Protected first tokens (default: per method)."),
    limit: int = typer.Option(10, help="Examples per task."),
    context_tokens: int = typer.Option(1024, help="Context length of synthetic tasks."),
    prefill: str = typer.Option("chunked", help="chunked (query-agnostic) or full (query-aware)."),
    data: list[str] = typer.Option([], help="TASK=PATH local file for a benchmark (repeatable)."),
    batch_size: int = typer.Option(8),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("eval_out"), help="Results directory."),
    quiet: bool = typer.Option(False),
):
    """Task accuracy per method and budget; kvpress-style result directories, table, plots."""
    from kvbound.eval.report import task_table
    from kvbound.eval.runner import EvalConfig, run_eval
    from kvbound.models import load_model

    try:
        data_map = {}
        for item in data:
            if "=" not in item:
                raise KVBoundError(f"--data expects TASK=PATH, got {item!r}.")
            k, v = item.split("=", 1)
            data_map[k] = v
        cfg = EvalConfig(tasks=_csv(tasks), methods=_csv(methods), budgets=_csv(budgets, int),
                         buffer=buffer, chunk=chunk, sinks=sinks, gates=gates, limit=limit,
                         seed=seed, context_tokens=context_tokens, prefill=prefill,
                         batch_size=batch_size, data=data_map)
        cfg.validate()
        m, tok = load_model(model)
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


def _self_generated(model, tokenizer, n: int, seq_len: int, seed: int) -> list[str]:
    import random

    from kvbound.train.data import SelfGenSource, _generate_text

    rng = random.Random(f"eval-selfgen:{seed}")
    texts = []
    for i in range(n):
        prompt = rng.choice(SelfGenSource.PROMPTS).format(topic=rng.choice(EVAL_TOPICS))
        texts.append(_generate_text(model, tokenizer, prompt, seq_len + 32, seed + 1000 + i))
    return texts


# topics for self-generated evaluation text (disjoint from the training topics)
EVAL_TOPICS = ("coral reefs", "medieval castles", "weather forecasting", "tea ceremonies",
               "railway signalling", "desert plants", "violin making", "deep sea fish")


@app.command()
def bench(
    model: str | None = typer.Option(None),
    gates: str | None = typer.Option(None),
    methods: str = typer.Option("full,trimkv,streaming,knorm,snapkv,h2o,tova"),
    lengths: str = typer.Option("1024,4096,16384", help="Prompt lengths (tokens)."),
    budget: int = typer.Option(256),
    buffer: int = typer.Option(32),
    chunk: int = typer.Option(512, help="Prefill chunk for bounded methods."),
    decode_tokens: int = typer.Option(64),
    repeats: int = typer.Option(1, help="Runs per configuration; the median run is reported."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    json_out: Path | None = typer.Option(None, "--json", help="Write results JSON here."),
    plot_dir: Path | None = typer.Option(None, help="Write plots here."),
):
    """Speed and memory per method and prompt length (each run in its own process).

    A method written NAME+compile (e.g. trimkv+compile) decodes with torch.compile on a
    static-shape cache."""
    from kvbound.bench import parser, render, run_bench

    argv = ["--methods", methods, "--lengths", lengths, "--budget", str(budget), "--buffer",
            str(buffer), "--chunk", str(chunk), "--decode-tokens", str(decode_tokens),
            "--repeats", str(repeats), "--dtype", dtype]
    for flag, value in (("--model", model), ("--gates", gates), ("--json", json_out),
                        ("--plot-dir", plot_dir)):
        if value is not None:
            argv += [flag, str(value)]
    try:
        result = run_bench(parser().parse_args(argv))
    except SystemExit as exc:
        _fail(KVBoundError(str(exc)))
    print(render(result, _command_line()))


def _pair(text: str) -> tuple[int, int]:
    try:
        layer, head = text.split(":")
        return int(layer), int(head)
    except ValueError:
        raise KVBoundError(f"Expected LAYER:HEAD, got {text!r}.") from None


@app.command()
def viz(
    prompt: str | None = typer.Option(None, "--prompt", help="Text to analyse."),
    prompt_file: Path | None = typer.Option(None, help="Read the text from a file."),
    model: str | None = typer.Option(None),
    gates: str | None = typer.Option(None, help="Gate directory or shipped name."),
    out: Path = typer.Option(Path("viz_out"), help="Output directory (PNG, HTML, JSON)."),
    budget: int = typer.Option(64),
    buffer: int = typer.Option(16),
    sinks: int = typer.Option(0, help="Protected first tokens (0 shows what gates keep alone)."),
    heads: str | None = typer.Option(None, help="Timelines for these heads: 'L:H,L:H'."),
    html_head: str | None = typer.Option(None, help="Head for retention.html: 'L:H'."),
    max_new_tokens: int = typer.Option(0, help="Let the model continue the text first."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the text in the chat template."),
):
    """Retention maps, eviction timelines, coloured text and head roles for a text."""
    from kvbound.generation import encode_prompt
    from kvbound.models import load_model
    from kvbound.viz import run_viz

    try:
        if (prompt is None) == (prompt_file is None):
            raise KVBoundError("Give exactly one of --prompt or --prompt-file.")
        text = prompt if prompt is not None else prompt_file.read_text()
        if not text.strip():
            raise KVBoundError("The text is empty.")
        m, tok = load_model(model)
        kwargs = {"ids": encode_prompt(tok, text, chat=True)} if chat else {"text": text}
        res = run_viz(m, tok, gates, out=out, budget=budget, buffer=buffer, sinks=sinks,
                      heads=[_pair(x) for x in heads.split(",")] if heads else None,
                      html_head=_pair(html_head) if html_head else None,
                      max_new_tokens=max_new_tokens, **kwargs)
    except (KVBoundError, OSError) as exc:
        _fail(exc)
    for f in res["files"]:
        print(f)
    console.print(f"head roles: {res['roles'].get('counts')}")
    for w in res["roles"].get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")


@app.command()
def models():
    """List the known model names."""
    from kvbound.models import list_models

    for name, spec in list_models().items():
        print(f"{name}\t{getattr(spec, 'description', '')}")


@app.command()
def demo(
    budget: int = typer.Option(64, help="Tight budget M for the bounded methods."),
    quick: bool = typer.Option(False, help="Shorter run (for tests)."),
    out: Path = typer.Option(Path("demo_out"), help="Where the plot and pictures go."),
):
    """The main job: TRIM-KV vs the full cache and baselines on the embedded model."""
    from kvbound.demo import run_demo

    try:
        run_demo(budget=budget, quick=quick, out=out)
    except KVBoundError as exc:
        _fail(exc)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
