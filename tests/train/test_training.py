"""Training on a few hundred real images for a few steps: losses fall, codes stay alive, runs resume."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch

from app.model.checkpoint import load_folder
from app.model.config import DEMO
from app.model.var import VAR, init_weights
from app.model.vqvae import VQVAE
from app.quality.fashion_mnist import Split, load_split
from app.train import __main__ as train_cli
from app.train.loop import batch_indices, lr_at
from app.train.var_trainer import VARTraining, token_loss, tokenize, train_var
from app.train.vqvae_trainer import (
    VQVAETraining,
    quantize_for_training,
    reconstruction_loss,
    restart_codes,
    train_vqvae,
)

SMALL_VAR = dataclasses.replace(DEMO.var, depth=2, embed_dim=64, num_heads=2)


@pytest.fixture(scope="module")
def train_images() -> Split:
    return load_split("train").subset(256)


def _codes_used(vqvae: VQVAE, images: torch.Tensor) -> int:
    with torch.no_grad():
        return int(torch.cat([t.flatten() for t in vqvae.img_to_idxBl(images)]).unique().numel())


@pytest.mark.slow
@pytest.mark.data
def test_vqvae_training_lowers_reconstruction_loss_and_uses_the_codebook(train_images: Split, tmp_path: Path) -> None:
    torch.manual_seed(0)
    vqvae = VQVAE(DEMO.vqvae)
    probe = train_images.images[:32]
    with torch.no_grad():
        before = reconstruction_loss(vqvae, probe, beta=0.25)[0].item()
    train_vqvae(vqvae, train_images, tmp_path, VQVAETraining(steps=25, batch_size=16, restart_every=10))
    with torch.no_grad():
        after = reconstruction_loss(vqvae, probe, beta=0.25)[0].item()
    assert after < 0.6 * before
    assert _codes_used(vqvae, train_images.images) > 128  # data initialisation and restarts keep codes alive


def test_restart_moves_only_dead_codes_onto_residuals() -> None:
    torch.manual_seed(0)
    vq = VQVAE(DEMO.vqvae).quantize
    old = vq.embedding.weight.detach().clone()
    dead = torch.zeros(old.shape[0], dtype=torch.bool)
    dead[[3, 7, 100]] = True
    residuals = torch.randn(50, old.shape[1]) * 5 + 20
    assert restart_codes(vq, dead, residuals, torch.Generator().manual_seed(0)) == 3
    new = vq.embedding.weight.detach()
    assert torch.equal(new[~dead], old[~dead])
    nearest = torch.cdist(new[dead], residuals).min(dim=1).values
    assert (nearest < 1.0).all()  # on a residual, up to the small jitter


def test_straight_through_quantizer_passes_decoder_gradients_to_the_encoder() -> None:
    torch.manual_seed(0)
    vq = VQVAE(DEMO.vqvae).quantize
    f = torch.randn(2, DEMO.vqvae.z_channels, 8, 8, requires_grad=True)
    q = quantize_for_training(vq, f, beta=0.25)
    q.f_hat.sum().backward()
    assert f.grad is not None and torch.allclose(f.grad, torch.ones_like(f))
    assert q.vq_loss.item() > 0 and int(q.hits_V.sum()) == 2 * sum(pn * pn for pn in DEMO.vqvae.patch_nums)


@pytest.mark.slow
@pytest.mark.data
def test_var_training_lowers_token_loss_and_resumes(train_images: Split, tmp_path: Path) -> None:
    torch.manual_seed(0)
    tokens = tokenize(VQVAE(DEMO.vqvae), train_images)
    assert tokens.tokens_NL.shape == (256, DEMO.var.seq_len)
    var = VAR(SMALL_VAR)
    init_weights(var)
    idx = torch.arange(32)

    def probe_loss() -> float:
        with torch.no_grad():
            return token_loss(var, tokens.labels[idx], tokens.inputs_NLC[idx], tokens.tokens_NL[idx]).item()

    before = probe_loss()
    t = VARTraining(steps=30, batch_size=16, checkpoint_every=10)
    train_var(var, tokens, tmp_path, dataclasses.replace(t, steps=20))
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 20
    train_var(var, tokens, tmp_path, t)  # resumes at step 20
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 30
    assert (tmp_path / "early.pt").is_file()
    assert probe_loss() < before - 0.5


def test_batches_are_the_same_after_a_resume() -> None:
    full = batch_indices(100, 8, seed=3, start_step=0)
    expected = [next(full) for _ in range(30)]
    resumed = batch_indices(100, 8, seed=3, start_step=17)
    for step in range(17, 30):
        assert torch.equal(next(resumed), expected[step])
    assert sorted(torch.cat(expected[:12]).tolist()) == sorted(set(torch.cat(expected[:12]).tolist()))


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    lrs = [lr_at(s, 100, 1.0, warmup=10) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


@pytest.mark.slow
@pytest.mark.data
def test_demo_command_exports_a_loadable_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["demo", "--work", str(tmp_path / "work"), "--out", str(out), "--train-images", "64"]
    assert train_cli.main([*args, "--vqvae-steps", "2", "--var-steps", "3", "--batch-size", "8"]) == 0
    pipe = load_folder(out)
    assert pipe.config == DEMO
    assert load_folder(tmp_path / "work" / "early").config == DEMO
    sums = dict(line.split("  ")[::-1] for line in (out / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {"config.json", "var.safetensors", "vae.safetensors"}
    assert "training on 64" in (tmp_path / "work" / "train.log").read_text()
