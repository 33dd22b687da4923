"""timm encoders behind the Backbone contract, against timm's own feature code and the project's
ResNet on the same weights (random weights, no download)."""

from __future__ import annotations

import copy
import math
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from lightning.pytorch import Trainer
from torch import nn

from backbones import ResNet, WeightsError
from backbones.testing import check_backbone
from backbones.timm_encoders import TimmEncoder
from datamodules import ShapesFewShot
from tasks.heads import ASGNetHead, BAMHead, HSNetHead, PFENetHead, PrototypeHead
from tasks.segment import FewShotSegmentation
from tasks.semantic import SemanticSegmentation


@pytest.mark.parametrize(
    ("name", "options", "size"),
    [
        ("resnet18", {}, (64, 72)),
        ("resnet50", {"output_stride": 8}, (64, 72)),
        ("convnext_atto", {}, (64, 72)),
        ("swin_tiny_patch4_window7_224", {}, (64, 96)),
        ("vit_small_patch14_dinov2", {"img_size": 70, "stage_ends": [2, 6, 9, 12]}, (70, 84)),
        ("samvit_base_patch16", {"img_size": 64}, (64, 80)),
        ("vit_small_patch16_dinov3", {"img_size": 64, "final_norm": True}, (64, 80)),
    ],
)
def test_every_family_passes_the_contract(name: str, options: dict, size: tuple) -> None:
    torch.manual_seed(0)
    check_backbone(TimmEncoder(name, **options), size)


def resnet_file(tmp_path: Path, arch: str = "resnet50") -> Path:
    """A timm ResNet's random weights, saved as a state dict (timm's and torchvision's names)."""
    torch.manual_seed(0)
    path = tmp_path / f"{arch}.pth"
    torch.save(timm.create_model(arch).state_dict(), path)
    return path


@pytest.mark.parametrize(("output_stride", "scheme"), [(None, "contracted"), (8, "contracted")])
def test_resnet_taps_equal_the_projects_resnet_on_the_same_weights(
    tmp_path: Path, output_stride: int | None, scheme: str
) -> None:
    """Every block's output and pre-activation sum (HSNet's taps) of timm's ResNet-50 equals
    the project's (torchvision's bottlenecks) on the same file, at output stride 32, and at 8
    with the project's ``contracted`` dilation, timm's rule (not PSPNet's ``uniform``)."""
    path = resnet_file(tmp_path)
    ours = TimmEncoder("resnet50", weights=str(path), output_stride=output_stride).eval()
    reference = ResNet("resnet50", weights=str(path), output_stride=output_stride or 32,
                       dilation_scheme=scheme).eval()  # fmt: skip
    blocks = [n for n in ours.output_info if n.startswith("layer") and "." in n]
    assert any(n.endswith(".pre_relu") for n in blocks)
    ours.select_outputs(blocks)
    reference.select_outputs(blocks)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want = ours(x), reference(x)
    for name in blocks:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-5, msg=name)
        assert ours.output_info[name].stride == reference.output_info[name].stride, name


@pytest.mark.parametrize(
    ("name", "final_norm", "grid"),
    [("vit_small_patch14_dinov2", False, (8, 6)), ("vit_small_patch14_dinov2", True, (8, 6)),
     ("vit_small_patch16_dinov3", True, (7, 6))],
)  # fmt: skip
def test_vit_blocks_equal_timms_forward_intermediates(
    name: str, final_norm: bool, grid: tuple[int, int]
) -> None:
    """Every block of DINOv2 ViT-S/14, and of DINOv3 ViT-S/16 (timm's Eva: each block gets the
    rotary embeddings of the input's own grid), as timm's own ``forward_intermediates`` gives it
    (prefix tokens dropped, NCHW), with or without the final norm, at a size other than the
    model's (padded to whole patches)."""
    torch.manual_seed(0)
    encoder = TimmEncoder(name, img_size=98, final_norm=final_norm).eval()
    blocks = [f"blocks.{i}" for i in range(12)]
    encoder.select_outputs(blocks)
    x = torch.randn(1, 3, 112, 84)
    with torch.no_grad():
        got = encoder(x)
        want = encoder.model.forward_intermediates(
            x, indices=12, norm=final_norm, output_fmt="NCHW", intermediates_only=True
        )
    assert [tuple(got[n].shape) for n in blocks] == [(1, 384, *grid)] * 12
    for block, reference in zip(blocks, want, strict=True):
        torch.testing.assert_close(got[block], reference, rtol=1e-5, atol=1e-5, msg=block)
    assert encoder.output_info.stages[-1].name == "stage3"  # 4 groups of 3 blocks


