"""Flags and chat input that used to crash, hang or exhaust memory (issue 13): each is now one line and
exit code 2 before any weight loads, or, in a chat, a message and the chat goes on."""

from __future__ import annotations

import pytest

from tests.generators import local_generator, tiny_source
from tests.cli_process import ROOT, one_line_error, torchchat
from torchchat.generate.base import MAX_NUM_SAMPLES, GenerationArgs

GREEDY = dict(temperature=0.0, top_k=None)


@pytest.mark.parametrize("flags, fragments", [
    # nan and inf were accepted: nan loaded the weights and then raised a 28-line traceback, inf printed noise
    (["--temperature", "nan"], ["--temperature", "'nan' is not a finite number"]),
    (["--temperature", "inf"], ["--temperature", "'inf' is not a finite number"]),
    (["--top-p", "nan"], ["--top-p", "'nan' is not a finite number"]),
    # 100000 samples grew to 15 GB of memory in 2 minutes
    (["--num-samples", "100000"], ["--num-samples (100000) must be at most 64", "KV cache"]),
    # --tp 0, --pp -1 and both -1 ran one process and exited 0
    (["--tp", "0"], ["--tp", "0 must be at least 1"]),
    (["--pp", "-1"], ["--pp", "-1 must be at least 1"]),
    (["--tp", "-1", "--pp", "-1"], ["--tp", "-1 must be at least 1"]),
    # a seed beyond what torch takes was a 21-line traceback after loading
    (["--seed", str(2**64)], ["--seed (18446744073709551616) must be in [0, 2**64)"]),
    (["--seed", "-1"], ["--seed (-1) must be in [0, 2**64)"]),
    # a bad choice printed the 15-line usage before the error
    (["--dtype", "fp64"], ["--dtype", "invalid choice: 'fp64'", "--help"]),
    (["--device", "tpu"], ["--device", "invalid choice: 'tpu'"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v[0].startswith("--") else None)
def test_bad_flag_values_are_one_line_before_loading(tmp_path, flags, fragments):
    # The checkpoint does not exist: the flag must be refused before the model files are even looked at.
    missing = tmp_path / "nothing.pth"
    one_line_error(torchchat("generate", "--checkpoint-path", str(missing), "--tokenizer-path", str(missing),
                             "--prompt", "hi", "--max-new-tokens", "2", *flags), *fragments)


def test_num_samples_at_the_bound_is_accepted():
    assert GenerationArgs(num_samples=MAX_NUM_SAMPLES).num_samples == MAX_NUM_SAMPLES
    assert GenerationArgs(seed=2**64 - 1).seed == 2**64 - 1


def test_tokenizer_path_that_is_a_directory_says_so(tiny_model, tmp_path):
    one_line_error(torchchat("generate", "--checkpoint-path", str(tiny_model.checkpoint), "--tokenizer-path",
                             str(tmp_path), "--prompt", "hi"), "is a directory", "tokenizer.model")


def test_a_full_chat_starts_a_new_conversation_and_goes_on(tiny_model):
    """Four long turns in a 256-token context: the chat used to say "start a new chat" and exit 0 at the third."""
    lines = "".join(f"Tell me a long story about animal {i}.\n" for i in range(4))
    proc = torchchat("chat", *tiny_model.cli_flags(), "--max-seq-length", "256", "--max-new-tokens", "64",
                     "--temperature", "0", stdin=lines)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Assistant: ") == 4  # every message answered
    assert "starting a new chat" in proc.stderr and "Traceback" not in proc.stderr
    # statistics lines: one per reply
    assert proc.stderr.count("time to first token") == 4, proc.stderr


def test_a_reply_cut_by_the_context_says_so_and_the_next_message_starts_over(tiny_model):
    """A context that holds the message but not the whole reply: the reply stops at the end of the context."""
    gen = local_generator(tiny_source(tiny_model), max_seq_len=48)
    args = GenerationArgs(max_new_tokens=40, **GREEDY)
    replies = gen.run_chat(args, iter(["a" * 6, "b" * 6, None]).__next__)
    out, err = gen.out.getvalue(), gen.err.getvalue()
    assert replies == 2
    assert out.count("[cut: the context is full") == 2, out
    assert "starting a new chat" in err


def test_a_message_too_long_for_any_chat_is_refused_and_the_chat_goes_on(tiny_model):
    gen = local_generator(tiny_source(tiny_model), max_seq_len=48)
    replies = gen.run_chat(GenerationArgs(max_new_tokens=4, **GREEDY), iter(["x" * 80, "hi", None]).__next__)
    assert replies == 1
    assert "does not fit in the context (48 tokens)" in gen.err.getvalue()


def test_empty_lines_are_not_turns(tiny_model):
    """Blank lines used to reach the model as empty user turns."""
    lines = "\n   \nhello\n\n/bye\n"
    proc = torchchat("chat", *tiny_model.cli_flags(), "--max-new-tokens", "3", "--temperature", "0", stdin=lines)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Assistant: ") == 1
    assert proc.stderr.count("time to first token") == 1


def test_a_user_error_under_torchrun_is_one_line_then_torchruns_report(tiny_model):
    """Row 11: torchrun's own report of the failed rank cannot be silenced from a rank; the README says to read
    the `[rank0] error:` line, which is there once, and that the rank's exit code is 2."""
    import subprocess
    import sys


    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                           "--nproc-per-node", "2", str(ROOT / "torchchat.py"), "generate", *tiny_model.cli_flags(),
                           "--prompt", "hi", "--pp", "3"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    errors = [line for line in proc.stderr.splitlines() if "error: " in line and "--pp 3" in line]
    assert errors == ["[rank0] error: --tp 1 x --pp 3 = 3 processes, but the world size is 2: run torchrun "
                      "--nproc-per-node 3 (or change --tp/--pp)"], proc.stderr
    assert "exitcode  : 2" in proc.stderr
    assert not [line for line in proc.stderr.splitlines() if line.startswith("[rank") and "Traceback" in line]
