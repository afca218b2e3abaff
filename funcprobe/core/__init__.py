"""The pure core: maths over tensors and name→tensor pytrees.

Nothing here touches optimizer objects, ``torch.distributed``, module modes, adapters or
any global state; every function is pure in its tensor arguments. The edge
(``funcprobe.edge``) owns the side effects and hands the core a pure S(θ, batch).

| module | concept |
| --- | --- |
| ``rollouts`` | ``RolloutBatch``: B prompts × G responses |
| ``logprobs`` | S(θ): teacher-forced sequence log-probs through ``functional_call`` |
| ``objectives`` | LX and J as ``Objective`` values closed over their weighting |
| ``transforms`` | per-prompt directional derivatives (jvp / vjp) and summed gradients over ``(chunk, keep)`` pairs |
| ``lm_head`` | the model cut into body and head; the head's values over token chunks (no full logits) |
| ``influence`` | the exact split of δH over the update batch (``StepSplit``, ``EntropyInfluence``) |
| ``steps`` | step maps P as typed values: optional global-norm clipping, then a coordinate-wise map |
| ``statistics`` | ``EntropyPrediction``: mean s, δH, Var_E, SE, 95% interval |
| ``advantages`` | rewards → group advantages (TRL's formula) |
| ``pytree`` | ``optree`` helpers over name→tensor dicts |
"""
