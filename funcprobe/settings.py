"""``ProbeSettings``: every option of the probe, typed, grouped, checked once, at the edge.

The fields fall in three groups (``GROUPS``): what is **predicted** (the step, the
objective, the probed parameters), how it is **computed** (same numbers to rounding,
different time and memory) and **runtime** (progress, data-parallel plumbing). Each
field's metadata holds its group, type, help and, for a choice, its ``Literal`` type;
the command line's flags are generated from that metadata (``add_arguments``), one
argument group per settings group, so the help text lives in one place.

One way in: the library functions and ``EntropyProbe`` take the settings as keyword
arguments only; they build the value with ``ProbeSettings.from_options`` (an unknown
keyword is a ``TypeError``, a bad value a ``SettingsError`` naming the field). A
caller holding a ``ProbeSettings`` passes it on with ``**settings.options()``::

    settings = ProbeSettings(step="sgd", chunk_size=4)
    probe = EntropyProbe(model, optimizer, **settings.options())

Every field is checked in exactly one place, its ``check``; ``__post_init__`` runs them,
then the checks between fields (``max_grad_norm`` needs ``step="optimizer_step"``,
``kernels`` needs forward mode's rules and Triton). Nothing below re-checks an option.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import operator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping, Sequence, Union, get_args

from .errors import SettingsError

#: step maps P (docs/definitions.md#step-maps)
Step = Literal["sgd", "frozen_adam", "adam_step", "optimizer_step"]
#: weightings of S (docs/definitions.md#weighting)
Weighting = Literal["dr_grpo", "per_token_avg"]
#: TRL ``GRPOTrainer`` loss types whose policy gradient is modelled (docs/definitions.md#trl-loss-types)
LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo"]
#: ways to compute the probe scalars (docs/definitions.md#probe-scalar, #alpha-trick)
Mode = Literal["jvp", "vjp"]
#: compute precisions of the probe's forwards (funcprobe.edge.precision)
Precision = Literal["auto", "float32", "model"]
#: which learning rate of each param group the Adam steps read (funcprobe.edge.optim.group_lrs)
LrSource = Literal["current", "initial"]
#: attention kernels inside the forward-mode rules (funcprobe.forward.rules.KERNELS)
Kernels = Literal["off", "triton"]
#: named parameter selections (besides an explicit sequence of parameter names)
ParamSelectionName = Literal["trainable", "lora"]
#: what ``params`` holds once checked: a named selection or a tuple of unique names
ParamSelection = Union[ParamSelectionName, Sequence[str]]

STEPS: tuple[str, ...] = get_args(Step)
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
MODES: tuple[str, ...] = get_args(Mode)
PRECISIONS: tuple[str, ...] = get_args(Precision)
KERNELS: tuple[str, ...] = get_args(Kernels)
LR_SOURCES: tuple[str, ...] = get_args(LrSource)
PARAM_SELECTIONS: tuple[str, ...] = get_args(ParamSelectionName)

#: settings groups, in the order of the class and of ``--help``: name → (title, what it covers)
GROUPS = {
    "prediction": ("what is predicted", "the step, the objective, the probed parameters"),
    "computation": ("how it is computed", "the same numbers to rounding; different time and memory"),
    "runtime": ("runtime", "progress bars and data-parallel plumbing"),
}

Check = Callable[[str, Any], Any]
#: a command-line flag with argparse's own metavar and the field's default shown
_FLAG: Mapping[str, str] = MappingProxyType({})


# ---------------------------------------------------------------- checks
# Each returns the value, normalised (``int`` for integer-like numbers, ``float`` for
# reals, a tuple for an explicit parameter list), or raises ``SettingsError`` naming it.
def _literal(kind: Any, *, optional: bool = False) -> Check:
    allowed = get_args(kind)

    def check(name: str, value: object) -> object:
        if value is None and optional:
            return value
        if not isinstance(value, str) or value not in allowed:
            expected = f"one of {allowed}" + (" or None" if optional else "")
            got = repr(value) if isinstance(value, str) or value is None else f"{value!r} ({type(value).__name__})"
            raise SettingsError(f"{name}: expected {expected}, got {got}")
        return value

    return check


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


def _positive_real(what: str) -> Check:
    def check(name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise SettingsError(f"{name}: expected a finite number{what} > 0, got {value!r}")
        return float(value)

    return check


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SettingsError(f"{name}: expected True or False, got {value!r}")
    return value


def _str(what: str) -> Check:
    def check(name: str, value: object) -> str:
        if not isinstance(value, str):
            raise SettingsError(f"{name}: expected {what} (str), got {value!r}")
        return value

    return check


def _or_none(check: Check, text: str) -> Check:
    def maybe(name: str, value: object) -> object:
        if value is None:
            return None
        try:
            return check(name, value)
        except SettingsError as err:
            raise SettingsError(f"{err} ({text})") from None

    return maybe


def _anything(name: str, value: object) -> object:
    return value


def check_params(value: object) -> ParamSelection:
    """``params``, checked: ``"trainable"``, ``"lora"`` or a non-empty sequence of unique
    ``str`` parameter names (returned as a tuple). The one check of the format;
    ``ParamRegistry.from_model`` calls it and then checks the names against the model.

    Raises:
        SettingsError (a ``ValueError``): an unknown selection, a non-sequence, an empty
            list, a non-``str`` name or duplicates.
    """
    expected = "params: expected " + ", ".join(repr(a) for a in PARAM_SELECTIONS) + " or a sequence of parameter names"
    if isinstance(value, str):
        if value not in PARAM_SELECTIONS:
            raise SettingsError(f"{expected}, got {value!r}")
        return value
    try:
        names = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise SettingsError(f"{expected}, got {type(value).__name__}") from None
    if not names:
        raise SettingsError("params: the explicit list of parameter names is empty")
    if not all(isinstance(n, str) for n in names):
        raise SettingsError("params: an explicit selection must be a sequence of str parameter names")
    if len(set(names)) != len(names):
        raise SettingsError("params: the explicit list of parameter names has duplicates")
    return names


def _opt(default: Any, help: str, *, group: str, type: Any, check: Check | None = None,
         flag: Mapping[str, str] | None = _FLAG) -> Any:
    """A settings field.

    Args:
        default: the field's default.
        help: what it means (``--help`` and the docs).
        group: a key of ``GROUPS``.
        type: what the command line parses: ``int``, ``float``, ``str``, ``bool`` or a
            ``Literal`` type, whose values become the flag's ``choices``.
        check: the field's one check, ``(name, value) -> value``; default: the
            ``Literal``'s values (or None where ``default`` is None), or a bool.
        flag: the command-line flag's ``metavar`` and ``shown_default`` (the default as
            ``--help`` shows it); None: no flag.
    """
    if group not in GROUPS:
        raise ValueError(f"group: expected one of {tuple(GROUPS)}, got {group!r}")
    choices = get_args(type) or None
    if check is None:
        if choices:
            check = _literal(type, optional=default is None)
        elif type is bool:
            check = _bool
        else:
            raise ValueError("check: needed for a field that is not a Literal or a bool")
    if flag is not None and not set(flag) <= {"metavar", "shown_default"}:
        raise ValueError(f"flag: expected the keys metavar, shown_default, got {sorted(flag)}")
    return field(default=default, metadata={
        "help": help, "group": group, "type": str if choices else type, "choices": choices, "check": check,
        "cli": flag is not None, "metavar": (flag or {}).get("metavar"), "shown_default": (flag or {}).get("shown_default"),
    })


@dataclass(frozen=True, kw_only=True)
class ProbeSettings:
    """How the probe runs. Every field is checked in ``__post_init__``, by its ``check``.

    What is predicted (group ``"prediction"``):
        step, max_grad_norm, optimizer_lr, weighting, loss_type, params, adapter, keep_dropout,
        allow_identity_fallback, split_baseline, effects
    How it is computed (group ``"computation"``; the same numbers to rounding):
        mode, precision, chunk_size, memory_budget_gb, attention_block, mlp_chunk,
        generic_jvp, kernels
    Runtime (group ``"runtime"``):
        progress, gather_s, process_group

    Each field's ``help`` metadata says what it means; ``add_arguments`` prints them.
    Fields are keyword-only.

    Raises:
        SettingsError (a ``ValueError``): naming the field, what was given and what was
            expected (for a choice, its ``Literal`` values).
    """

    # ------------------------------------------------------------ prediction
    step: Step = _opt(
        "adam_step",
        "the optimizer's step map P in muY = P(grad J): sgd (identity), frozen_adam (the seeds' "
        "preconditioner g/(sqrt(v_hat)+eps) with Adam's state frozen), adam_step "
        "(the exact next Adam/AdamW step per unit learning rate), optimizer_step (the step "
        "clip_grad_norm_ + optimizer.step() will take now: each param group's current lr inside, "
        "clipping by max_grad_norm)",
        group="prediction", type=Step,
    )
    max_grad_norm: float | None = _opt(
        None,
        "step optimizer_step: the trainer's gradient clipping by global norm (torch.nn.utils.clip_grad_norm_, "
        "TRL/HF max_grad_norm); None: no clipping",
        group="prediction", type=float, flag={"metavar": "C"},
        check=_or_none(_positive_real(""), "or None: no clipping"),
    )
    optimizer_lr: LrSource = _opt(
        "current",
        "the learning rate the optimizer's steps read from each param group: current (its lr now, what "
        "optimizer.step() takes) or initial (the scheduler's base rate, the group's initial_lr: for a "
        "checkpoint saved at the end of a schedule or in warm-up, where the current lr is 0)",
        group="prediction", type=LrSource,
    )
    weighting: Weighting = _opt(
        "dr_grpo",
        "weighting of the sequence log-prob: dr_grpo (S/Lmax, needs max_len) or per_token_avg (S/|y|)",
        group="prediction", type=Weighting,
    )
    loss_type: LossType | None = _opt(
        None,
        "the policy-gradient loss of the step, as TRL's GRPOTrainer computes it at ratio 1: grpo (mean over "
        "sequences of the token mean), dr_grpo (token sum / (sequences x Lmax)), dapo (token sum / completion "
        "tokens of the whole update batch, all ranks), bnpo (token sum / tokens of the batch, one process); "
        "None: J of the weighting",
        group="prediction", type=LossType,
    )
    params: ParamSelection = _opt(
        "trainable",
        "which parameters are probed: trainable (requires_grad), lora (LoRA weights of the adapter) or (in "
        "Python) a sequence of parameter names",
        group="prediction", type=ParamSelectionName, check=lambda name, value: check_params(value),
    )
    adapter: str | None = _opt(
        None, "PEFT adapter to probe; None: the active one",
        group="prediction", type=str, flag={"metavar": "NAME"}, check=_or_none(_str("an adapter name"), "or None"),
    )
    keep_dropout: bool = _opt(
        False, "keep the model's train/eval modes (dropout) in the probe's forwards",
        group="prediction", type=bool,
    )
    allow_identity_fallback: bool = _opt(
        False, "frozen_adam: identity preconditioner for parameters without Adam state",
        group="prediction", type=bool,
    )
    split_baseline: bool = _opt(
        False,
        "EntropyProbe.predict: also report the entropy change of the part of the step that does not depend "
        "on U (Adam's momentum and weight decay, the step of a zero gradient), at one more JVP pass over E",
        group="prediction", type=bool,
    )
    effects: bool = _opt(
        False,
        "EntropyProbe.predict: also predict the step's effects on what trainers log (the token entropy under "
        "each aggregation, the KL of the step, the completion length, the reward), from the same JVP pass over "
        "E (docs/derivations.md#predicted-effects)",
        group="prediction", type=bool,
    )
    # ------------------------------------------------------------ computation
    mode: Mode = _opt(
        "jvp",
        "how s is computed: jvp (forward mode, memory of about one forward) or vjp (the seeds' alpha-trick, "
        "reverse over reverse; same numbers, more memory)",
        group="computation", type=Mode,
    )
    precision: Precision = _opt(
        "auto",
        "compute precision of the probe's forwards: auto (float32 when the model holds bf16/fp16 weights, "
        "upcast layer by layer without touching the model; else the model's dtype), float32, or model (the "
        "model's own dtypes)",
        group="computation", type=Precision,
    )
    chunk_size: int | None = _opt(
        None,
        "prompts per forward (each JVP / gradient chunk holds chunk_size x G sequences); default: the most "
        "that fit memory_budget_gb by an estimate from the model's config. Results do not depend on it; "
        "larger chunks are fewer, bigger forwards (faster, above all on GPUs) and need more memory",
        group="computation", type=int, flag={"metavar": "N", "shown_default": "auto"},
        check=_or_none(_positive_int, "or None: from memory_budget_gb"),
    )
    memory_budget_gb: float = _opt(
        2.0,
        "activation memory (GiB) the default chunk_size aims at (funcprobe.edge.memory); the model's own "
        "weights are not counted",
        group="computation", type=float, flag={"metavar": "GIB"}, check=_positive_real(" of GiB"),
    )
    attention_block: int | None = _opt(
        None,
        "keys per block of funcprobe's blockwise causal attention (online softmax in plain PyTorch, the "
        "tangent carried block by block: no [T x T] scores, primal or tangent) for the probe's forwards; "
        "None: the model's own eager / MATH-SDPA attention. Exact either way (funcprobe.forward.attention)",
        group="computation", type=int, flag={"metavar": "N"},
        check=_or_none(_positive_int, "or None: the model's own attention"),
    )
    mlp_chunk: int | None = _opt(
        2048,
        "tokens per MLP call in the probe's forward-mode passes (funcprobe.edge.token_chunks): the MLP's "
        "[tokens x intermediate] primal and tangent buffers, which set forward mode's peak memory, stay this "
        "small; same values; None: all tokens at once",
        group="computation", type=int, flag={"metavar": "N"},
        check=_or_none(_positive_int, "or None: all tokens at once"),
    )
    generic_jvp: bool = _opt(
        False,
        "run forward mode with PyTorch's generic forward-AD formulas instead of funcprobe's rules "
        "(funcprobe.forward.rules: linear layers, matrix products, attention, SiLU and the LM head's "
        "log-probs with tangents that skip frozen weights); same values to rounding, slower; for checking",
        group="computation", type=bool,
    )
    kernels: Kernels = _opt(
        "off",
        "attention kernels in forward mode (mode jvp, funcprobe.forward.rules): off (SDPA calls take the "
        "closed-form rule) or triton (the Triton flash kernels for the SDPA calls they cover on CUDA, the rule "
        "for the others; needs Triton; same values to rounding, not faster at batch scale on an H200)",
        group="computation", type=Kernels,
    )
    # ------------------------------------------------------------ runtime
    progress: bool | None = _opt(
        None,
        "tqdm bars over chunks: --progress always, --no-progress never (on the command line also no loading "
        "bars or advisory warnings from transformers); None: only on a terminal",
        group="runtime", type=bool,
        check=_or_none(_bool, "or None: only on a terminal"),
    )
    gather_s: bool = _opt(
        False, "data-parallel: return every rank's s, not only this rank's", group="runtime", type=bool, flag=None,
    )
    process_group: object | None = _opt(
        None, "torch.distributed group to reduce over (default: WORLD when initialised with > 1 rank)",
        group="runtime", type=object, check=_anything, flag=None,
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))
        if self.max_grad_norm is not None and self.step != "optimizer_step":
            raise SettingsError(
                f"max_grad_norm: clipping is part of step='optimizer_step' only (the step here is {self.step!r}, "
                "per unit learning rate)"
            )
        if self.kernels != "off":
            if self.mode != "jvp" or self.generic_jvp:
                raise SettingsError(f"kernels: {self.kernels!r} runs inside the forward-mode rules, which mode="
                                    f"{self.mode!r} / generic_jvp={self.generic_jvp!r} do not use; set kernels='off'")
            if importlib.util.find_spec("triton") is None:  # the rules mode imports it (funcprobe.forward.rules)
                raise SettingsError("kernels: 'triton' needs Triton, which is not installed here (pip install "
                                    "triton, or kernels='off')")

    # ---------------------------------------------------------------- building
    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, caller: str) -> "ProbeSettings":
        """The settings of a function's keyword arguments: ``options`` over the defaults.

        Args:
            options: field name → value (the ``**options`` of ``caller``).
            caller: the public function's name, for the error message.

        Raises:
            TypeError: a keyword that is no field, named with ``caller`` as Python names
                an unexpected keyword argument.
            SettingsError (a ``ValueError``): a bad value, naming the field.
        """
        _known_keywords(options, caller)
        return cls(**options)

    def options(self) -> dict[str, Any]:
        """The keyword arguments that rebuild these settings in any entry point:
        ``EntropyProbe(model, optimizer, **settings.options())`` probes with exactly
        ``settings``.

        The fields that differ from their defaults, and ``step`` always (entry points
        differ in their default step: ``EntropyProbe`` and ``entropy_influence`` predict
        ``"optimizer_step"``, the functions ``"adam_step"``).
        """
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "step" or (value is not f.default and value != f.default):
                out[f.name] = value
        return out

    def direction_code(self) -> list[float]:
        """What ranks must share to build one μY (step, weighting, loss type), as numbers (handshake)."""
        loss = -1.0 if self.loss_type is None else float(LOSS_TYPES.index(self.loss_type))
        return [float(STEPS.index(self.step)), float(WEIGHTINGS.index(self.weighting)), loss]

    def probe_code(self) -> list[float]:
        """What ranks must share to probe E along μY (weighting, mode), as numbers (handshake)."""
        return [float(WEIGHTINGS.index(self.weighting)), float(MODES.index(self.mode)), float(self.effects)]


def _known_keywords(options: Mapping[str, Any], caller: str) -> None:
    known = {f.name for f in dataclasses.fields(ProbeSettings)}
    for key in options:
        if key not in known:
            raise TypeError(f"{caller}() got an unexpected keyword argument '{key}'; the settings are {sorted(known)}")


def fields_by_group() -> dict[str, tuple[str, ...]]:
    """Group name → the names of its ``ProbeSettings`` fields, in class order."""
    out: dict[str, tuple[str, ...]] = {g: () for g in GROUPS}
    for f in dataclasses.fields(ProbeSettings):
        out[f.metadata["group"]] += (f.name,)
    return out


def add_arguments(parser: argparse.ArgumentParser, *, exclude: Sequence[str] = ()) -> None:
    """Add a ``--flag`` for every command-line field of ``ProbeSettings`` to ``parser``,
    in one argument group per settings group.

    Everything comes from the fields' metadata: the flag is the name with ``-`` for
    ``_``; ``type``, ``metavar``, ``choices`` (a ``Literal``'s values), help and default as
    declared; a bool field is ``--flag/--no-flag``. The names added are remembered on the
    parser, so ``from_arguments`` reads exactly those.
    """
    groups: dict[str, Any] = {}
    added = []
    for f in dataclasses.fields(ProbeSettings):
        meta = f.metadata
        if not meta["cli"] or f.name in exclude:
            continue
        if meta["group"] not in groups:
            title, description = GROUPS[meta["group"]]
            groups[meta["group"]] = parser.add_argument_group(f"probe settings: {title}", description)
        added.append(f.name)
        flag = "--" + f.name.replace("_", "-")
        shown = meta["shown_default"] if meta["shown_default"] is not None else f.default
        text = f"{meta['help']} (default: {shown})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default}
        if meta["type"] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = meta["type"]
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
        action = groups[meta["group"]].add_argument(flag, **kwargs)
        action.help = text  # set after: BooleanOptionalAction would append its own default on some Pythons
    parser.set_defaults(_settings_fields=tuple(added))


def from_arguments(args: argparse.Namespace, **extra: Any) -> ProbeSettings:
    """The ``ProbeSettings`` of parsed arguments (fields added by ``add_arguments``) plus ``extra``."""
    names = getattr(args, "_settings_fields", ())
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return ProbeSettings(**{**values, **extra})
