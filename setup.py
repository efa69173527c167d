"""HydraServe: serverless LLM serving with pipeline-parallel cold starts."""
from setuptools import find_packages, setup

setup(
    name="hydraserve",
    version="0.1.0",
    description="Serverless LLM serving with pipeline-parallel cold starts and consolidation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hydraserve", "hydraserve.*"]),
    package_data={"hydraserve.gateway": ["static/*.html"]},
    install_requires=[
        # torch is installed first and pinned by the Makefile / CI (a CPU build); an unpinned
        # requirement here would pull a multi-GB CUDA build on a machine without it.
        "torch>=2.4",
        "safetensors>=0.4",
        "tokenizers>=0.21.1",
        "numpy>=1.24",
        "jinja2>=3.1",
        "pyyaml>=6.0",
        "aiohttp>=3.9",
        "fastapi>=0.110",
        "uvicorn>=0.30",
        "prometheus_client>=0.20",
        "scipy>=1.10",  # Gamma fits of the end-to-end workload (hydraserve workload make)
        "tqdm>=4.60",  # replay progress bar
        "gguf>=0.10",  # hydraserve import-gguf (and the default model's one-time conversion)
    ],
    extras_require={
        "client": ["openai>=1.30"],  # the examples `hydraserve serve` prints
        "kubernetes": ["kubernetes>=29"],  # scripts/kubernetes/label_nodes.py on a real cluster
        "test": [
            "pytest>=8",
            # Reference implementation for correctness tests only; the range is one the real
            # vLLM for CPU also accepts, so one environment can hold both.
            "transformers>=5.16.1,<5.20",
            "openai>=1.30",
            "matplotlib>=3.7",  # the figure scripts
            "accelerate>=1.0",  # transformers' own GGUF loading, the reference of import-gguf
            "kubernetes>=29",  # scripts/kubernetes: label_nodes.py and the manifests' tests
            "kubernetes-validate>=1.35",  # the manifests' schema checks (Kubernetes 1.35)
            # /dashboard in Debian's headless Chromium (tests/test_dashboard.py); below 4.40,
            # whose releases need a newer certifi than the package index may have
            "selenium>=4.25,<4.40",
        ],
    },
    entry_points={"console_scripts": ["hydraserve=hydraserve.cli:main"]},
)
