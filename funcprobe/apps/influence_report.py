"""Text and figures for an ``EntropyInfluence``: the responses and tokens that drive δH.

``format_influence`` renders the totals with their SEs, the named groups, the update
responses and the tokens with the largest shares (with their SEs where the matrix was
computed; with the decoded response text around them when a tokenizer is given);
``plot_influence`` draws the shares of responses and how concentrated the token shares
are (cumulative |share| / Σ|share|). Source of the quantities: docs/derivations.md#entropy-influence.
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


def escaped(text: str) -> str:
    r"""``text`` on one line: backslashes, newlines, carriage returns and tabs as ``\\``,
    ``\n``, ``\r``, ``\t``."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def response_ids(U: RolloutBatch, i: int, g: int) -> tuple[list[int], list[int]]:
    """(columns, token ids) of response g of prompt i of ``U``, in order."""
    cols = U.response_mask[i, g].nonzero().flatten()
    return cols.tolist(), U.input_ids[i, g, cols].tolist()


def response_text(tokenizer, U: RolloutBatch, i: int, g: int, *, max_chars: int = 60) -> str:
    """The decoded response (escaped, cut after ``max_chars`` characters with "…")."""
    text = tokenizer.decode(response_ids(U, i, g)[1])
    return escaped(text[:max_chars]) + ("…" if len(text) > max_chars else "")


def token_context(tokenizer, U: RolloutBatch, i: int, g: int, column: int, *, width: int = 8) -> str:
    """Up to ``width`` response tokens either side of the response token at ``column``,
    decoded, the token itself in ⟦ ⟧, escaped; "…" where the response goes on. The three
    parts are decoded apart (a tokenizer that merges spaces across them shows them split).

    Raises ``ValueError`` when ``column`` is not a response token of response (i, g)."""
    cols, ids = response_ids(U, i, g)
    if column not in cols:
        raise ValueError(f"column: {column} is not a response token of prompt {i} response {g}")
    k = cols.index(column)
    before, after = ids[max(0, k - width):k], ids[k + 1:k + 1 + width]
    left, token, right = (escaped(tokenizer.decode(part)) for part in (before, [ids[k]], after))
    return ("…" if k > width else "") + f"{left}⟦{token}⟧{right}" + ("…" if k + 1 + width < len(ids) else "")


def _share(value: float, se) -> str:
    """``+1.234e-03 ± 5.6e-04`` (the SE when known), or the share alone."""
    return f"{value:+.3e}" + ("" if se is None else f" ± {float(se):.1e}")


def format_influence(inf: EntropyInfluence, U: RolloutBatch, *, tokenizer=None, top: int = 10,
                     unit: str = "nats") -> str:
    """A plain-text report, every entropy quantity in ``unit`` (``funcprobe.core.statistics.
    entropy_unit`` of the weighting). ``U`` is the update batch ``inf`` was made from.

    Responses and tokens show "share ± SE_E" where ``inf`` has the SEs (``matrix=True``).
    With ``tokenizer`` (anything with ``decode(list[int]) -> str``) each top response shows
    its decoded text (cut to 60 characters) and each top token its decoded response
    window (``token_context``: 8 tokens either side, the token in ⟦ ⟧); without one, the
    token ids (``#id``)."""
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
    if inf.per_token_se is None:
        lines.append("(SE_E of each response and token: with the matrix, --matrix / matrix=True)")
    share = "share ± SE_E" if inf.per_response_se is not None else "share"
    text = "   response text" if tokenizer is not None else ""
    lines.append(f"top {top} responses by |share|        {share:<22} advantage   tokens{text}")
    lengths = U.response_lengths
    for i, g, v in inf.top_responses(top):
        adv = float(U.advantages[i, g]) if U.advantages is not None else float("nan")
        se = None if inf.per_response_se is None else inf.per_response_se[i, g]
        row = f"  prompt {i:>4} response {g:>2}       {_share(v, se):<22} {adv:+9.3f}   {int(lengths[i, g]):>6}"
        lines.append(row + (f"   {response_text(tokenizer, U, i, g)}" if tokenizer is not None else ""))
    lines.append("")
    context = "   in its response" if tokenizer is not None else ""
    lines.append(f"top {top} tokens by |share|                  {share:<22} token{context}")
    start = U.response_start
    for i, g, t, v in inf.top_tokens(top):
        token = token_text(tokenizer, int(U.input_ids[i, g, t]))
        se = None if inf.per_token_se is None else inf.per_token_se[i, g, t]
        row = f"  prompt {i:>4} response {g:>2} position {t - start:>4}   {_share(v, se):<22} {token}"
        lines.append(row + (f"   {token_context(tokenizer, U, i, g, t)}" if tokenizer is not None else ""))
    return "\n".join(lines)


