"""The realized companion of a prediction: the entropy change of a step actually taken,
measured on held-out rollouts sampled from the policy before the step.

Around one optimizer step θ → θ':

1. ``sample_held_out`` with ``sampling_config``: before the step, G responses for each of B held-out prompts are
   sampled from π_θ itself (``model.generate`` in eval mode at temperature 1, with no
   top-k / top-p / min-p / repetition penalty or any other logits processor: the model's own
   ``generation_config`` is replaced for the call and put back), in a seeded block that
   leaves every random generator as it was (``funcprobe.edge.rng.seeded``);
2. ``held_out_logprobs``: their sequence log-probs S0 ``[B, G]`` under θ (before the step)
   and S1 under θ' (after it), in eval mode, in the probe's compute precision;
3. ``realized_change``: the importance-sampling change of the weighted entropy
   H_w = −E[Sw] (``funcprobe.validation.entropy_change.is_change``: unbiased for every G),
   per prompt mean_g (r_g·(−Sw1_g) + Sw0_g) with r = exp(S1 − S0), Sw = S / W and W = Lmax
   (``dr_grpo``) or the response's own length (``per_token_avg``; a fixed number per
   response, so the estimator is unbiased for either weighting); the estimate is the mean
   over the B prompts, its SE their standard deviation / sqrt(B).

The responses are sampled from the temperature-1 policy whatever the trainer samples its
training batches with, because that is the policy whose entropy the probe predicts
(docs/definitions.md#sequence-log-prob) and importance sampling needs the sampler's own
probabilities. The prompts must be held out from the step (not in its update batch), or the
measured change includes the prompts' own influence on the step, which the leave-one-out
prediction excludes.

Cost per measured step: one generation of B·G responses and two no-grad forwards over them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from transformers import GenerationConfig

from ..core.objectives import weighted_logprobs
from ..core.rollouts import RolloutBatch
from ..edge.memory import chunk_size_for
from ..edge.registry import ParamRegistry
from ..edge.rng import seeded
from ..run import ProbeRun
from ..settings import ProbeSettings
from ..validation.entropy_change import EntropyChange, is_change


@dataclass(frozen=True)
class RealizedCompanion:
    """The realized companion's held-out prompts (``ProbedGRPOTrainer(probe_realized=...)``),
    checked once when it is built.

    Attributes:
        prompts: B ≥ 2 prompts drawn at random for each probed step (the SE needs 2).
        dataset: where they come from: a map-style dataset (``datasets.Dataset`` or a
            sequence of dicts) with a ``"prompt"`` column in the train dataset's format, held
            out from training, with at least ``prompts`` rows.

    Raises ``ValueError`` naming ``probe_realized.prompts`` or ``probe_realized.dataset``.
    """

    prompts: int
    dataset: Any

    def __post_init__(self) -> None:
        B = self.prompts
        if isinstance(B, bool) or not isinstance(B, int) or B < 2:
            raise ValueError("probe_realized.prompts: expected an int >= 2 (held-out prompts per probed step; the "
                             f"standard error needs 2), got {B!r}")
        try:
            size = len(self.dataset)
            first = self.dataset[0] if size else None
        except Exception as err:  # an iterable dataset, or an object without rows
            raise ValueError(f"probe_realized.dataset: expected a map-style dataset (len() and rows by index), got "
                             f"{type(self.dataset).__name__} ({type(err).__name__}: {err})") from None
        if size < B:
            raise ValueError(f"probe_realized.dataset: {size} row(s), fewer than prompts={B} per probed step")
        if not isinstance(first, Mapping) or "prompt" not in first:
            raise ValueError("probe_realized.dataset: expected rows with a 'prompt' (as in the train dataset), got a "
                             f"first row of type {type(first).__name__}"
                             + (f" with keys {sorted(first)}" if isinstance(first, Mapping) else ""))


@contextlib.contextmanager
def _sampling_state(model: nn.Module, config: GenerationConfig) -> Iterator[None]:
    """Eval mode and ``config`` as the model's ``generation_config`` (transformers fills the
    fields a passed config leaves at their defaults from the model's own, e.g. its
    ``typical_p`` or ``top_k``); every submodule's train/eval flag and the model's
    ``generation_config`` are restored on exit, also when the block raises."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    modes = [(m, m.training) for m in model.modules()]
    saved = target.generation_config
    try:
        target.generation_config = config
        model.eval()
        yield
    finally:
        target.generation_config = saved
        for m, training in modes:
            if m.training != training:
                m.train(training)


