"""One rank of verl's ``TrainingWorker`` (in-process, without Ray) on CPU/gloo, with the probe
enabled by ``external_lib`` alone; run by the tests as a script, one process per rank:

    python run_worker.py MODEL_DIR OUT_JSON [fp64]  (env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)

Every rank builds the same GRPO batch (4 prompts x 4 responses) and keeps the rows ``rank::world``
(so each prompt's group is split across the ranks), trains one actor update on it
(``train_mini_batch``: one mini-batch) and writes the metrics verl returns (rank 0) and the
probe's δH seen on this rank to OUT_JSON. ``fp64``: the model loaded, computed and reduced in
float64 (verl's precision names stop at fp32: the test maps "fp64" to torch.float64 here, in
the test process only), so that 1 and 2 ranks can be compared beyond float32 summation order."""

import json
import os
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from verl_cpu import at_ratio_one, register_cpu, rollout_batch  # noqa: E402


def _allow_fp64() -> None:
    """verl's ``PrecisionType.to_dtype`` knows fp16/bf16/fp32 only; let it map "fp64" too."""
    from verl.utils.torch_dtypes import PrecisionType

    to_dtype = PrecisionType.to_dtype
    PrecisionType.to_dtype = staticmethod(lambda p: torch.float64 if p == "fp64" else to_dtype(p))


def main(model_dir: str, out_path: str, fp64: bool = False) -> None:
    register_cpu()
    if fp64:
        _allow_fp64()
    dtype = "fp64" if fp64 else "fp32"
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from verl.trainer.config import CheckpointConfig
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import FSDPActorConfig, FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.config.engine import TrainingWorkerConfig
    from verl.workers.engine_workers import TrainingWorker
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import left_right_2_no_padding

    imported_before = "funcprobe.integrations.verl" in sys.modules
    model = HFModelConfig(path=model_dir, override_config={"attn_implementation": "sdpa"}, use_remove_padding=True,
                          external_lib="funcprobe.integrations.verl")
    engine = FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False, use_dynamic_bsz=False,
                              micro_batch_size_per_gpu=4, seed=0, model_dtype=dtype,
                              mixed_precision={"param_dtype": dtype, "reduce_dtype": dtype, "buffer_dtype": dtype})
    worker = TrainingWorker(TrainingWorkerConfig(
        model_type="language_model", model_config=model, engine_config=engine,
        optimizer_config=FSDPOptimizerConfig(
            lr=1e-2, clip_grad=1e-2), checkpoint_config=CheckpointConfig()))
    worker.reset()
    config = FSDPActorConfig(strategy="fsdp2", rollout_n=4, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=4,
                             use_dynamic_bsz=False, loss_agg_mode="token-mean")
    worker.set_loss_fn(partial(ppo_loss, config=config))
    batch = at_ratio_one(worker.engine, rollout_batch(4, 4, seed=7))
    mine = batch[list(range(rank, len(batch), world))]
    td = left_right_2_no_padding(mine.to_tensordict())
    tu.assign_non_tensor(td, global_batch_size=len(batch), mini_batch_size=len(batch), epochs=1, seed=0,
                         dataloader_kwargs={"shuffle": False}, temperature=1.0, calculate_entropy=False,
                         compute_loss=True)
    out = worker.train_mini_batch(td)
    result = {"imported_before": imported_before, "engine": type(worker.engine).__name__,
              "rank_metrics": worker.engine.funcprobe_metrics,
              "param_dtypes": sorted({str(p.dtype) for p in worker.engine.module.parameters()})}
    if out is not None:
        metrics = tu.get(out, "metrics")
        result["metrics"] = {k: float(v[0] if isinstance(v, list) else v) for k, v in metrics.items()
                             if k.startswith("funcprobe/")}
    Path(out_path).write_text(json.dumps(result))
    # leave without tearing down: the FSDP2 engine holds the process group, and gloo's threads that
    # outlive the interpreter abort it at exit ("terminate called without an active exception", seen
    # with examples/probe_fsdp2_torchrun.py); the result is written (the same as tests/test_distributed.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[3:] not in ([], ["fp64"]):
        sys.exit(f"usage: run_worker.py MODEL_DIR OUT_JSON [fp64]; got {sys.argv[3:]}")
    main(sys.argv[1], sys.argv[2], fp64=sys.argv[3:] == ["fp64"])
