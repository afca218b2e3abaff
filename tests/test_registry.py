"""Parameter registry: selections, wrappers, tied weights, adapters and LoRA tangents."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig
from torch.func import jvp

from funcprobe import ParamRegistry, conditional_variance, sequence_logprobs, unwrap_model
from funcprobe.edge.session import probe_session
from helpers import gpt2, qwen2, random_direction, random_rollouts, reference_s, rel_err


def test_selections():
    model = gpt2()
    lora = ParamRegistry.from_model(model, params="lora")
    trainable = ParamRegistry.from_model(model, params="trainable")
    assert lora.names == trainable.names and all(".lora_" in n for n in lora.names)
    assert len(lora.names) == 12 and lora.numel() > 0  # (c_attn, attn.c_proj, mlp.c_proj) x A,B x 2 layers
    assert set(lora.frozen).isdisjoint(lora.trainable)
    assert len(lora.frozen) + len(lora.trainable) == len(dict(model.named_parameters()))
    name = "base_model.model.transformer.h.0.mlp.c_fc.weight"
    explicit = ParamRegistry.from_model(model, params=[name])
    assert explicit.names == [name] and explicit.trainable[name].data_ptr() == dict(model.named_parameters())[name].data_ptr()
    with pytest.raises(KeyError, match="not parameters of the model.*nope"):
        ParamRegistry.from_model(model, params=["nope"])
    with pytest.raises(ValueError, match="params: expected 'trainable', 'lora'"):
        ParamRegistry.from_model(model, params="all")
    with pytest.raises(ValueError, match="no LoRA weights"):
        ParamRegistry.from_model(gpt2(lora=False), params="lora")
    with pytest.raises(ValueError, match="params: the explicit list of parameter names is empty"):
        ParamRegistry.from_model(model, params=[])
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        ParamRegistry.from_model("gpt2")
    with pytest.raises(ValueError, match="adapter: 'x' was named but the model is not a peft.PeftModel"):
        ParamRegistry.from_model(gpt2(lora=False), adapter="x")
    with pytest.raises(ValueError, match="adapter: 'x' not found"):
        ParamRegistry.from_model(model, adapter="x")


def test_tied_lm_head_through_functional_call():
    model = gpt2(lora=False)
    name = "transformer.wte.weight"
    reg = ParamRegistry.from_model(model, params=[name])
    assert "lm_head.weight" not in reg.trainable and "lm_head.weight" not in reg.frozen
    E = random_rollouts(B=3, G=2)
    mu = random_direction(reg)
    r = conditional_variance(reg, E, mu, lr=1.0)
    assert rel_err(r.s, reference_s(model, E, mu)) < 1e-10  # autograd sees both uses of wte (float64: seen 4e-16)


def test_lora_tensors_receive_tangents():
    model = qwen2()
    reg = ParamRegistry.from_model(model, params="lora")
    E = random_rollouts(B=2, G=2)
    with probe_session(reg):
        for name, value in reg.trainable.items():
            tangent = {k: torch.zeros_like(v) for k, v in reg.trainable.items()}
            tangent[name] = torch.ones_like(value)
            _, dS = jvp(lambda t: sequence_logprobs(reg.module, reg.params(t), E), (reg.trainable,), (tangent,))
            assert dS.abs().min() > 0, name


def test_named_inactive_adapter_is_probed_and_state_restored():
    model = gpt2()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True))
    model.set_adapter("other")
    model.to(torch.float64)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    reg = ParamRegistry.from_model(model, params="lora", adapter="default")
    assert reg.names and all(".default." in n for n in reg.names)
    E = random_rollouts(B=3, G=2)
    mu = random_direction(reg)
    r = conditional_variance(reg, E, mu, lr=1.0)
    assert model.active_adapters == ["other"]
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    twin = copy.deepcopy(model)
    twin.set_adapter("default")
    assert rel_err(r.s, reference_s(twin, E, mu)) < 1e-10  # float64: seen 1.5e-15
    twin.set_adapter("other")  # probing "other" instead gives other numbers
    with pytest.raises(KeyError):
        conditional_variance(twin, E, mu, lr=1.0, params="lora")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_wrapped_model_gives_identical_s():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = gpt2()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert unwrap_model(ddp) is model
        E = random_rollouts(B=3, G=2)
        reg = ParamRegistry.from_model(ddp)
        assert reg.module is model
        mu = random_direction(reg)
        wrapped = conditional_variance(ddp, E, mu, lr=1.0)
        bare = conditional_variance(model, E, mu, lr=1.0)
        assert torch.equal(wrapped.s, bare.s)
        assert all(p.grad is None for p in model.parameters())
    finally:
        dist.destroy_process_group()
