"""Local checkpoints: a causal LM, an optional PEFT adapter, a tokenizer, an optimizer state.

Everything is read from local directories with ``local_files_only=True``: a missing or
malformed directory is a clear error, never a download attempt.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.rollouts import check_device
from ..edge.progress import quiet_loading
from ..edge.registry import ParamRegistry

log = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def _local_dir(path: str | Path, argname: str, marker: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{argname}: {str(p)!r} does not exist (only local directories are read)")
    if not p.is_dir():
        raise ValueError(f"{argname}: {str(p)!r} is not a directory")
    if not (p / marker).is_file():
        raise ValueError(f"{argname}: {str(p)!r} has no {marker}; it is not a saved {what} directory")
    return p


def load_policy(
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    attn_implementation: str | None = None,
    adapter_name: str = "default",
) -> nn.Module:
    """Load ``AutoModelForCausalLM`` (and a trainable PEFT adapter on it) from local dirs.

    Args:
        model_dir: a directory written by ``save_pretrained`` (has ``config.json``).
        adapter_dir: a PEFT adapter directory (has ``adapter_config.json``), or None.
        dtype: ``"auto"`` (the checkpoint's), ``"float32"``, ``"float64"``, ``"bfloat16"``, ``"float16"``.
        device: where to put the model.
        attn_implementation: passed to ``from_pretrained`` (the probe switches fused
            implementations itself, see ``funcprobe.forward.attention_impl``).

    Raises:
        FileNotFoundError: a directory does not exist.
        ValueError: a directory is not a saved model/adapter, an unknown ``dtype``, a
            ``device`` torch does not know or this machine lacks (``check_device``);
            loading errors are re-raised as ``ValueError`` naming the directory; an
            adapter saved for another base model (weights of other shapes) names
            ``adapter_dir``, the model directory and the first mismatching parameter.
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    device = check_device(device, "device")
    mdir = _local_dir(model_dir, "model_dir", "config.json", "transformers model")
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": DTYPES[dtype]}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(mdir), **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"model_dir: could not load a causal LM from {str(mdir)!r}: {err}") from err
    model.to(device)
    if adapter_dir is not None:
        from peft import PeftModel

        adir = _local_dir(adapter_dir, "adapter_dir", "adapter_config.json", "PEFT adapter")
        try:
            with quiet_loading(bars=True):
                model = PeftModel.from_pretrained(model, str(adir), adapter_name=adapter_name, is_trainable=True,
                                                  local_files_only=True)
        except RuntimeError as err:
            raise ValueError(_adapter_mismatch(err, adir, mdir)) from err
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"adapter_dir: could not load a PEFT adapter from {str(adir)!r}: {err}") from err
        model.to(device)
    log.info("loaded %s from %s (adapter: %s)", type(model).__name__, mdir, adapter_dir)
    return model


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
                            r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)")


def _adapter_mismatch(err: RuntimeError, adapter_dir: Path, model_dir: Path) -> str:
    """The message of a PEFT adapter that does not fit the base model (torch's size-mismatch
    ``RuntimeError`` from ``load_state_dict``): the base it was saved for, the count and the
    first mismatching parameter with both shapes; other errors' first line."""
    text = str(err)
    found = _SIZE_MISMATCH.findall(text)
    if not found:
        return f"adapter_dir: could not load a PEFT adapter from {str(adapter_dir)!r}: {text.splitlines()[0]}"
    name, saved, here = found[0]
    recorded = None
    try:
        recorded = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        pass
    base = f" (it records the base model {recorded!r})" if recorded else ""
    return (f"adapter_dir: the adapter in {str(adapter_dir)!r} was saved for another base model than "
            f"{str(model_dir)!r}{base}: {len(found)} of its weights have other shapes, the first {name} "
            f"[{saved}] in the adapter but [{here}] in this model")


def load_tokenizer(path: str | Path):
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)`` with clear errors."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer: {str(p)!r} is not an existing directory")
    markers = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
    if not any((p / m).is_file() for m in markers):
        raise ValueError(f"tokenizer: {str(p)!r} has no tokenizer files (one of {', '.join(markers)})")
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"tokenizer: could not load a tokenizer from {str(p)!r}: {err}") from err


def load_optimizer_state(path: str | Path, model: nn.Module | ParamRegistry) -> torch.optim.Optimizer:
    """Rebuild a ``torch.optim.Adam``/``AdamW`` over the model's trainable parameters from a
    saved ``optimizer.state_dict()``: a file, or an HF Trainer ``checkpoint-N/`` directory
    (its ``optimizer.pt``).

    Parameters are matched by the ``param_names`` that torch saves when the optimizer was
    built from ``named_parameters()``; otherwise by position: the saved parameter
    indices, group after group, must follow the order of the trainable parameters in
    ``model.named_parameters()`` (the order ``[p for p in model.parameters() if
    p.requires_grad]`` and the HF Trainer use for a LoRA model). Shapes are checked.

    Raises:
        FileNotFoundError: no such file (or a directory without ``optimizer.pt``).
        ValueError: not an Adam/AdamW state dict, a parameter count, name or shape that
            does not match the model (each named).
    """
    p = Path(path)
    if p.is_dir():  # an HF Trainer checkpoint-N/ directory
        if not (p / "optimizer.pt").is_file():
            raise FileNotFoundError(f"optimizer_state: the directory {str(p)!r} has no optimizer.pt (an HF Trainer "
                                    "checkpoint-N/ directory has one)")
        p = p / "optimizer.pt"
    if not p.is_file():
        raise FileNotFoundError(f"optimizer_state: {str(p)!r} is not an existing file")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"optimizer_state: {str(p)!r} is not a torch optimizer state_dict (torch.load failed: "
                         f"{type(err).__name__})") from err
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError(f"optimizer_state: {str(p)!r} has no 'state' and 'param_groups'; save optimizer.state_dict()")
    groups = sd["param_groups"]
    if not all("betas" in g and "eps" in g for g in groups):
        raise ValueError("optimizer_state: not an Adam/AdamW state (param groups without betas/eps)")
    registry = model if isinstance(model, ParamRegistry) else ParamRegistry.from_model(model)
    live = registry.live_parameters()
    names = list(live)
    saved = [i for g in groups for i in g["params"]]
    if all("param_names" in g for g in groups):
        order = [n for g in groups for n in g["param_names"]]
        unknown = [n for n in order if n not in live]
        if unknown:
            raise ValueError(f"optimizer_state: saved parameter names not among the model's trainable ones: {unknown[:8]}")
    else:
        if len(saved) != len(names):
            raise ValueError(
                f"optimizer_state: it holds {len(saved)} parameters but the model has {len(names)} trainable ones"
            )
        order = names
    param_groups, offset = [], 0
    for g in groups:
        k = len(g["params"])
        hyper = {key: v for key, v in g.items() if key not in ("params", "param_names")}
        param_groups.append({**hyper, "params": [live[n] for n in order[offset : offset + k]]})
        offset += k
    cls = torch.optim.AdamW if all(g.get("decoupled_weight_decay", False) for g in groups) else torch.optim.Adam
    optimizer = cls(param_groups)
    optimizer.load_state_dict(sd)
    bad = [n for n in order if "exp_avg" in optimizer.state.get(live[n], {})
           and optimizer.state[live[n]]["exp_avg"].shape != live[n].shape]
    if bad:
        raise ValueError(f"optimizer_state: moment shapes differ from the parameters at {bad[:8]}")
    return optimizer