def test_swin_taps_every_block() -> None:
    """Every Swin block's output (DCAMA's taps), recorded from timm's own forward."""
    torch.manual_seed(0)
    encoder = TimmEncoder("swin_tiny_patch4_window7_224").eval()
    names = [n for n, info in encoder.output_info.items() if info.block is not None]
    assert len(names) == sum(encoder.model.layers[i].depth for i in range(4)) == 12
    recorded = []
    hooks = [block.register_forward_hook(lambda m, i, o: recorded.append(o.permute(0, 3, 1, 2)))
             for stage in encoder.model.layers for block in stage.blocks]  # fmt: skip
    encoder.select_outputs(names)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        encoder.model.forward_features(x)
        for hook in hooks:
            hook.remove()
        got = encoder(x)
    for name, want in zip(names, recorded, strict=True):
        torch.testing.assert_close(got[name], want, msg=name)


def test_a_weights_file_loads_strictly_and_is_not_needed_to_reload(tmp_path: Path) -> None:
    path = resnet_file(tmp_path, "resnet18")
    encoder = TimmEncoder("resnet18", weights=str(path))
    assert torch.equal(encoder.model.conv1.weight, torch.load(path)["conv1.weight"])
    assert encoder.describe()["init_args"]["weights"] is None  # the checkpoint holds them
    state = torch.load(path)
    del state["layer4.1.bn2.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match=r"missing \['layer4\.1\.bn2\.weight'\], unexpected "
                       r"\['extra\.weight'\]"):  # fmt: skip
        TimmEncoder("resnet18", weights=str(tmp_path / "broken.pth"))
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet19'"):
        TimmEncoder("resnet19")


def episode(size: int = 64, shots: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    masks = torch.zeros(2, shots, size, size, dtype=torch.long)
    masks[..., size // 4 : size // 2, size // 4 : size // 2] = 1
    return torch.randn(2, 3, size, size), torch.randn(2, shots, 3, size, size), masks


@pytest.mark.parametrize("head", [PrototypeHead, PFENetHead, ASGNetHead, HSNetHead])
@pytest.mark.parametrize("encoder", ["resnet18", "convnext_atto"])
def test_the_heads_run_on_hierarchical_timm_encoders(encoder: str, head: type) -> None:
    """HSNet reads ResNet's pre-activation taps, ConvNeXt's block outputs (it has none)."""
    torch.manual_seed(0)
    model = FewShotSegmentation(TimmEncoder(encoder), head=head)
    output = model(*episode())
    assert output.logits.shape[:2] == (2, 2) and torch.isfinite(output.logits).all()
    if head is HSNetHead:
        pre = [n for n in model.head.in_features if n.endswith(".pre_relu")]
        assert bool(pre) == (encoder == "resnet18") and len(model.head.in_features) > 3


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "samvit_base_patch16"])
def test_every_head_runs_on_a_vit(name: str) -> None:
    """HSNet reads the blocks (FoundationFSS's taps); PFENet's support runs its last stage on
    its masked ``stage2`` tokens, with the class token of its own forward."""
    torch.manual_seed(0)
    encoder = TimmEncoder(name, img_size=56 if "dinov2" in name else 64)
    size = 56 if "dinov2" in name else 64
    for head in (PrototypeHead, PFENetHead, ASGNetHead, HSNetHead):
        model = FewShotSegmentation(encoder, head=head)
        assert model(*episode(size)).logits.shape[:2] == (2, 2), head
    assert model.support_mask_at is None and len(model.head.in_features) == 9  # stages 1-3
    pfenet = FewShotSegmentation(encoder, head=PFENetHead)
    assert pfenet.support_mask_at == "stage2"


