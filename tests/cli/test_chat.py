"""``kvbound chat`` and :class:`kvbound.chat.Conversation`: turns persist in one bounded file."""

from __future__ import annotations

import pytest

from kvbound.cache.persist import read_metadata
from kvbound.chat import SESSION_FILE, Conversation, turn_text
from kvbound.cli import main
from kvbound.gates import RetentionGates
from kvbound.hooks import detach
from kvbound.models import load_model
from tests.helpers import tiny_model_dir

TEXT = ("The lighthouse keeper climbed the stairs every evening. The lamp was old, the glass "
        "was clean, and ships passed safely through the narrow channel below. ") * 12
TURNS = ["Who climbs the stairs?", "What is old?", "Tell me about the ships and the channel."]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    data = root / "data.txt"
    data.write_text(TEXT)
    model_dir = tiny_model_dir(root / "model", data, chat=True)
    model, _ = load_model(model_dir)
    RetentionGates.for_model(model, intermediate_size=8, bias_init=2.0, seed=0).save(root / "g")
    return {"model": str(model_dir), "gates": str(root / "g")}


def _chat(capsys, *argv) -> tuple[int, str, str]:
    code = main(["chat", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_turn_text_follows_the_chat_template(env):
    _, tok = load_model(env["model"])
    first, closing = turn_text(tok, "hi", first=True)
    later, _ = turn_text(tok, "again", first=False)
    assert first == "user: hi\nassistant: " and later == "user: again\nassistant: "
    assert closing == "\n"


@pytest.mark.parametrize("method", ["trimkv", "h2o"])
def test_three_cli_turns_continue_one_conversation(env, capsys, tmp_path, method):
    """Three `kvbound chat --message` processes = one Conversation saying the three turns; the
    session file holds a bounded cache (its size does not grow with the conversation)."""
    session = tmp_path / "s"
    common = ["--session", str(session), "--model", env["model"], "--method", method,
              "--budget", "16", "--buffer", "4", "--max-new-tokens", "12"]
    if method == "trimkv":
        common += ["--gates", env["gates"]]
    replies, sizes = [], []
    for turn in TURNS:
        code, out, err = _chat(capsys, *common, "--message", turn)
        assert code == 0, err
        replies.append(out.rstrip("\n"))
        sizes.append((session / SESSION_FILE).stat().st_size)
    meta = read_metadata(session / SESSION_FILE)
    assert meta["extra"]["conversation"]["turns"] == 3 and "turn 3:" in err
    model, tok = load_model(env["model"])
    if method == "trimkv":
        RetentionGates.load(env["gates"], model).attach(model)
    conv = Conversation.start(model, tok, method=method, budget=16, buffer=4)
    want = [conv.say(t, max_new_tokens=12) for t in TURNS]
    assert replies == want
    assert conv.cache.stats().seen_tokens == meta["seen_total"] > 16 + 4
    assert max(sizes) < 1.05 * sizes[0]
    detach(model)


def test_a_session_keeps_its_settings(env, capsys, tmp_path):
    s = ["--session", str(tmp_path / "s"), "--model", env["model"], "--method", "tova"]
    assert _chat(capsys, *s, "--budget", "16", "--message", "hello")[0] == 0
    code, _, err = _chat(capsys, *s, "--budget", "32", "--message", "again")
    assert code == 2 and "--budget" in err and "16" in err
    code, out, err = _chat(capsys, "--session", str(tmp_path / "s"), "--message", "again")
    assert code == 0 and out.strip() is not None and "turn 2:" in err


def test_interactive_turns_from_stdin(env, capsys, tmp_path, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("first question\n\nsecond one\n/exit\nnever\n"))
    code, out, err = _chat(capsys, "--session", str(tmp_path / "s"), "--model", env["model"],
                           "--method", "streaming", "--budget", "16", "--max-new-tokens", "5")
    assert code == 0 and "turn 2:" in err and "turn 3:" not in err
    assert read_metadata(tmp_path / "s" / SESSION_FILE)["extra"]["conversation"]["turns"] == 2


def test_a_reply_cut_by_max_new_tokens_owes_the_templates_end(env):
    """A reply that did not end with EOS leaves the template's whole closing for the next turn."""
    model, tok = load_model(env["model"])
    conv = Conversation.start(model, tok, method="streaming", budget=16, buffer=4)
    conv.say("hi", max_new_tokens=3)
    assert conv.state.closing == "\n" and len(conv.state.pending) == 1
    ids = conv._unseen_ids("next")
    assert ids[0] == conv.state.pending[0]
    assert tok.decode(ids[1:]) == "\nuser: next\nassistant: "
    with pytest.raises(Exception, match="empty"):
        conv.say("  ")


def test_the_fed_stream_is_the_templates_rendering_when_replies_end_with_eos(env):
    """With a template whose assistant turns end with the EOS token's text (a newline after a
    block tag would be trimmed by transformers' Jinja settings, hence ``{{ '\\n' }}``), and a reply that
    ends at EOS, the tokens fed over two turns decode to the template's rendering of the whole
    conversation (the end marker is fed once, not twice)."""
    model, tok = load_model(env["model"])
    probe = Conversation.start(model, tok, method="streaming", budget=16, buffer=4)
    probe.say("hi", max_new_tokens=1)
    eos = probe.state.pending[0]
    end = tok.decode([eos])
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                         "{% if m['role'] == 'assistant' %}" + end + "{% endif %}{{ '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    model.generation_config.eos_token_id = eos
    conv = Conversation.start(model, tok, method="streaming", budget=16, buffer=4)
    fed = conv._unseen_ids("hi")
    reply = conv.say("hi", max_new_tokens=5)
    assert conv.state.pending == [eos] and conv.state.closing == "\n"
    fed += conv._unseen_ids("more")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply},
            {"role": "user", "content": "more"}]
    want = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert tok.decode(fed) == want
