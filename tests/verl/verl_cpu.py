"""Test-side support for running verl 0.9.1's FSDP2 engine on CPU (gloo): a CPU platform and the
language-model engine registered for ``cpu``. Only the tests do this; funcprobe never registers a
platform."""

from __future__ import annotations

import os
from contextlib import contextmanager
from types import ModuleType

import torch


def register_cpu() -> None:
    """Make verl run on CPU in this process: a CPU platform (set as verl's current platform) and
    verl's ``FSDPEngineWithLMHead`` registered for device ``cpu``. Idempotent."""
    from verl.plugin.platform import platform_manager
    from verl.plugin.platform.platform_cuda import PlatformCUDA
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    class PlatformCPU(PlatformCUDA):
        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self) -> ModuleType:
            return _CpuModule

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check=False) -> bool:
            return True

        def current_device(self) -> torch.device:
            return torch.device("cpu")  # verl moves tensors to `current_device()`: an int would mean an accelerator

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            pass

        def synchronize(self, device_index=None) -> None:
            pass

        def manual_seed(self, seed: int) -> None:
            pass

        def manual_seed_all(self, seed: int) -> None:
            pass

        def set_allocator_settings(self, settings: str) -> None:
            pass

        def empty_cache(self) -> None:
            pass

        def get_device_capability(self, device_index: int = 0):
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def is_ipc_supported(self) -> bool:
            return False

        @contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            pass

        def profiler_stop(self) -> None:
            pass

    current = platform_manager._current_platform
    if current is None or current.device_name != "cpu":
        platform_manager.set_platform(PlatformCPU())
    engines = EngineRegistry._engines["language_model"]
    for backend in ("fsdp", "fsdp2"):
        engines[backend].setdefault("cpu", FSDPEngineWithLMHead)


class _CpuModule:
    """What verl reads from ``torch.cuda`` through the platform, for a CPU run."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(*args) -> None:
        pass

    @staticmethod
    def synchronize(*args) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def get_device_name(*args) -> str:
        return "CPU"

    @staticmethod
    def max_memory_allocated(*args) -> int:
        return 0

    @staticmethod
    def max_memory_reserved(*args) -> int:
        return 0

    @staticmethod
    def memory_allocated(*args) -> int:
        return 0

    @staticmethod
    def memory_reserved(*args) -> int:
        return 0

    @staticmethod
    def mem_get_info(*args):
        return (0, 0)

    @staticmethod
    def get_rng_state(*args):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, *args):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        pass

    @staticmethod
    def manual_seed_all(seed):
        pass


def init_single_process(port: int = 29611) -> None:
    """A one-rank gloo process group (world size 1), as verl's workers expect."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group("gloo", rank=0, world_size=1)


def save_tiny_qwen2(path: str, vocab: int = 32, seed: int = 0) -> str:
    """A random 2-layer Qwen2 (and a word-level tokenizer) saved to ``path``, for verl to load."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2,
                      bos_token_id=None, tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    words = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                            eos_token="[EOS]").save_pretrained(path)
    return path


def rollout_batch(num_prompts: int, group: int, *, seed: int = 0, vocab: int = 32, prompt_len: int = 4,
                  response_len: int = 5, uids: list | None = None, scores: bool = False):
    """A GRPO batch in the layout verl's trainer hands to ``update_actor`` (before
    ``left_right_2_no_padding``): ``input_ids``/``attention_mask``/``position_ids`` ``[N, P + R]``
    (prompts left-padded, responses right-padded), ``responses``/``response_mask``/``old_log_probs``/
    ``advantages`` ``[N, R]`` (advantage constant over each response), ``uid`` per row; G consecutive
    rows per prompt; with ``scores``, ``token_level_scores`` ``[N, R]`` (each response's 0/1 reward at
    its last token, as verl's reward manager places it). Returns a verl ``DataProto``."""
    import numpy as np
    from verl import DataProto

    gen = torch.Generator().manual_seed(seed)
    N, P, R = num_prompts * group, prompt_len, response_len
    prompt_lens = torch.randint(1, P + 1, (num_prompts,), generator=gen).repeat_interleave(group)
    prompt_mask = (torch.arange(P) >= (P - prompt_lens)[:, None]).long()
    prompt_ids = torch.where(prompt_mask.bool(), torch.randint(3, vocab, (N, P), generator=gen), 0)
    resp_lens = torch.randint(1, R + 1, (N,), generator=gen)
    response_mask = (torch.arange(R) < resp_lens[:, None]).long()
    responses = torch.where(response_mask.bool(), torch.randint(3, vocab, (N, R), generator=gen), 0)
    rewards = torch.randint(0, 2, (num_prompts, group), generator=gen).double()
    rewards[0, 0], rewards[0, 1] = 0.0, 1.0  # signal in the first prompt at least
    adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)
    advantages = adv.reshape(N, 1).float() * response_mask
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    uid = np.array(uids if uids is not None else [f"p{i // group}" for i in range(N)], dtype=object)
    tensors = {"input_ids": torch.cat([prompt_ids, responses], 1), "attention_mask": attention_mask,
               "position_ids": position_ids, "prompts": prompt_ids, "responses": responses,
               "response_mask": response_mask, "old_log_probs": torch.zeros(N, R), "advantages": advantages}
    if scores:
        tensors["token_level_scores"] = torch.zeros(N, R).scatter(1, (resp_lens - 1)[:, None],
                                                                  rewards.reshape(N, 1).float())
    return DataProto.from_dict(tensors=tensors, non_tensors={"uid": uid})


