"""Settings typed, grouped and checked once, one way in, the import direction, no global side effects."""

import argparse
import dataclasses
import math
import pathlib
import typing
import warnings

import pytest
import torch

import funcprobe
from funcprobe import (
    EntropyProbe,
    NoSignalError,
    ParamRegistry,
    ProbeSettings,
    SettingsError,
    StaleProbeError,
    conditional_variance,
    update_direction,
)
from funcprobe.settings import add_arguments, from_arguments
from helpers import VOCAB, gpt2, random_direction, random_rollouts, rel_err

PACKAGE = pathlib.Path(funcprobe.__file__).parent


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(step="rmsprop"), "step: expected one of"),
        (dict(weighting="mean"), "weighting: expected one of"),
        (dict(mode="bogus"), "mode: expected one of"),
        (dict(chunk_size=2.5), "chunk_size: expected an int >= 1"),
        (dict(chunk_size=0), "chunk_size: expected an int >= 1"),
        (dict(chunk_size=True), "chunk_size: expected an int >= 1"),
        (dict(params="everything"), "params: expected 'trainable', 'lora'"),
        (dict(params=[]), "params: the explicit list of parameter names is empty"),
        (dict(params=["a", "a"]), "duplicates"),
        (dict(adapter=3), "adapter: expected an adapter name"),
        (dict(keep_dropout="yes"), "keep_dropout: expected True or False"),
        (dict(progress=1), r"progress: expected True or False, got 1 \(or None"),
        # the removed spellings are ordinary bad choices, and a wrong type names the Literal's values
        (dict(step="adam"), r"step: expected one of \('sgd', 'frozen_adam', 'adam_step', 'optimizer_step'\), got 'adam'"),
        (dict(step=3), r"step: expected one of \('sgd', .*'optimizer_step'\), got 3 \(int\)"),
        (dict(loss_type=["grpo"]), r"loss_type: expected one of \('grpo', 'dr_grpo', 'dapo', 'bnpo'\) or None, got \['grpo'\]"),
        (dict(precision=None), r"precision: expected one of \('auto', 'float32', 'model'\), got None"),
        (dict(params=3), "params: expected 'trainable', 'lora' or a sequence of parameter names, got int"),
        (dict(params=["a", 1]), "sequence of str parameter names"),
        (dict(max_grad_norm=1.0), "max_grad_norm: clipping is part of step='optimizer_step' only"),
    ],
)
def test_bad_settings_are_named(change, message):
    with pytest.raises(SettingsError, match=message):
        ProbeSettings(**change)


def test_integer_like_chunk_size_is_accepted():
    np = pytest.importorskip("numpy")
    assert ProbeSettings(chunk_size=np.int64(3)).chunk_size == 3
    assert ProbeSettings(chunk_size=torch.tensor(4)).chunk_size == 4


def test_entropy_probe_checks_settings_before_any_work():
    model = gpt2()
    with pytest.raises(SettingsError, match="mode: expected one of"):
        EntropyProbe(model, lr=0.1, mode="bogus")
    with pytest.raises(ValueError, match="optimizer: step='optimizer_step' needs"):
        EntropyProbe(model)  # the step the optimizer will take is the default: it needs the optimizer
    with pytest.raises(ValueError, match="pass step='adam_step'"):
        EntropyProbe(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), lr=0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'nonsense'"):
        EntropyProbe(model, lr=0.1, step="sgd", nonsense=1)
    with pytest.raises(SettingsError, match="lr: expected a finite number > 0"):
        EntropyProbe(model, lr=-1.0, step="sgd")


