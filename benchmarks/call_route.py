"""The route a call takes through funcprobe's modules, from an entry point to the model's forward.

    python benchmarks/call_route.py

Traces (``sys.settrace``) the first ``conditional_variance``, ``update_direction`` and
``EntropyProbe.predict`` call on a tiny GPT-2 + LoRA model, from entry until the first call
into the model's own forward (a ``transformers`` modeling file), and prints for each: the
funcprobe modules visited in order (consecutive calls in one module collapsed into one
stop), the number of stops, of distinct modules, and of returns to a module already left.
Only calls that have the model in hand count (the model, its ``ParamRegistry`` or a
``ProbeRun`` among the function's arguments): the route of ``model``, not of every helper.
Function calls only: nothing is timed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import funcprobe  # noqa: E402
from helpers import gpt2, random_rollouts  # noqa: E402

PACKAGE = Path(funcprobe.__file__).resolve().parent


class _Forward(Exception):
    pass


def _carries(value: object, model: torch.nn.Module) -> bool:
    """Whether a local variable is the model or a funcprobe value holding it (a registry, a run)."""
    if value is model:
        return True
    return type(value).__module__.startswith("funcprobe") and (
        getattr(value, "module", None) is model or getattr(getattr(value, "registry", None), "module", None) is model)


def route(fn, model: torch.nn.Module) -> list[str]:
    """funcprobe modules (dotted) in the order ``fn()`` enters them with ``model`` in hand (a
    function whose arguments or locals at entry hold the model, its registry or a run), until
    the model's own forward."""
    stops: list[str] = []

    def tracer(frame, event, arg):
        if event != "call":
            return None
        path = Path(frame.f_code.co_filename).resolve()
        if "transformers" in path.parts and path.name.startswith("modeling_") and frame.f_code.co_name == "forward":
            raise _Forward
        if PACKAGE in path.parents and any(_carries(v, model) for v in frame.f_locals.values()):
            parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            if not stops or stops[-1] != name:
                stops.append(name)
        return None

    sys.settrace(tracer)
    try:
        fn()
    except _Forward:
        pass
    finally:
        sys.settrace(None)
    return stops


def summary(stops: list[str]) -> str:
    seen, returns = set(), 0
    for i, name in enumerate(stops):
        if name in seen and stops[i - 1] != name:
            returns += 1
        seen.add(name)
    return f"{len(set(stops))} modules, {len(stops)} stops, {returns} returns to a module already left"


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    torch.manual_seed(0)
    model = gpt2()
    E, U = random_rollouts(B=2, G=2, seed=1), random_rollouts(B=2, G=2, seed=2)
    mu = {n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    calls = {
        "conditional_variance(model, E, muY, lr=...)": lambda: funcprobe.conditional_variance(model, E, mu, lr=1e-3),
        "update_direction(model, U)": lambda: funcprobe.update_direction(model, U, step="sgd"),
        "EntropyProbe(model, opt).predict(E, U)": lambda: funcprobe.EntropyProbe(model, opt).predict(E, U),
    }
    for label, fn in calls.items():
        stops = route(fn, model)
        print(f"{label}: {summary(stops)}")
        print("  " + " -> ".join(s.removeprefix("funcprobe.") for s in stops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
