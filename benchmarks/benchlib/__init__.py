"""The pieces of benchmarks/bench.py, one purpose a module.

    cases.py               Case, Workload, Result: what one subprocess runs and what it reports
    weights.py             model shapes, random weights and prompt ids, the same for every engine
    measure.py             inside a worker: warm-up, timed generations, medians
    torchchat_engine.py    torchchat's LocalGenerator
    transformers_engine.py Hugging Face transformers (and the conversion of our weights to its names)
    llama_cpp_engine.py    llama.cpp's llama-bench
    runner.py              one subprocess per case: the parent's loop and the worker's entry
    report.py              ratios, greedy agreement and the table (plain and Markdown)

and of benchmarks/server_bench.py (servers measured over HTTP):

    openai_client.py       one chat request, timed at the client (streamed or not)
    server_procs.py        starting torchchat's server and llama.cpp's llama-server; GGUF copies of a file type
    server_load.py         the workloads: clients at once, one at a time, a short request, a conversation
    server_report.py       percentiles, per-server summaries, the tables and the issue's targets

bench.py and server_bench.py put ``benchmarks/`` on the path by being run from it; tests put it there themselves.
"""