def test_lr_accepts_real_numbers_of_any_kind():
    np = pytest.importorskip("numpy")
    model = gpt2()
    E = random_rollouts(B=3, G=2, seed=5)
    mu = random_direction(ParamRegistry.from_model(model))
    ref = conditional_variance(model, E, mu, lr=0.5).delta_h
    for lr in (np.float32(0.5), torch.tensor(0.5, dtype=torch.float64), 0.5):
        # seen exact (0.5 is exact in float32): 1e-6 still allows a float32 lr; a dropped or
        # mis-scaled lr is O(1) off
        assert rel_err(conditional_variance(model, E, mu, lr=lr).delta_h, ref) < 1e-6
    for bad in ("1e-3", True, torch.ones(2), float("nan")):
        with pytest.raises(SettingsError, match="lr: expected"):
            conditional_variance(model, E, mu, lr=bad)


def test_one_way_in_keywords_and_a_settings_value_agree():
    model = gpt2()
    U = random_rollouts(B=3, G=2, seed=6)
    settings = ProbeSettings(step="sgd", chunk_size=2)
    assert settings.options() == {"step": "sgd", "chunk_size": 2}
    new = update_direction(model, U, **settings.options())
    same = update_direction(model, U, step="sgd", chunk_size=2)
    assert all(torch.equal(new[k], same[k]) for k in new)
    # the removed spellings are ordinary errors, raised before any work
    for old in (dict(direction="sgd"), dict(batch_size=2)):
        with pytest.raises(TypeError, match=f"update_direction\\(\\) got an unexpected keyword argument '{next(iter(old))}'"):
            update_direction(model, U, **old)
    with pytest.raises(SettingsError, match="step: expected one of .*got 'adam'"):
        update_direction(model, U, step="adam")
    E = random_rollouts(B=3, G=2, seed=7)
    pred = conditional_variance(model, E, new, lr=0.1)
    for old in ("se_e", "bars_dot", "var_e", "mu_y_norm", "direction", "result"):  # removed attribute names
        with pytest.raises(AttributeError):
            getattr(pred, old)
    for old in ("ConditionalVariance", "DIRECTIONS"):
        with pytest.raises(AttributeError):
            getattr(funcprobe, old)
    # float64: seen 1.2e-16 relative, default rtol 1e-5
    assert torch.allclose(pred.per_prompt.mean(), torch.tensor(pred.delta_h, dtype=torch.float64))


def test_from_options_and_options_round_trip():
    with pytest.raises(TypeError, match=r"EntropyProbe\(\) got an unexpected keyword argument 'batch_size'"):
        ProbeSettings.from_options({"batch_size": 2}, caller="EntropyProbe")
    assert ProbeSettings.from_options({}, caller="f") == ProbeSettings()
    assert ProbeSettings().options() == {"step": "adam_step"}  # step always: EntropyProbe's default differs
    full = ProbeSettings(step="optimizer_step", max_grad_norm=1, optimizer_lr="initial", weighting="per_token_avg",
                         loss_type="dapo",
                         params=["a", "b"], adapter="x", keep_dropout=True, allow_identity_fallback=True,
                         split_baseline=True, effects=True, mode="vjp", precision="float32", chunk_size=3, memory_budget_gb=1,
                         attention_block=16, mlp_chunk=None, generic_jvp=True, progress=False, gather_s=True)
    # every field but process_group (a live group) and kernels ("triton" needs Triton installed)
    assert set(full.options()) == {f.name for f in dataclasses.fields(ProbeSettings)} - {"process_group", "kernels"}
    assert full.options()["params"] == ("a", "b") and full.options()["max_grad_norm"] == 1.0
    for s in (ProbeSettings(), ProbeSettings(step="sgd", chunk_size=2), full):
        assert ProbeSettings.from_options(s.options(), caller="f") == s
    with pytest.raises(TypeError, match="positional"):
        ProbeSettings("sgd")  # keyword-only: one way in
    # the entry points take keywords only: no settings= beside them
    model = gpt2()
    with pytest.raises(TypeError, match="unexpected keyword argument 'settings'"):
        update_direction(model, random_rollouts(B=2, G=2, seed=1), settings=ProbeSettings(step="sgd"))


