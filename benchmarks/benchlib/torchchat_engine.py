"""The torchchat engine: LocalGenerator, on the path the CLI takes."""

from __future__ import annotations

import io
import time

from benchlib.cases import Case, Result, Workload
from benchlib.measure import measure, new_result
from benchlib.weights import load_weights, model_args, prompt_ids, smollm2_source


class _NoTokenizer:
    """The generator's tokenizer is only consulted for stop ids and text; the benchmark uses ids."""

    stop_ids = ()


def run_torchchat(case: Case, w: Workload) -> Result:
    from torchchat.generate.base import GenerationArgs, Turn
    from torchchat.generate.local import DTYPES, LocalGenerator

    t0 = time.perf_counter()
    silent = {"out": io.StringIO(), "err": io.StringIO()}
    max_seq_len = w.prompt_tokens + w.new_tokens
    if case.model == "smollm2-135m":  # the user's path: from_source (GGUF -> dtype -> quantize)
        args = model_args(case.model)
        native = case.dtype == "native"  # no --dtype: the file's quantized blocks as they are
        gen = LocalGenerator.from_source(smollm2_source(), _NoTokenizer(), None, max_seq_len=max_seq_len,
                                         dtype="fp32" if native else case.dtype, keep_quantized=native,
                                         compile=case.compile, quantize=case.quantize, **silent)
    else:
        args, model = load_weights(case.model, DTYPES[case.dtype])
        if case.quantize:
            from torchchat.quantize import quantize_model

            quantize_model(model, case.quantize)
        gen = LocalGenerator(model, _NoTokenizer(), None, max_seq_len=max_seq_len, compile=case.compile, **silent)
    result = new_result(case, w, gen.model, load_s=time.perf_counter() - t0)
    prompt = prompt_ids(case.model, w.prompt_tokens, args.vocab_size)

    def generate(n: int):
        turn = Turn(prompt, GenerationArgs(max_new_tokens=n, temperature=0, top_k=None, seed=0))
        tokens = [step[0] for step in gen.generate_tokens(turn)]  # the CLI's path, stop tokens aside
        s = gen.last_stats
        return tokens, s.ttft_s, s.decode_s

    return measure(result, w, generate)
