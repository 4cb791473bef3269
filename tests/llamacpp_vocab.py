"""llama.cpp's test vocabularies and their golden tokenizations, for the tokenizer tests.

llama.cpp keeps vocabulary-only GGUFs in models/ggml-vocab-<name>.gguf, with <name>.gguf.inp (strings
separated by a line ``__ggml_vocab_test__``) and <name>.gguf.out (one line of ids per string, no BOS,
special tokens not parsed) that its test-tokenizer-0 checks. The llama-cpp-python source package on PyPI
carries them; ``python -m tests.llamacpp_vocab`` (run by ``scripts/install.sh --dev``) downloads it once
with pip and keeps only those files, under $TORCHCHAT_TEST_ASSETS (default ~/.cache/torchchat-test-assets).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python==0.3.36"
# The Llama-family vocabularies torchchat reads: Llama 3 (llama-bpe), Llama 2 (sentencepiece), and the
# byte-level BPEs whose pre-tokenizers torchchat knows.
NAMES = ("llama-bpe", "llama-spm", "gpt-2", "starcoder")
SUFFIXES = (".gguf", ".gguf.inp", ".gguf.out")
_SEPARATOR = "\n__ggml_vocab_test__\n"


def vocab_dir() -> Path:
    root = os.environ.get("TORCHCHAT_TEST_ASSETS") or Path.home() / ".cache" / "torchchat-test-assets"
    return Path(root) / ("llama.cpp-vocab-" + PACKAGE.split("==")[1])


def vocab_files(name: str) -> list[Path]:
    return [vocab_dir() / f"ggml-vocab-{name}{suffix}" for suffix in SUFFIXES]


def golden_cases(name: str) -> list[tuple[str, list[int]]]:
    """(text, llama.cpp's ids) for each test string of a vocabulary, read as test-tokenizer-0 reads them."""
    _, inp, out = vocab_files(name)
    texts = inp.read_text(encoding="utf-8").split(_SEPARATOR)
    if texts and texts[-1] == "":  # the file ends with a separator
        texts.pop()
    ids = [[int(i) for i in line.split()] for line in out.read_text(encoding="utf-8").splitlines()]
    if len(texts) != len(ids):
        raise ValueError(f"{inp}: {len(texts)} strings but {len(ids)} lines of ids in {out}")
    return list(zip(texts, ids))


def missing() -> list[Path]:
    return [path for name in NAMES for path in vocab_files(name) if not path.is_file()]


def fetch() -> None:
    """Downloads the source package (76 MB) and extracts the vocabulary files, unless they are all there."""
    if not missing():
        print(f"llama.cpp test vocabularies: already in {vocab_dir()}")
        return
    dest = vocab_dir()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                        "--no-binary", ":all:", PACKAGE, "-d", tmp], check=True)
        [sdist] = Path(tmp).glob("*.tar.gz")
        wanted = {f"ggml-vocab-{name}{suffix}" for name in NAMES for suffix in SUFFIXES}
        with tarfile.open(sdist) as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and "/vendor/llama.cpp/models/" in member.name and name in wanted:
                    part = Path(tmp) / name  # written whole, then moved: a killed run leaves no half file
                    with tar.extractfile(member) as src, open(part, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    part.replace(dest / name)
                    wanted.discard(name)
        if wanted:
            raise SystemExit(f"{PACKAGE} lacks {', '.join(sorted(wanted))}")
    print(f"llama.cpp test vocabularies: extracted into {dest}")


if __name__ == "__main__":
    fetch()