def test_entropy_probe_built_from_options_has_exactly_those_settings():
    model = gpt2()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for s in (ProbeSettings(), ProbeSettings(step="sgd", mode="vjp", chunk_size=2),
              ProbeSettings(step="optimizer_step", max_grad_norm=0.5, progress=False)):
        assert EntropyProbe(model, opt, **s.options()).settings == s


def test_fields_are_typed_and_grouped_in_one_place():
    """Every field: a group, a type and a check in its metadata; the choice tuples are the
    Literals' values; the class is ordered by group and its docstring lists each group."""
    from funcprobe import settings as mod

    for tup, kind in ((mod.STEPS, mod.Step), (mod.WEIGHTINGS, mod.Weighting), (mod.LOSS_TYPES, mod.LossType),
                      (mod.MODES, mod.Mode), (mod.PRECISIONS, mod.Precision), (mod.KERNELS, mod.Kernels),
                      (mod.PARAM_SELECTIONS, mod.ParamSelectionName)):
        assert tup == typing.get_args(kind) and len(tup) > 1
    assert funcprobe.STEPS is mod.STEPS
    fields = dataclasses.fields(ProbeSettings)
    order = [f.metadata["group"] for f in fields]
    assert order == sorted(order, key=list(mod.GROUPS).index), "fields ordered by group"
    groups = mod.fields_by_group()
    assert list(groups) == list(mod.GROUPS) and all(groups.values())
    lines = ProbeSettings.__doc__.splitlines()
    for group, names in groups.items():
        at = next(i for i, line in enumerate(lines) if f'(group ``"{group}"``' in line)
        indent = len(lines[at]) - len(lines[at].lstrip())
        body = []
        for line in lines[at + 1:]:
            if not line.strip() or len(line) - len(line.lstrip()) <= indent:
                break
            body.append(line.strip())
        listed = [n.strip() for n in " ".join(body).split(",")]
        assert listed == list(names), (group, listed)
    for f in fields:
        assert f.metadata["help"] and callable(f.metadata["check"]) and f.metadata["type"] is not None, f.name
        choices = f.metadata["choices"]
        if choices:
            assert f.metadata["type"] is str and f.default in choices + (None,), f.name


def test_command_line_flags_are_generated_from_the_settings():
    parser = argparse.ArgumentParser()
    add_arguments(parser, exclude=("adapter",))
    args = parser.parse_args(["--step", "sgd", "--chunk-size", "3", "--mode", "vjp", "--keep-dropout"])
    assert from_arguments(args) == ProbeSettings(step="sgd", chunk_size=3, mode="vjp", keep_dropout=True)
    args = parser.parse_args(["--no-keep-dropout", "--no-progress", "--memory-budget-gb", "0.5", "--mlp-chunk", "64",
                              "--loss-type", "grpo", "--step", "optimizer_step", "--max-grad-norm", "1"])
    assert from_arguments(args) == ProbeSettings(step="optimizer_step", max_grad_norm=1.0, loss_type="grpo",
                                                 memory_budget_gb=0.5, mlp_chunk=64, progress=False)
    assert from_arguments(parser.parse_args([])) == ProbeSettings()
    assert from_arguments(parser.parse_args(["--progress"])).progress is True
    # the removed spellings and values are refused by argparse (exit status 2)
    for argv in (["--direction", "sgd"], ["--batch-size", "2"], ["--step", "adam"], ["--chunk-size", "x"]):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 2, argv
    helptext = parser.format_help()
    for flag in ("--step", "--weighting", "--mode", "--chunk-size N", "--params", "--allow-identity-fallback",
                 "--no-allow-identity-fallback", "--memory-budget-gb GIB", "--max-grad-norm C", "--progress",
                 "--no-progress"):
        assert flag in helptext, flag
    assert "--adapter" not in helptext and "--gather-s" not in helptext and "--process-group" not in helptext
    # one argument group per settings group, in order, each flag under its own
    titles = [f"probe settings: {title}:" for title, _ in funcprobe.settings.GROUPS.values()]
    at = [helptext.index(t) for t in titles]
    assert at == sorted(at)
    flags = [helptext.index(f"\n  {flag}") for flag in ("--step {", "--mode {", "--progress, --no-progress")]
    assert at[0] < flags[0] < at[1] < flags[1] < at[2] < flags[2]


