"""Local checkpoints, rollout files, the command line, plots, progress/logging, TRL."""

import json
import math
import subprocess
import sys

import pytest
import torch

from funcprobe import EntropyProbe, conditional_variance
from funcprobe.io.checkpoints import load_optimizer_state, load_policy, load_tokenizer
from funcprobe.core.advantages import group_advantages
from funcprobe.io.rollout_files import read_rollouts, read_rollouts_and_rewards, write_rollouts
from helpers import gpt2, rel_err

WORDS = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(29)]
LMAX = 6


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def _rollouts(seed, B=5, G=3):
    gen = torch.Generator().manual_seed(seed)
    rint = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    prompts = [torch.randint(3, len(WORDS), (rint(2, 5),), generator=gen).tolist() for _ in range(B)]
    responses = [[torch.randint(3, len(WORDS), (rint(1, LMAX),), generator=gen).tolist() for _ in range(G)]
                 for _ in range(B)]
    rewards = torch.rand(B, G, generator=gen).tolist()
    return prompts, responses, rewards


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny Qwen2 model, LoRA adapter, tokenizer, optimizer state and rollout files."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    base = Qwen2ForCausalLM(cfg)
    base.save_pretrained(root / "model")
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(root / "adapter")
    _tokenizer().save_pretrained(root / "tokenizer")
    model = load_policy(root / "model", root / "adapter", dtype="float64")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()
    torch.save(opt.state_dict(), root / "optimizer.pt")
    for name, seed in (("E", 1), ("U", 2)):
        prompts, responses, rewards = _rollouts(seed)
        write_rollouts(root / f"{name}.jsonl", prompts, responses, rewards=rewards)
    return root


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "funcprobe", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_matches_the_library_call(workspace, tmp_path):
    w = workspace
    out, png = tmp_path / "out.json", tmp_path / "probe.png"
    proc = _cli("probe", "--model", w / "model", "--adapter", w / "adapter", "--eval", w / "E.jsonl",
                "--update", w / "U.jsonl", "--optimizer-state", w / "optimizer.pt", "--step", "adam_step",
                "--weighting", "dr_grpo", "--max-completion-length", LMAX, "--dtype", "float64",
                "--json", out, "--plot", png, "--no-progress", "--effects")
    assert proc.returncode == 0, proc.stderr
    assert "predicted dH" in proc.stdout and "SE_E" in proc.stdout
    assert "entropy_token_mean" in proc.stdout and "reward" in proc.stdout  # --effects, E's file has rewards
    got = json.loads(out.read_text())
    model = load_policy(w / "model", w / "adapter", dtype="float64")
    opt = load_optimizer_state(w / "optimizer.pt", model)
    from_dir = load_optimizer_state(w, model)  # an HF Trainer checkpoint-N/ directory: its optimizer.pt
    assert all(torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) for a, b in zip(opt.state.values(), from_dir.state.values()))
    with pytest.raises(FileNotFoundError, match="has no optimizer.pt"):
        load_optimizer_state(w / "adapter", model)
    E = read_rollouts(w / "E.jsonl", max_len=LMAX)
    U = read_rollouts(w / "U.jsonl", max_len=LMAX)
    _, rewards_E = read_rollouts_and_rewards(w / "E.jsonl", max_len=LMAX)
    ref = EntropyProbe(model, opt, step="adam_step", weighting="dr_grpo", effects=True).predict(E, U, rewards=rewards_E)
    assert got["lr"] == 1e-3 and got["step"] == "adam_step" and got["num_prompts"] == 5
    for key in ("delta_h", "se", "mean_s", "var", "step_norm"):  # float64 both sides, JSON exact: seen 0
        assert rel_err(got[key], ref.to_dict()[key]) < 1e-9, key
    assert set(got["effects"]["effects"]) == set(ref.effects.effects) and "reward" in ref.effects.effects
    for name, e in ref.effects.effects.items():  # float64 both sides: 1e-9
        assert rel_err(got["effects"]["effects"][name]["value"], e.value) < 1e-9, name
    assert png.stat().st_size > 5000


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: ["--model", w / "missing"], "--model: .* does not exist"),
        (lambda w: ["--model", w / "tokenizer"], "has no config.json"),
        (lambda w: ["--eval", w / "bad.jsonl"], "bad.jsonl:2: not valid JSON"),
        (lambda w: ["--optimizer-state", w / "E.jsonl"], "not a torch optimizer state_dict"),
        (lambda w: ["--max-completion-length", None], "--max-completion-length: weighting dr_grpo needs Lmax"),
    ],
)
def test_cli_reports_malformed_input(workspace, change, message):
    w = workspace
    (w / "bad.jsonl").write_text((w / "E.jsonl").read_text().splitlines()[0] + "\n{not json\n")
    args = {"--model": w / "model", "--adapter": w / "adapter", "--eval": w / "E.jsonl", "--update": w / "U.jsonl",
            "--optimizer-state": w / "optimizer.pt", "--max-completion-length": LMAX}
    override = change(w)
    args[override[0]] = override[1]
    flat = [x for k, v in args.items() if v is not None for x in (k, v)]
    proc = _cli("probe", *flat, "--no-progress")
    assert proc.returncode == 2
    import re

    assert re.search(message, proc.stderr), proc.stderr
    # --no-progress: one line, no loading bars, no warnings, no traceback
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("funcprobe probe: error: "), proc.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w, t: ["--json", t], "--json: .* is a directory"),
        (lambda w, t: ["--plot", t / "no" / "p.png"], "--plot: the folder .* does not exist"),
        (lambda w, t: ["--device", "banana"], "--device: 'banana' is not a torch device"),
        (lambda w, t: ["--tokenizer", t], "--tokenizer: .* has no tokenizer files"),
        (lambda w, t: ["--optimizer-state", w / "E.jsonl"], r"--optimizer-state: .*\(torch.load failed: \w+\)$"),
        (lambda w, t: ["--eval", w / "latin1.jsonl"], "rollouts: .* is not UTF-8 text"),
        (lambda w, t: ["--step", "optimizer_step", "--lr", "0.1"], "lr: step='optimizer_step'"),
        (lambda w, t: ["--chunk-size", "0"], "chunk_size: expected an int >= 1"),
    ],
)
def test_cli_checks_outputs_devices_and_files_first(workspace, tmp_path, capsys, change, message):
    """In-process: every user error is one line naming the flag, exit status 2, before any work."""
    import re

    from funcprobe.apps.cli import main

    w = workspace
    (w / "latin1.jsonl").write_bytes("{\"prompt\": \"caf\u00e9\"}\n".encode("latin-1"))
    args = {"--model": w / "model", "--adapter": w / "adapter", "--eval": w / "E.jsonl", "--update": w / "U.jsonl",
            "--optimizer-state": w / "optimizer.pt", "--max-completion-length": LMAX}
    extra = change(w, tmp_path)
    for k, v in zip(extra[::2], extra[1::2]):
        args[k] = v
    code = main(["probe", *[str(x) for k, v in args.items() for x in (k, v)]])
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err.strip().splitlines()[-1]), err
    assert "Traceback" not in err


