#!/usr/bin/env bash
# GRPO in verl 0.9.1 with funcprobe's prediction of each actor step's entropy change, logged
# as actor/funcprobe/* next to verl's own metrics. The probe is enabled by configuration alone:
# the external_lib override (lines marked "funcprobe"); everything else is a plain verl GRPO
# run on FSDP2. Needs GPUs (vLLM rollouts) and verl's GSM8K parquet files
# (examples/data_preprocess/gsm8k.py in verl's repository); set DATA and MODEL.
#
#   pip install funcprobe "verl==0.9.1"   (plus verl's GPU extras: vllm, flash-attn)
#   DATA=$HOME/data/gsm8k MODEL=Qwen/Qwen2.5-0.5B-Instruct bash examples/verl_grpo_probe.sh
set -euo pipefail
DATA=${DATA:?set DATA to the folder with train.parquet and test.parquet}
MODEL=${MODEL:?set MODEL to a Hugging Face model id or a local folder}
NGPUS=${NGPUS:-1}

python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    data.train_files="$DATA/train.parquet" data.val_files="$DATA/test.parquet" \
    data.train_batch_size=64 data.max_prompt_length=512 data.max_response_length=512 \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.external_lib=funcprobe.integrations.verl `# funcprobe: the plug-in` \
    actor_rollout_ref.actor.strategy=fsdp2 `# funcprobe: FSDP2 only (FSDP1 is refused)` \
    actor_rollout_ref.actor.ppo_mini_batch_size=64 `# funcprobe: one mini-batch holds whole prompt groups` \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.loss_agg_mode=token-mean \
    actor_rollout_ref.actor.use_kl_loss=True actor_rollout_ref.actor.kl_loss_coef=0.001 \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.fsdp_config._target_=funcprobe.integrations.verl.ProbedFSDPEngineConfig `# funcprobe: options` \
    +actor_rollout_ref.actor.fsdp_config.funcprobe.every=5 `# funcprobe: probe every 5th actor step` \
    +actor_rollout_ref.actor.fsdp_config.funcprobe.chunk_size=4 `# funcprobe: prompts per probe forward` \
    actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.temperature=1.0 `# funcprobe: the probe refuses other temperatures` \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.5 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8 \
    trainer.n_gpus_per_node="$NGPUS" trainer.nnodes=1 \
    trainer.logger='["console"]' trainer.project_name=funcprobe trainer.experiment_name=grpo-probe \
    trainer.total_epochs=1 trainer.save_freq=-1 trainer.test_freq=-1 "$@"