def test_no_signal_is_a_named_value_error():
    model = gpt2()
    zero = random_rollouts()
    zero = type(zero)(zero.input_ids, zero.attention_mask, zero.response_start, torch.zeros(4, 3), zero.max_len)
    with pytest.raises(NoSignalError):
        update_direction(model, zero, step="sgd")
    assert issubclass(NoSignalError, ValueError)


def test_a_long_lived_probe_follows_the_model_and_the_scheduler():
    model = gpt2()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.01**k)
    probe = EntropyProbe(model, opt, step="adam_step")
    E, U = random_rollouts(B=3, G=2, seed=8), random_rollouts(B=3, G=2, seed=9)
    before = probe.predict(E, U)
    opt.step()  # no gradients: nothing moves, but the scheduler may step now
    sched.step()
    after = probe.predict(E, U)
    assert after.lr == pytest.approx(before.lr * 0.01)  # float64 product of the scheduler's factor: rel 1e-6
    # a replaced tensor (load_state_dict into new storage) is seen: the probe differentiates the new values
    name = next(n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        dict(model.named_parameters())[name].data = dict(model.named_parameters())[name].data * 2.0
    assert probe.registry.trainable[name].data_ptr() == dict(model.named_parameters())[name].data_ptr()
    # a changed layout is refused by name
    model.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight = torch.nn.Parameter(
        torch.zeros(5, 32, dtype=torch.float64))
    with pytest.raises(StaleProbeError, match="changed since the EntropyProbe was built"):
        probe.predict(E, U)


def test_seeded_block_is_reproducible_restores_the_generator_and_checks_its_arguments():
    from funcprobe.edge.rng import seeded

    rng = torch.get_rng_state()
    with seeded(3):
        a = torch.rand(4)
    with pytest.raises(RuntimeError, match="inside"), seeded(3):
        b = torch.rand(4)
        raise RuntimeError("inside")
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), rng)
    assert not torch.equal(torch.rand(4), a)  # the caller's stream goes on from its own state
    with pytest.raises(ValueError, match="seed: expected an int"):
        with seeded(1.5):
            pass
    with pytest.raises(ValueError, match="seed: expected an int in"):
        with seeded(2**64):
            pass
    with pytest.raises(ValueError, match="seed: expected an int, got True"):
        with seeded(True):
            pass
    with pytest.raises(ValueError, match="device: expected a cpu, meta or cuda device"):
        with seeded(1, "xpu"):
            pass
    if torch.cuda.device_count() < 8:
        with pytest.raises(ValueError, match="device: cuda:7 is not an available CUDA device"):
            with seeded(1, "cuda:7"):
                pass
    with seeded(torch.tensor(3), "meta"):  # an integer tensor is an int; meta draws nothing
        assert torch.equal(torch.rand(4), a)


