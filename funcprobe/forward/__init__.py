"""Forward-mode operators: what ``torch.func.jvp`` runs in place of PyTorch's generic formulas.

A layer of its own, below the core: these modules import torch (Triton: only
``triton``, and only when ``kernels="triton"`` is chosen) and ``funcprobe.errors``, nothing
else of funcprobe; ``funcprobe.core`` (logprobs, transforms) and ``funcprobe.edge``
(session) import them.

* ``rules``: the rules mode ``jvp_rules(kernels="off")`` (a ``TorchFunctionMode``, the
  dispatcher) and the generic Functions (linear, addmm, matmul, SiLU); ``KERNELS``;
* ``head``: the LM head's operator ``linear_logprobs`` (logits and the target's log-prob
  in one op, with its rule);
* ``attention``: attention maths: blockwise causal attention (online softmax in PyTorch)
  and SDPA's closed-form rule (``AttentionCall``, ``_Attention``);
* ``triton``: the Triton flash-attention kernels with a tangent (opt-in,
  ``kernels="triton"``), their torch operators registered on first use, never at import;
* ``attention_impl``: which attention a Hugging Face model runs in the probe's forwards
  (``probe_attention``, ``blockwise_attention`` context managers).
"""
