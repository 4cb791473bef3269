"""The pieces of benchmarks/bench.py, one purpose a module.

    cases.py               Case, Workload, Result: what one subprocess runs and what it reports
    weights.py             model shapes, random weights and prompt ids, the same for every engine
    measure.py             inside a worker: warm-up, timed generations, medians
    torchchat_engine.py    torchchat's LocalGenerator
    transformers_engine.py Hugging Face transformers (and the conversion of our weights to its names)
    llama_cpp_engine.py    llama.cpp's llama-bench
    runner.py              one subprocess per case: the parent's loop and the worker's entry
    report.py              ratios, greedy agreement and the table (plain and Markdown)

bench.py puts ``benchmarks/`` on the path by being run from it; tests put it there themselves.
"""
