"""The VQVAE decoder computes in the dtype of its parameters and always hands back float32 images."""

from __future__ import annotations

import copy

import torch

from app.model.config import DEMO
from app.model.vqvae import VQVAE


def demo_vqvae() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(DEMO.vqvae).eval().use_channels_last()


@torch.inference_mode()
def test_a_bf16_decoder_computes_in_bf16_from_a_float32_latent_and_returns_float32() -> None:
    vqvae = demo_vqvae()
    bf16 = copy.deepcopy(vqvae)
    bf16.decoder.to(torch.bfloat16)
    seen: list[torch.dtype] = []
    bf16.decoder.conv_out.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    f_hat = torch.randn(2, DEMO.vqvae.z_channels, 8, 8)
    ref, got = vqvae.fhat_to_img(f_hat), bf16.fhat_to_img(f_hat)
    assert seen == [torch.bfloat16, torch.bfloat16]  # the last convolution's input, once per image
    assert bf16.decoder.dtype == torch.bfloat16 and got.dtype == torch.float32
    assert not torch.equal(got, ref) and torch.allclose(got, ref, atol=0.05)


@torch.inference_mode()
def test_decoding_one_image_at_a_time_or_the_batch_at_once_gives_the_same_images_within_rounding() -> None:
    vqvae = demo_vqvae()
    f_hat = torch.randn(3, DEMO.vqvae.z_channels, 8, 8)
    per_image, batched = vqvae.fhat_to_img(f_hat), vqvae.fhat_to_img(f_hat, per_image=False)
    alone = vqvae.fhat_to_img(f_hat[1:2])
    assert torch.equal(per_image[1], alone[0])
    assert torch.allclose(per_image, batched, atol=1e-5)
