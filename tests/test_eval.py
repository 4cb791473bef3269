"""`eval`: the perplexity of a text by llama-perplexity's protocol, on one process."""

import json
import math

import pytest
import torch

from tests.assets import SENTENCEPIECE_TEXT
from tests.cli_process import one_line_error, torchchat
from tests.generators import load_parts, local_generator, tiny_source
from torchchat.errors import ConfigError
from torchchat.perplexity import first_scored, perplexity, windows_of

TEXT = SENTENCEPIECE_TEXT * 3  # ~1,100 tiny-tokenizer tokens: several windows of 64
WINDOW = 64


def test_windows_are_consecutive_with_bos_first_and_the_tail_dropped():
    tokens = list(range(100, 350))  # 250 tokens: 3 windows of 64, a tail of 58 dropped
    windows = windows_of(tokens, WINDOW, bos_id=1)
    assert [w[1:] for w in windows] == [tokens[k * WINDOW + 1:(k + 1) * WINDOW] for k in range(3)]
    assert [w[0] for w in windows] == [1, 1, 1]
    assert windows_of(tokens, WINDOW, bos_id=None)[1] == tokens[WINDOW:2 * WINDOW]  # no BOS: the text's own token
    assert first_scored(512) == 256 and first_scored(WINDOW) == 32


def test_a_text_shorter_than_one_window_is_refused():
    with pytest.raises(ConfigError, match="63 tokens, fewer than one window of 64"):
        windows_of(list(range(63)), WINDOW, None)


def reference_perplexity(model, tokenizer, text: str, window: int) -> float:
    """The protocol written out on the model's full logits: each window alone from position 0, BOS first, the log
    softmax of every position in float64, positions window // 2 .. window - 2 scored against the next token."""
    tokens = tokenizer.encode(text, bos=tokenizer.add_bos)
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - window + 1, window):
        w = [tokenizer.bos_id, *tokens[start + 1:start + window]]
        model.setup_caches(1, window)
        with torch.no_grad():
            logits = model(torch.tensor([w]), torch.arange(window))[0].double()  # (window, V)
        log_probs = torch.log_softmax(logits, dim=-1)
        for j in range(window // 2, window - 1):
            nll -= log_probs[j, w[j + 1]].item()
            count += 1
    return math.exp(nll / count)


@pytest.mark.parametrize("batch", [1, 3])
def test_perplexity_is_the_protocol_on_the_models_logits(tiny_model, batch):
    """The generator's figure against the protocol on the same model's logits (the CPU path's float16 KV cache
    included: against a float32 cache the figure moves by 2.8e-5). Measured: 1e-8 relative (float32 log softmax
    against float64), whatever the batch."""
    from torchchat import cpu

    source = tiny_source(tiny_model)
    model, tokenizer, _ = load_parts(source)
    cpu.install(model)
    expected = reference_perplexity(model, tokenizer, TEXT, WINDOW)
    gen = local_generator(source, max_seq_len=WINDOW, max_batch=batch)
    got = perplexity(gen, tokenizer.encode(TEXT, bos=True), WINDOW)
    assert got.windows == len(tokenizer.encode(TEXT, bos=True)) // WINDOW
    assert got.tokens == got.windows * (WINDOW - 1 - WINDOW // 2)
    assert got.perplexity == pytest.approx(expected, rel=1e-6)


def test_score_leaves_the_generator_ready_to_generate(tiny_model):
    """Scoring uses the KV cache rows a request would; a generation after it is the one a fresh generator gives."""
    from torchchat.generate.base import GenerationArgs

    source = tiny_source(tiny_model)
    greedy = GenerationArgs(max_new_tokens=8, temperature=0)
    fresh = local_generator(source, max_seq_len=WINDOW, max_batch=2).run_generate("Once upon a time", greedy)
    gen = local_generator(source, max_seq_len=WINDOW, max_batch=2)
    perplexity(gen, gen.tokenizer.encode(TEXT, bos=True), WINDOW)
    assert gen.run_generate("Once upon a time", greedy)[0].text == fresh[0].text


# ----- the command line -----

@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "text.txt"
    path.write_text(TEXT)
    return path


def test_eval_prints_the_perplexity_last_and_writes_json(tiny_model, text_file, tmp_path):
    out = tmp_path / "eval.json"
    proc = torchchat("eval", *tiny_model.cli_flags(), "--text-file", str(text_file), "--max-seq-length", str(WINDOW),
                     "--batch", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    source = tiny_source(tiny_model)
    gen = local_generator(source, max_seq_len=WINDOW, max_batch=2)
    expected = perplexity(gen, gen.tokenizer.encode(TEXT, bos=True), WINDOW)
    assert proc.stdout.splitlines()[-1] == f"perplexity: {expected.perplexity:.4f} over {expected.tokens} tokens"
    figures = json.loads(out.read_text())
    assert figures["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert figures["tokens"] == expected.tokens and figures["window"] == WINDOW and figures["tokens_per_s"] > 0
    assert f"{expected.windows}/{expected.windows} windows" in proc.stderr and "tokens/s" in proc.stderr


@pytest.mark.parametrize("case", ["missing", "empty", "short", "window"])
def test_bad_input_is_one_line_before_the_weights_load(tiny_model, tmp_path, case):
    path = tmp_path / "text.txt"
    flags = ["--max-seq-length", str(WINDOW)]
    if case == "empty":
        path.write_text("  \n")
    elif case == "short":
        path.write_text("Hello world.")
    elif case == "window":
        path.write_text(TEXT)
        flags = ["--max-seq-length", "100000"]
    proc = torchchat("eval", *tiny_model.cli_flags(), "--text-file", str(path), *flags)
    expected = {"missing": ("text file not found", "--text-file"), "empty": ("is empty", "--text-file"),
                "short": ("fewer than one window of 64", "--max-seq-length"),
                "window": ("--max-seq-length (100000) exceeds the model's context",)}[case]
    one_line_error(proc, *expected)
    assert "loaded" not in proc.stderr


@pytest.mark.parametrize("layer", ["float", "int8 blocks", "int4"])
def test_scoring_by_vocabulary_slices_is_the_log_softmax(monkeypatch, layer):
    """target_log_probs takes the output layer a slice of the vocabulary at a time with a running log-sum-exp: equal to
    the log softmax of the layer's whole logits (measured 0.9-1.6e-6; a running sum not rescaled as the max grows is
    off by 2.5), targets in every slice, the last slice short."""
    from torchchat.generate import scoring
    from torchchat.quantize import Int4Linear, Int8Linear

    monkeypatch.setattr(scoring, "VOCAB_SLICE", 96)
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 1000, bias=False)
    output = {"float": linear, "int8 blocks": Int8Linear.from_linear(linear, blocks=True),
              "int4": Int4Linear.from_linear(linear, 32)}[layer]
    hidden = 4 * torch.randn(2, 40, 64)  # (B, T, dim)
    targets = torch.randint(0, 1000, (2, 40))
    targets[:, :7] = -1  # not scored
    got = scoring.target_log_probs(output, hidden, targets)
    weight = scoring.weight_rows(output)(0, 1000).double()  # (V, dim): the layer's own values
    expected = torch.log_softmax(hidden.double() @ weight.T, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    assert torch.equal(got[:, :7], torch.zeros(2, 7))
    torch.testing.assert_close(got[:, 7:].double(), expected[:, 7:], rtol=0, atol=1e-5)
