"""DCAMA: the head and its released files against a transcription of the official model
(pawn-sxy/DCAMA ``model/DCAMA.py``, ``model/base/transformer.py``: :mod:`reference_dcama`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures_models import randomise_norms
from reference_dcama import DCAMA_model, ReferenceDCAMA, build_reference_dcama
from torch import Tensor

from backbones import FeatureInfo, FeaturePyramid, ResNet
from tasks.heads import DCAMAHead
from tasks.heads.testing import check_head
from tasks.segment import FewShotSegmentation

#: a multiple of 8, as the official decoder needs (its x2 upsampling makes squares)
IMAGE = 128


@pytest.fixture(scope="module")
def reference() -> ReferenceDCAMA:
    torch.manual_seed(0)
    model = build_reference_dcama("resnet50")
    randomise_norms(model)
    return model.eval()


def write_best_model(reference: ReferenceDCAMA, path: Path) -> Path:
    """As ``Logger.save_model_miou`` saves it: the DDP model's state dict (``module.``)."""
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, path)
    return path


def episode(batch: int, shots: int, size: int = IMAGE) -> tuple[Tensor, Tensor, Tensor]:
    """Binary support masks, as DCAMA's data code gives them (HSNet's test episodes add a 255
    band, which DCAMA's model would take as a value of 255)."""
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(batch, 3, size, size, generator=generator)
    support = torch.randn(batch, shots, 3, size, size, generator=generator)
    masks = torch.zeros(batch, shots, size, size, dtype=torch.long)
    for b in range(batch):
        for k in range(shots):
            y, x = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            masks[b, k, y : y + size // 2, x : x + size // 3] = 1
    return query, support, masks


def official_logits(reference: ReferenceDCAMA, query: Tensor, support: Tensor, masks: Tensor):
    """``predict_mask_nshot`` before its argmax, one episode at a time (its ``test.sh`` runs
    K shots at batch 1: with more episodes the official path mixes their supports)."""
    out = []
    for b in range(query.shape[0]):
        batch = {"query_img": query[b : b + 1], "support_imgs": support[b : b + 1],
                 "support_masks": masks[b : b + 1].float()}  # fmt: skip
        out.append(reference.logit_mask_nshot(batch, nshot=support.shape[1]))
    return torch.cat(out)


def test_the_head_passes_the_contract_on_resnet_and_a_swin() -> None:
    check_head(DCAMAHead, ResNet("resnet50").output_info)
    check_head(DCAMAHead, swin_base_features(), size=128)


@pytest.mark.parametrize(("batch", "shots"), [(1, 1), (1, 5), (2, 3)])
def test_a_released_file_gives_the_official_logits(
    reference: ReferenceDCAMA, tmp_path: Path, batch: int, shots: int
) -> None:
    """``best_model.pt`` of a ResNet-50 DCAMA through ``official_checkpoint``: the encoder's
    pre-activation taps, the attention and the decoder give the official logits, K shots in
    one pass; a batch of episodes gives each episode's own (the official code, at batch 1)."""
    path = write_best_model(reference, tmp_path / "best_model.pt")
    model = FewShotSegmentation(official_checkpoint=str(path)).eval()
    assert isinstance(model.head, DCAMAHead) and model.hparams.freeze_backbone
    assert model.backbone.summary()[1] == "resnet50-standard-os32"
    assert len(model.head.in_features) == 14  # layer1's last, every layer2..4 bottleneck
    query, support, masks = episode(batch, shots)
    with torch.no_grad():
        ours = model(query, support, masks).logits
        theirs = official_logits(reference, query, support, masks)
    assert ours.shape == theirs.shape == (batch, 2, IMAGE, IMAGE)
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale)


def swin_base_features() -> FeaturePyramid:
    """DCAMA's Swin-B as TimmEncoder declares it (every block of ``layers.0..3``: 2, 2, 18, 2
    blocks of 128, 256, 512, 1024 channels at strides 4..32), without building the model."""
    infos = []
    for stage, (depth, channels) in enumerate(
        zip((2, 2, 18, 2), (128, 256, 512, 1024), strict=True)
    ):
        stride = 4 * 2**stage
        for block in range(depth):
            infos.append(FeatureInfo(f"layers.{stage}.{block}", channels, stride, stage, block))
        infos.append(FeatureInfo(f"layers.{stage}", channels, stride, stage, None))
    return FeaturePyramid(infos)


