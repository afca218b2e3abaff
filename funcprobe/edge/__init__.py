"""The side-effect edge: everything that touches live objects, restored after use.

| module | concept |
| --- | --- |
| ``registry`` | ``ParamRegistry``: the canonical module (accelerate's unwrapping, FSDP refusal), the adapter, name→tensor pytrees, the pure S(θ, batch) handed to the core |
| ``session`` | ``probe_session``: modes, adapter, attention (``funcprobe.forward.attention_impl``), inference mode, input-require-grads hooks, all restored |
| ``optim`` | reads a live ``torch.optim.Adam``/``AdamW`` by name into the core's step maps |
| ``distributed`` | ``Communicator``: handshake, all-reduce, gather over ``torch.distributed`` |
| ``progress`` | tqdm bars and the ``funcprobe`` logger |
| ``rng`` | ``seeded``: a seeded block that restores the CPU's and its CUDA device's generators |
"""
