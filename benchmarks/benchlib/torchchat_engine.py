"""The torchchat engine: LocalGenerator, on the path the CLI takes."""

from __future__ import annotations

import io
import time
from dataclasses import asdict

from benchlib.cases import Case, Result, Workload
from benchlib.measure import measure, new_result
from benchlib.weights import load_weights, model_args, prompt_ids, smollm2_source, summary_prompt_ids

SPECULATE_K = 4  # the CLI's default (--speculate-k)
LOOKUP_NGRAM = 3


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
        drafter = _drafter(case, max_seq_len, silent)
        gen = LocalGenerator.from_source(smollm2_source(), _NoTokenizer(), None, max_seq_len=max_seq_len,
                                         dtype="fp32" if native else case.dtype, keep_quantized=native,
                                         compile=case.compile, quantize=case.quantize, drafter=drafter, **silent)
    else:
        args, model = load_weights(case.model, DTYPES[case.dtype])
        if case.quantize:
            from torchchat.quantize import quantize_model

            quantize_model(model, case.quantize)
        gen = LocalGenerator(model, _NoTokenizer(), None, max_seq_len=max_seq_len, compile=case.compile, **silent)
    result = new_result(case, w, gen.model, load_s=time.perf_counter() - t0)
    prompt = summary_prompt_ids(w.prompt_tokens) if case.prompt == "summary" else \
        prompt_ids(case.model, w.prompt_tokens, args.vocab_size)
    drafted = accepted = verifications = verified = 0

    def generate(n: int):
        nonlocal drafted, accepted, verifications, verified
        turn = Turn(prompt, GenerationArgs(max_new_tokens=n, temperature=0, top_k=None, seed=0))
        tokens = [step[0] for step in gen.generate_tokens(turn)]  # the CLI's path, stop tokens aside
        s = gen.last_stats
        drafted, accepted, verifications = drafted + s.drafted, accepted + s.accepted, verifications + s.verifications
        verified += s.verified_tokens
        return tokens, s.ttft_s, s.decode_s

    if len(prompt) != w.prompt_tokens:  # the summary prompt is as long as the chat template makes it
        w = Workload(**{**asdict(w), "prompt_tokens": len(prompt)})
        result.prompt_tokens = len(prompt)
    result = measure(result, w, generate)
    if case.prompt == "summary":
        result.note = f"prompt: a request to summarize the passage, {len(prompt)} tokens with the chat template"
    if verifications:
        result.note = (result.note + f" speculation k {SPECULATE_K}: {accepted}/{drafted} draft tokens accepted "
                       f"({100 * accepted / drafted:.0f}%), {verified / verifications:.2f} tokens "
                       f"a verification").strip()
    return result


def _drafter(case: Case, max_seq_len: int, silent: dict):
    """The case's drafter, as the CLI's --draft-quantize int4 and --prompt-lookup build them; None without one."""
    from torchchat.generate.local import LocalGenerator
    from torchchat.generate.speculative import ModelDrafter, PromptLookupDrafter

    if case.draft is None:
        return None
    if case.draft == "lookup":
        return PromptLookupDrafter(SPECULATE_K, LOOKUP_NGRAM)
    draft = LocalGenerator.from_source(smollm2_source(), _NoTokenizer(), None, max_seq_len=max_seq_len, dtype="fp32",
                                       quantize=case.draft, **silent)
    return ModelDrafter(SPECULATE_K, draft)
