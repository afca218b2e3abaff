"""The side-effect edge: everything that touches live objects, restored after use.

| module | concept |
| --- | --- |
| ``registry`` | ``ParamRegistry``: the canonical module (accelerate's unwrapping, FSDP refusal), the adapter, name→tensor pytrees, the pure S(θ, batch) handed to the core |
| ``session`` | ``probe_session``: modes, adapter, attention (``funcprobe.forward.attention_impl``), inference mode, input-require-grads hooks, all restored |
| ``sharding`` | how parameters are read, installed and iterated: ``Replica`` or ``FSDP2`` (equal chunk counts), the FSDP1/ZeRO-3 refusal |
| ``fsdp`` | FSDP2's mechanics: θ gathered in full, installed by hooks around the model's own forward |
| ``precision`` | the precision policy: bf16/fp16 models probed in float32, layer by layer |
| ``memory`` | the default chunk size from a memory budget |
| ``token_chunks`` | MLP blocks run on at most ``mlp_chunk`` tokens per call in forward mode |
| ``optim`` | reads a live ``torch.optim.Adam``/``AdamW`` by name into the core's step maps |
| ``distributed`` | ``Communicator``: handshake, all-reduce, gather over ``torch.distributed`` |
| ``progress`` | tqdm bars and the ``funcprobe`` logger |
| ``rng`` | ``seeded``: a seeded block that restores the CPU's and its CUDA device's generators |
"""
