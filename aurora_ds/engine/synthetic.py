"""Deterministic synthetic batches: the same global batch for any number of ranks.

Batch ``k`` of the run is drawn from a generator seeded by (seed, k) for the whole global
batch, and each rank keeps its own rows. A 1-process run with a rank-times-larger micro-batch
therefore sees exactly what N ranks see together: the basis of the equivalence tests.
"""

from __future__ import annotations

import torch


class SyntheticBatches:
    def __init__(self, cfg, image_size: int, vocab_size: int, process: int, world: int, seq_len: int = 12):
        self.cfg, self.image_size, self.vocab, self.seq_len = cfg, image_size, vocab_size, seq_len
        self.process, self.world = process, world
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        cfg, b = self.cfg, self.cfg.optim.batch_size
        g = torch.Generator().manual_seed(cfg.engine.seed * 1_000_003 + self.position)
        n = b * self.world
        shape = (n, 3, self.image_size, self.image_size)
        if cfg.data.media == "video":
            shape = (n, cfg.data.num_frames, 3, self.image_size, self.image_size)
        pixels = torch.randn(shape, generator=g)
        ids = torch.randint(7, self.vocab, (n, self.seq_len), generator=g)
        ids[:, 0] = 2
        mask = torch.ones_like(ids)
        mask[:, self.seq_len // 2:] = (torch.rand(n, 1, generator=g) > 0.5).long()
        media = [f"synthetic-{self.position}-{i}" for i in range(n)]
        rows = slice(self.process * b, (self.process + 1) * b)
        self.position += 1
        return {"pixel_values": pixels[rows], "input_ids": ids[rows], "attention_mask": mask[rows],
                "media_id": media[rows], "caption": [""] * b, "skipped": {}}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict):
        self.position = int(state["position"])