def test_cli_on_cuda_without_cuda_is_a_user_error(workspace, capsys):
    from funcprobe.apps.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    w = workspace
    code = main(["probe", "--model", str(w / "model"), "--eval", str(w / "E.jsonl"), "--update", str(w / "U.jsonl"),
                 "--lr", "0.1", "--step", "sgd", "--weighting", "per_token_avg", "--device", "cuda"])
    assert code == 2 and "--device: 'cuda' but this torch build has no CUDA" in capsys.readouterr().err


def test_trailing_blank_lines_in_rollout_files_are_fine(workspace, tmp_path):
    text = (workspace / "E.jsonl").read_text()
    (tmp_path / "E.jsonl").write_text(text.rstrip("\n") + "\n\n\n")
    a = read_rollouts(workspace / "E.jsonl", max_len=LMAX)
    b = read_rollouts(tmp_path / "E.jsonl", max_len=LMAX)
    assert torch.equal(a.input_ids, b.input_ids)
    (tmp_path / "mid.jsonl").write_text(text.replace("\n", "\n\n", 1))
    with pytest.raises(ValueError, match="mid.jsonl:2: empty line"):
        read_rollouts(tmp_path / "mid.jsonl", max_len=LMAX)


def test_demo_bad_options_are_user_errors(capsys):
    from funcprobe.apps.cli import main

    assert main(["demo", "--prompts", "0"]) == 2
    assert "prompts: expected an int >= 1" in capsys.readouterr().err
    assert main(["demo", "--lr", "-1"]) == 2
    assert "lr: expected a finite number > 0" in capsys.readouterr().err


