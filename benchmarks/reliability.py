"""Run the reliability scenarios and write docs/RELIABILITY.md from what the library did.

    python benchmarks/reliability.py

The scenarios are the ones in tests/cli/test_reliability.py (the tests assert the same behaviour).
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _results import command, machine  # noqa: E402

from kvbound.io import atomic_write_text  # noqa: E402
from tests.cli.test_reliability import SCENARIOS  # noqa: E402


def run(fn):
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn(Path(tmp))
        except Exception as exc:  # noqa: BLE001 - recording what happened is the point
            return type(exc).__name__, str(exc)
        relevant = [w for w in caught if issubclass(w.category, UserWarning)]
        if relevant:
            return f"warning ({relevant[-1].category.__name__})", str(relevant[-1].message)
        return "no error", ""


def main() -> None:
    rows = []
    for name, fn, _expected, match in SCENARIOS:
        kind, message = run(fn)
        ok = match in message
        rows.append(f"| {name} | {kind} | {message.replace('|', '/').replace(chr(10), ' ')} | "
                    f"{'as expected' if ok else 'UNEXPECTED'} |")
    text = "\n".join([
        "# Reliability",
        "",
        "What happens when things go wrong. The first table is written by "
        "`benchmarks/reliability.py`, which runs the scenarios of `tests/cli/test_reliability.py` "
        "and records the library's actual behaviour (the tests assert the same).",
        "",
        f"Command: `{command()}`  ",
        f"Machine: {machine()}",
        "",
        "| what was tried | outcome | message the user sees | check |",
        "|---|---|---|---|",
        *rows,
        "",
        "## Faults and long runs (asserted by tests, not re-run here)",
        "",
        "| what was tried | how the library behaved | test |",
        "|---|---|---|",
        "| training process killed with SIGKILL mid-run, then `--resume` | resumes from the last "
        "complete checkpoint; final gates bit-identical to an uninterrupted run; log has each step "
        "once | `test_killed_training_resumes_from_last_complete_checkpoint` |",
        "| training checkpoint write killed (os._exit) after each of its steps: files written, "
        "version renamed, pointer replaced, old version trashed | `read_versioned` finds a "
        "complete checkpoint every time; resume gives gates bit-identical to an uninterrupted "
        "run | `tests/train/test_checkpoints.py` |",
        "| gate directory write killed between the weights and the metadata rename | load "
        "refuses: digest in gates.json does not match the weights, with the reason | "
        "`test_gates_killed_between_weights_and_metadata_are_refused_with_a_reason` |",
        "| `--resume` in a directory without a checkpoint | error: nothing to resume | "
        "`test_resume_without_a_checkpoint_says_so` |",
        "| model conversion killed mid-write | no cache entry appears; the next load converts "
        "again; stale temp dirs are cleaned | `tests/models/test_models.py` |",
        "| checkpoints, converted models, eval results | checkpoints: numbered directories + "
        "pointer (`kvbound.io.write_versioned`); models and results: fsynced temp dir then "
        "rename (`kvbound.models.convert`, `kvbound.io`) | `tests/train/`, `tests/models/` |",
        "| 100K tokens through the bounded cache (tiny model) | seen counter exact; resident "
        "tokens <= M + b + chunk; storage capacity bounded; peak RSS flat (< 20 MB growth) | "
        "`test_100k_tokens_flat_memory_and_exact_counter` |",
        "| random budgets, buffers, chunks, prompts, batches with padding (hypothesis) | bound, "
        "exact seen count, kept = top-scored in order | `tests/cache/test_cache.py::test_cache_invariants`"
        " |",
        "| `.pth` checkpoints | only ever read with `torch.load(weights_only=True)`; our own format "
        "is safetensors + JSON | `test_official_import_rejects_pickles_with_code` |",
        "| bounded methods past the model's context | default `positions=auto` switches to "
        "rolling positions (keys re-rotated, no warning); `positions=absolute` warns once; the "
        "full cache warns | `tests/cache/test_positions.py`, "
        "`test_bounded_absolute_positions_warn_once_past_the_context` |",
        "| every option of every CLI command given bad values (generated from the typer app: "
        "wrong types, out of range, unknown choices, missing / binary / non-UTF-8 / directory "
        "input files, uncreatable output paths, bad lists, unknown methods, tasks, gates) | exit "
        "code != 0, no traceback, the message names the option; unexpected exceptions are one "
        "line (`--debug` shows the traceback) | `tests/cli/test_bad_input.py` |",
        "| batch == rows alone, static == dynamic, batched == single windows under other CPU "
        "kernels (ATen AVX2 / scalar, MKL_CBWR COMPATIBLE / AVX, as on an Intel Xeon) and 1 or 2 "
        "threads | same tokens kept (scores tied within 1e-5 relative keep the most recent) | "
        "`tests/test_portability.py` |",
        "| the suite in shuffled order, hypothesis derandomized, inputs from local generators "
        "| passes; a lint test rejects global-RNG inputs, bare `pytest.raises(KVBoundError)` and "
        "timing thresholds | `tests/test_lint.py`, `make test` (pytest-randomly) |",
        "",
    ])
    doc = ROOT / "docs" / "RELIABILITY.md"
    old = doc.read_text() if doc.exists() else ""
    if "<!-- BEGIN mutation -->" in old:  # benchmarks/mutation.py owns that section: keep it
        text = text.rstrip() + "\n\n" + old[old.index("<!-- BEGIN mutation -->"):]
    atomic_write_text(doc, text)
    print(text)


if __name__ == "__main__":
    main()