def test_a_vit_resumes_only_the_images_it_last_ran() -> None:
    """The prefix tokens come from the same images' forward: masking the map's patch tokens
    equals masking them inside the network; another batch or output is refused by name."""
    torch.manual_seed(0)
    encoder = TimmEncoder("vit_small_patch14_reg4_dinov2", img_size=56).eval()
    images, mask = torch.randn(2, 3, 56, 56), (torch.rand(2, 1, 4, 4) > 0.5).float()
    with torch.no_grad():
        head = encoder.forward_from(None, images, until="stage1")
        resumed = encoder.forward_from("stage1", head["stage1"] * mask)
        model = encoder.model  # the same by hand: blocks 6.. on the masked patch tokens
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for block in model.blocks[:6]:
            tokens = block(tokens)
        tokens = torch.cat([tokens[:, :5], tokens[:, 5:] * mask.flatten(2).transpose(1, 2)], 1)
        for block in model.blocks[6:]:
            tokens = block(tokens)
    by_hand = tokens[:, 5:].transpose(1, 2).reshape(2, -1, 4, 4)
    torch.testing.assert_close(resumed["stage3"], by_hand, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"forward_from\('stage2', x\) resumes the images of "
                       r"the last forward_from\(None, images, until='stage2'\)"):  # fmt: skip
        encoder.forward_from("stage2", head["stage1"])
    encoder.forward_from(None, images, until="stage1")
    with pytest.raises(ValueError, match=r"stopped at \('stage1', 2\)"):
        encoder.forward_from("stage1", head["stage1"][:1])
    encoder.forward_from(None, images, until="stage1")
    encoder(images.flip(0))  # another forward: the record of the first is gone
    with pytest.raises(ValueError, match=r"that forward stopped at None"):
        encoder.forward_from("stage1", head["stage1"])
    normed = TimmEncoder("vit_small_patch14_dinov2", img_size=56, final_norm=True)
    assert not normed.resumable
    refused = r"^head PFENetHead multiplies the support's 'stage2' by its mask .* TimmEncoder "
    with pytest.raises(ValueError, match=refused + r"cannot \(Backbone.resumable is false\)"):
        FewShotSegmentation(normed, head=PFENetHead)


def test_dinov2_weights_in_the_releases_layout_load(tmp_path: Path) -> None:
    """facebookresearch/dinov2's layout (``mask_token``; with registers ``register_tokens``, the
    class token's position inside ``pos_embed``) loads into timm's through its checkpoint filter,
    giving timm's own tensors."""
    torch.manual_seed(0)
    reference = TimmEncoder("vit_small_patch14_reg4_dinov2", img_size=56)
    timm_state = reference.model.state_dict()
    official = {k: v for k, v in timm_state.items() if k not in ("reg_token", "cls_token")}
    first = torch.randn(1, 1, 384)  # the class token's position, folded into it by the filter
    official |= {"mask_token": torch.zeros(1, 384), "register_tokens": timm_state["reg_token"],
                 "cls_token": timm_state["cls_token"] - first,
                 "pos_embed": torch.cat([first, timm_state["pos_embed"]], 1)}  # fmt: skip
    torch.save(official, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    loaded = TimmEncoder("vit_small_patch14_reg4_dinov2", img_size=56,
                         weights=str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"))  # fmt: skip
    for key, value in timm_state.items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, msg=key)


#: The encoders every head trains on: DINOv2-S, a small Swin, ConvNeXt-Tiny, SAM's ViT-B at a
#: reduced size (4 blocks, 64 px): timm name, options, image size.
TRAINED_ENCODERS = {
    "dinov2_vits14": ("vit_small_patch14_dinov2", {"img_size": 56}, 56),
    "swin_tiny": ("swin_tiny_patch4_window7_224", {}, 64),
    "convnext_tiny": ("convnext_tiny", {}, 64),
    "samvit_base": ("samvit_base_patch16", {"img_size": 64, "timm_options": {"depth": 4}}, 64),
}


@pytest.mark.slow
@pytest.mark.parametrize("encoder", TRAINED_ENCODERS)
def test_every_head_trains_and_reloads_from_its_checkpoint_alone(
    tmp_path: Path, shapes_root: Path, encoder: str
) -> None:
    """Each head: two training steps on the encoder, then the model rebuilt from the checkpoint
    alone (no network, no file): the same tensors and the same logits."""
    name, options, size = TRAINED_ENCODERS[encoder]
    torch.manual_seed(0)
    built = TimmEncoder(name, **options)
    data = ShapesFewShot(root=str(shapes_root), num_train=200, num_test=80, image_size=size,
                         batch_size=2, num_workers=0, val_episodes=4, min_pixels=32)  # fmt: skip
    options = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
               "default_root_dir": tmp_path}  # fmt: skip
    base = Trainer(**options)  # BAM's base learner: a tasks.semantic model on this encoder
    base.strategy.connect(SemanticSegmentation(copy.deepcopy(built), num_classes=16))
    base.save_checkpoint(tmp_path / "base_learner.ckpt")
    bam = partial(BAMHead, base_learner=str(tmp_path / "base_learner.ckpt"))
    inputs = episode(size)
    for head in (PrototypeHead, PFENetHead, ASGNetHead, HSNetHead, bam):
        trained = FewShotSegmentation(copy.deepcopy(built), head=head)
        trainer = Trainer(max_steps=2, limit_val_batches=0, enable_checkpointing=False, **options)
        trainer.fit(trained, data)
        assert trainer.global_step == 2, head
        path = tmp_path / "trained.ckpt"
        trainer.save_checkpoint(path)
        reloaded = FewShotSegmentation.load_from_checkpoint(path).eval()
        trained.eval()
        for key, value in trained.state_dict().items():
            assert torch.equal(reloaded.state_dict()[key], value), (head, key)
        with torch.no_grad():
            assert torch.equal(reloaded(*inputs).logits, trained(*inputs).logits), head