def test_cli_help_is_complete():
    proc = _cli("probe", "--help")
    assert proc.returncode == 0
    for flag in ("--model", "--adapter", "--eval", "--update", "--optimizer-state", "--lr", "--step", "--weighting",
                 "--json", "--plot", "--tokenizer", "--max-completion-length", "--keep-dropout", "--no-progress"):
        assert flag in proc.stdout, flag


def test_rollout_file_errors_name_the_line(tmp_path):
    good = {"prompt_ids": [3, 4], "responses": [{"ids": [5], "reward": 1.0}, {"ids": [6, 7], "reward": 0.0}]}
    cases = [
        ("[1, 2]", "r.jsonl:2: expected a JSON object"),
        (json.dumps({**good, "extra": 1}), "unknown key"),
        (json.dumps({"responses": good["responses"]}), "exactly one of 'prompt_ids' and 'prompt'"),
        (json.dumps({**good, "prompt_ids": []}), "the prompt is empty"),
        (json.dumps({**good, "prompt_ids": [1, -2]}), "non-negative integer token ids"),
        (json.dumps({**good, "responses": good["responses"][:1]}), "at least 2"),
        (json.dumps({**good, "responses": [{"ids": [5]}, {"ids": [6], "reward": 0}]}), "exactly one of 'reward'"),
        (json.dumps({**good, "responses": [{"ids": [], "reward": 1}, {"ids": [6], "reward": 0}]}), "response 0: the response is empty"),
        (json.dumps({**good, "responses": [{"ids": [5], "reward": "x"}, {"ids": [6], "reward": 0}]}), "finite number"),
        (json.dumps({**good, "responses": [{"ids": [5], "reward": 1}, {"ids": [6], "advantage": 0}]}), "mixes"),
        (json.dumps({"prompt": "w3 w4", "responses": good["responses"]}), "a tokenizer is needed"),
    ]
    for text, message in cases:
        f = tmp_path / "r.jsonl"
        f.write_text(json.dumps(good) + "\n" + text + "\n" if text else json.dumps(good) + "\n\n")
        with pytest.raises(ValueError, match=message):
            read_rollouts(f)
    f.write_text(json.dumps(good) + "\n" + json.dumps({**good, "responses": good["responses"] * 2}) + "\n")
    with pytest.raises(ValueError, match=r"r.jsonl:2: 4 responses, but earlier lines have G = 2"):
        read_rollouts(f)
    with pytest.raises(FileNotFoundError):
        read_rollouts(tmp_path / "none.jsonl")


