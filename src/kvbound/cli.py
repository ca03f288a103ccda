"""The ``kvbound`` command line: demo, generate, chat, train, eval, bench, viz, models."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Literal

import typer
from rich.console import Console

from kvbound import cli_args as arg
from kvbound.errors import KVBoundError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="kvbound: memory-bounded KV cache for Hugging Face LLMs (TRIM-KV and baselines).",
)
console = Console(stderr=True)
_DEBUG = {"on": False}
#: ``--dtype`` of ``generate`` and ``demo`` (resolved by ``kvbound.models.dtype.resolve_dtype``)
RunDtype = Literal["auto", "float32", "bfloat16", "float16"]


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks on errors.")):
    _DEBUG["on"] = debug


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2)


def _command_line() -> str:
    return "kvbound " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@app.command()
def generate(
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Prompt text."),
    prompt_file: Path | None = typer.Option(None, help="Read the prompt from a UTF-8 text file."),
    model: str | None = typer.Option(None, help="Model name, directory, .gguf or hub id."),
    method: str = typer.Option("trimkv", help="full|trimkv|streaming|h2o|tova|snapkv|..."),
    gates: str | None = typer.Option(None, help="Gate directory or shipped name."),
    budget: int = typer.Option(256, min=1, help="M: tokens kept per layer and KV head."),
    buffer: int = typer.Option(32, min=0, help="b: tokens accumulated between evictions."),
    chunk: int | None = typer.Option(None, min=1,
                                     help="Prefill chunk for long prompts (default 128)."),
    full_prefill: bool = typer.Option(False, "--full-prefill",
                                      help="Prefill the whole prompt, then cut to the budget."),
    sinks: int | None = typer.Option(None, min=0, help="Protect the first N tokens (inside M)."),
    compile: bool = typer.Option(False, "--compile",
                                 help="Decode with torch.compile on a static-shape cache."),
    positions: Literal["auto", "absolute", "rolling"] = typer.Option(
        "auto", help="RoPE positions of a bounded cache: absolute, rolling (inside the cache), "
                     "auto (absolute, rolling once past the model's context)."),
    budget_scope: Literal["head", "layer", "global"] = typer.Option(
        "head", help="Who shares the budget: each KV head (M), each layer's heads (M x H), or "
                     "every head of the model (M x H x L); same bytes."),
    min_per_head: int = typer.Option(0, min=0,
                                     help="With --budget-scope layer/global: tokens kept at "
                                          "least per head."),
    max_new_tokens: int = typer.Option(128, min=1, help="Tokens to generate."),
    min_new_tokens: int | None = typer.Option(None, min=0, help="Generate at least this many."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.7, min=0.0, help="Sampling temperature (> 0)."),
    top_p: float = typer.Option(0.9, min=0.0, max=1.0, help="Nucleus sampling mass (0, 1]."),
    repetition_penalty: float = typer.Option(
        1.0, min=0.0, help="> 1 discourages repeating tokens already seen (1 = off)."),
    seed: int = typer.Option(0, min=0),
    no_chat: bool = typer.Option(False, "--no-chat", help="Do not apply the chat template."),
    dtype: RunDtype = typer.Option(
        "auto", help="auto: bfloat16 where the hardware computes it natively (GPU, or a CPU with "
        "AVX512-BF16 or AMX), float32 elsewhere."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Generate text with the full cache or a bounded one."""
    from kvbound.generation import generate as run
    from kvbound.models import load_model
    from kvbound.models.dtype import resolve_dtype

    try:
        text = _prompt(prompt, prompt_file)
        arg.methods(method, "--method")
        if sinks is not None and sinks >= budget:
            raise arg.OptionError("--sinks", f"must be smaller than --budget ({budget}), "
                                             f"got {sinks}.")
        arg.decoding(sample, temperature, top_p, repetition_penalty)
        if min_new_tokens is not None and min_new_tokens > max_new_tokens:
            raise arg.OptionError("--min-new-tokens", f"must be <= --max-new-tokens "
                                                      f"({max_new_tokens}).")
        arg.gates_source(gates, "--gates")
        m, tok = load_model(arg.model_name(model, "--model"), dtype=resolve_dtype(dtype))
        result = run(m, tok, text, method=method, gates=gates, budget=budget, buffer=buffer,
                     chunk=chunk, sinks=sinks, max_new_tokens=max_new_tokens, sample=sample,
                     temperature=temperature, top_p=top_p,
                     repetition_penalty=repetition_penalty, seed=seed,
                     chat=False if no_chat else None, min_new_tokens=min_new_tokens,
                     full_prefill=full_prefill, compile=compile, positions=positions,
                     budget_scope=budget_scope, min_per_head=min_per_head)
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


