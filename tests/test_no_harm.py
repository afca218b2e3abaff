"""The probe leaves the model, its .grads, modes, attention, adapter and optimizer as they were."""

import pytest
import torch

from funcprobe import EntropyProbe, ParamRegistry, conditional_variance
from funcprobe.forward.attention_impl import probe_attention
from helpers import gpt2, qwen2, random_direction, random_rollouts, rel_err


def _snapshot(model, opt):
    return dict(
        params={n: p.detach().clone() for n, p in model.named_parameters()},
        grads={n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        flags={n: p.requires_grad for n, p in model.named_parameters()},
        modes={n: m.training for n, m in model.named_modules()},
        attn=model.get_base_model().config._attn_implementation,
        adapters=list(model.active_adapters),
        opt={id_: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
             for id_, st in enumerate(opt.state[p] for g in opt.param_groups for p in g["params"])},
    )


def _assert_same(a, b):
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
        ga, gb = a["grads"][k], b["grads"][k]
        assert (ga is None and gb is None) or torch.equal(ga, gb), k
    assert a["flags"] == b["flags"] and a["modes"] == b["modes"]
    assert a["attn"] == b["attn"] and a["adapters"] == b["adapters"]
    for i in a["opt"]:
        for k, v in a["opt"][i].items():
            assert torch.equal(v, b["opt"][i][k]) if torch.is_tensor(v) else v == b["opt"][i][k]


def _trained(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:  # leave non-trivial .grads behind, as a trainer mid-step would
        p.grad = torch.randn_like(p)
    return opt


@pytest.mark.parametrize("mode", ["jvp", "vjp"])
def test_probe_changes_nothing(mode):
    model = gpt2()
    model.train()
    model.base_model.model.transformer.h[1].eval()  # mixed modes must come back exactly
    opt = _trained(model)
    before = _snapshot(model, opt)
    pred = EntropyProbe(model, opt, mode=mode).predict(random_rollouts(seed=1), random_rollouts(seed=2))
    assert pred.se > 0 and torch.isfinite(pred.s).all()
    _assert_same(before, _snapshot(model, opt))
    # also when the probe fails half-way through a forward
    def boom(*args):
        raise RuntimeError("boom in the middle of a forward")

    handle = model.base_model.model.transformer.h[1].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            EntropyProbe(model, opt, mode=mode).predict(random_rollouts(seed=1), random_rollouts(seed=2))
    finally:
        handle.remove()
    _assert_same(before, _snapshot(model, opt))


def test_fused_attention_is_switched_for_the_probe_and_restored():
    model = qwen2(attn="flex_attention")  # no forward AD / double backward on CPU
    opt = _trained(model)
    before = _snapshot(model, opt)
    E, U = random_rollouts(seed=1), random_rollouts(seed=2)
    pred = EntropyProbe(model, opt, mode="vjp").predict(E, U)
    _assert_same(before, _snapshot(model, opt))
    assert model.get_base_model().config._attn_implementation == "flex_attention"
    with probe_attention(model) as used:  # SDPA: in forward mode the jvp rules take it
        assert used == "sdpa" == model.get_base_model().config._attn_implementation
    assert model.get_base_model().config._attn_implementation == "flex_attention"
    model.get_base_model().set_attn_implementation("sdpa")
    ref = EntropyProbe(model, opt, mode="vjp").predict(E, U)
    assert rel_err(pred.s, ref.s) < 1e-6  # the same SDPA path both times: seen 0 (Qwen2's float32 softmax: 1e-6)


def test_fused_attention_falls_back_to_eager_and_refuses_what_does_not_switch(monkeypatch):
    model = qwen2(attn="flex_attention")
    base = model.get_base_model()
    setter = type(base).set_attn_implementation

    def no_sdpa(self, implementation):
        if implementation == "sdpa":
            raise ValueError("this model does not support SDPA")
        return setter(self, implementation)

    monkeypatch.setattr(type(base), "set_attn_implementation", no_sdpa)
    with probe_attention(model) as used:
        assert used == "eager" == base.config._attn_implementation
    assert base.config._attn_implementation == "flex_attention"
    monkeypatch.setattr(type(base), "set_attn_implementation", lambda self, implementation: None)  # warns, no-op
    with pytest.raises(RuntimeError, match="did not take effect"):
        with probe_attention(model):
            pass
    assert base.config._attn_implementation == "flex_attention"


def test_dropout_off_by_default_and_switchable():
    model = gpt2()  # dropout 0.1 in every GPT-2 block
    model.train()
    reg = ParamRegistry.from_model(model)
    E, mu = random_rollouts(), random_direction(reg)
    a = conditional_variance(model, E, mu, lr=1.0)
    b = conditional_variance(model, E, mu, lr=1.0)
    model.eval()
    c = conditional_variance(model, E, mu, lr=1.0)
    assert torch.equal(a.s, b.s) and torch.equal(a.s, c.s)
    model.train()
    torch.manual_seed(0)
    d = conditional_variance(model, E, mu, lr=1.0, keep_dropout=True)
    assert not torch.equal(d.s, a.s)
    assert model.training


@pytest.mark.parametrize("mode", ["jvp", "vjp"])
def test_no_grad_and_inference_mode_give_identical_results(mode):
    model = gpt2()
    opt = _trained(model)
    E, U = random_rollouts(seed=1), random_rollouts(seed=2)
    probe = EntropyProbe(model, opt, mode=mode)
    ref = probe.predict(E, U)
    with torch.no_grad():
        assert torch.equal(probe.predict(E, U).s, ref.s)
    with torch.inference_mode():
        E_inf, U_inf = random_rollouts(seed=1), random_rollouts(seed=2)  # inference tensors
        assert E_inf.input_ids.is_inference()
        assert torch.equal(probe.predict(E_inf, U_inf).s, ref.s)


def test_model_built_under_inference_mode_is_refused():
    with torch.inference_mode():
        model = gpt2()
    with pytest.raises(RuntimeError, match="created under torch.inference_mode"):
        conditional_variance(model, random_rollouts(), random_direction(ParamRegistry.from_model(model)), lr=1.0)


def test_input_require_grads_hooks_are_suspended_and_restored():
    model = qwen2()
    model.enable_input_require_grads()
    model.enable_input_require_grads()  # twice, as PEFT + TRL do: one hook is no longer tracked by a handle
    emb = model.get_input_embeddings()
    before = list(emb._forward_hooks.items())
    assert len(before) == 2
    mu = random_direction(ParamRegistry.from_model(model))
    for mode in ("jvp", "vjp"):
        r = conditional_variance(model, random_rollouts(), mu, lr=1.0, mode=mode)
        assert torch.isfinite(r.s).all()
    assert list(emb._forward_hooks.items()) == before
