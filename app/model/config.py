"""Model configurations and the presets that name the released checkpoints.

Every field that changes the state dict or the numbers of the official builder `build_vae_var` is here,
so a config fully determines which checkpoint keys and shapes a model expects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from app.model.imagenet import NUM_IMAGENET_CLASSES, imagenet_names, imagenet_synonyms
from app.model.sampling import SamplingParams

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


@dataclass(frozen=True)
class VQVAEConfig:
    """Multi-scale residual VQVAE (`VQVAE` in the official code)."""

    vocab_size: int = 4096
    z_channels: int = 32  # Cvae: width of the latent and of the codebook vectors
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # per encoder level; the decoder has one more
    in_channels: int = 3
    using_znorm: bool = False
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0
    patch_nums: tuple[int, ...] = PATCH_NUMS_256

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample


@dataclass(frozen=True)
class VARConfig:
    """The next-scale-prediction transformer (`VAR` in the official code)."""

    depth: int = 16
    embed_dim: int = 0  # 0: 64 * depth, as the official builder
    num_heads: int = 0  # 0: depth (head dim 64)
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    vocab_size: int = 4096
    z_channels: int = 32
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    patch_nums: tuple[int, ...] = PATCH_NUMS_256

    def __post_init__(self) -> None:
        if self.embed_dim == 0:
            object.__setattr__(self, "embed_dim", 64 * self.depth)
        if self.num_heads == 0:
            object.__setattr__(self, "num_heads", self.depth)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)


@dataclass(frozen=True)
class PipelineConfig:
    """A VAR transformer plus the VQVAE it was trained with; `name` is what errors and logs call it."""

    name: str
    var: VARConfig = field(default_factory=VARConfig)
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    class_names: tuple[str, ...] = ()  # optional, one per class; the API accepts them in place of numbers
    sampling: SamplingParams | None = None  # for requests that name no setting; None: `default_sampling`
    class_synonyms: tuple[tuple[str, ...], ...] = ()  # optional, one tuple per class: other names it answers to

    def __post_init__(self) -> None:
        if self.var.patch_nums != self.vqvae.patch_nums:
            raise ValueError(f"patch_nums differ: VAR {self.var.patch_nums} vs VQVAE {self.vqvae.patch_nums}")
        if (self.var.vocab_size, self.var.z_channels) != (self.vqvae.vocab_size, self.vqvae.z_channels):
            raise ValueError("VAR and VQVAE disagree on vocab_size or z_channels")
        if self.class_names and len(self.class_names) != self.var.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.var.num_classes} classes")
        if self.class_synonyms and len(self.class_synonyms) != len(self.class_names):
            raise ValueError(f"{len(self.class_synonyms)} synonym lists for {len(self.class_names)} class names")
        self.default_sampling.validate(self.var.vocab_size)

    @property
    def default_sampling(self) -> SamplingParams:
        """The model's own sampling settings, else the official defaults (top_k at most the vocabulary)."""
        return self.sampling or SamplingParams(top_k=min(SamplingParams.top_k, self.var.vocab_size))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PipelineConfig:
        def tuples(sub: dict[str, Any]) -> dict[str, Any]:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()}

        names = tuple(d.get("class_names", ()))
        synonyms = tuple(tuple(s) for s in d.get("class_synonyms", ()))
        sampling = SamplingParams(**d["sampling"]) if d.get("sampling") else None
        return PipelineConfig(
            d["name"], VARConfig(**tuples(d["var"])), VQVAEConfig(**tuples(d["vqvae"])), names, sampling, synonyms
        )


def with_imagenet_names(config: PipelineConfig) -> PipelineConfig:
    """The ImageNet class names and synonyms for a 1000-class model that has no names of its own: the
    released models and the official code's checkpoints are ImageNet models."""
    if config.class_names or config.var.num_classes != NUM_IMAGENET_CLASSES:
        return config
    return dataclasses.replace(config, class_names=imagenet_names(), class_synonyms=imagenet_synonyms())


