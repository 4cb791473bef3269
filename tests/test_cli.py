"""The command line end to end, in subprocesses, as a user runs it."""

import fcntl
import io
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.checkpoint_assets import write_gguf
from tests.cli_process import ROOT, chat_transcript, one_line_error, torchchat, write_endless_model
from tests.generators import local_generator, tiny_source
from torchchat.catalog import ModelSource
from torchchat.chat_format import chat_format_for
from torchchat.cli import build_parser
from torchchat.generate.base import GenerationArgs, Turn
from torchchat.generate.local import LocalGenerator
from torchchat.tokenizer import load_tokenizer

CHAT_CONTEXT = 2048  # a chat's KV cache: builder.DEFAULT_CHAT_SEQ_LEN, or the model's context if shorter
PAGE = 4096


def test_generate_greedy_matches_in_process(tiny_model):
    proc = torchchat("generate", *tiny_model.cli_flags(), "--prompt", "Once upon a time", "--max-new-tokens", "10",
                     "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    expected = local_generator(tiny_source(tiny_model)).run_generate(
        "Once upon a time", GenerationArgs(max_new_tokens=10, temperature=0))[0].text
    assert proc.stdout == "Once upon a time" + expected + "\n"
    assert "time to first token" in proc.stderr and "loaded" in proc.stderr


def test_generate_reads_standard_input(tiny_model):
    args = ["generate", *tiny_model.cli_flags(), "--max-new-tokens", "5", "--temperature", "0"]
    piped = torchchat(*args, stdin="Once upon a time")
    flagged = torchchat(*args, "--prompt", "Once upon a time")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == flagged.stdout


