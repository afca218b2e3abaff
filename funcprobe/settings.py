"""``ProbeSettings``: every option of the probe, checked once, at the edge.

The library functions (``update_direction``, ``conditional_variance``,
``probe_scalars``), ``EntropyProbe``, the command line and the TRL integration all
build one ``ProbeSettings`` and pass it inward; nothing below re-checks an option.
The command line's flags are generated from the fields (``add_arguments``), so the
help text lives in one place (the ``help`` metadata of each field).

Keyword arguments given to the library functions are applied on top of a
``settings=`` object (``ProbeSettings.resolve``). Deprecated spellings keep working
with a ``DeprecationWarning``: ``batch_size`` → ``chunk_size``, ``direction`` →
``step``, ``step="adam"`` → ``"frozen_adam"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

from .errors import SettingsError

#: step maps P (docs/definitions.md#step-maps); "adam" is the deprecated name of "frozen_adam"
STEPS = ("sgd", "frozen_adam", "adam_step", "optimizer_step")
#: weightings of S (docs/definitions.md#weighting)
WEIGHTINGS = ("dr_grpo", "per_token_avg")
#: TRL ``GRPOTrainer`` loss types whose policy gradient is modelled (docs/definitions.md#trl-loss-types)
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
#: ways to compute the probe scalars (docs/definitions.md#probe-scalar, #alpha-trick)
MODES = ("jvp", "vjp")
#: compute precisions of the probe's forwards (funcprobe.edge.precision)
PRECISIONS = ("auto", "float32", "model")
#: parameter selections besides an explicit list of names
PARAM_SELECTIONS = ("trainable", "lora")
#: attention kernels inside the forward-mode rules (funcprobe.forward.rules.KERNELS)
KERNELS = ("off", "triton")

ParamSelection = Union[str, Sequence[str]]

#: deprecated keyword → current keyword
_RENAMED = {"batch_size": "chunk_size", "direction": "step"}
#: deprecated value of ``step`` → current value
_RENAMED_STEPS = {"adam": "frozen_adam"}


def _opt(default: Any, help: str, *, choices: Sequence[str] | None = None, cli: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli})


@dataclass(frozen=True)
class ProbeSettings:
    """How the probe runs. Every field is checked in ``__post_init__``.

    Raises:
        SettingsError (a ``ValueError``): naming the field, what was given and what was
            expected.
    """

    step: str = _opt(
        "adam_step",
        "the optimizer's step map P in muY = P(grad J): sgd (identity), frozen_adam (the seeds' "
        "preconditioner g/(sqrt(v_hat)+eps) with Adam's state frozen; formerly 'adam'), adam_step "
        "(the exact next Adam/AdamW step per unit learning rate), optimizer_step (the step "
        "clip_grad_norm_ + optimizer.step() will take now: each param group's current lr inside, "
        "clipping by max_grad_norm)",
        choices=STEPS,
    )
    max_grad_norm: float | None = _opt(
        None,
        "step optimizer_step: the trainer's gradient clipping by global norm (torch.nn.utils.clip_grad_norm_, "
        "TRL/HF max_grad_norm); None: no clipping",
    )
    weighting: str = _opt(
        "dr_grpo",
        "weighting of the sequence log-prob: dr_grpo (S/Lmax, needs max_len) or per_token_avg (S/|y|)",
        choices=WEIGHTINGS,
    )
    loss_type: str | None = _opt(
        None,
        "the policy-gradient loss of the step, as TRL's GRPOTrainer computes it at ratio 1: grpo (mean over "
        "sequences of the token mean), dr_grpo (token sum / (sequences x Lmax)), dapo (token sum / completion "
        "tokens of the whole update batch, all ranks), bnpo (token sum / tokens of the batch, one process); "
        "None: J of the weighting",
        choices=LOSS_TYPES,
    )
    mode: str = _opt(
        "jvp",
        "how s is computed: jvp (forward mode, memory of about one forward) or vjp (the seeds' alpha-trick, "
        "reverse over reverse; same numbers, more memory)",
        choices=MODES,
    )
    precision: str = _opt(
        "auto",
        "compute precision of the probe's forwards: auto (float32 when the model holds bf16/fp16 weights, "
        "upcast layer by layer without touching the model; else the model's dtype), float32, or model (the "
        "model's own dtypes)",
        choices=PRECISIONS,
    )
    chunk_size: int | None = _opt(
        None,
        "prompts per forward (each JVP / gradient chunk holds chunk_size x G sequences); default: the most "
        "that fit memory_budget_gb by an estimate from the model's config. Results do not depend on it; "
        "larger chunks are fewer, bigger forwards (faster, above all on GPUs) and need more memory",
    )
    memory_budget_gb: float = _opt(
        2.0,
        "activation memory (GiB) the default chunk_size aims at (funcprobe.edge.memory); the model's own "
        "weights are not counted",
    )
    attention_block: int | None = _opt(
        None,
        "keys per block of funcprobe's blockwise causal attention (online softmax in plain PyTorch, the "
        "tangent carried block by block: no [T x T] scores, primal or tangent) for the probe's forwards; "
        "None: the model's own eager / MATH-SDPA attention. Exact either way (funcprobe.forward.attention)",
    )
    mlp_chunk: int | None = _opt(
        2048,
        "tokens per MLP call in the probe's forward-mode passes (funcprobe.edge.token_chunks): the MLP's "
        "[tokens x intermediate] primal and tangent buffers, which set forward mode's peak memory, stay this "
        "small; same values; None: all tokens at once",
    )
    generic_jvp: bool = _opt(
        False,
        "run forward mode with PyTorch's generic forward-AD formulas instead of funcprobe's rules "
        "(funcprobe.forward.rules: linear layers, matrix products, attention, SiLU and the LM head's "
        "log-probs with tangents that skip frozen weights); same values to rounding, slower; for checking",
    )
    kernels: str = _opt(
        "off",
        "attention kernels in forward mode (mode jvp, funcprobe.forward.rules): off (SDPA calls take the "
        "closed-form rule) or triton (the Triton flash kernels for the SDPA calls they cover on CUDA, the rule "
        "for the others; needs Triton; same values to rounding, not faster at batch scale on an H200)",
        choices=KERNELS,
    )
    params: ParamSelection = _opt(
        "trainable",
        "which parameters are probed: trainable (requires_grad), lora (LoRA weights of the adapter) or a "
        "list of parameter names",
        choices=PARAM_SELECTIONS,
    )
    adapter: str | None = _opt(None, "PEFT adapter to probe (default: the active one)")
    keep_dropout: bool = _opt(False, "keep the model's train/eval modes (dropout) in the probe's forwards")
    allow_identity_fallback: bool = _opt(
        False, "frozen_adam: identity preconditioner for parameters without Adam state"
    )
    split_baseline: bool = _opt(
        False,
        "EntropyProbe.predict: also report the entropy change of the part of the step that does not depend "
        "on U (Adam's momentum and weight decay, the step of a zero gradient), at one more JVP pass over E",
    )
    gather_s: bool = _opt(False, "data-parallel: return every rank's s, not only this rank's", cli=False)
    progress: bool | None = _opt(None, "tqdm bar over chunks: None = only on a terminal", cli=False)
    process_group: object | None = _opt(
        None, "torch.distributed group to reduce over (default: WORLD when initialised with > 1 rank)", cli=False
    )

    def __post_init__(self) -> None:
        _choice("step", self.step, STEPS)
        if self.max_grad_norm is not None:
            if isinstance(self.max_grad_norm, bool) or not isinstance(self.max_grad_norm, (int, float)) \
                    or not 0 < self.max_grad_norm < float("inf"):
                raise SettingsError(f"max_grad_norm: expected a finite number > 0 or None, got {self.max_grad_norm!r}")
            if self.step != "optimizer_step":
                raise SettingsError(
                    f"max_grad_norm: clipping is part of step='optimizer_step' only (the step here is {self.step!r}, "
                    "per unit learning rate)"
                )
            object.__setattr__(self, "max_grad_norm", float(self.max_grad_norm))
        _choice("weighting", self.weighting, WEIGHTINGS)
        _choice("mode", self.mode, MODES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("kernels", self.kernels, KERNELS)
        if self.kernels != "off":
            if self.mode != "jvp" or self.generic_jvp:
                raise SettingsError(f"kernels: {self.kernels!r} runs inside the forward-mode rules, which mode="
                                    f"{self.mode!r} / generic_jvp={self.generic_jvp!r} do not use; set kernels='off'")
            if importlib.util.find_spec("triton") is None:  # the rules mode imports it (funcprobe.forward.rules)
                raise SettingsError("kernels: 'triton' needs Triton, which is not installed here (pip install "
                                    "triton, or kernels='off')")
        if self.loss_type is not None:
            _choice("loss_type", self.loss_type, LOSS_TYPES)
        if self.chunk_size is not None:
            object.__setattr__(self, "chunk_size", _positive_int("chunk_size", self.chunk_size))
        for name in ("attention_block", "mlp_chunk"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
        budget = self.memory_budget_gb
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < float("inf"):
            raise SettingsError(f"memory_budget_gb: expected a finite number of GiB > 0, got {budget!r}")
        object.__setattr__(self, "memory_budget_gb", float(budget))
        object.__setattr__(self, "params", _param_selection(self.params))
        if self.adapter is not None and not isinstance(self.adapter, str):
            raise SettingsError(f"adapter: expected an adapter name (str) or None, got {self.adapter!r}")
        for name in ("keep_dropout", "allow_identity_fallback", "gather_s", "split_baseline", "generic_jvp"):
            if not isinstance(getattr(self, name), bool):
                raise SettingsError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise SettingsError(f"progress: expected True, False or None, got {self.progress!r}")

    # ---------------------------------------------------------------- building
    @classmethod
    def resolve(cls, settings: "ProbeSettings | None", options: Mapping[str, Any], *, caller: str) -> "ProbeSettings":
        """``settings`` (default: all defaults) with the keyword ``options`` applied on top.

        Translates the deprecated spellings (with a ``DeprecationWarning``) and raises
        ``TypeError`` for a keyword that is no setting, as Python does for a function.
        """
        if settings is not None and not isinstance(settings, ProbeSettings):
            raise SettingsError(f"settings: expected a ProbeSettings, got {type(settings).__name__}")
        base = settings if settings is not None else cls()
        if not options:
            return base
        known = {f.name for f in dataclasses.fields(cls)}
        changes: dict[str, Any] = {}
        for key, value in options.items():
            if key in _RENAMED:
                warnings.warn(f"{caller}: '{key}=' is deprecated; use '{_RENAMED[key]}='", DeprecationWarning,
                              stacklevel=3)
                key = _RENAMED[key]
            if key not in known:
                raise TypeError(f"{caller}() got an unexpected keyword argument '{key}'; settings are {sorted(known)}")
            if key in changes:
                raise TypeError(f"{caller}() got '{key}' twice (once under a deprecated name)")
            changes[key] = value
        if changes.get("step") in _RENAMED_STEPS:
            old = changes["step"]
            warnings.warn(f"{caller}: step {old!r} is deprecated; use {_RENAMED_STEPS[old]!r}", DeprecationWarning,
                          stacklevel=3)
            changes["step"] = _RENAMED_STEPS[old]
        return dataclasses.replace(base, **changes)

    def direction_code(self) -> list[float]:
        """What ranks must share to build one μY (step, weighting, loss type), as numbers (handshake)."""
        loss = -1.0 if self.loss_type is None else float(LOSS_TYPES.index(self.loss_type))
        return [float(STEPS.index(self.step)), float(WEIGHTINGS.index(self.weighting)), loss]

    def probe_code(self) -> list[float]:
        """What ranks must share to probe E along μY (weighting, mode), as numbers (handshake)."""
        return [float(WEIGHTINGS.index(self.weighting)), float(MODES.index(self.mode))]


def add_arguments(parser: argparse.ArgumentParser, *, exclude: Sequence[str] = ()) -> None:
    """Add a ``--flag`` for every command-line field of ``ProbeSettings`` to ``parser``.

    Flags are the field names with ``-`` for ``_``; defaults and help come from the fields.
    ``--direction`` and ``--batch-size`` stay accepted as deprecated spellings. The names
    added are remembered on the parser, so ``from_arguments`` reads exactly those.
    """
    added = []
    for f in dataclasses.fields(ProbeSettings):
        if not f.metadata.get("cli") or f.name in exclude:
            continue
        added.append(f.name)
        flag = "--" + f.name.replace("_", "-")
        helptext = f"{f.metadata['help']} (default: {f.default})"
        aliases = [("--" + old.replace("_", "-")) for old, new in _RENAMED.items() if new == f.name]
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action="store_true", default=f.default, help=helptext)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": helptext}
        if f.name == "chunk_size":
            kwargs.update(type=int, metavar="N", help=f"{f.metadata['help']} (default: auto)")
        elif f.name in ("attention_block", "mlp_chunk"):
            kwargs.update(type=int, metavar="N")
        elif f.name == "memory_budget_gb":
            kwargs.update(type=float, metavar="GIB")
        elif f.name == "max_grad_norm":
            kwargs.update(type=float, metavar="C")
        elif f.metadata.get("choices"):
            choices = list(f.metadata["choices"])
            if f.name == "step":
                choices += list(_RENAMED_STEPS)
            kwargs.update(choices=choices)
        parser.add_argument(flag, *aliases, **kwargs)
    parser.set_defaults(_settings_fields=tuple(added) + ("progress",))


def from_arguments(args: argparse.Namespace, **extra: Any) -> ProbeSettings:
    """The ``ProbeSettings`` of parsed arguments (fields added by ``add_arguments``) plus ``extra``."""
    names = getattr(args, "_settings_fields", ())
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    step = values.get("step")
    if step in _RENAMED_STEPS:
        values["step"] = _RENAMED_STEPS[step]
    return ProbeSettings(**{**values, **extra})


# ---------------------------------------------------------------- checks
def _choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        hint = f"; {value!r} is deprecated, write {_RENAMED_STEPS[value]!r}" if value in _RENAMED_STEPS else ""
        raise SettingsError(f"{name}: expected one of {tuple(allowed)}, got {value!r}{hint}")


def _positive_int(name: str, value: object) -> int:
    """An integer ≥ 1; integer-like numbers (``numpy.int64``, 0-d integer tensors) are accepted."""
    if isinstance(value, bool):
        raise SettingsError(f"{name}: expected an int >= 1, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise SettingsError(f"{name}: expected an int >= 1, got {value!r}") from None
    if number < 1:
        raise SettingsError(f"{name}: expected an int >= 1, got {value!r}")
    return int(number)


def _param_selection(value: object) -> ParamSelection:
    if isinstance(value, str):
        if value not in PARAM_SELECTIONS:
            raise SettingsError(
                f"params: expected 'trainable', 'lora' or a list of parameter names, got {value!r}"
            )
        return value
    try:
        names = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise SettingsError(
            f"params: expected 'trainable', 'lora' or a list of parameter names, got {type(value).__name__}"
        ) from None
    if not names:
        raise SettingsError("params: the explicit list of parameter names is empty")
    if not all(isinstance(n, str) for n in names):
        raise SettingsError("params: an explicit selection must be a sequence of str parameter names")
    if len(set(names)) != len(names):
        raise SettingsError("params: the explicit list of parameter names has duplicates")
    return names