def test_rollout_files_text_and_advantages(workspace, tmp_path):
    tok = load_tokenizer(workspace / "tokenizer")
    lines = [{"prompt": "w3 w4 w5", "responses": [{"text": "w6 w7", "reward": 1.0}, {"text": "w8", "reward": 0.0},
                                                  {"text": "w9 w9 w9", "reward": 0.5}]}]
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    b = read_rollouts(f, tokenizer=tok, max_len=4)
    assert b.input_ids[0, 0].tolist()[:5] == [6, 7, 8, 9, 10] and b.response_lengths.tolist() == [[2, 1, 3]]
    r = torch.tensor([[1.0, 0.0, 0.5]], dtype=torch.float64)
    # the same float formulas: seen exactly equal (default rtol 1e-5)
    assert torch.allclose(b.advantages, (r - r.mean()) / (r.std() + 1e-4))  # TRL's group normalisation
    assert torch.allclose(read_rollouts(f, tokenizer=tok, scale_rewards="none").advantages, r - r.mean())
    assert torch.allclose(group_advantages(r, "none"), r - r.mean())
    write_rollouts(f, [[3]], [[[4], [5]]], advantages=[[0.25, -0.25]])
    assert read_rollouts(f).advantages.tolist() == [[0.25, -0.25]]


def test_checkpoint_errors_and_named_optimizer_state(workspace, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(tmp_path / "nothing")
    with pytest.raises(ValueError, match="adapter_dir: .* has no adapter_config.json"):
        load_policy(workspace / "model", workspace / "model")
    with pytest.raises(ValueError, match="dtype: expected one of"):
        load_policy(workspace / "model", dtype="int8")
    model = load_policy(workspace / "model", workspace / "adapter", dtype="float64")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.Adam(list(reversed(named)), lr=2e-3)  # param_names saved, order reversed
    for _, p in named:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "named.pt")
    back = load_optimizer_state(tmp_path / "named.pt", model)
    live = dict(named)
    for n, p in named:
        assert torch.equal(back.state[p]["exp_avg"], opt.state[live[n]]["exp_avg"])
    short = torch.optim.Adam([named[0][1]], lr=1e-3)
    torch.save(short.state_dict(), tmp_path / "short.pt")
    with pytest.raises(ValueError, match="holds 1 parameters but the model has"):
        load_optimizer_state(tmp_path / "short.pt", model)


def test_library_prints_nothing_and_progress_bar_runs(workspace, capsys):
    from funcprobe import update_direction

    model = load_policy(workspace / "model", workspace / "adapter", dtype="float64")
    E = read_rollouts(workspace / "E.jsonl", max_len=LMAX)
    mu = update_direction(model, read_rollouts(workspace / "U.jsonl", max_len=LMAX), step="sgd", chunk_size=2)
    a = conditional_variance(model, E, mu, lr=0.1, chunk_size=2, progress=True)
    b = conditional_variance(model, E, mu, lr=0.1, chunk_size=2, progress=False)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "funcprobe s[n]" in captured.err  # the tqdm bar
    assert torch.equal(a.s, b.s)


def test_plot_is_written(workspace, tmp_path):
    from funcprobe.apps.plots import plot_probe

    model = load_policy(workspace / "model", workspace / "adapter", dtype="float64")
    E = read_rollouts(workspace / "E.jsonl", max_len=LMAX)
    res = EntropyProbe(model, lr=0.1, step="sgd").predict(E, read_rollouts(workspace / "U.jsonl", max_len=LMAX))
    path = plot_probe(res, tmp_path / "p.png")
    assert path.stat().st_size > 5000


def test_trl_grpo_trainer_logs_the_probe(workspace, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig

    from funcprobe.integrations.trl import ProbedGRPOTrainer

    model = load_policy(workspace / "model", workspace / "adapter", dtype="float32")
    tok = load_tokenizer(workspace / "tokenizer")
    data = Dataset.from_dict({"prompt": [f"w{3 + i} w{4 + i} w{5 + i}" for i in range(8)]})

    def reward_short(completions, **kwargs):  # varies with the tokens drawn, so advantages are not all 0
        return [-float(len(c)) for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=LMAX, max_steps=2, logging_steps=1, report_to="none", use_cpu=True,
                      learning_rate=1e-2, loss_type="dr_grpo", save_strategy="no", seed=0, bf16=False)
    trainer = ProbedGRPOTrainer(model=model, reward_funcs=reward_short, args=args, train_dataset=data,
                                processing_class=tok, probe_every=1)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "funcprobe/delta_h" in h]
    assert len(logged) == 2, trainer.state.log_history
    for h in logged:
        for key in ("funcprobe/delta_h", "funcprobe/se", "funcprobe/ci95_low", "funcprobe/ci95_high", "entropy"):
            assert key in h and math.isfinite(h[key]), (key, h)
        assert h["funcprobe/ci95_low"] <= h["funcprobe/delta_h"] <= h["funcprobe/ci95_high"]
        assert h["funcprobe/se"] > 0


