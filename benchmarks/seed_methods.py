"""The seeds' autograd paths, reimplemented faithfully for comparison (not library code).

* ``seed_logprobs``: ``_compute_aligned_batch_logprobs`` of seed 001 §A: one forward of
  the flattened group on the live model, full ``[N, T, V]`` logits, float32
  ``log_softmax``, gather, generated-region slice, mask by multiplication, sum. One
  deliberate change: ``position_ids`` from the attention mask are passed (SPEC failure
  7), without which rotary/absolute-position models disagree on left-padded rows.
* ``seed_lx``: ``build_LX_vector_from_S`` of seed 001 §B.
* ``seeds_alpha``: ``compute_conditional_variance_over_E_alpha`` of seed 001 §C: per
  group ``L = Σ α·LX``, ``torch.autograd.grad(L, params, create_graph=True)``,
  contraction with μY, second ``torch.autograd.grad`` to α.
* ``seeds_s_boundary``: seed 000 §B, the first reverse pass fed ``grad_outputs = W =
  dL/dS`` at the S boundary.
* ``per_prompt_loop``: the naive reference, one backward per prompt, dot with μY.
* units: ``nograd_forward`` (S once under ``no_grad``) and ``forward_backward`` (one
  forward + backward of Σ LX).

μY is keyed by parameter name here (the seeds keyed it by ``id(p)``; no cost difference).
Every method runs under SDPA's MATH backend, as funcprobe does: the fused CPU kernels
support neither forward-mode AD nor double backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from funcprobe import RolloutBatch, sequence_logprobs
from funcprobe.edge.registry import ParamRegistry


def seed_logprobs(model, batch: RolloutBatch) -> torch.Tensor:
    B, G, T = batch.input_ids.shape
    flat = batch.input_ids.reshape(B * G, T)
    mask = batch.attention_mask.reshape(B * G, T).long()
    with torch.set_grad_enabled(True):
        logits = model(input_ids=flat, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       use_cache=False).logits
        log_probs = F.log_softmax(logits.float(), dim=-1)
        token_log_probs = log_probs[:, :-1].gather(2, flat[:, 1:].unsqueeze(-1)).squeeze(-1).view(B, G, T - 1)
        gen_start = batch.response_start - 1
        gen_masks = batch.response_mask[:, :, batch.response_start :].float()
        return (token_log_probs[:, :, gen_start:] * gen_masks).sum(dim=2)


def seed_weighted(S: torch.Tensor, batch: RolloutBatch, weighting: str) -> torch.Tensor:
    """S_w of seed 001 §B (dr_grpo: S / Lmax; per_token_avg: S / |y|)."""
    if weighting == "dr_grpo":
        return S / batch.max_len_tensor(S.dtype)
    return S / batch.response_lengths.to(S.dtype).clamp_min(1.0)


def seed_lx(S: torch.Tensor, batch: RolloutBatch, weighting: str) -> torch.Tensor:
    S_w = seed_weighted(S, batch, weighting)
    G = S.size(1)
    S_w_LOO = (S_w.sum(dim=1, keepdim=True) - S_w) / max(G - 1, 1)
    coeff = (S_w - S_w_LOO).detach()
    return -(coeff * S).mean(dim=1)


def _groups(batch: RolloutBatch, k: int):
    for i in range(0, batch.num_prompts, k):
        yield batch.select(i, min(i + k, batch.num_prompts))


def _live(model, names):
    named = dict(model.named_parameters())
    return [named[n] for n in names]


def seeds_alpha(model, names, batch, mu, weighting, group_size):
    params = _live(model, names)
    out = []
    for group in _groups(batch, group_size):
        L_vec = seed_lx(seed_logprobs(model, group), group, weighting)
        alpha = torch.ones_like(L_vec, requires_grad=True)
        L = (alpha * L_vec).sum()
        g_list = torch.autograd.grad(L, params, create_graph=True)
        h = sum((g * mu[n]).sum() for g, n in zip(g_list, names))
        out.append(torch.autograd.grad(h, alpha)[0].detach())
    return torch.cat(out)


def seeds_s_boundary(model, names, batch, mu, weighting, group_size):
    params = _live(model, names)
    out = []
    for group in _groups(batch, group_size):
        S = seed_logprobs(model, group)
        alpha = torch.ones(group.num_prompts, dtype=S.dtype, requires_grad=True)
        S_w = seed_weighted(S, group, weighting)
        G = S.shape[1]
        S_w_LOO = (S_w.sum(dim=1, keepdim=True) - S_w) / max(G - 1, 1)
        W = -(alpha.view(-1, 1) / float(G)) * (S_w - S_w_LOO).detach()
        g_list = torch.autograd.grad(outputs=S, inputs=params, grad_outputs=W, create_graph=True)
        h = sum((g * mu[n]).sum() for g, n in zip(g_list, names))
        out.append(torch.autograd.grad(h, alpha)[0].detach())
    return torch.cat(out)


def per_prompt_loop(model, names, batch, mu, weighting, group_size):
    params = _live(model, names)
    out = []
    for n in range(batch.num_prompts):
        one = batch.select(n, n + 1)
        lx = seed_lx(seed_logprobs(model, one), one, weighting)[0]
        grads = torch.autograd.grad(lx, params)
        out.append(sum((g.double() * mu[k].double()).sum() for g, k in zip(grads, names)))
    return torch.stack(out)


def nograd_forward(model, names, batch, mu, weighting, group_size):
    reg = ParamRegistry.from_model(model)
    with torch.no_grad():
        for group in _groups(batch, group_size):
            sequence_logprobs(reg.module, reg.params(reg.trainable), group)
    return None


def forward_backward(model, names, batch, mu, weighting, group_size):
    params = _live(model, names)
    named = dict(model.named_parameters())
    for group in _groups(batch, group_size):
        lx = seed_lx(sequence_logprobs(model, named, group), group, weighting)
        torch.autograd.grad(lx.sum(), params)
    return None
