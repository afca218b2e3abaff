"""The pure core: maths over tensors and name→tensor pytrees.

Nothing here touches optimizer objects, ``torch.distributed``, module modes, adapters or
any global state; every function is pure in its tensor arguments. The edge
(``funcprobe.edge``) owns the side effects and hands the core a pure S(θ, batch).

| module | concept |
| --- | --- |
| ``rollouts`` | ``RolloutBatch``: B prompts × G responses |
| ``logprobs`` | S(θ): teacher-forced sequence log-probs through ``functional_call`` |
| ``objectives`` | LX and J as ``Objective`` values closed over their weighting |
| ``transforms`` | per-prompt directional derivatives (jvp / vjp) and summed gradients, in chunks |
| ``steps`` | step maps P (sgd, frozen_adam, adam_step) as values |
| ``statistics`` | ``EntropyPrediction``: mean s, δH, Var_E, SE, 95% interval |
| ``exact`` | exact response entropy by enumeration |
| ``pytree`` | ``optree`` helpers over name→tensor dicts |
"""