def test_trl_probe_failures_are_logged_and_training_goes_on(caplog):
    pytest.importorskip("trl")
    """Only a batch with no signal is a quiet skip; any other failure is logged by name
    (and counted) instead of stopping the run, unless probe_raise=True."""
    from types import SimpleNamespace

    from funcprobe.integrations.trl import ProbedGRPOTrainer
    from funcprobe.settings import ProbeSettings

    model = gpt2()
    B, G, P, C = 2, 2, 3, 4
    batch = {"prompt_ids": torch.randint(1, 30, (B * G, P)), "prompt_mask": torch.ones(B * G, P, dtype=torch.long),
             "completion_ids": torch.randint(1, 30, (B * G, C)), "completion_mask": torch.ones(B * G, C, dtype=torch.long),
             "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5])}

    def fake(optimizer, advantages=None, probe_raise=False, step="adam_step"):
        b = dict(batch, advantages=batch["advantages"] if advantages is None else advantages)
        trainer = SimpleNamespace(_funcprobe_batch=b, loss_type="grpo", num_generations=G,
                                  args=SimpleNamespace(max_completion_length=C), model=model, optimizer=optimizer,
                                  probe_settings=ProbeSettings(step=step, progress=False),
                                  probe_raise=probe_raise, probe_gradient="recompute",
                                  state=SimpleNamespace(global_step=7), funcprobe_history=[],
                                  _funcprobe_window=[], _funcprobe_failed=0)
        trainer.record = lambda metrics, step_number: ProbedGRPOTrainer.record(trainer, metrics, step_number)
        return trainer

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ok = fake(opt)
    metrics = ProbedGRPOTrainer.run_probe(ok)
    assert metrics is not None and all(math.isfinite(v) for v in metrics.values())
    quiet = fake(opt, advantages=torch.zeros(4), step="sgd")
    assert ProbedGRPOTrainer.run_probe(quiet) is None and quiet._funcprobe_failed == 0
    broken = fake(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    with caplog.at_level("ERROR", logger="funcprobe"):
        assert ProbedGRPOTrainer.run_probe(broken) is None
    assert "the probe failed at step 8" in caplog.text and "TypeError" in caplog.text  # TRL's number of the step
    assert broken._funcprobe_failed == 1 and ok._funcprobe_window == [metrics] and ok.funcprobe_history[0]["step"] == 8
    with pytest.raises(TypeError, match="expected torch.optim.Adam or AdamW"):
        ProbedGRPOTrainer.run_probe(fake(broken.optimizer, probe_raise=True))


def test_text_responses_warn_and_mismatched_retokenization_is_counted(tmp_path):
    """Text-only responses are re-tokenized with a warning; with both 'ids' and 'text' the
    ids are used and texts that re-tokenize to other ids are counted."""
    from funcprobe.io.rollout_files import read_rollouts

    tok = _tokenizer()
    text_only = {"prompt_ids": [3, 4], "responses": [{"text": "w1 w2", "reward": 1.0}, {"text": "w3", "reward": 0.0}]}
    f = tmp_path / "text.jsonl"
    f.write_text(json.dumps(text_only) + "\n")
    with pytest.warns(UserWarning, match="2 response\\(s\\) given only as 'text' were re-tokenized"):
        batch = read_rollouts(f, tokenizer=tok, max_len=LMAX)
    assert batch.input_ids[0, 0][batch.response_mask[0, 0]].tolist() == tok("w1 w2", add_special_tokens=False)["input_ids"]
    both = {"prompt_ids": [3, 4], "responses": [{"ids": [9, 10], "text": "w1 w2", "reward": 1.0},
                                                 {"ids": [WORDS.index("w3")], "text": "w3", "reward": 0.0}]}
    g = tmp_path / "both.jsonl"
    g.write_text(json.dumps(both) + "\n")
    with pytest.warns(UserWarning, match="1 of 2 response\\(s\\) whose 'text' and 'ids'"):
        batch = read_rollouts(g, tokenizer=tok, max_len=LMAX)
    assert batch.input_ids[0, 0][batch.response_mask[0, 0]].tolist() == [9, 10]  # the ids are what is used
    import warnings

    eos = tok.eos_token_id  # a sampled response ends with EOS, which decode(skip_special_tokens=True) drops
    ended = {"prompt_ids": [3, 4], "responses": [{"ids": [WORDS.index("w1"), eos], "text": "w1", "reward": 1.0},
                                                  {"ids": [WORDS.index("w3"), eos], "text": "w3", "reward": 0.0}]}
    e = tmp_path / "ended.jsonl"
    e.write_text(json.dumps(ended) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no mismatch counted
        read_rollouts(e, tokenizer=tok, max_len=LMAX)

    ids_only = {"prompt_ids": [3, 4], "responses": [{"ids": [9], "reward": 1.0}, {"ids": [10], "reward": 0.0}]}
    h = tmp_path / "ids.jsonl"
    h.write_text(json.dumps(ids_only) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_rollouts(h, max_len=LMAX)


def test_cli_influence_matches_the_library_call(workspace, tmp_path, capsys):
    """``funcprobe influence``: the library's split, top tokens decoded, JSON and plot; bad --top refused."""
    from funcprobe.apps.cli import main

    w = workspace
    out, png = tmp_path / "influence.json", tmp_path / "influence.png"
    args = ["influence", "--model", w / "model", "--adapter", w / "adapter", "--tokenizer", w / "tokenizer",
            "--eval", w / "E.jsonl", "--update", w / "U.jsonl", "--optimizer-state", w / "optimizer.pt",
            "--max-completion-length", LMAX, "--dtype", "float64", "--top", 4, "--json", out, "--plot", png,
            "--no-progress"]
    assert main([str(a) for a in args]) == 0
    text = capsys.readouterr().out
    assert "predicted dH" in text and "baseline" in text and "top 4 tokens" in text and "'w" in text
    got = json.loads(out.read_text())
    model = load_policy(w / "model", w / "adapter", dtype="float64")
    opt = load_optimizer_state(w / "optimizer.pt", model)
    from_dir = load_optimizer_state(w, model)  # an HF Trainer checkpoint-N/ directory: its optimizer.pt
    assert all(torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) for a, b in zip(opt.state.values(), from_dir.state.values()))
    with pytest.raises(FileNotFoundError, match="has no optimizer.pt"):
        load_optimizer_state(w / "adapter", model)
    E = read_rollouts(w / "E.jsonl", max_len=LMAX)
    U = read_rollouts(w / "U.jsonl", max_len=LMAX)
    ref = EntropyProbe(model, opt, step="adam_step").influence(E, U)  # the CLI's default step
    assert got["step"] == "adam_step" and got["lr"] == 1e-3
    # float64 both sides, JSON exact: seen 0 (1e-9 allows reordering); the groups' sum: seen 3.4e-21
    assert rel_err(got["delta_h"], ref.delta_h) < 1e-9 and rel_err(torch.tensor(got["per_prompt"], dtype=torch.float64), ref.per_prompt) < 1e-9
    assert abs(got["groups"]["positive_adv"]["delta_h"] + got["groups"]["negative_adv"]["delta_h"]
               - ref.delta_h_update) < 1e-12
    assert len(got["top_tokens"]) == 4 and png.stat().st_size > 5000
    assert main([str(a) for a in args[:-7]] + ["--top", "0"]) == 2
    assert "--top: expected an integer >= 1" in capsys.readouterr().err
