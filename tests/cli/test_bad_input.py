"""Every option of every command, given bad values, fails with one clear line that names it.

The commands and options are read from the typer app (not a hand list), so a new option without
a bad-value case fails ``test_every_option_has_bad_values``. Every case fails before a model is
loaded, so the whole sweep takes seconds.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import typer.main

from kvbound.cli import app, main


def _commands():
    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in sorted(cmd.commands.items()):
                yield from walk(sub, (*path, name))
        else:
            yield path, cmd

    return list(walk(typer.main.get_command(app), ()))


def _annotation(param):
    """The option's value type with Optional / list unwrapped."""
    ann = param.type_descriptor.annotation
    while typing.get_origin(ann) in (typing.Union, list, __import__("types").UnionType):
        ann = next(a for a in typing.get_args(ann) if a is not type(None))
    return ann


#: valid values for the options a command needs, so that only the option under test is bad
BASE = {
    ("generate",): ["--prompt", "hello"],
    ("train",): ["--out", "{tmp}/run", "--data", "file:{text}"],
    ("viz",): ["--prompt", "hello"],
    ("eval", "fidelity"): ["--text-file", "{text}"],
    ("chat",): ["--session", "{tmp}/session", "--message", "hi"],
}

#: bad values of string options, by option name
STRING_BAD = {
    "--prompt": [""],
    "--message": ["", "   "],
    "--model": ["./no/such/model"],
    "--gates": ["no-such-gates"],
    "--model-config": ["no-such-config"],
    "--device": ["tpu", "cuda:x", "cuda:7"],
    "--init-gates": ["no-such-gates"],
    "--method": ["nope"],
    "--methods": ["full,nope", ","],
    "--budgets": ["64,x", "0"],
    "--budget-scopes": ["head,model", ","],
    "--evict-budgets": ["32,x", "0", ","],
    "--lengths": ["1024,x", "-5"],
    "--tasks": ["nope"],
    "--data": ["nope:1", "file:/no/such/file.txt"],
    "--heads": ["3-4", "a:b"],
    "--html-head": ["3"],
}
#: bad values of path options: inputs must be readable UTF-8 text, outputs creatable
INPUT_PATHS = {"--prompt-file", "--text-file"}
OUTPUT_PATHS = {"--out", "--json", "--plot-dir"}


def _is_flag(param) -> bool:
    return bool(param.is_flag) or _annotation(param) is bool


def _bad_values(param, tmp) -> list[str]:
    ann, name = _annotation(param), param.opts[0]
    if _is_flag(param):
        return []
    if typing.get_origin(ann) is typing.Literal:
        return ["nope"]
    if ann in (int, float):
        out = ["x"] if ann is float else ["x", "1.5"]
        if param.min is not None:
            out.append(str(param.min - 1))
        if param.max is not None:
            out.append(str(param.max + 1))
        return out
    if ann is Path or name in INPUT_PATHS | OUTPUT_PATHS:
        if name in INPUT_PATHS:
            return [str(tmp / "missing.txt"), str(tmp / "binary.bin"), str(tmp / "latin1.txt"),
                    str(tmp)]
        return [str(tmp / "a-file" / "below")]
    return STRING_BAD.get(name, [])


def _cases():
    for path, cmd in _commands():
        for param in cmd.params:
            if param.param_type_name == "option" and param.opts[0] != "--help":
                yield path, param