# --- DINOv2's own model (facebookresearch/dinov2, dinov2/models/vision_transformer.py and
# dinov2/layers), transcribed: the hub's ViT-S/14 (layer scale 1.0, MLP FFN, unchunked blocks) --


class DinoBlock(nn.Module):
    """``NestedTensorBlock`` on a tensor: pre-norm attention and MLP, each layer-scaled."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ls1, self.ls2 = nn.Module(), nn.Module()
        self.ls1.gamma = nn.Parameter(torch.rand(dim))
        self.ls2.gamma = nn.Parameter(torch.rand(dim))
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.heads = heads

    def attention(self, x: torch.Tensor) -> torch.Tensor:  # layers/attention.py: Attention
        b, n, c = x.shape
        qkv = self.attn.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (c // self.heads) ** -0.5, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.attn.proj((attn @ v).transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1.gamma * self.attention(self.norm1(x))
        hidden = nn.functional.gelu(self.mlp.fc1(self.norm2(x)))
        return x + self.ls2.gamma * self.mlp.fc2(hidden)


class DinoViT(nn.Module):
    """``DinoVisionTransformer`` (vit_small, patch 14, img_size 518) with
    ``get_intermediate_layers``."""

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6, patch: int = 14) -> None:
        super().__init__()
        self.patch_size, grid = patch, 518 // patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, dim) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList(DinoBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        side = int(math.sqrt(n))
        w0, h0 = w // self.patch_size + 0.1, h // self.patch_size + 0.1
        patch_pos = nn.functional.interpolate(
            self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2),
            scale_factor=(w0 / side, h0 / side), mode="bicubic",
        )  # fmt: skip
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, x.shape[-1])
        return torch.cat((self.pos_embed[:, :1], patch_pos), dim=1)

    def get_intermediate_layers(self, x: torch.Tensor, n: int, norm: bool) -> list[torch.Tensor]:
        b, _, w, h = x.shape
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(tokens, w, h)
        outputs = []
        for index, block in enumerate(self.blocks):
            tokens = block(tokens)
            if index >= len(self.blocks) - n:
                outputs.append(self.norm(tokens) if norm else tokens)
        return [out[:, 1:].reshape(b, w // self.patch_size, h // self.patch_size, -1)
                .permute(0, 3, 1, 2) for out in outputs]  # fmt: skip


@pytest.mark.parametrize("norm", [False, True])
def test_dinov2_blocks_equal_dinov2s_own_get_intermediate_layers(
    tmp_path: Path, norm: bool
) -> None:
    """A state dict in the release's layout (``dinov2_vits14_pretrain.pth``, random weights from
    DINOv2's own model code) loaded through this encoder: every block's map equals DINOv2's
    ``get_intermediate_layers(12, reshape=True, norm=...)`` at its native 518 px. At 476 px the
    position embeddings are resized by different code (DINOv2: bicubic with a 0.1 offset in the
    scale factor; timm: bicubic to the size), measured and bounded here."""
    torch.manual_seed(0)
    reference = DinoViT().eval()
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(reference.state_dict(), path)
    encoder = TimmEncoder("vit_small_patch14_dinov2", weights=str(path), final_norm=norm).eval()
    blocks = [f"blocks.{i}" for i in range(12)]
    encoder.select_outputs(blocks)
    for size, tolerance in ((518, 1e-5), (476, 0.02)):  # measured: 4e-7 and 9e-3
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            got, want = encoder(x), reference.get_intermediate_layers(x, 12, norm)
        worst = max((got[n] - w).abs().max().item() / w.abs().max().item()
                    for n, w in zip(blocks, want, strict=True))  # fmt: skip
        assert worst <= tolerance, (size, worst)
