"""Scion learns faster than a grid-tuned AdamW on a source whose entropy is known.

The data is a second-order Markov chain over 32 symbols with sparse (Dirichlet 0.1) transitions:
the best achievable loss is the chain's entropy rate H, so each optimizer's excess loss over H is
an absolute measure. Both optimizers get the same model, data, steps and schedule, and their
learning rates are tuned on a grid whose optimum must lie inside the grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from disco_ds import Scion, scion_param_groups

VOCAB, WIDTH, STEPS, BATCH = 32, 64, 200, 512
SCION_LRS = (0.05, 0.1, 0.2)
ADAMW_LRS = (1e-3, 3e-3, 1e-2)


class MarkovSource:
    """x_t ~ P(· | x_{t−2}, x_{t−1}) with uniformly drawn contexts; entropy rate known exactly."""

    def __init__(self, seed: int = 0) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            dirichlet = torch.distributions.Dirichlet(torch.full((VOCAB,), 0.1))
            self.probs = dirichlet.sample((VOCAB * VOCAB,))
        self.entropy = -(self.probs * self.probs.clamp_min(1e-30).log()).sum(-1).mean().item()

    def batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = torch.randint(0, VOCAB, (BATCH,), generator=gen)
        b = torch.randint(0, VOCAB, (BATCH,), generator=gen)
        y = torch.multinomial(self.probs[a * VOCAB + b], 1, generator=gen).squeeze(1)
        return a, b, y


class TwoTokenMLP(nn.Module):
    """Embedding, three hidden matrices with an RMS norm before each, and an output head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.w_in = nn.Linear(2 * WIDTH, 4 * WIDTH, bias=False)
        self.w_mid = nn.Linear(4 * WIDTH, 4 * WIDTH, bias=False)
        self.w_out = nn.Linear(4 * WIDTH, WIDTH, bias=False)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.embed(a), self.embed(b)], dim=-1)
        h = F.relu(self.w_in(F.rms_norm(x, (2 * WIDTH,))))
        h = F.relu(self.w_mid(F.rms_norm(h, (4 * WIDTH,))))
        x = self.w_out(F.rms_norm(h, (4 * WIDTH,)))
        return self.head(F.rms_norm(x, (WIDTH,)))

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def final_loss(source: MarkovSource, optimizer: str, lr: float) -> float:
    torch.manual_seed(1)
    model = TwoTokenMLP()
    if optimizer == "scion":
        groups = scion_param_groups(model, lr=lr)
        Scion.init_(groups)
        opt: torch.optim.Optimizer = Scion(groups)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # Warmup-free WSD: constant, then linear decay to 0 over the last 30%.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (STEPS - s) / (0.3 * STEPS)))
    gen = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        a, b, y = source.batch(gen)
        loss = F.cross_entropy(model(a, b), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    held_out = torch.Generator().manual_seed(99)
    losses = []
    with torch.no_grad():
        for _ in range(8):
            a, b, y = source.batch(held_out)
            losses.append(F.cross_entropy(model(a, b), y).item())
    return sum(losses) / len(losses)


def test_scion_beats_grid_tuned_adamw_on_known_entropy_source() -> None:
    torch.set_num_threads(1)  # deterministic and no slower for matrices this small
    source = MarkovSource()
    scion = {lr: final_loss(source, "scion", lr) for lr in SCION_LRS}
    adamw = {lr: final_loss(source, "adamw", lr) for lr in ADAMW_LRS}
    best_adamw_lr = min(adamw, key=adamw.get)
    # The AdamW baseline is tuned: its best rate is inside the grid, not at an edge.
    assert best_adamw_lr not in (ADAMW_LRS[0], ADAMW_LRS[-1]), adamw
    excess_scion = min(scion.values()) - source.entropy
    excess_adamw = min(adamw.values()) - source.entropy
    assert 0 < excess_scion, (scion, source.entropy)
    # Measured: excess 0.41 (Scion) vs 0.51 (AdamW) nats; require a clear margin.
    assert excess_scion < excess_adamw - 0.03, (scion, adamw, source.entropy)
    print(f"entropy {source.entropy:.3f}; Scion {scion}; AdamW {adamw}")