@pytest.fixture
def files(tmp_path):
    (tmp_path / "binary.bin").write_bytes(b"\x00\x01\x02 binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "a-file").write_text("a file, not a directory")
    (tmp_path / "text.txt").write_text("Some text to read. " * 20)
    return tmp_path


def test_every_option_has_bad_values(files):
    missing = [f"{' '.join(p)} {param.opts[0]}" for p, param in _cases()
               if not _is_flag(param) and not _bad_values(param, files)]
    assert not missing, f"give these options bad-value cases: {missing}"


def _run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize(("path", "param"), list(_cases()),
                         ids=[f"{'-'.join(p)}{param.opts[0]}" for p, param in _cases()])
def test_bad_values_fail_cleanly_and_name_the_option(path, param, files, capsys):
    base = [a.format(tmp=files, text=files / "text.txt") for a in BASE.get(path, [])]
    for value in _bad_values(param, files):
        argv = list(base)
        if param.opts[0] in argv:
            i = argv.index(param.opts[0])
            del argv[i:i + 2]
        argv = [*path, *argv, param.opts[0], value]
        code, out = _run(argv, capsys)
        assert code != 0, f"accepted {argv}:\n{out}"
        assert "Traceback" not in out, out
        names = [*param.opts, *getattr(param, "secondary_opts", [])]
        assert any(n in out for n in names), f"{argv}: the message does not name the option:\n{out}"


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt", "hi", "--sample", "--temperature", "0"],
    ["generate", "--prompt", "hi", "--sample", "--top-p", "0"],
    ["generate", "--prompt", "hi", "--budget", "8", "--sinks", "8"],
    ["generate", "--prompt", "hi", "--max-new-tokens", "4", "--min-new-tokens", "5"],
    ["generate", "--prompt", "hi", "--prompt-file", "x.txt"],
    ["generate"],
    ["viz", "--prompt", "hi", "--budget", "4", "--sinks", "4"],
    ["eval", "fidelity"],
    ["eval", "fidelity", "--text-file", "{text}", "--budgets", "8", "--sinks", "8"],
    ["eval", "tasks", "--data", "gsm8k"],
    ["eval", "tasks", "--data", "gsm8k=/no/such.jsonl"],
    ["train", "--out", "{tmp}/empty", "--data", "file:{text}", "--resume"],
    ["train", "--out", "{tmp}/run", "--lr", "0"],
    ["train", "--out", "{tmp}/run", "--objective", "attention-rank", "--evict-aware"],
    ["train", "--out", "{tmp}/run", "--objective", "attention-rank", "--seq-len", "16"],
    ["chat", "--session", "{tmp}/s", "--message", "hi", "--method", "full"],
    ["chat", "--session", "{tmp}/s", "--message", "hi", "--sample", "--temperature", "0"],
    ["chat", "--session", "{tmp}/s", "--message", "hi", "--budget", "8", "--sinks", "8"],
    ["chat", "--session", "{tmp}/a-file", "--message", "hi"],
])
def test_bad_combinations_fail_cleanly(argv, files, capsys):
    argv = [a.format(tmp=files, text=files / "text.txt") for a in argv]
    code, out = _run(argv, capsys)
    assert code != 0 and "Traceback" not in out and "error" in out.lower(), out


def test_unexpected_exceptions_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    import kvbound.models

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(kvbound.models, "load_model", boom)
    code, out = _run(["generate", "--prompt", "hi"], capsys)
    assert code == 1 and "RuntimeError: disk on fire" in out and "--debug" in out
    assert "Traceback" not in out and "second line" not in out
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["--debug", "generate", "--prompt", "hi"])


def test_bench_random_fill_refuses_compiled_methods(capsys):
    code, out = _run(["bench", "--fill", "random", "--methods", "full,trimkv+compile"], capsys)
    assert code != 0 and "Traceback" not in out
    assert "--fill" in out and "+compile" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--lr", "0"], "--lr: must be > 0, got 0.0."),
    (["--evict-no-decay"], "--evict-no-decay: needs --evict-aware (without"),
    (["--position-lr-scale", "2"], "--position-lr-scale: needs --gate-positions"),
    (["--freeze-positions"], "--freeze-positions: needs --gate-positions and --init-gates"),
    (["--objective", "attention-rank", "--evict-aware"], "--evict-aware: shapes the student's"),
    (["--evict-budgets", "8,16"], "--evict-budgets: needs --evict-aware"),
])
def test_train_settings_are_checked_once_and_named_by_their_option(argv, message, files, capsys,
                                                                    monkeypatch):
    """`train` leaves the checks of its settings to TrainConfig.validate (no twin in the CLI):
    the error names the option of the bad field, and the other fields in its text by their
    options too; nothing is loaded or trained first."""
    import kvbound.train.trainer as trainer

    monkeypatch.setattr(trainer.Trainer, "__init__", lambda *a, **k: pytest.fail("trained"))
    code, out = _run(["train", "--out", str(files / "run"), *argv], capsys)
    assert code != 0 and "Traceback" not in out
    assert message in " ".join(out.split()), out
