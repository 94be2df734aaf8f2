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
        index_path = root / "index.json"
        if not index_path.exists():
            raise FileNotFoundError(
                f"{index_path} not found: run the tokenize stage first (python -m flows.tokenize)"
            )
        self.index = json.loads(index_path.read_text())
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
        self.batch, self.seq_len, self.rank, self.world, self.seed = (
            batch,
            seq_len,
            rank,
            world,
            seed,
        )
        self.n_windows = (self.total - 1) // seq_len
        if self.n_windows < 1:
            raise DataMismatchError(
                f"the {split} split has {self.total} tokens, fewer than one sequence of {seq_len + 1}"
            )
        self.position = 0
        self._perm_epoch, self._perm = -1, None
        self.fingerprint = hashlib.sha256(
            json.dumps(
                [
                    self.index["tokenizer_sha256"],
                    self.index["splits"][split]["shards"],
                    seq_len,
                    seed,
                ]
            ).encode()
        ).hexdigest()[:16]

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