def _prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise arg.OptionError("--prompt", "give exactly one of --prompt or --prompt-file.")
    if prompt is not None:
        return arg.nonempty(prompt, "--prompt")
    return arg.read_text(prompt_file, "--prompt-file")


@app.command()
def train(
    model: str | None = typer.Option(None, help="Model to train gates for (default: embedded)."),
    out: Path = typer.Option(..., help="Output directory (gates, checkpoints, log)."),
    memory_size: int = typer.Option(64, min=1, help="M used by the capacity loss."),
    seq_len: int = typer.Option(1024, min=2, help="Training sequence length."),
    steps: int = typer.Option(500, min=1, help="Optimizer steps."),
    data: str = typer.Option("prose", help="Mixture, e.g. 'prose:0.8,synthetic:0.2,file:x.txt:1'."),
    seed: int = typer.Option(0, min=0),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT's last checkpoint."),
    batch_size: int = typer.Option(1, min=1),
    grad_accum: int = typer.Option(1, min=1),
    lr: float = typer.Option(1e-3, min=0.0),
    weight_decay: float = typer.Option(0.01, min=0.0),
    warmup_steps: int = typer.Option(20, min=0),
    intermediate_size: int = typer.Option(128, min=1, help="Gate hidden width I."),
    bias_init: float = typer.Option(8.0, help="Initial gate bias (beta ~ sigmoid(b))."),
    gate_positions: bool = typer.Option(False, "--gate-positions",
                                        help="Gates also see how early a token is."),
    gate_log_alpha: bool = typer.Option(False, "--gate-log-alpha",
                                        help="Gates also give each token an initial importance "
                                        "(score log alpha + age x log beta); needs "
                                        "--objective attention-rank."),
    position_lr_scale: float = typer.Option(1.0, min=0.0, help="With --gate-positions: learning-"
                                            "rate multiplier of the position input."),
    train_position_only: bool = typer.Option(False, "--train-position-only",
                                             help="With --gate-positions and --init-gates: train "
                                             "only the position input (the rest frozen)."),
    freeze_positions: bool = typer.Option(False, "--freeze-positions",
                                          help="With --gate-positions and --init-gates: keep "
                                          "their position input, train the rest."),
    init_gates: str | None = typer.Option(None, help="Start from these trained gates (a "
                                          "directory or shipped name) instead of a fresh init."),
    lambda_cap: float = typer.Option(1.0, min=0.0, help="Weight of the capacity loss."),
    cap_variant: Literal["paper", "official"] = typer.Option("paper",
                                    help="paper|official capacity loss."),
    quality_reduction: Literal["sum", "mean"] = typer.Option("sum",
                                          help="sum (paper) or mean of KL and NTP."),
    train_sinks: int = typer.Option(4, min=0, help="First N tokens never decay in training."),
    evict_aware: bool = typer.Option(False, "--evict-aware", help="Student attention also "
                                     "soft-masks the keys top-M eviction would drop."),
    evict_tau: float = typer.Option(0.05, min=0.0, help="Temperature of --evict-aware's mask, "
                                    "relative to the threshold score (or in nats: --evict-scale "
                                    "absolute)."),
    evict_scale: Literal["relative", "absolute"] = typer.Option("relative",
                                    help="relative (scale-free) or absolute temperature."),
    evict_budgets: str | None = typer.Option(None, help="With --evict-aware or "
                                             "--rank-topm-weight: budgets M the student's "
                                             "eviction or the top-M cut cycles through, one per "
                                             "step (e.g. '32,64,128'; default: --memory-size)."),
    evict_decay: bool = typer.Option(True, "--evict-decay/--evict-no-decay",
                                     help="With --evict-aware: keep the paper's soft decay in the "
                                     "student beside the eviction mask, or the mask alone."),
    objective: Literal["distill", "attention-rank"] = typer.Option(
        "distill", help="distill (the paper: teacher + student passes) or attention-rank (the "
        "gate's eviction ranking fitted to the model's future attention, one pass a step)."),
    rank_horizon: int = typer.Option(256, min=1, help="attention-rank: queries summed into a "
                                     "key's future attention."),
    rank_stride: int = typer.Option(16, min=1, help="attention-rank: tokens between decision "
                                    "times."),
    rank_scope: Literal["head", "layer", "model"] = typer.Option(
        "head", help="attention-rank: rank each KV head's keys alone (head), all the layer's "
        "heads' keys in one list (layer: for --budget-scope layer) or every layer's (model: for "
        "--budget-scope global)."),
    rank_topm_weight: float = typer.Option(0.0, min=0.0, help="attention-rank: weight of the "
                                           "attention a top-M cut of each list loses (M = "
                                           "--memory-size per KV head), beside ListNet."),
    rank_topm_tau: float = typer.Option(1.0, min=1e-6, help="Temperature of that cut."),
    rank_topm_sequential: bool = typer.Option(False, "--rank-topm-sequential",
                                              help="The cut sees only keys that survived the "
                                              "earlier cuts (evictions are final)."),
    rank_listnet_weight: float = typer.Option(1.0, min=0.0, help="attention-rank: weight of "
                                              "the listwise loss."),
    rank_topm_relative: bool = typer.Option(False, "--rank-topm-relative",
                                            help="--rank-topm-tau as a fraction of each list's "
                                            "score spread."),
    bf16: bool = typer.Option(True, help="bf16 autocast where the hardware computes bf16 natively "
                              "(GPU, or a CPU with AVX512-BF16 or AMX); fp32 elsewhere."),
    grad_checkpointing: bool = typer.Option(False, help="Recompute activations in backward."),
    save_every: int = typer.Option(50, min=1, help="Checkpoint every N steps."),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """Train retention gates (distillation or attention-rank, + capacity loss); only the gates
    change."""
    from kvbound.train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(
        model=model, out=str(out), memory_size=memory_size, seq_len=seq_len, steps=steps,
        data=data, seed=seed, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        weight_decay=weight_decay, warmup_steps=warmup_steps, intermediate_size=intermediate_size,
        bias_init=bias_init, gate_positions=gate_positions, gate_log_alpha=gate_log_alpha,
        position_lr_scale=position_lr_scale,
        train_position_only=train_position_only, freeze_positions=freeze_positions,
        init_gates=init_gates,
        lambda_cap=lambda_cap,
        cap_variant=cap_variant,
        quality_reduction=quality_reduction, train_sinks=train_sinks, evict_aware=evict_aware,
        evict_tau=evict_tau, evict_scale=evict_scale, bf16=bf16,
        evict_budgets=[], evict_decay=evict_decay, objective=objective,
        rank_horizon=rank_horizon, rank_stride=rank_stride, rank_scope=rank_scope,
        rank_topm_weight=rank_topm_weight, rank_topm_tau=rank_topm_tau,
        rank_topm_sequential=rank_topm_sequential, rank_listnet_weight=rank_listnet_weight,
        rank_topm_relative=rank_topm_relative,
        grad_checkpointing=grad_checkpointing, save_every=save_every,
        extra={"resume": resume},
    )
    try:
        if evict_budgets is not None:
            cfg.evict_budgets = arg.csv(evict_budgets, "--evict-budgets", int, minimum=1)
        arg.config(cfg, {"evict_decay": "--evict-no-decay"})
        arg.writable(out, "--out", directory=True)
        _check_data(data)
        arg.model_name(model, "--model")
        arg.gates_source(init_gates, "--init-gates")
        if resume:
            from kvbound.io import read_versioned

            if read_versioned(out, "checkpoint") is None:
                raise arg.OptionError("--resume", f"nothing to resume: no checkpoint in {out}. "
                                                  "Run without --resume to start there.")
        gates = Trainer(cfg, progress=not quiet, command=_command_line()).run()
    except KVBoundError as exc:
        _fail(exc)
    console.print(f"gates written to {out} (digest {gates.digest()})")


def _check_data(data: str) -> None:
    """--data: known sources, and files that exist and are readable."""
    from kvbound.train.data import parse_spec

    for kind, source, _ in arg.check("--data", parse_spec, data):
        if kind == "file" and not Path(source).is_file():
            raise arg.OptionError("--data", f"no file {source!r}.")


@app.command()
def bench(
    model: str | None = typer.Option(None),
    gates: str | None = typer.Option(None),
    methods: str = typer.Option("full,trimkv,streaming,knorm,snapkv,h2o,tova"),
    lengths: str = typer.Option("1024,4096,16384", help="Prompt lengths (tokens)."),
    budget: int = typer.Option(256, min=1),
    buffer: int = typer.Option(32, min=0),
    chunk: int = typer.Option(512, min=1, help="Prefill chunk for bounded methods."),
    decode_tokens: int = typer.Option(64, min=5, help="Decode steps timed (4 are warm-up)."),
    repeats: int = typer.Option(1, min=1,
                                help="Runs per configuration; the median run is reported."),
    dtype: Literal["float32", "bfloat16", "float16"] = typer.Option("float32",
                              help="float32, bfloat16 or float16."),
    model_config: str | None = typer.Option(None, help="Random weights from a real architecture "
                                            "(llama-3.2-1b, qwen3-1.7b, qwen3-4b, qwen3-8b or a "
                                            "config.json): speed at real sizes, no download."),
    batch_size: int = typer.Option(1, min=1, help="Rows decoded together."),
    device: str = typer.Option("cpu", help="cpu, or cuda / cuda:N on a GPU machine."),
    fill: Literal["prefill", "random"] = typer.Option(
        "prefill", help="prefill: run the prompt through the model. random: decode speed at "
        "sizes too slow to prefill (full cache: random K/V of the prompt length; bounded: "
        "prefilled until it evicts, then repeated to the batch)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write results JSON here."),
    plot_dir: Path | None = typer.Option(None, help="Write plots here."),
):
    """Speed and memory per method and prompt length (each run in its own process).

    A method written NAME+compile (e.g. trimkv+compile) decodes with torch.compile on a
    static-shape cache; NAME@SCOPE (e.g. trimkv@global) runs with that budget scope."""
    from kvbound.bench import parser, render, run_bench

    try:
        arg.methods(methods, "--methods", compile_suffix=True, scope_suffix=True)
        arg.csv(lengths, "--lengths", int, minimum=1)
        arg.gates_source(gates, "--gates")
        arg.model_name(model, "--model")
        arg.device(device, "--device")
        if fill == "random" and "+compile" in methods:
            raise arg.OptionError("--fill", "random fill measures eager decoding: drop '+compile' "
                                  "from --methods, or use --fill prefill.")
        if model_config is not None:
            from kvbound.models.random_config import read_config

            if model is not None:
                raise arg.OptionError("--model-config", "give --model or --model-config, not both.")
            arg.check("--model-config", read_config, model_config)
        if json_out is not None:
            arg.writable(json_out, "--json", directory=False)
        if plot_dir is not None:
            arg.writable(plot_dir, "--plot-dir", directory=True)
    except KVBoundError as exc:
        _fail(exc)
    argv = ["--methods", methods, "--lengths", lengths, "--budget", str(budget), "--buffer",
            str(buffer), "--chunk", str(chunk), "--decode-tokens", str(decode_tokens),
            "--repeats", str(repeats), "--dtype", dtype, "--batch-size", str(batch_size),
            "--device", device, "--fill", fill]
    for flag, value in (("--model", model), ("--gates", gates), ("--json", json_out),
                        ("--plot-dir", plot_dir), ("--model-config", model_config)):
        if value is not None:
            argv += [flag, str(value)]
    try:
        result = run_bench(parser().parse_args(argv))
    except SystemExit as exc:
        _fail(KVBoundError(str(exc)))
    print(render(result, _command_line()))


@app.command()
def viz(
    prompt: str | None = typer.Option(None, "--prompt", help="Text to analyse."),
    prompt_file: Path | None = typer.Option(None, help="Read the text from a UTF-8 file."),
    model: str | None = typer.Option(None),
    gates: str | None = typer.Option(None, help="Gate directory or shipped name."),
    out: Path = typer.Option(Path("viz_out"), help="Output directory (PNG, HTML, JSON)."),
    budget: int = typer.Option(64, min=1),
    buffer: int = typer.Option(16, min=0),
    sinks: int = typer.Option(0, min=0,
                              help="Protected first tokens (0 shows what gates keep alone)."),
    heads: str | None = typer.Option(None, help="Timelines for these heads: 'L:H,L:H'."),
    html_head: str | None = typer.Option(None, help="Head for retention.html: 'L:H'."),
    max_new_tokens: int = typer.Option(0, min=0, help="Let the model continue the text first."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the text in the chat template."),
):
    """Retention maps, eviction timelines, coloured text and head roles for a text."""
    from kvbound.generation import encode_prompt
    from kvbound.models import load_model
    from kvbound.viz import run_viz

    try:
        text = _prompt(prompt, prompt_file)
        if sinks >= budget:
            raise arg.OptionError("--sinks", f"must be smaller than --budget ({budget}).")
        head_list = [arg.pair(x, "--heads") for x in arg.csv(heads, "--heads")] if heads else None
        html = arg.pair(html_head, "--html-head") if html_head else None
        arg.writable(out, "--out", directory=True)
        arg.gates_source(gates, "--gates")
        m, tok = load_model(arg.model_name(model, "--model"))
        kwargs = {"ids": encode_prompt(tok, text, chat=True)} if chat else {"text": text}
        res = arg.check("--heads", run_viz, m, tok, gates, out=out, budget=budget,
                        buffer=buffer, sinks=sinks, heads=head_list, html_head=html,
                        max_new_tokens=max_new_tokens, **kwargs)
    except (KVBoundError, OSError) as exc:
        _fail(exc)
    for path in res["files"].values():
        print(path)
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
    budget: int = typer.Option(64, min=8, help="Tight budget M for the bounded methods."),
    quick: bool = typer.Option(False, help="Shorter run (for tests)."),
    out: Path = typer.Option(Path("demo_out"), help="Where the plot and pictures go."),
    dtype: RunDtype = typer.Option(
        "auto", help="auto: bfloat16 where the hardware computes it natively, float32 elsewhere."),
):
    """The main job: TRIM-KV vs the full cache and baselines on the embedded model."""
    from kvbound.demo import run_demo

    try:
        arg.writable(out, "--out", directory=True)
        run_demo(budget=budget, quick=quick, out=out, dtype=dtype)
    except KVBoundError as exc:
        _fail(exc)


from kvbound.cli_eval import eval_app  # noqa: E402 - needs app, _fail and friends above

app.add_typer(eval_app, name="eval")
from kvbound import cli_chat  # noqa: E402, F401 - registers ``kvbound chat`` on app


def main(argv: list[str] | None = None) -> int:
    """The console script: one clear line for any error, the traceback with ``--debug``.

    Usage errors (bad types, ranges, choices, unknown options) are typer's own messages, which
    name the option (exit 2); errors of ours name it too (exit 2); anything unexpected from
    transformers, torch or the file system becomes one line (exit 1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args=argv, prog_name="kvbound")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        return 130
    except Exception as exc:  # noqa: BLE001 - the boundary: no traceback for a user
        if "--debug" in argv:
            raise
        what = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        console.print(f"[bold red]error:[/] {type(exc).__name__}: {what} "
                      "(run again with --debug for the traceback)")
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