def test_library_leaves_global_state_alone(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib

    from funcprobe.apps.plots import plot_probe
    from funcprobe.validation.models import PolicySpec, qwen2_lora_policy
    from calibration_study import sample_fixed_length

    model = gpt2()  # the test helper seeds the global RNG; the library must not
    # torch.manual_seed would seed every CUDA generator too (or queue it, over the caller's
    # own queued seed, before CUDA starts): nothing here may touch a CUDA generator
    cuda_seeding = []
    for name in ("manual_seed", "manual_seed_all", "seed", "seed_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, _n=name: cuda_seeding.append(_n))
    backend = matplotlib.get_backend()
    rng = torch.get_rng_state()
    policy = qwen2_lora_policy(PolicySpec(vocab_size=VOCAB, hidden=16, layers=1, eos_token_id=None), seed=123)
    assert torch.equal(torch.get_rng_state(), rng)
    sample_fixed_length(policy, [[1, 2], [3, 4]], group_size=2, response_len=3, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)
    conditional_variance(policy, random_rollouts(B=2, G=2, seed=4),
                                random_direction(ParamRegistry.from_model(policy)), lr=0.1)
    E = random_rollouts(B=3, G=2, seed=5)
    pred = conditional_variance(model, E, random_direction(ParamRegistry.from_model(model)), lr=0.1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert cuda_seeding == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_probe(pred, tmp_path / "p.png")
    assert matplotlib.get_backend() == backend
    assert (tmp_path / "p.png").stat().st_size > 5000


def test_a_nan_weight_raises_by_name_not_a_nan_direction():
    from funcprobe import NonFiniteError

    model = gpt2()
    name = next(n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        dict(model.named_parameters())[name][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=f"own weights are non-finite at \\['{name} \\(probed\\)'"):
        update_direction(model, random_rollouts(), step="sgd")


def test_zero_advantages_under_adam_step_are_predicted_and_flagged(caplog):
    """All-zero advantages: sgd raises NoSignalError; adam_step's step is momentum and weight
    decay only, which is predicted, logged, and flagged in the result (README: "no signal")."""
    from funcprobe import EntropyProbe

    model = gpt2()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    sum(p.sum() for p in params).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    U = random_rollouts(seed=3)
    zero = type(U)(U.input_ids, U.attention_mask, U.response_start, torch.zeros(4, 3), U.max_len)
    E = random_rollouts(seed=4)
    probe = EntropyProbe(model, opt, step="adam_step")
    with caplog.at_level("WARNING", logger="funcprobe"):
        quiet = probe.predict(E, zero)
    assert quiet.policy_gradient_signal is False and quiet.step_norm > 0 and math.isfinite(quiet.delta_h)
    assert "no policy-gradient signal" in caplog.text
    assert probe.predict(E, U).policy_gradient_signal is True
    assert quiet.to_dict()["policy_gradient_signal"] is False


def test_default_chunk_size_comes_from_the_memory_budget():
    from funcprobe import ParamRegistry, ProbeSettings
    from funcprobe.edge.memory import FALLBACK_CHUNK, bytes_per_token, chunk_size_for
    from helpers import qwen2

    reg = ParamRegistry.from_model(qwen2())
    batch = random_rollouts(B=6, G=3)
    per_prompt = bytes_per_token(reg, batch.seq_len, "gradient") * batch.group_size * batch.seq_len
    assert chunk_size_for(ProbeSettings(memory_budget_gb=2.5 * per_prompt / 2**30), reg, batch, "gradient") == 2
    assert chunk_size_for(ProbeSettings(memory_budget_gb=1e-9), reg, batch, "jvp") == 1
    assert chunk_size_for(ProbeSettings(chunk_size=5), reg, batch, "gradient") == 5
    assert bytes_per_token(reg, 10, "vjp") == 2 * bytes_per_token(reg, 10, "gradient")

    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

    assert chunk_size_for(ProbeSettings(), ParamRegistry.from_model(Bare()), batch, "gradient") == FALLBACK_CHUNK
    for bad in (0, -1.0, float("nan"), True, "2"):
        with pytest.raises(SettingsError, match="memory_budget_gb"):
            ProbeSettings(memory_budget_gb=bad)


def test_unused_probed_parameter_is_named_not_given_a_silent_zero_gradient():
    """SPEC failure 5: no allow_unused; a probed parameter the forward does not reach is
    refused by name instead of getting a zero gradient."""
    from funcprobe import UnreachableDirectionError

    model = gpt2()
    model.register_parameter("stray", torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)))
    with pytest.raises(UnreachableDirectionError, match="stray"):
        update_direction(model, random_rollouts(), step="sgd")
