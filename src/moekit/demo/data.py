"""The demo's data: a few sparse random Markov chains ("languages") over the vocabulary."""

from __future__ import annotations

import math

import torch


class MarkovLanguages:
    """``languages`` sparse Markov chains over tokens ``[languages, V)``; token ``l < languages`` tags language l.

    Each token of each language has 3 possible successors with probabilities 0.6 / 0.25 / 0.15 (entropy
    ~0.94 nats per token once the language is known). Deterministic from ``seed`` (the same on every rank).
    """

    PROBS = (0.6, 0.25, 0.15)

    def __init__(self, vocab: int, languages: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.languages = vocab, languages
        content = vocab - languages
        succ = torch.stack([torch.stack([torch.randperm(content, generator=g)[:len(self.PROBS)]
                                         for _ in range(vocab)]) for _ in range(languages)]) + languages
        self.succ = succ  # [L, V, 3] successor tokens
        self.entropy = -sum(p * math.log(p) for p in self.PROBS)

    def batch(self, b: int, s: int, g: torch.Generator) -> torch.Tensor:
        """``[b, s + 1]`` int64: tag, then a random start token, then the chain."""
        lang = torch.randint(0, self.languages, (b,), generator=g)
        out = torch.empty(b, s + 1, dtype=torch.int64)
        out[:, 0] = lang
        out[:, 1] = torch.randint(self.languages, self.vocab, (b,), generator=g)
        probs = torch.tensor(self.PROBS)
        for t in range(2, s + 1):
            pick = torch.multinomial(probs.expand(b, -1), 1, generator=g).squeeze(1)
            out[:, t] = self.succ[lang, out[:, t - 1], pick]
        return out
