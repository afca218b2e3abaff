"""Figures for a probe report (matplotlib), and the checks of output files.

Figures are built as ``matplotlib.figure.Figure`` objects and written through the Agg
canvas directly: the caller's pyplot state and backend are never touched (inline
plots in notebooks keep working). The file format is the path's extension, one of those
matplotlib can write (``figure_format``: ``.png``, ``.pdf``, ``.svg``, ...), checked
before any work together with the path itself (``check_output``).
"""

from __future__ import annotations

from pathlib import Path

from ..core.statistics import EntropyPrediction


def require_matplotlib() -> None:
    """Raise ``ImportError`` with the install hint when matplotlib is missing (checked
    before a long run whose plot was asked for)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:  # pragma: no cover - matplotlib is in the plots/test extras
        raise ImportError("plots need matplotlib: pip install 'funcprobe[plots]'") from err


def check_output(path: str | Path | None, argname: str) -> None:
    """An output file that can be written: not a directory, in an existing folder, and
    opened for appending right now (so permissions, read-only and virtual file systems
    such as ``/proc`` and ``/sys`` are judged by the system itself, for root too). An
    existing file is left unchanged; a file that did not exist is removed again.

    Checked before any work, so a long run is not wasted. ``None``: nothing to check.
    Raises ``ValueError`` naming ``argname`` and the reason.
    """
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{argname}: {str(path)!r} is a directory; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{argname}: the folder {str(parent)!r} does not exist")
    existed = p.exists()
    try:
        with open(p, "a"):  # append mode: an existing file's contents are not touched
            pass
    except OSError as err:
        raise ValueError(f"{argname}: cannot write {str(path)!r}: {err.strerror or err}") from None
    if not existed:
        p.unlink(missing_ok=True)


def figure_formats() -> list[str]:
    """The file extensions matplotlib writes figures in here: its Agg canvas's
    ``get_supported_filetypes``, less ``pgf`` when the TeX program it needs
    (``rcParams["pgf.texsystem"]``, xelatex by default) is not installed.

    Raises ``ImportError`` when matplotlib is missing."""
    require_matplotlib()
    import shutil

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = set(FigureCanvasAgg.get_supported_filetypes())
    if shutil.which(matplotlib.rcParams["pgf.texsystem"]) is None:
        formats.discard("pgf")
    return sorted(formats)


def figure_format(path: str | Path, argname: str) -> str:
    """The format of the figure file ``path``: its extension (lower case), which must be
    one matplotlib writes (``figure_formats``), so a figure is never written under another
    name or format than the one asked for.

    Raises ``ValueError`` naming ``argname`` and the accepted extensions (no extension,
    or one matplotlib cannot write); ``ImportError`` when matplotlib is missing.
    """
    formats = figure_formats()
    accepted = ", ".join(f".{f}" for f in formats)
    suffix = Path(path).suffix
    if not suffix:
        raise ValueError(f"{argname}: {str(path)!r} has no extension, which names the figure's format; "
                         f"give one of {accepted}")
    ext = suffix[1:].lower()
    if ext not in formats:
        raise ValueError(f"{argname}: matplotlib cannot write {suffix!r} files ({str(path)!r}); give one of {accepted}")
    return ext


def check_figure_path(path: str | Path | None, argname: str) -> None:
    """``figure_format`` and ``check_output`` of a figure file, before any work (``None``:
    nothing to check)."""
    if path is None:
        return
    figure_format(path, argname)
    check_output(path, argname)


def new_figure(figsize: tuple[float, float]):
    """A ``Figure`` on its own Agg canvas (pyplot's state and backend untouched)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_probe(result: EntropyPrediction, path: str | Path, *, title: str | None = None) -> Path:
    """Two panels: the distribution of η·s[n] with δH and its 95% interval, and the
    per-prompt contributions η·s[n]/B to δH (sorted) with their running sum. The format
    is ``path``'s extension (``figure_format``).

    Raises ``ValueError`` naming ``path`` for an extension matplotlib cannot write (or
    none); ``ImportError`` with the install hint when matplotlib is missing.
    """
    fmt = figure_format(path, "path")
    lr, B = result.lr, result.num_prompts
    scaled = (result.s * lr).tolist()
    lo, hi = result.ci95
    fig = new_figure((11, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.hist(scaled, bins=max(10, min(60, len(scaled) // 2)), color="#4c72b0", alpha=0.75)
    ax1.axvline(result.delta_h, color="k", lw=1.5, label=f"δH = η·mean s = {result.delta_h:+.3e}")
    ax1.axvspan(lo, hi, color="orange", alpha=0.3, label=f"95% interval ±{1.96 * result.se:.2e}")
    ax1.axvline(0.0, color="gray", lw=0.8, ls=":")
    ax1.set_xlabel(f"η · s[n]  ({result.unit}, per prompt)")
    ax1.set_ylabel("prompts")
    ax1.legend(fontsize=8)
    contrib = sorted(x / B for x in scaled)
    running = [sum(contrib[: i + 1]) for i in range(len(contrib))]
    ax2.bar(range(len(contrib)), contrib, color=["#c44e52" if c < 0 else "#55a868" for c in contrib], width=1.0)
    ax2.plot(range(len(contrib)), running, "k-", lw=1, label="running sum → δH")
    ax2.axhline(0.0, color="gray", lw=0.8)
    ax2.set_xlabel("prompts, sorted by contribution")
    ax2.set_ylabel(f"η · s[n] / B  ({result.unit})")
    ax2.legend(fontsize=8)
    fig.suptitle(title or f"predicted entropy change δH = {result.delta_h:+.3e} ± {result.se:.1e} (SE_E), B = {B}")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110, format=fmt)
    return out


def plot_demo(records, path: str | Path, *, title: str | None = None) -> Path:
    """The demo's figure: per step, predicted δH ± 95% interval (SE_E) against the realized
    change ± 95% interval (SE_H): left, realized against predicted with the diagonal;
    right, both along the steps. ``records``: ``funcprobe.apps.demo.StepRecord`` list.
    The format is ``path``'s extension; errors as ``plot_probe``.
    """
    fmt = figure_format(path, "path")
    k = [r.step for r in records]
    pred = [r.prediction.delta_h for r in records]
    pred_ci = [1.96 * r.prediction.se for r in records]
    real = [r.realized.delta_h for r in records]
    real_ci = [1.96 * r.realized.se for r in records]
    fig = new_figure((11, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.errorbar(pred, real, xerr=pred_ci, yerr=real_ci, fmt="o", color="#4c72b0", capsize=3)
    for x, y, n in zip(pred, real, k):
        ax1.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ends = [min(pred + real), max(pred + real)]
    pad = 0.1 * (ends[1] - ends[0] or 1e-6)
    ax1.plot([ends[0] - pad, ends[1] + pad], [ends[0] - pad, ends[1] + pad], "k--", lw=0.8, label="realized = predicted")
    ax1.axhline(0.0, color="gray", lw=0.6, ls=":")
    ax1.axvline(0.0, color="gray", lw=0.6, ls=":")
    ax1.set_xlabel("predicted δH ± 1.96 SE_E  (nats / Lmax)")
    ax1.set_ylabel("realized ΔH on held-out H ± 1.96 SE_H")
    ax1.legend(fontsize=8)
    ax2.errorbar([x - 0.08 for x in k], pred, yerr=pred_ci, fmt="o", capsize=3, label="predicted (before the step)")
    ax2.errorbar([x + 0.08 for x in k], real, yerr=real_ci, fmt="s", capsize=3, label="realized (after the step)")
    ax2.axhline(0.0, color="gray", lw=0.6)
    ax2.set_xlabel("GRPO step")
    ax2.set_ylabel("entropy change (nats / Lmax)")
    ax2.set_xticks(k)
    ax2.legend(fontsize=8)
    fig.suptitle(title or "predicted vs realized entropy change per step")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110, format=fmt)
    return out
