"""The verl plug-in's options and refusals: the hydra route of the engine config, bad options
named, FSDP1 and other engines refused when the engine is built, a mini-batch the probe cannot
model (holes in ``response_mask``) logged while verl's step goes on unchanged."""

import logging

import pytest

pytest.importorskip("verl.workers.engine", reason="verl is not installed (the verl tests run in .ci/run-verl's environment)")

import torch  # noqa: E402

from funcprobe.errors import SettingsError  # noqa: E402
from verl_cpu import (actor_config, build_engine, full_parameters, init_single_process, register_cpu,  # noqa: E402
                      rollout_batch, save_tiny_qwen2, train_step)

TARGET = "funcprobe.integrations.verl.ProbedFSDPEngineConfig"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    register_cpu()
    init_single_process()
    return save_tiny_qwen2(str(tmp_path_factory.mktemp("qwen2")))


def _config(funcprobe):
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    return omega_conf_to_dataclass(OmegaConf.create({"_target_": TARGET, "strategy": "fsdp2", "funcprobe": funcprobe}))


def test_options_come_through_verls_hydra_config():
    from funcprobe.integrations.verl import engine_options

    options = engine_options(_config({"every": 10, "gradient": "recompute", "chunk_size": 4, "mode": "vjp"}))
    assert (options.every, options.gradient, options.first_minibatch_only) == (10, "recompute", True)
    assert options.settings.chunk_size == 4 and options.settings.mode == "vjp"
    assert options.settings.step == "optimizer_step" and options.settings.progress is False


@pytest.mark.parametrize("funcprobe,match", [
    ({"evry": 10}, r"unknown option\(s\) \['evry'\]"),
    ({"every": 0}, "funcprobe.every: expected an int >= 1"),
    ({"gradient": "autograd"}, "funcprobe.gradient: expected one of"),
    ({"gradient": "recompute", "first_minibatch_only": False}, "first_minibatch_only"),
    ({"raise": "yes"}, "funcprobe.raise: expected true or false"),
    ({"weighting": "dr_grpo"}, "funcprobe.weighting: set by the plug-in"),
    ({"chunk_size": -1}, "chunk_size"),
    ({"effects": "yes"}, "effects: expected True or False"),
])
def test_bad_options_are_refused_by_name_when_the_config_is_built(funcprobe, match):
    with pytest.raises(Exception, match=match):
        _config(funcprobe)


def test_fsdp1_is_refused_by_name_before_the_model_is_built(model_path):
    import funcprobe.integrations.verl as plugin
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine import EngineRegistry

    plugin.install()
    engine = EngineRegistry.get_engine_cls("language_model", "fsdp")(
        model_config=HFModelConfig(path=model_path), engine_config=plugin.ProbedFSDPEngineConfig(strategy="fsdp"),
        optimizer_config=FSDPOptimizerConfig(lr=1e-3), checkpoint_config=CheckpointConfig())
    with pytest.raises(SettingsError, match=r"strategy='fsdp' \(FSDP1"):
        engine.initialize()
    assert not hasattr(engine, "module")  # refused before anything was built


def test_other_engines_are_refused_by_name():
    import funcprobe.integrations.verl as plugin
    from verl.workers.engine import BaseEngine, EngineRegistry

    class OtherEngine(BaseEngine):
        def __init__(self, *args, **kwargs):
            super().__init__()

    engines = EngineRegistry._engines["language_model"]
    engines["megatron_test"] = {"cpu": OtherEngine}
    try:
        plugin.install()
        with pytest.raises(SettingsError, match="the 'megatron_test' engine"):
            EngineRegistry.new("language_model", "megatron_test")
        from verl.workers.config import FSDPEngineConfig

        reference = FSDPEngineConfig(strategy="fsdp2", forward_only=True)  # a reference model is never probed
        assert type(EngineRegistry.new("language_model", "megatron_test", engine_config=reference)).__mro__[1] \
            is OtherEngine
    finally:
        del engines["megatron_test"]


@pytest.mark.parametrize("change,reason", [
    ("holes", "response_mask: differs from the attended response tokens in 1 row(s)"),
    ("temperature", "temperature: 0.7 != 1"),
    ("token_advantages", "advantages: vary along the response in 1 row(s)"),
    ("split_group", "uid: 2 prompt group(s) of this mini-batch are incomplete (e.g. uid 'p2': 3 of 4"),
])
def test_a_batch_the_probe_does_not_model_is_logged_and_verls_step_is_unchanged(model_path, caplog, change, reason):
    uids = ["p0"] * 4 + ["p1"] * 4 + ["p2"] * 3 + ["p3"] if change == "split_group" else None
    batch = rollout_batch(3, 4, uids=uids)
    if change == "holes":  # a tool token in the middle of row 0's response: attended, not trained
        batch.batch["response_mask"][0, 0] = 0
    if change == "token_advantages":  # e.g. GAE: one advantage per token
        lengths = batch.batch["response_mask"].sum(1)
        row = int((lengths > 1).nonzero()[0])
        batch.batch["advantages"][row, 0] += 0.5
    results = []
    for probed in (True, False):
        engine = build_engine(model_path, clip=1e-2, probed=probed)
        with caplog.at_level(logging.ERROR, logger="funcprobe"):
            out = train_step(engine, batch, actor_config(), temperature=0.7 if change == "temperature" else 1.0)
        results.append((full_parameters(engine), out["metrics"]))
    (params, metrics), (plain, _) = results
    assert metrics["funcprobe/failed"].aggregate() == 1.0 and "funcprobe/delta_h" not in metrics
    assert reason in caplog.text
    assert all(torch.equal(params[n], plain[n]) for n in params)


@pytest.mark.parametrize("setting,match", [({"strategy": "fsdp"}, "FSDP1"),
                                           ({"ulysses_sequence_parallel_size": 2}, "Ulysses"),
                                           ({"param_offload": True}, "param_offload"),
                                           ({"optimizer_offload": True}, "optimizer_offload")])
def test_build_refusals_name_each_unsupported_engine_setting(setting, match):
    from types import SimpleNamespace

    from funcprobe.integrations.verl import build_refusals

    config = SimpleNamespace(**{"strategy": "fsdp2", **setting})
    (refused,) = build_refusals(SimpleNamespace(engine_config=config))
    assert match in refused
    assert build_refusals(SimpleNamespace(engine_config=SimpleNamespace(strategy="fsdp2"))) == []
