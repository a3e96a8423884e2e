"""Identical captions in a batch of tokenised captions, so that each distinct one is encoded once."""

import torch


def distinct_captions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For `(N, L)` tokenised captions: the row of the first occurrence of each distinct caption (`(D,)`, in the
    order `torch.unique` sorts them) and, for every row, the index of its caption among those (`(N,)`), so that
    `encoded[inverse]` with `encoded` the embeddings of `input_ids[first]` gives every row's embedding.

    Two rows are the same caption when their attended tokens are (padding is ignored)."""
    keys = torch.cat([input_ids * attention_mask, attention_mask], dim=1)
    distinct, inverse = torch.unique(keys, dim=0, return_inverse=True)
    positions = torch.arange(len(keys), device=keys.device)
    first = positions.new_full((len(distinct),), len(keys)).scatter_reduce(0, inverse, positions, "amin")
    return first, inverse
