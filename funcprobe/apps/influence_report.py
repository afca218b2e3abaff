"""Text and figures for an ``EntropyInfluence``: the responses and tokens that drive δH.

``format_influence`` renders the totals with their SEs, the named groups, the update
responses and the tokens with the largest shares (decoded with the tokenizer when one is
given); ``plot_influence`` draws the shares of responses and how concentrated the token
shares are. Source of the quantities: docs/derivations.md#entropy-influence.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.influence import EntropyInfluence
from ..core.rollouts import RolloutBatch
from .plots import new_figure


def token_text(tokenizer, token_id: int) -> str:
    """The token as text (``repr``-quoted so spaces and newlines show), or ``#id``."""
    if tokenizer is None:
        return f"#{token_id}"
    return repr(tokenizer.decode([token_id]))


def format_influence(inf: EntropyInfluence, U: RolloutBatch, *, tokenizer=None, top: int = 10,
                     unit: str = "nats") -> str:
    """A plain-text report, every entropy quantity in ``unit`` (``funcprobe.core.statistics.
    entropy_unit`` of the weighting). ``U`` is the update batch ``inf`` was made from."""
    lo, hi = inf.ci95
    lines = [
        f"units             {unit}",
        f"predicted dH      {inf.delta_h:+.6e}   SE_E {inf.se:.3e}   95% [{lo:+.3e}, {hi:+.3e}]",
        f"  baseline        {inf.delta_h_baseline:+.6e}   SE_E {inf.se_baseline:.3e}   "
        "(momentum and weight decay: no update sample drives it)",
        f"  update samples  {inf.delta_h_update:+.6e}   SE_E {inf.se_update:.3e}   "
        f"(sum over {inf.num_update_prompts} prompts x {U.group_size} responses)",
        f"step              {inf.step}, lr {inf.lr:g}, clipping factor {inf.clip:.4g}, "
        f"B_E = {inf.num_eval_prompts}",
    ]
    for name, g in inf.groups.items():
        lines.append(f"group {name:<11} {g.delta_h:+.6e}   SE_E {g.se:.3e}   ({g.num_tokens} tokens)")
    lines.append("")
    lines.append(f"top {top} responses by |share|        share          advantage   tokens")
    lengths = U.response_lengths
    for i, g, v in inf.top_responses(top):
        adv = float(U.advantages[i, g]) if U.advantages is not None else float("nan")
        se = f" +- {float(inf.per_prompt_se[i]):.1e} (prompt)" if inf.per_prompt_se is not None else ""
        lines.append(f"  prompt {i:>4} response {g:>2}       {v:+.3e}{se}   {adv:+.3f}   {int(lengths[i, g])}")
    lines.append("")
    lines.append(f"top {top} tokens by |share|   share          token")
    start = U.response_start
    for i, g, t, v in inf.top_tokens(top):
        token = token_text(tokenizer, int(U.input_ids[i, g, t]))
        lines.append(f"  prompt {i:>4} response {g:>2} position {t - start:>4}   {v:+.3e}   {token}")
    return "\n".join(lines)


def plot_influence(inf: EntropyInfluence, U: RolloutBatch, path: str | Path, *, title: str | None = None,
                   unit: str = "nats") -> Path:
    """Two panels: every update response's share of δH (sorted, coloured by the sign of
    its advantage) and the cumulative share of the update part carried by the top
    tokens (by |share|). Raises ``ImportError`` with the install hint without matplotlib."""
    fig = new_figure((11, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    shares = inf.per_response.flatten()
    adv = U.advantages.flatten() if U.advantages is not None else torch.zeros_like(shares)
    order = torch.argsort(shares)
    colors = ["#55a868" if float(adv[i]) > 0 else "#c44e52" if float(adv[i]) < 0 else "#999999" for i in order]
    ax1.bar(range(len(order)), shares[order].tolist(), color=colors, width=1.0)
    ax1.axhline(0.0, color="gray", lw=0.8)
    ax1.set_xlabel("update responses, sorted (green: advantage > 0, red: < 0)")
    ax1.set_ylabel(f"share of δH ({unit})")
    tokens = inf.per_token[U.response_mask]
    by_size = torch.argsort(tokens.abs(), descending=True)
    cumulative = torch.cumsum(tokens[by_size], 0) / (float(tokens.sum()) or 1.0)
    frac = torch.arange(1, len(tokens) + 1, dtype=torch.float64) / len(tokens)
    ax2.plot(frac.tolist(), cumulative.tolist(), "k-", lw=1.2)
    ax2.axhline(1.0, color="gray", lw=0.6, ls=":")
    ax2.set_xscale("log")
    ax2.set_xlabel("fraction of update tokens (largest |share| first)")
    ax2.set_ylabel("cumulative share / Σ token shares")
    fig.suptitle(title or f"entropy influence: δH = {inf.delta_h:+.3e} ± {inf.se:.1e} (SE_E); "
                 f"baseline {inf.delta_h_baseline:+.2e}, update samples {inf.delta_h_update:+.2e}")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    return out