def build_engine(path: str, *, lora: bool = False, remove_padding: bool = True, clip: float = 1.0,
                 funcprobe: dict | None = None, probed: bool = True, param_dtype: str = "fp32", lr: float = 1e-2,
                 micro_batch: int = 4):
    """verl's FSDP2 language-model engine for the model saved at ``path``, built and initialised
    (``probed``: with ``ProbedFSDPEngineConfig`` and the plug-in installed; else verl's own engine
    class, straight from ``FSDPEngineWithLMHead``). ``param_dtype``: FSDP2's compute dtype (verl's
    default is bf16; fp32 here unless asked)."""
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    model = HFModelConfig(path=path, override_config={"attn_implementation": "sdpa"}, use_remove_padding=remove_padding,
                          lora_rank=4 if lora else 0, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    common = dict(strategy="fsdp2", use_torch_compile=False, use_dynamic_bsz=False, micro_batch_size_per_gpu=micro_batch,
                  use_remove_padding=remove_padding, seed=0,
                  mixed_precision={"param_dtype": param_dtype, "reduce_dtype": "fp32", "buffer_dtype": "fp32"})
    optim = FSDPOptimizerConfig(lr=lr, clip_grad=clip, weight_decay=0.01)
    if probed:
        import funcprobe.integrations.verl as plugin

        plugin.install()
        engine_config = plugin.ProbedFSDPEngineConfig(funcprobe=dict(funcprobe or {}), **common)
        from verl.workers.engine import EngineRegistry

        cls = EngineRegistry.get_engine_cls("language_model", "fsdp2")
    else:
        engine_config = FSDPEngineConfig(**common)
        cls = FSDPEngineWithLMHead
    torch.manual_seed(0)
    engine = cls(model_config=model, engine_config=engine_config, optimizer_config=optim,
                 checkpoint_config=CheckpointConfig())
    engine.initialize()
    return engine


def actor_config(loss_agg_mode: str = "token-mean", **kwargs):
    """verl's ``FSDPActorConfig`` of the loss (``ppo_loss``'s ``config``)."""
    from verl.workers.config import FSDPActorConfig

    return FSDPActorConfig(strategy="fsdp2", rollout_n=4, ppo_mini_batch_size=2, ppo_micro_batch_size_per_gpu=4,
                           use_dynamic_bsz=False, loss_agg_mode=loss_agg_mode, **kwargs)


def train_step(engine, batch, config, *, remove_padding: bool = True, global_batch_size: int | None = None,
               last_minibatch: bool = True, micro_batch: int = 4, temperature: float = 1.0):
    """One actor optimizer step of verl on ``batch`` (a ``DataProto`` from ``rollout_batch``), as
    ``TrainingWorker.train_batch`` runs it: the trainer's ``left_right_2_no_padding``, the engine's
    ``train_batch`` with ``ppo_loss``. Returns the engine's outputs (``metrics``)."""
    from functools import partial

    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import left_right_2_no_padding

    td = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(td, global_batch_size=global_batch_size or len(batch), temperature=temperature,
                         calculate_entropy=False, use_remove_padding=remove_padding,
                         micro_batch_size_per_gpu=micro_batch, use_dynamic_bsz=False, compute_loss=True,
                         update_lr_scheduler=last_minibatch)
    with engine.train_mode():
        return engine.train_batch(td, loss_function=partial(ppo_loss, config=config))


def full_parameters(engine) -> dict[str, torch.Tensor]:
    """The engine's trainable parameters, unsharded copies (name as the FSDP2 module names them)."""
    out = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = t.detach().clone()
    return out


def at_ratio_one(engine, batch, *, remove_padding: bool = True, micro_batch: int = 4):
    """``batch`` with ``old_log_probs`` = the engine's own log-probs of the responses now (verl's
    ``compute_log_prob`` path: ``infer_batch``), so the step's ratios are 1."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    td = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(td, temperature=1.0, calculate_entropy=False, use_remove_padding=remove_padding,
                         micro_batch_size_per_gpu=micro_batch, use_dynamic_bsz=False, compute_loss=False,
                         global_batch_size=len(batch))
    with engine.eval_mode():
        out = engine.infer_batch(td)
    log_probs = no_padding_2_padding(out["model_output"]["log_probs"], td).detach().float()
    batch.batch["old_log_probs"] = log_probs * batch.batch["response_mask"]
    return batch
