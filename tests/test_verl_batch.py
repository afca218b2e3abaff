"""The verl plug-in's regrouping of a mini-batch's rows by prompt (``uid``) over the ranks
(``funcprobe.integrations.verl_batch``), without verl: each response's advantage, tokens and
score stay with its row whatever order the ranks hold the rows in."""

import pytest
import torch

from funcprobe.integrations.verl_batch import BatchRefused, Rows, regroup

P, R = 2, 3


def _rows(row_ids, uids, scored=True):
    """Rows whose every field encodes the row id: tokens (id + 1, id + 1, ...), advantage id,
    score 100 + id; responses of length 1 + id % R."""
    n = len(row_ids)
    ids = torch.tensor([[r + 1] * (P + R) for r in row_ids])
    lens = torch.tensor([1 + r % R for r in row_ids])
    mask = torch.cat([torch.ones(n, P, dtype=torch.long), (torch.arange(R) < lens[:, None]).long()], 1)
    adv = torch.tensor(row_ids, dtype=torch.float64)
    score = 100.0 + adv if scored else None
    return Rows(ids * mask, mask, adv, list(uids), P, score)


def test_scores_advantages_and_tokens_stay_with_their_rows_when_groups_are_split_and_interleaved():
    # 3 prompts x G = 2, rows interleaved over 2 ranks: rank 0 holds rows 0, 3, 4; rank 1 rows 1, 2, 5
    uid_of = {0: "a", 1: "b", 2: "a", 3: "c", 4: "b", 5: "c"}
    held = [[0, 3, 4], [1, 2, 5]]
    all_rows = [_rows(h, [uid_of[r] for r in h]) for h in held]
    shares = [regroup(all_rows, rank, 2, None) for rank in range(2)]
    assert [b for _, b, _ in shares] == [3, 3]
    rows_seen = []
    for batch, _, score in shares:
        assert score.shape == batch.advantages.shape
        row = batch.advantages.long()  # the row id of each response, from its advantage
        assert torch.equal(score, 100.0 + batch.advantages)  # each score with its own row
        assert torch.equal(batch.input_ids[..., 0], row + 1)  # and its tokens
        for b in range(row.shape[0]):
            assert len({uid_of[int(r)] for r in row[b]}) == 1  # one prompt per group
        rows_seen += row.flatten().tolist()
    assert sorted(rows_seen) == list(range(6))  # every row once, none dropped


def test_scores_are_none_unless_every_rank_has_them_and_cut_groups_are_refused():
    uid_of = {0: "a", 1: "a", 2: "b", 3: "b"}
    all_rows = [_rows([0, 2], ["a", "b"]), _rows([1, 3], ["a", "b"], scored=False)]
    batch, B, score = regroup(all_rows, 0, 2, None)
    assert B == 2 and score is None and batch.num_prompts == 1
    batch, B, empty = regroup([_rows([0, 1, 2, 3], ["a", "a", "b", "b"])], 0, 3, None)  # rank 0 of 3: no prompt
    assert B == 2 and batch.num_prompts == 0 and empty.shape == (0, 2)
    cut = [_rows([0, 1, 2], [uid_of[r] for r in (0, 1, 2)])]  # uid b has 1 of 2 responses
    with pytest.raises(BatchRefused, match="uid: 1 prompt group"):
        regroup(cut, 0, 1, None)