def token_concentration(inf: EntropyInfluence, U: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(fraction of U's response tokens, cumulative |share| / Σ|share|), both ``[N]``
    float64, tokens taken largest |share| first: how concentrated the token shares are,
    monotone from |top share|/Σ|share| to 1 whatever their signs. None when Σ|share| = 0
    (every token share is 0, or U has no response tokens)."""
    size = inf.per_token[U.response_mask].abs().to(torch.float64)
    total = float(size.sum())
    if total == 0.0:
        return None
    cumulative = torch.cumsum(torch.sort(size, descending=True).values, 0) / total
    frac = torch.arange(1, len(size) + 1, dtype=torch.float64) / len(size)
    return frac, cumulative


def plot_influence(inf: EntropyInfluence, U: RolloutBatch, path: str | Path, *, title: str | None = None,
                   unit: str = "nats") -> Path:
    """Two panels: every update response's share of δH (sorted, coloured by the sign of
    its advantage, ± SE_E where ``inf`` has it) and how concentrated the token shares are: the cumulative |share| of
    the top tokens over Σ|share| (``token_concentration``; the panel says so where
    Σ|share| = 0). Raises ``ImportError`` with the install hint without matplotlib."""
    fig = new_figure((11, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    shares = inf.per_response.flatten()
    adv = U.advantages.flatten() if U.advantages is not None else torch.zeros_like(shares)
    order = torch.argsort(shares)
    colors = ["#55a868" if float(adv[i]) > 0 else "#c44e52" if float(adv[i]) < 0 else "#999999" for i in order]
    se = None if inf.per_response_se is None else inf.per_response_se.flatten()[order].tolist()
    ax1.bar(range(len(order)), shares[order].tolist(), color=colors, width=1.0, yerr=se, ecolor="#444444",
            error_kw={"lw": 0.6})
    ax1.axhline(0.0, color="gray", lw=0.8)
    ax1.set_xlabel("update responses, sorted (green: advantage > 0, red: < 0)"
                   + ("; bars ± SE_E" if se is not None else ""))
    ax1.set_ylabel(f"share of δH ({unit})")
    curve = token_concentration(inf, U)
    if curve is None:
        ax2.text(0.5, 0.5, "every token share is 0:\nΣ|share| = 0, nothing to normalise", ha="center",
                 va="center", transform=ax2.transAxes)
    else:
        frac, cumulative = curve
        ax2.plot(frac.tolist(), cumulative.tolist(), "k-", lw=1.2)
        ax2.set_xscale("log")
    ax2.axhline(1.0, color="gray", lw=0.6, ls=":")
    ax2.set_ylim(0.0, 1.05)
    ax2.set_xlabel("fraction of update tokens (largest |share| first)")
    ax2.set_ylabel("cumulative |share| / Σ|share|")
    fig.suptitle(title or f"entropy influence: δH = {inf.delta_h:+.3e} ± {inf.se:.1e} (SE_E); "
                 f"baseline {inf.delta_h_baseline:+.2e}, update samples {inf.delta_h_update:+.2e}")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    return out
