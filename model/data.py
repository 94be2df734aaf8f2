"""Batches from the packed token shards, with a position that is part of the checkpoint.

The token stream of a split (its shards in index order) is cut into windows of ``seq_len + 1``
tokens; each epoch visits the windows in a permutation seeded by (seed, epoch). Micro-batch ``p`` of
rank ``r`` takes windows ``((p * world + r) * batch + j)`` of that order, so the data a step sees
depends only on the step, never on restarts: resuming at position ``p`` is exact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch


class DataMismatchError(RuntimeError):
    pass


class TokenLoader:
    def __init__(
        self,
        tokens_dir: str,
        split: str,
        batch: int,
        seq_len: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
    ):
        root = Path(tokens_dir)
        self.index = read_index(root)
        self.batch, self.seq_len, self.rank, self.world, self.seed = (
            batch,
            seq_len,
            rank,
            world,
            seed,
        )
        identity = self._open(root, split)
        self.position = 0
        self._perm_epoch, self._perm = -1, None
        self.fingerprint = hashlib.sha256(
            json.dumps([self.index["tokenizer_sha256"], identity, seq_len, seed]).encode()
        ).hexdigest()[:16]

    def _open(self, root: Path, split: str) -> object:
        """Map the split's data and set ``total`` and ``n_windows``; return what identifies the
        data in the fingerprint (here the shard list)."""
        dtype = np.dtype(self.index["dtype"])
        shards = [s for s in self.index["splits"][split]["shards"] if s["tokens"] > 0]
        self.arrays = [np.memmap(root / s["path"], dtype=dtype, mode="r") for s in shards]
        for s, a in zip(shards, self.arrays, strict=True):
            if len(a) != s["tokens"]:
                raise DataMismatchError(
                    f"{s['path']} holds {len(a)} tokens but index.json says {s['tokens']}"
                )
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.total = int(self.offsets[-1])
        self.n_windows = (self.total - 1) // self.seq_len
        if self.n_windows < 1:
            raise DataMismatchError(
                f"the {split} split has {self.total} tokens, fewer than one sequence of "
                f"{self.seq_len + 1}"
            )
        return self.index["splits"][split]["shards"]

    def _window(self, w: int) -> np.ndarray:
        start = w * self.seq_len
        end = start + self.seq_len + 1
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        out, pos = [], start
        while pos < end:
            a = self.arrays[i]
            lo = pos - int(self.offsets[i])
            take = min(len(a) - lo, end - pos)
            out.append(np.asarray(a[lo : lo + take]))
            pos += take
            i += 1
        return np.concatenate(out) if len(out) > 1 else out[0]

    def _order(self, g: int) -> int:
        epoch, k = divmod(g, self.n_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return int(self._perm[k])

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        base = (self.position * self.world + self.rank) * self.batch
        rows = np.stack([self._window(self._order(base + j)) for j in range(self.batch)]).astype(
            np.int64
        )
        self.position += 1
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"position": self.position, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.fingerprint:
            raise DataMismatchError(
                "the checkpoint was trained on different data (tokens, tokenizer, seq_len or seed changed); "
                "start a new run: move or delete the checkpoint folder (train.ckpt_dir)"
            )
        self.position = int(state["position"])


class ConversationLoader(TokenLoader):
    """Batches of rendered conversations (the finetune stage's ``data/sft``): one conversation per
    row of ``seq_len + 1`` tokens, right-padded, with a loss mask. Targets outside the mask
    (system and user turns, role headers, padding) are -100, which the loss ignores. Rows are
    visited in the same seeded per-epoch order as token windows, so resuming is exact."""

    def _open(self, root: Path, split: str) -> object:
        entry = self.index["splits"][split]
        self.ids = np.load(root / entry["ids"], mmap_mode="r")
        self.mask = np.load(root / entry["mask"], mmap_mode="r")
        width = self.seq_len + 1
        if self.ids.shape != (entry["rows"], width) or self.mask.shape != self.ids.shape:
            raise DataMismatchError(
                f"{root / entry['ids']} holds rows of shape {self.ids.shape}, not "
                f"({entry['rows']}, seq_len + 1 = {width}): prepare the conversations "
                "again with this seq_len (rerun the finetune stage)"
            )
        self.n_windows = entry["rows"]
        if self.n_windows < 1:
            raise DataMismatchError(f"the {split} split of {root} has no conversations")
        self.total = entry["tokens"]
        return entry

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        base = (self.position * self.world + self.rank) * self.batch
        rows = [self._order(base + j) for j in range(self.batch)]
        ids = torch.from_numpy(np.stack([self.ids[r] for r in rows]).astype(np.int64))
        mask = torch.from_numpy(np.stack([self.mask[r] for r in rows]))
        self.position += 1
        return ids[:, :-1], ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE)


IGNORE = -100  # a target the loss skips (torch's cross_entropy ignore_index)


def read_index(root: Path) -> dict:
    path = root / "index.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run the stage that writes it first (tokenize for data/tokens, "
            "finetune for the conversations)"
        )
    return json.loads(path.read_text())


def make_loader(tokens_dir: str, split: str, *args, **kwargs) -> TokenLoader:
    """The loader for what ``tokens_dir`` holds: packed token shards or rendered conversations."""
    kind = read_index(Path(tokens_dir)).get("kind", "tokens")
    cls = ConversationLoader if kind == "conversations" else TokenLoader
    return cls(tokens_dir, split, *args, **kwargs)