def _released(depth: int, patch_nums: tuple[int, ...] = PATCH_NUMS_256, shared_aln: bool = False) -> PipelineConfig:
    config = PipelineConfig(
        name=f"d{depth}",
        var=VARConfig(depth=depth, shared_aln=shared_aln, patch_nums=patch_nums),
        vqvae=VQVAEConfig(patch_nums=patch_nums),
    )
    return with_imagenet_names(config)


DEMO_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# The embedded demo model (model_store/demo): 32x32 grayscale Fashion-MNIST, 8x8 latent, 155 tokens.
DEMO = PipelineConfig(
    name="demo",
    var=VARConfig(depth=4, embed_dim=256, num_heads=4, num_classes=10, vocab_size=512, patch_nums=DEMO_PATCH_NUMS),
    vqvae=VQVAEConfig(
        vocab_size=512, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, in_channels=1, patch_nums=DEMO_PATCH_NUMS
    ),
    class_names=FASHION_MNIST_CLASSES,
    sampling=SamplingParams(cfg=3.0, top_k=0, top_p=0.0),
)

PRESETS: dict[str, PipelineConfig] = {
    "d16": _released(16),
    "d20": _released(20),
    "d24": _released(24),
    "d30": _released(30),
    "d36": _released(36, PATCH_NUMS_512, shared_aln=True),
    # the shape of the shipped conformance fixture: depth 2, the smallest legal VQVAE (ch=32)
    "tiny": PipelineConfig("tiny", VARConfig(depth=2), VQVAEConfig(ch=32)),
    "demo": DEMO,
}


def get_preset(name: str) -> PipelineConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def config_from_official(cfg: dict[str, Any], name: str = "official") -> PipelineConfig:
    """Build a config from the official builder's keyword arguments (the fixture's config.json format).

    Uses the explicit constructor arguments (`var_constructor`, `vqvae_constructor`) when present,
    else derives them from `build_vae_var_kwargs` the way the official builder does.
    """
    kw = cfg.get("build_vae_var_kwargs", cfg)
    var_kw = cfg.get("var_constructor", {})
    vae_kw = cfg.get("vqvae_constructor", {})
    patch_nums = tuple(vae_kw.get("v_patch_nums", kw.get("patch_nums", PATCH_NUMS_256)))
    vqvae = VQVAEConfig(
        vocab_size=int(vae_kw.get("vocab_size", kw.get("V", 4096))),
        z_channels=int(vae_kw.get("z_channels", kw.get("Cvae", 32))),
        ch=int(vae_kw.get("ch", kw.get("ch", 160))),
        using_znorm=bool(vae_kw.get("using_znorm", False)),
        quant_conv_ks=int(vae_kw.get("quant_conv_ks", 3)),
        quant_resi=float(vae_kw.get("quant_resi", 0.5)),
        share_quant_resi=int(vae_kw.get("share_quant_resi", kw.get("share_quant_resi", 4))),
        default_qresi_counts=int(vae_kw.get("default_qresi_counts", 0)),
        patch_nums=patch_nums,
    )
    depth = int(var_kw.get("depth", kw.get("depth", 16)))
    var = VARConfig(
        depth=depth,
        embed_dim=int(var_kw.get("embed_dim", 64 * depth)),
        num_heads=int(var_kw.get("num_heads", depth)),
        mlp_ratio=float(var_kw.get("mlp_ratio", 4.0)),
        num_classes=int(var_kw.get("num_classes", kw.get("num_classes", 1000))),
        vocab_size=vqvae.vocab_size,
        z_channels=vqvae.z_channels,
        norm_eps=float(var_kw.get("norm_eps", 1e-6)),
        shared_aln=bool(var_kw.get("shared_aln", kw.get("shared_aln", False))),
        attn_l2_norm=bool(var_kw.get("attn_l2_norm", kw.get("attn_l2_norm", True))),
        patch_nums=tuple(var_kw.get("patch_nums", patch_nums)),
    )
    return PipelineConfig(name, var, vqvae)
