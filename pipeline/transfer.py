"""The patch transfer scheme of distributed class-first sampling (seed §3.3.6, step 3).

Process 0 draws the global batch of ``B = P * b`` patches; patch ``k`` lives on the process that
holds its tile, ``owner[k]``. Process ``i`` owns ``c_i`` patches and must end with exactly ``b``:
it sends ``c_i - b`` if it has too many, receives ``b - c_i`` if too few. Every patch that moves
leaves a process with a surplus, so ``sum_i max(0, c_i - b)`` moves is a lower bound, and the greedy
pairing below reaches it: no process both sends and receives, and nothing moves twice.

The plan is pure arithmetic on small integer arrays, computed identically everywhere from the
broadcast owner list, so processes agree on it without further messages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TransferPlan:
    """Where every patch of the global batch is read, and where it is trained on.

    ``owner[k]``: process reading patch ``k`` from its tile; ``dest[k]``: process training on it.
    ``moves[i, j]``: patches process ``i`` sends to ``j``. ``t[i, j]`` is the paper's signed form:
    negative = ``i`` sends ``-t[i, j]`` to ``j``, positive = ``i`` receives ``t[i, j]`` from ``j``.
    """

    owner: np.ndarray
    dest: np.ndarray
    moves: np.ndarray
    per_process: int

    @property
    def world(self) -> int:
        return self.moves.shape[0]

    @property
    def t(self) -> np.ndarray:
        return self.moves.T - self.moves

    @property
    def moved(self) -> int:
        return int(self.moves.sum())

    def batch_of(self, rank: int) -> np.ndarray:
        """Global indices of the patches ``rank`` trains on, in global batch order."""
        return np.flatnonzero(self.dest == rank)

    def sends(self, rank: int) -> list[tuple[int, int]]:
        """(patch, to) pairs ``rank`` sends, in global batch order."""
        idx = np.flatnonzero((self.owner == rank) & (self.dest != rank))
        return [(int(k), int(self.dest[k])) for k in idx]

    def receives(self, rank: int) -> list[tuple[int, int]]:
        """(patch, from) pairs ``rank`` receives, in global batch order."""
        idx = np.flatnonzero((self.dest == rank) & (self.owner != rank))
        return [(int(k), int(self.owner[k])) for k in idx]


def lower_bound(owner: np.ndarray, world: int, per_process: int) -> int:
    """The fewest patches any scheme must move: the total surplus over ``per_process``."""
    counts = np.bincount(np.asarray(owner, dtype=np.int64), minlength=world)
    return int(np.maximum(counts - per_process, 0).sum())


def plan_transfers(owner: np.ndarray, world: int, per_process: int) -> TransferPlan:
    """The minimal transfer scheme for patches held by ``owner`` (one entry per patch, ``P * b`` long).

    Each process keeps its first ``min(c_i, b)`` own patches (batch order); its surplus goes, in
    batch order, to the processes lacking patches, lowest rank first.
    """
    owner = np.asarray(owner, dtype=np.int64)
    if owner.size != world * per_process:
        raise ValueError(f"a global batch of {owner.size} patches is not {world} processes x {per_process}")
    if owner.size and (owner.min() < 0 or owner.max() >= world):
        raise ValueError(f"patch owners must be ranks in [0, {world}), got {owner.min()}..{owner.max()}")
    dest = owner.copy()
    kept = np.zeros(world, np.int64)
    surplus: list[int] = []
    for k, i in enumerate(owner):
        if kept[i] < per_process:
            kept[i] += 1
        else:
            surplus.append(k)
    moves = np.zeros((world, world), np.int64)
    needy = (j for j in range(world) for _ in range(per_process - int(kept[j])))
    for k, j in zip(surplus, needy, strict=True):
        dest[k] = j
        moves[owner[k], j] += 1
    return TransferPlan(owner, dest, moves, per_process)
