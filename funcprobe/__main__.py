"""Command line: ``funcprobe demo`` (also ``python -m funcprobe demo``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    from .demo import DemoConfig

    p = sub.add_parser(
        "demo",
        help="run the probe end to end on a Qwen2-config model with a LoRA adapter (no downloads)",
        description="Build a Qwen2-architecture LM + LoRA from a config, train a few AdamW steps on sampled "
        "rollouts, sample E and U, and predict the next step's entropy change with its standard error.",
    )
    defaults = DemoConfig()
    for f in dataclasses.fields(DemoConfig):
        choices = {"direction": ["sgd", "adam", "adam_step"], "weighting": ["dr_grpo", "per_token_avg"],
                   "mode": ["jvp", "vjp"]}.get(f.name)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name), choices=choices,
                       help=f"(default: {getattr(defaults, f.name)})")
    p.add_argument("--json", metavar="FILE", help="also write the prediction as JSON to FILE")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="funcprobe", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.command == "demo":
        from .demo import DemoConfig, format_report, run_demo

        cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)})
        res = run_demo(cfg)
        print(format_report(res))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"config": dataclasses.asdict(cfg), **res.prediction.to_dict(), "seconds": res.seconds},
                          fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