def sampling_config(*, group_size: int, max_new_tokens: int, eos_token_ids: Sequence[int],
                    pad_token_id: int) -> GenerationConfig:
    """The ``GenerationConfig`` that samples from π_θ itself: G = ``group_size`` responses per
    prompt of at most ``max_new_tokens`` tokens, ending at any of ``eos_token_ids``,
    temperature 1, no top-k / top-p truncation and no other logits processor.

    Raises:
        ValueError: ``group_size`` < 2, ``max_new_tokens`` < 1, no ``eos_token_ids``.
    """
    if group_size < 2:
        raise ValueError(f"group_size: expected >= 2 responses per prompt, got {group_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    eos = [int(e) for e in eos_token_ids]
    if not eos:
        raise ValueError("eos_token_ids: expected at least one id")
    return GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=True, temperature=1.0, top_k=0,
                            top_p=1.0, num_return_sequences=int(group_size), pad_token_id=int(pad_token_id),
                            eos_token_id=eos, disable_compile=True)


@torch.no_grad()
def sample_held_out(model: nn.Module, prompt_ids: Sequence[Sequence[int]], config: GenerationConfig, *, seed: int,
                    max_len: float | None = None) -> RolloutBatch:
    """``config.num_return_sequences`` = G responses per prompt sampled from π_θ in eval mode.

    Args:
        model: a Hugging Face causal LM (or a PEFT model around one) with ``generate``.
        prompt_ids: B prompts, each a list of token ids (a chat template already applied).
        config: from ``sampling_config`` (temperature 1, no truncation); it stands in for
            the model's own ``generation_config`` during the call.
        seed: seeds the sampling; the caller's CPU and CUDA generators are restored after.
        max_len: Lmax of the batch (``dr_grpo``); None: none.

    Returns:
        the ``RolloutBatch`` of B prompts × G responses (no advantages), on the CPU; a
        response ends at its first id of ``config.eos_token_id`` (kept, as TRL does).

    Raises:
        ValueError: no prompts or an empty one, and the errors of ``RolloutBatch.from_lists``.
    """
    prompts = [list(p) for p in prompt_ids]
    if not prompts or any(not p for p in prompts):
        raise ValueError("prompt_ids: expected B >= 1 non-empty prompts")
    group_size, pad_token_id = int(config.num_return_sequences), int(config.pad_token_id)
    eos = config.eos_token_id
    eos_set = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
    device = next(model.parameters()).device
    P = max(len(p) for p in prompts)
    x = torch.tensor([[pad_token_id] * (P - len(p)) + p for p in prompts], device=device)
    mask = (torch.arange(P, device=device) >= torch.tensor([P - len(p) for p in prompts], device=device)[:, None])
    with seeded(seed, device), _sampling_state(model, config):
        out = model.generate(input_ids=x, attention_mask=mask.long(), generation_config=config)
    responses: list[list[list[int]]] = []
    for i in range(len(prompts)):
        group = []
        for g in range(group_size):
            tokens = out[i * group_size + g, P:].tolist()
            end = next((t for t, tok in enumerate(tokens) if tok in eos_set), None)
            group.append(tokens if end is None else tokens[: end + 1])
        responses.append(group)
    return RolloutBatch.from_lists(prompts, responses, pad_token_id=pad_token_id, max_len=max_len)


@torch.no_grad()
def held_out_logprobs(model: nn.Module | ParamRegistry, H: RolloutBatch, settings: ProbeSettings) -> Tensor:
    """``[B, G]`` float64 S of H's responses under the model's current weights.

    Eval mode whatever ``settings.keep_dropout`` says (the responses were sampled in eval
    mode), in the compute precision of ``settings.precision``, in chunks of
    ``settings.chunk_size`` prompts or as many as the memory budget fits. Every rank
    scores the whole of H by itself (no collectives), so sharded models (FSDP2) are not
    supported here.
    """
    settings = replace(settings, keep_dropout=False, progress=False)
    registry = ParamRegistry.from_settings(model, settings)
    registry.check_batch(H, "H")
    run = ProbeRun.of(registry, settings)
    batch = run.batch(H)
    size = chunk_size_for(settings, registry, batch, "gradient")
    logprobs = run.logprob_fn()
    out = []
    with run.session(forward_mode=False):
        for start in range(0, batch.num_prompts, size):
            chunk = batch.select(start, min(start + size, batch.num_prompts))
            out.append(logprobs(run.theta, chunk).double())
    return torch.cat(out).cpu()


def realized_change(S0: Tensor, S1: Tensor, H: RolloutBatch, weighting: str) -> EntropyChange:
    """The importance-sampling change of H_w = −E[S / W] from θ (sampler, S0) to θ' (S1).

    Args:
        S0, S1: ``[B, G]`` sequence log-probs of H's responses under θ and θ'.
        H: the held-out rollouts (their lengths, and Lmax for ``dr_grpo``).
        weighting: ``"dr_grpo"`` (W = Lmax) or ``"per_token_avg"`` (W = |y|).

    Returns:
        ``is_change(S0, S1, −S0 / W, −S1 / W)``: nats per W, mean over H's prompts, SE.

    Raises:
        ValueError: a bad ``weighting``, ``dr_grpo`` without Lmax, fewer than 2 prompts.
    """
    S0, S1 = S0.double().cpu(), S1.double().cpu()
    H = H.to("cpu")
    return is_change(S0, S1, -weighted_logprobs(S0, H, weighting), -weighted_logprobs(S1, H, weighting))
