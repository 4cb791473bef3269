from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.split("#")[0].strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]

setup(
    name="torchchat",
    version="0.1.0",
    description="Run Llama-family language models with PyTorch: generate, chat, serve; local or distributed.",
    packages=find_packages(include=["torchchat", "torchchat.*"]),
    # the chat page; the CPU decode op's source, compiled at first use (torchchat/cpu_kernels.py)
    package_data={"torchchat.server": ["static/*.html"], "torchchat": ["csrc/*.cpp", "csrc/*.h"]},
    python_requires=">=3.10",
    install_requires=requirements,
    entry_points={"console_scripts": ["torchchat=torchchat.cli:main"]},
)