def test_default_model_completes_in_english(smollm2_gguf):
    proc = torchchat("generate", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_default_model_chat_answers_and_keeps_context(smollm2_gguf):
    proc = torchchat("chat", "--temperature", "0", "--max-new-tokens", "40",
                     stdin="What is the capital of France?\nWhat language do people speak in that city?\n")
    assert proc.returncode == 0, proc.stderr
    replies = proc.stdout.split("Assistant: ")[1:]
    assert len(replies) == 2
    assert "Paris" in replies[0]
    assert "French" in replies[1]


def test_chat_ends_cleanly_on_bye_and_eof(tiny_model):
    proc = torchchat("chat", *tiny_model.cli_flags(), "--max-new-tokens", "4", "--temperature", "0",
                     stdin="hello\n/bye\nnot read\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Assistant: ") == 1


@pytest.fixture(scope="module")
def endless_model(tiny_model, tmp_path_factory) -> ModelSource:
    checkpoint = write_endless_model(tiny_model, tmp_path_factory.mktemp("endless"), CHAT_CONTEXT)
    return ModelSource("endless", checkpoint_path=checkpoint, tokenizer_path=tiny_model.tokenizer)


def endless_generator(source: ModelSource) -> LocalGenerator:
    tokenizer = load_tokenizer(source)
    return LocalGenerator.from_source(source, tokenizer, chat_format_for(tokenizer, source), max_seq_len=CHAT_CONTEXT,
                                      out=io.StringIO(), err=io.StringIO())


def interrupted_chat(source: ModelSource, lines: list[str], args: GenerationArgs, new_tokens: int):
    """The chat, in this process, when Ctrl-C lands in the first reply after ``new_tokens`` tokens:
    (its transcript, the longest text of one token in the cut reply, the tokens of the last whole reply)."""
    gen = endless_generator(source)
    forward, decode_steps, submit, requests = gen.forward, {"n": 0}, gen.submit, []

    def interrupted_once(step):
        if step.tokens.size(1) == 1:  # a decode step; the first token comes from the prompt
            decode_steps["n"] += 1
            if decode_steps["n"] == new_tokens:
                raise KeyboardInterrupt
        return forward(step)
    gen.forward = interrupted_once
    gen.submit = lambda *a, **k: requests.append(submit(*a, **k)) or requests[-1]
    transcript = chat_transcript(gen, lines, args)
    longest_piece = max(len(gen.tokenizer.decode([token])) for token in requests[0].sequences[0].generated)
    return transcript, longest_piece, requests[-1].sequences[0].generated


def one_shot_after_interrupt(source: ModelSource, user: list[str], args: GenerationArgs, new_tokens: int):
    """The reply to user[1] run in one go over the history a chat should hold when its first reply was cut
    after ``new_tokens`` tokens: user[0]'s turn, those tokens, the end of the turn, user[1]'s turn."""
    gen = endless_generator(source)
    fmt = gen.chat_format
    turn1 = fmt.encode_turn([{"role": "user", "content": user[0]}], first=True)
    reply1 = gen.complete(Turn(turn1, replace(args, max_new_tokens=new_tokens)))[0].tokens
    history = turn1 + reply1[:new_tokens] + fmt.end_of_turn
    history += fmt.encode_turn([{"role": "user", "content": user[1]}], first=False)
    return endless_generator(source).complete(Turn(history, args))[0].tokens


def test_ctrl_c_stops_the_reply_not_the_chat(endless_model):
    """A real SIGINT to `torchchat.py chat` mid-reply: the reply ends with [interrupted], the next line gets a
    whole reply (the one an in-process chat cut at the same token gives, and a one-shot run over the history
    with the cut reply in it), and /bye exits 0.

    The chat's stdout is a one-page pipe that this test does not read until the signal is sent: a reply
    longer than a page (the first reply's 400 tokens are 6.3 KB of text) cannot end before it, however fast
    the process runs."""
    flags = ["--checkpoint-path", str(endless_model.checkpoint_path), "--tokenizer-path",
             str(endless_model.tokenizer_path), "--max-new-tokens", "400", "--temperature", "0"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "torchchat.py"), "chat", *flags], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "2"}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, PAGE)
        proc.stdin.write(b"Tell me a story\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 120
        while pipe_bytes(proc.stdout) < len("\nYou: Assistant: ") + 200:  # the reply is streaming
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"no reply streaming:\n{proc.communicate()[1].decode()}")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends (the process has a session of its own)
        out, err = proc.communicate(b"Go on\n/bye\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout, stderr = out.decode("utf-8", "surrogateescape"), err.decode()
    assert proc.returncode == 0, stderr
    decoded = [int(n) for n in re.findall(r"decode (\d+) tokens", stderr)]
    assert len(decoded) == 2 and decoded[0] < 399 and decoded[1] == 399, stderr  # 400 tokens: 1 + 399
    user, args = ["Tell me a story", "Go on"], GenerationArgs(max_new_tokens=400, temperature=0)
    want, longest_piece, second_reply = interrupted_chat(endless_model, [*user, "/bye"], args, decoded[0] + 1)
    first, marker, rest = stdout.partition("\n[interrupted]\n")
    want_first, _, want_rest = want.partition("\n[interrupted]\n")
    assert marker and "[interrupted]" not in rest
    # The SIGINT may land while a token's text is being written: that piece is then lost from the screen.
    assert want_first.startswith(first) and len(want_first) - len(first) <= longest_piece
    assert rest == want_rest and rest.count("Assistant: ") == 1
    # And the reply to "Go on" is the one a chat holding the cut reply, closed as a turn, gives. Measured:
    # one-shot and turn-by-turn tokens agree on 600 of 600 tokens for cuts at 5, 16, 40, 100 and 250 tokens.
    assert second_reply[:64] == one_shot_after_interrupt(endless_model, user, replace(args, max_new_tokens=64),
                                                         decoded[0] + 1)


def pipe_bytes(pipe) -> int:
    """How many bytes wait in a pipe, unread."""
    return struct.unpack("i", fcntl.ioctl(pipe.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def test_list_shows_known_models_and_the_default_available(smollm2_gguf):
    proc = torchchat("list")
    assert proc.returncode == 0
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert {"smollm2-135m", "llama3.1-8b", "llama2-7b", "llama3.2-1b", "stories15m"} <= set(rows)
    assert str(smollm2_gguf) in rows["smollm2-135m"]
    assert "int4 (Q4_1 x210), int8 (Q8_0 x1)" in rows["smollm2-135m"]  # what it runs as, from the file's header
    assert "not available" in rows["llama3.1-405b"]


def test_every_flag_is_explained_in_help():
    for command in ("generate", "chat"):
        proc = torchchat(command, "--help")
        assert proc.returncode == 0
        sub = build_parser()._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{command} {action.option_strings} has no help"
                assert action.option_strings[-1] in proc.stdout


def test_models_in_the_home_directory_are_found_by_name(tiny_model, tmp_path):
    """~/.torchchat/models holds a known model as <name>/ (here Meta's layout) or <name>.gguf: `list` shows
    each, and `generate <alias>` loads it (the tiny model's weights in both, so the tiny model's text)."""
    models = tmp_path / ".torchchat" / "models"
    (models / "stories15m").mkdir(parents=True)
    shutil.copy(tiny_model.checkpoint, models / "stories15m" / "consolidated.00.pth")
    shutil.copy(tiny_model.checkpoint.parent / "params.json", models / "stories15m" / "params.json")
    shutil.copy(tiny_model.tokenizer, models / "stories15m" / "tokenizer.model")
    write_gguf(models / "llama2-7b.gguf", torch.load(tiny_model.checkpoint), tiny_model.args)
    # HOME moves ~/.torchchat; the CPU kernels' build cache stays where it is (no rebuild).
    env = {"HOME": str(tmp_path), "TORCHCHAT_CACHE": os.environ.get("TORCHCHAT_CACHE",
                                                                     str(Path.home() / ".cache" / "torchchat"))}
    listed = torchchat("list", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert rows["stories15m"].endswith(str(models / "stories15m"))
    assert rows["llama2-7b"].endswith(str(models / "llama2-7b.gguf"))
    assert rows["llama3.1-8b"].endswith("not available")
    greedy = ["--prompt", "Once upon a time", "--max-new-tokens", "10", "--temperature", "0"]
    expected = local_generator(tiny_source(tiny_model)).run_generate(
        "Once upon a time", GenerationArgs(max_new_tokens=10, temperature=0))[0].text
    for alias, name, flags in (("stories", "stories15m", []),
                               ("llama2", "llama2-7b", ["--tokenizer-path", str(tiny_model.tokenizer)])):
        proc = torchchat("generate", alias, *flags, *greedy, env=env)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "Once upon a time" + expected + "\n"
        assert f"loaded {name} (fp32" in proc.stderr


# ----- bad input: one line on stderr, exit code 2, before any weights load -----

def test_unknown_model_suggests_close_names():
    one_line_error(torchchat("generate", "llama3.1-8bb", "--prompt", "x"), "unknown model 'llama3.1-8bb'",
                   "did you mean", "llama3.1-8b")


def test_known_model_without_files_says_where_to_put_them(tmp_path):
    one_line_error(torchchat("generate", "llama2-7b", "--prompt", "x", "--model-directory", str(tmp_path)),
                   "not available", "--checkpoint-dir")


def test_missing_checkpoint(tmp_path, tiny_model):
    one_line_error(torchchat("generate", "--checkpoint-path", str(tmp_path / "nope.pth"), "--tokenizer-path",
                             str(tiny_model.tokenizer), "--prompt", "x"), "not found", "nope.pth")


def test_truncated_checkpoint(tmp_path, tiny_model):
    broken = tmp_path / "model.pth"
    broken.write_bytes(tiny_model.checkpoint.read_bytes()[:5000])
    (tmp_path / "params.json").write_text((tiny_model.checkpoint.parent / "params.json").read_text())
    one_line_error(torchchat("generate", "--checkpoint-path", str(broken), "--tokenizer-path",
                             str(tiny_model.tokenizer), "--prompt", "x"), str(broken))


def test_truncated_gguf(tmp_path, smollm2_gguf):
    broken = tmp_path / "model.gguf"
    with open(smollm2_gguf, "rb") as f:
        broken.write_bytes(f.read(3_000_000))
    one_line_error(torchchat("generate", "--gguf-path", str(broken), "--prompt", "x"), str(broken))


def test_tokenizer_that_does_not_fit_the_model(tmp_path, tiny_model):
    import base64
    big = tmp_path / "big.model"  # 1000 ranks + 256 specials > the model's 512 embeddings
    ranks = [bytes([b]) for b in range(256)] + [bytes([a, b]) for a in range(32, 127) for b in range(32, 40)]
    big.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks[:1000])))
    one_line_error(torchchat("generate", "--checkpoint-path", str(tiny_model.checkpoint), "--tokenizer-path",
                             str(big), "--prompt", "x"), "1256 tokens", "512")


def test_prompt_longer_than_the_context(tiny_model):
    one_line_error(torchchat("generate", *tiny_model.cli_flags(), "--prompt", "word " * 100,
                             "--max-new-tokens", "100"), "exceeds the context (512)")


@pytest.mark.parametrize("flags, fragment", [
    (["--temperature", "-1"], "--temperature (-1.0) must be >= 0"),
    (["--top-p", "1.5"], "--top-p (1.5) must be in (0, 1]"),
    (["--top-p", "0"], "--top-p (0.0) must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens (0) must be at least 1"),
])
def test_impossible_flag_values(tiny_model, flags, fragment):
    one_line_error(torchchat("generate", *tiny_model.cli_flags(), "--prompt", "x", *flags), fragment)
