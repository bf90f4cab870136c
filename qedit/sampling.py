"""Drawing one token per row from next-token logits, seeded and exact: the statistics corpus's sampler."""
from __future__ import annotations

from collections.abc import Sequence

import torch

SAMPLERS = ("inverse-cdf", "race")
_DRAW_BLOCK = 1024  # vocabulary block of the two-level inverse-CDF draw
_RACE_HEAD = 1024   # tokens that race one by one in the "race" draw; the rest race as one


def draw_tokens(logits: torch.Tensor, generator: torch.Generator, banned: Sequence[int] = (),
                sampler: str = "inverse-cdf") -> torch.Tensor:
    """One token per row from softmax(logits) (rows, vocab); returns (rows, 1) int64. Both samplers are exact.

    "inverse-cdf": one uniform per row against the cumulative probabilities in token-id order, in two
    levels (cumulative block masses pick a block of the vocabulary, then a cumulative sum inside it), so
    one pass of block sums is the only full-width scan. A tiny change of the logits moves that cumulative
    sum past the drawn uniform wherever it lands among the many small probabilities.
    "race": each token's p / E with E ~ Exp(1), the largest wins. Only the _RACE_HEAD most likely tokens
    race one by one; the rest race as one entrant of their summed mass m (the largest p_j / E_j over a set
    is distributed as m / E), which, when it wins, picks its token by inverse CDF. The winner changes only
    when the logits move by about the gap between the two best scores.
    """
    probs = torch.softmax(logits.float(), dim=-1)                              # (rows, vocab), a new tensor
    vocab = probs.shape[1]
    banned = [t for t in banned if 0 <= t < vocab]
    if banned:
        probs[:, banned] = 0.0
    if sampler == "race":
        return _race(probs, generator)
    cum = _block_cum(probs)                                                    # (rows, n_blocks)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=torch.float64) * cum[:, -1:]
    return _pick(probs, cum, u)


def _block_cum(probs: torch.Tensor) -> torch.Tensor:
    """Cumulative masses of the vocabulary blocks, float64 (rows, n_blocks)."""
    rows, vocab = probs.shape
    full = vocab // _DRAW_BLOCK
    masses = probs[:, : full * _DRAW_BLOCK].view(rows, full, _DRAW_BLOCK).sum(-1)  # (rows, full)
    if full * _DRAW_BLOCK < vocab:
        masses = torch.cat([masses, probs[:, full * _DRAW_BLOCK:].sum(-1, keepdim=True)], dim=1)
    return masses.double().cumsum(-1)


def _pick(probs: torch.Tensor, cum: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token (rows, 1) where the cumulative probability in id order passes u (rows, 1); cum = _block_cum."""
    vocab = probs.shape[1]
    b = torch.searchsorted(cum, u, right=True).clamp_(max=cum.shape[1] - 1)    # (rows, 1) block index
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(u))
    offsets = torch.arange(_DRAW_BLOCK, device=probs.device)
    cols = b * _DRAW_BLOCK + offsets                                           # (rows, block)
    chosen = probs.gather(1, cols.clamp(max=vocab - 1)) * (cols < vocab)       # (rows, block)
    j = torch.searchsorted(chosen.double().cumsum(-1), u - before, right=True)  # (rows, 1)
    last = torch.where(chosen > 0, offsets, -1).amax(-1, keepdim=True)         # rounding may overshoot the block
    return b * _DRAW_BLOCK + torch.minimum(j, last)


def _race(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """draw_tokens' exponential race: (rows, vocab) probabilities -> (rows, 1) token ids.

    A head token's E comes from hashing its id with the row's key, so it stays with the token when a
    slightly different model ranks the head otherwise."""
    rows, vocab = probs.shape
    k = min(_RACE_HEAD, vocab)
    p_head, i_head = probs.topk(k, dim=-1)                                     # (rows, k), most likely first
    key = torch.randint(-(2 ** 62), 2 ** 62, (rows, 1), generator=generator, device=probs.device)
    e_head = -torch.log(_unit(_mix(key + i_head)))                             # (rows, k) Exp(1) per token id
    e_rest = torch.empty((rows, 1), device=probs.device, dtype=torch.float64).exponential_(generator=generator)
    u = torch.rand((rows, 1), generator=generator, device=probs.device, dtype=torch.float64)
    tail = probs.scatter(1, i_head, 0.0)                                       # (rows, vocab) the rest
    cum = _block_cum(tail)                                                     # (rows, n_blocks)
    scores = torch.cat([p_head.double() / e_head, cum[:, -1:] / e_rest], dim=1)  # (rows, k + 1)
    win = scores.argmax(-1, keepdim=True)                                      # (rows, 1)
    from_tail = _pick(tail, cum, u * cum[:, -1:])                              # used where the rest won
    return torch.where(win < k, i_head.gather(1, win.clamp(max=k - 1)), from_tail)


def _signed(x: int) -> int:
    """An unsigned 64-bit constant as torch's int64."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> keeps the sign)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 (wrapping arithmetic): a counter-based hash, one draw per value."""
    x = x + _signed(0x9E3779B97F4A7C15)
    x = (x ^ _shr(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _shr(x, 31)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """int64 hashes -> uniforms in (0, 1), float64 (53 random bits)."""
    return (_shr(x, 11).double() + 0.5) / float(1 << 53)
