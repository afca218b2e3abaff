"""The forward-mode operators' package (funcprobe.forward): its layer, the ``kernels`` setting,
custom ops registered on first use rather than at import, functions of at most 6 parameters."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import funcprobe
from funcprobe import ProbeSettings, SettingsError
from funcprobe.forward import rules
from funcprobe.forward.rules import jvp_rules
from funcprobe.settings import KERNELS

FORWARD = pathlib.Path(funcprobe.__file__).parent / "forward"
ROOT = FORWARD.parents[1]


def _triton_available() -> bool:
    from funcprobe.forward import triton as kernels

    return kernels.available()


def test_importing_funcprobe_registers_no_custom_op_and_imports_no_kernels():
    """A fresh interpreter: ``import funcprobe`` (and the kernels' module itself) defines no
    ``funcprobe::`` operator; the first ``_ops()`` call (a kernel launch's) defines both."""
    script = """
import sys, torch
import funcprobe, funcprobe.core, funcprobe.edge.session
names = ("flash_attention_forward", "flash_attention_jvp")
assert not any(hasattr(torch.ops.funcprobe, n) for n in names), "registered at import"
assert "funcprobe.forward.triton" not in sys.modules, "the kernels' module imported by default"
import funcprobe.forward.triton as kernels
assert not any(hasattr(torch.ops.funcprobe, n) for n in names), "registered when the kernels' module is imported"
kernels._ops()
assert all(hasattr(torch.ops.funcprobe, n) for n in names), "not registered by _ops()"
assert kernels._ops() is kernels._ops()
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-2000:]


def test_the_kernels_setting_is_off_by_default_and_checked_by_name(monkeypatch):
    assert KERNELS == rules.KERNELS == ("off", "triton")
    assert ProbeSettings().kernels == "off"
    assert jvp_rules()._kernels is None
    for bad in ("on", "cuda", None, True):
        with pytest.raises(SettingsError, match=r"kernels: expected one of \('off', 'triton'\)"):
            ProbeSettings(kernels=bad)
        with pytest.raises(SettingsError, match=r"kernels: expected one of \('off', 'triton'\)"):
            jvp_rules(kernels=bad)
    for conflict in (dict(mode="vjp"), dict(generic_jvp=True)):
        with pytest.raises(SettingsError, match="kernels: 'triton' runs inside the forward-mode rules"):
            ProbeSettings(kernels="triton", **conflict)
    from funcprobe.forward import triton as kernels

    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # as without Triton installed
                        lambda name, *a: None if name == "triton" else find_spec(name, *a))
    monkeypatch.setattr(kernels, "available", lambda: False)
    with pytest.raises(SettingsError, match="kernels: 'triton' needs Triton"):
        ProbeSettings(kernels="triton")
    with pytest.raises(SettingsError, match="kernels: 'triton' needs Triton"):
        jvp_rules(kernels="triton")
    monkeypatch.undo()
    if _triton_available():
        assert ProbeSettings(kernels="triton").kernels == "triton"
        assert jvp_rules(kernels="triton")._kernels is kernels


def test_the_command_line_offers_the_kernels_flag():
    import argparse

    from funcprobe.settings import add_arguments, from_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_arguments(parser.parse_args([])).kernels == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kernels", "cuda"])


def test_kernels_triton_where_they_do_not_apply_is_the_closed_form_rule(monkeypatch):
    """``kernels="triton"`` where the kernels do not apply (here: ``applies`` says no, as for
    CPU tensors without Triton's interpreter) gives the rule's value and tangent exactly."""
    if not _triton_available():
        pytest.skip("Triton is not installed: kernels='triton' is refused (tested above)")
    from funcprobe.forward import triton as kernels

    monkeypatch.setattr(kernels, "applies", lambda call: False)
    monkeypatch.setattr(kernels, "attention_forward", lambda *a, **k: pytest.fail("the kernels ran"))
    gen = torch.Generator().manual_seed(0)
    q, k, v, dq = (torch.randn(1, 2, 9, 8, generator=gen, dtype=torch.float64) for _ in range(4))

    def f(q):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    with jvp_rules():
        ref = torch.func.jvp(f, (q,), (dq,))
    with jvp_rules(kernels="triton"):
        got = torch.func.jvp(f, (q,), (dq,))
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def _modules():
    for path in sorted(FORWARD.glob("*.py")):
        yield path, ast.parse(path.read_text())


def test_the_forward_layer_imports_torch_triton_and_funcprobe_errors_only():
    """funcprobe.forward is below the core: no import of funcprobe outside it but errors
    (relative or absolute); third-party packages: torch, triton, transformers (the HF
    attention switch, imported in the function that needs it)."""
    third_party = {"torch", "triton", "transformers"}
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                parts = ["funcprobe", "forward"][: 3 - node.level] + (node.module or "").split(".")
                parts = [p for p in parts if p]
                names = [".".join(parts + [a.name]) for a in node.names] if parts == ["funcprobe"] else [".".join(parts)]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "funcprobe":
                    assert name.startswith(("funcprobe.forward", "funcprobe.errors")), f"{path.name} imports {name}"
                else:
                    assert top in third_party or top in sys.stdlib_module_names, f"{path.name} imports {name}"


def test_no_function_in_forward_takes_more_than_six_parameters():
    """Besides self/cls/ctx; Triton kernels (``@_jit``) are exempt: their parameters are the
    launch's pointers, strides and compile-time constants, which Triton takes one by one."""
    for path, tree in _modules():
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if any(isinstance(d, ast.Name) and d.id == "_jit" for d in node.decorator_list):
                continue
            a = node.args
            names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls", "ctx")]
            assert len(names) <= 6, f"{path.name}: {node.name} takes {len(names)} parameters {names}"
