"""BasisModule reproduces the reference's updates: given the same initial V and W, in float64, it
follows a plain per-user loop of the reference's joint and alternating Adam iterations."""

import pytest
import torch
import torch.nn.functional as F

from datamodules import SyntheticPopulationDataModule
from helpers import TINY, tiny_trainer
from lore_pl import BasisModule, LoreModel

ITERATIONS = 100


def reference_loss(features, users, basis, logits, tau, weighting):
    """The reference's NLL, user by user: each user's pairs against ``V softmax(W[u])``."""
    total, count = 0.0, 0
    for user in range(logits.shape[0]):
        rows = features[users == user]
        nll = -F.logsigmoid(rows @ basis @ torch.softmax(logits[user], dim=0) / tau)
        total = total + (nll.mean() if weighting == "user_mean" else nll.sum())
        count += rows.shape[0]
    return total if weighting == "user_mean" else total / count


def ramp(step, alpha):
    """0 before 20% of the iterations, linear to ``alpha`` at 80%, ``alpha`` after (the reference's schedule)."""
    start, end = int(0.2 * ITERATIONS), int(0.8 * ITERATIONS)
    return 0.0 if step < start else alpha if step >= end else alpha * (step - start) / (end - start)


def reference_fit(features, users, basis, logits, reference_head, *, schedule, weighting, lr, tau, alpha=0.0):
    basis, logits = basis.clone().requires_grad_(), logits.clone().requires_grad_()
    if schedule == "joint":
        optimizer = torch.optim.Adam([basis, logits], lr=lr)
        for _ in range(ITERATIONS):
            optimizer.zero_grad()
            reference_loss(features, users, basis, logits, tau, weighting).backward()
            optimizer.step()
        return basis.detach(), logits.detach()
    opt_weights, opt_basis = torch.optim.Adam([logits], lr=lr), torch.optim.Adam([basis], lr=lr)
    for step in range(ITERATIONS):
        opt_weights.zero_grad()  # W step, V frozen
        reference_loss(features, users, basis.detach(), logits, tau, weighting).backward()
        opt_weights.step()
        opt_basis.zero_grad()  # V step, the new W frozen; the cosine pull to V_ref on this step only
        cosine = F.cosine_similarity(basis, reference_head[:, None].expand_as(basis), dim=0)
        loss = reference_loss(features, users, basis, logits.detach(), tau, weighting)
        (loss + ramp(step, alpha) * (1 - cosine).mean()).backward()
        opt_basis.step()
    return basis.detach(), logits.detach()


@pytest.mark.parametrize("schedule, weighting, regularizer", [
    ("joint", "pair_mean", "none"),
    ("joint", "user_mean", "none"),
    ("alternating", "pair_mean", "cosine"),
])
def test_basis_module_follows_the_reference_loop_to_1e_10(schedule, weighting, regularizer):
    data = SyntheticPopulationDataModule(**{**TINY, "labels": "bradley_terry"}, feature_dtype="float64")
    data.setup("fit")
    train = data.split("seen_train")
    generator = torch.Generator().manual_seed(3)
    basis = torch.randn(data.dim, 3, generator=generator, dtype=torch.float64)
    logits = torch.randn(data.num_users, 3, generator=generator, dtype=torch.float64)
    settings = dict(
        schedule=schedule, weighting=weighting, lr=0.5, tau=4.0, alpha=5.0 if regularizer == "cosine" else 0.0
    )
    expected_basis, expected_logits = reference_fit(
        train.features, train.users, basis, logits, data.reference_head.double(), **settings
    )

    module = BasisModule.from_initial(
        LoreModel(basis, logits, tau=settings["tau"]),
        estimator="adam",
        lr=0.5,
        schedule=schedule,
        loss_weighting=weighting,
        regularizer=regularizer,
        alpha=settings["alpha"],
        prune_threshold=0.0,
    )
    tiny_trainer(ITERATIONS).fit(module, datamodule=data)
    assert module.model.basis.dtype == torch.float64
    torch.testing.assert_close(module.model.basis.detach(), expected_basis, rtol=0, atol=1e-10)
    torch.testing.assert_close(module.model.user_logits.detach(), expected_logits, rtol=0, atol=1e-10)
    assert (expected_basis - basis).abs().max() > 0.1  # it moved: the agreement is not of two idle runs
