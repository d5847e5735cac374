"""`python -m app conformance DIR`: check our model against outputs of the official VAR code.

DIR holds config.json (the official builder's arguments), vae.pth, var.pth and reference.pt, in the
format of the shipped `tests/data/var_official_tiny/`. Tolerances are those of the fixture's README:
tokens exact; logits within 1e-4 absolute or 1e-6 of the largest logit; latents and images within 1e-4;
the low-temperature Gumbel path within 1e-2. Prints one line per check and exits 0 only if all pass.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from app.model.checkpoint import load_folder
from app.model.pipeline import VARPipeline
from app.model.sampling import SamplingParams

Ref = dict[str, Any]


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name:<28} {self.detail}"


def exact(name: str, got: torch.Tensor | list[torch.Tensor], want: torch.Tensor | list[torch.Tensor]) -> CheckResult:
    g = torch.cat([t.flatten() for t in got]) if isinstance(got, list) else got.flatten()
    w = torch.cat([t.flatten() for t in want]) if isinstance(want, list) else want.flatten()
    if g.shape != w.shape:
        return CheckResult(name, False, f"shape {tuple(g.shape)} != {tuple(w.shape)}")
    wrong = int((g.cpu() != w.cpu()).sum())
    return CheckResult(name, wrong == 0, f"{wrong} of {w.numel()} differ (exact)")


def close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rel_to_max: float = 0.0) -> CheckResult:
    got, want = got.detach().float().cpu(), want.float().cpu()
    if got.shape != want.shape:
        return CheckResult(name, False, f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    tol = max(atol, rel_to_max * float(want.abs().max()))
    diff = float((got - want).abs().max())
    return CheckResult(
        name,
        diff <= tol,
        f"max |diff| {diff:.3g} <= {tol:.3g}" if diff <= tol else f"max |diff| {diff:.3g} > {tol:.3g}",
    )


def logits_close(name: str, got: torch.Tensor, want: torch.Tensor) -> CheckResult:
    return close(name, got, want, atol=1e-4, rel_to_max=1e-6)


def _params(args: Ref) -> SamplingParams:
    return SamplingParams(cfg=args["cfg"], top_k=args["top_k"], top_p=args["top_p"], more_smooth=args["more_smooth"])


def check_greedy(pipe: VARPipeline, ref: Ref) -> Iterator[CheckResult]:
    args = ref["greedy_args"]
    logits: dict[int, torch.Tensor] = {}
    gen = pipe.generate(
        ref["labels"],
        _params(args),
        shared_seed=args["g_seed"],
        on_guided_logits=lambda si, x: logits.__setitem__(si, x),
    )
    yield exact("greedy tokens", gen.tokens, ref["greedy_idx"])
    for si, want in enumerate(ref["greedy_cfg_logits_scales0to2"]):
        yield logits_close(f"greedy guided logits s{si}", logits[si], want)
    yield close("greedy f_hat", gen.f_hat, ref["greedy_fhat"], 1e-4)
    yield close("greedy image", gen.images, ref["greedy_img"], 1e-4)


def check_sampled(pipe: VARPipeline, ref: Ref) -> Iterator[CheckResult]:
    args = ref["sample_args"]
    gen = pipe.generate(ref["labels"], _params(args), shared_seed=args["g_seed"])
    yield exact("sampled tokens", gen.tokens, ref["sample_idx"])
    yield close("sampled f_hat", gen.f_hat, ref["sample_fhat"], 1e-4)
    yield close("sampled image", gen.images, ref["sample_img"], 1e-4)


def check_smooth(pipe: VARPipeline, ref: Ref) -> Iterator[CheckResult]:
    args = ref["smooth_args"]
    gen = pipe.generate(ref["labels"], _params(args), shared_seed=args["g_seed"])
    yield close("smooth f_hat", gen.f_hat, ref["smooth_fhat"], 1e-2)
    yield close("smooth image mean", gen.images.mean(dim=(1, 2, 3)), ref["smooth_img_mean"], 1e-3)


@torch.inference_mode()
def check_teacher_forced(pipe: VARPipeline, ref: Ref) -> Iterator[CheckResult]:
    dev = pipe.device
    x_in = pipe.vqvae.quantize.idxBl_to_var_input([t.to(dev) for t in ref["tf_gt_idx"]])
    yield close("teacher-forcing input", x_in, ref["tf_x_BLCv_wo_first_l"], 1e-4)
    logits = pipe.var(ref["tf_labels"].to(dev), ref["tf_x_BLCv_wo_first_l"].to(dev)).float().cpu()
    yield logits_close(
        "tf logits scales 0-3", logits[:, : ref["tf_logits_scales0to3"].shape[1]], ref["tf_logits_scales0to3"]
    )
    yield logits_close("tf logits rows", logits[:, ref["tf_rows_pos"]], ref["tf_logits_rows"])
    yield logits_close("tf logits columns", logits[..., ref["tf_cols_vocab"]], ref["tf_logits_cols"])
    yield exact("tf argmax", logits.argmax(-1), ref["tf_argmax"])
    yield logits_close("tf max", logits.amax(-1), ref["tf_max"])
    yield logits_close("tf logsumexp", logits.logsumexp(-1), ref["tf_logsumexp"])
    gt = ref["tf_gt_idx_BL"]
    yield logits_close("tf ground-truth logit", logits.gather(-1, gt.unsqueeze(-1)).squeeze(-1), ref["tf_gt_logit"])
    ce = F.cross_entropy(logits.flatten(0, 1), gt.flatten())
    yield close("tf cross-entropy", ce, ref["tf_ce_loss_mean"], 1e-5)


@torch.inference_mode()
def check_vqvae(pipe: VARPipeline, ref: Ref) -> Iterator[CheckResult]:
    vae, dev = pipe.vqvae, pipe.device
    f = vae.img_to_f(ref["vae_img_in"].to(dev))
    yield close("vqvae latent f", f, ref["vae_f"], 1e-4)
    idx = vae.quantize.f_to_idxBl(f)
    yield exact("vqvae tokens", idx, ref["vae_idx"])
    yield close("vqvae f_hat per scale", torch.stack(vae.quantize.f_to_fhats(f)), ref["vae_fhat_per_scale"], 1e-4)
    yield close("vqvae reconstruction", vae.img_to_reconstructed_img(ref["vae_img_in"].to(dev)), ref["vae_recon"], 1e-4)
    from_tokens = vae.idxBl_to_img([t.to(dev) for t in ref["vae_idx"]])
    yield close("vqvae tokens -> image", from_tokens, ref["vae_recon"], 1e-4)


CHECK_GROUPS: dict[str, Callable[[VARPipeline, Ref], Iterator[CheckResult]]] = {
    "greedy": check_greedy,
    "sampled": check_sampled,  # CPU oracle: a CUDA generator draws a different stream
    "smooth": check_smooth,
    "teacher_forced": check_teacher_forced,
    "vqvae": check_vqvae,
}


def run_conformance(folder: Path, groups: list[str], device: str = "cpu") -> list[CheckResult]:
    pipe = load_folder(folder).to(device)
    ref = torch.load(folder / "reference.pt", map_location="cpu", weights_only=True)
    results: list[CheckResult] = []
    for group in groups:
        for result in CHECK_GROUPS[group](pipe, ref):
            print(result.line(), flush=True)
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m app conformance", description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument(
        "--checks", default=",".join(CHECK_GROUPS), help=f"comma-separated subset of {','.join(CHECK_GROUPS)}"
    )
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    groups = [g for g in a.checks.split(",") if g]
    unknown = [g for g in groups if g not in CHECK_GROUPS]
    if unknown:
        ap.error(f"unknown check group(s) {unknown}; choose from {list(CHECK_GROUPS)}")
    results = run_conformance(a.folder, groups, a.device)
    passed = sum(r.passed for r in results)
    print(f"conformance: {passed}/{len(results)} checks passed")
    return 0 if results and passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