@pytest.mark.parametrize("shots", [1, 5])
def test_swin_b_head_equals_the_official_model_on_the_same_features(shots: int) -> None:
    """The Swin-B model's head (``DCAMA_model`` with Swin's channels and ``stack_ids`` 2, 4,
    22, 24) and this head on the same 24 block maps (of a 128 px input; the encoders' own
    parity is ``test_swin_parity``): the same logits, K shots in one pass."""
    torch.manual_seed(0)
    official = DCAMA_model([128, 256, 512, 1024], torch.tensor([2, 4, 22, 24])).eval()
    randomise_norms(official)
    head = DCAMAHead(swin_base_features()).eval()
    head.load_official_state_dict({f"model.{k}": v for k, v in official.state_dict().items()})
    names = list(head.in_features)
    assert names[0] == "layers.0.1" and len(names) == 1 + 2 + 18 + 2
    generator = torch.Generator().manual_seed(2)
    sizes = {0: 32, 1: 16, 2: 8, 3: 4}
    blocks = [(s, b) for s, d in enumerate((2, 2, 18, 2)) for b in range(d)]

    def maps(*lead: int) -> list[Tensor]:
        return [torch.randn(*lead, 128 * 2**s, sizes[s], sizes[s], generator=generator)
                for s, _ in blocks]  # fmt: skip

    query, support = maps(1), maps(1, shots)
    masks = torch.zeros(1, shots, IMAGE, IMAGE, dtype=torch.long)
    masks[..., 20:90, 30:100] = 1
    named = {f"layers.{s}.{b}": i for i, (s, b) in enumerate(blocks)}
    with torch.no_grad():
        ours = head({n: query[named[n]] for n in names},
                    {n: support[named[n]] for n in names}, masks).logits  # fmt: skip
        per_shot = [[f[:, k] for f in support] for k in range(shots)]
        if shots == 1:
            theirs = official(query, per_shot[0], masks[:, 0].float())
        else:
            theirs = official(query, per_shot, masks.float(), shots)
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale)


def test_a_file_that_is_not_dcamas_lists_its_keys(reference: ReferenceDCAMA) -> None:
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    del state["module.model.mixer3.2.bias"]
    state["module.model.extra.weight"] = torch.zeros(1)
    head = DCAMAHead(ResNet("resnet50").output_info)
    with pytest.raises(RuntimeError, match=r"DCAMA.*missing keys \['model.mixer3.2.bias'\].*"
                       r"\['model.extra.weight'\]"):  # fmt: skip
        head.load_official_state_dict(state)
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    state["module.model.pe.1.pe"] = torch.zeros(1, 10000, 8)
    with pytest.raises(RuntimeError, match=r"model.pe.1.pe missing or not \[1, 10000, 1024\]"):
        head.load_official_state_dict(state)


@pytest.mark.slow
def test_a_released_swin_b_file_builds_timms_swin_with_its_tensors(tmp_path: Path) -> None:
    """A Swin-B ``best_model.pt`` (Microsoft's layout under ``feature_extractor.``, patch
    merging at the end of a stage) builds timm's Swin-B with the file's tensors (merging moved
    to the next stage's start) and the head attends to its 22 blocks of the last three stages;
    the block taps' parity with DCAMA's Swin is ``test_swin_parity``'s."""
    torch.manual_seed(0)
    reference = build_reference_dcama("swin")
    path = write_best_model(reference, tmp_path / "best_model.pt")
    model = FewShotSegmentation(official_checkpoint=str(path))
    assert model.backbone.summary()[0]["timm"] == "swin_base_patch4_window12_384"
    assert model.head.in_features[0] == "layers.0.1" and len(model.head.in_features) == 23
    ours, theirs = model.backbone.model.layers, reference.feature_extractor.layers
    pairs = [
        (ours[2].blocks[5].attn.qkv.weight, theirs[2].blocks[5].attn.qkv.weight),
        (ours[1].downsample.reduction.weight, theirs[0].downsample.reduction.weight),
        (ours[3].blocks[1].attn.relative_position_bias_table,
         theirs[3].blocks[1].attn.relative_position_bias_table),
    ]  # fmt: skip
    for got, want in pairs:
        assert torch.equal(got, want)
    for key, value in reference.model.state_dict().items():
        if not key.startswith("pe."):
            assert torch.equal(model.head.state_dict()[key], value), key
