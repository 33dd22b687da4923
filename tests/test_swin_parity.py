"""TimmEncoder's per-block Swin taps against DCAMA's vendored Swin (``feat_maps``), on the same
random weights saved in the layout of Microsoft's release (:mod:`reference_dcama_swin`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference_dcama_swin import SwinTransformer, dcama_swin_base, extract_feats

from backbones.timm_encoders import TimmEncoder


def randomize(model: SwinTransformer) -> None:
    """Weights no default init gives (LayerNorm affine, biases, a decisive relative position
    bias), so that a tensor loaded into the wrong place shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0.0, 1.0)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.dim() == 1:  # LayerNorm weight
                p.normal_(1.0, 0.2)


def tiny() -> SwinTransformer:
    """Swin-T (window 7, 224 px), the same code, a different window size and resolution."""
    return SwinTransformer(img_size=224, patch_size=4, window_size=7, embed_dim=96,
                           depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))  # fmt: skip


@pytest.mark.parametrize(
    ("timm_name", "build", "size"),
    [
        pytest.param("swin_base_patch4_window12_384", dcama_swin_base, 384,
                     marks=pytest.mark.slow, id="dcama-swin-b-384"),
        pytest.param("swin_tiny_patch4_window7_224", tiny, 224, id="swin-t-224"),
    ],
)  # fmt: skip
def test_swin_block_taps_equal_dcamas_feat_maps(
    tmp_path: Path, timm_name: str, build, size: int
) -> None:
    """Every block's output of TimmEncoder, loading the file as DCAMA's released
    ``swin_base_patch4_window12_384_22kto1k.pth`` holds it (``{'model': state_dict}``, Microsoft's
    names, patch merging at the end of a stage, the ``relative_position_index``/``attn_mask``
    buffers), equals DCAMA's ``extract_feats`` maps in order, in fp32 to 1e-5."""
    torch.manual_seed(0)
    reference = build().eval()
    randomize(reference)
    path = tmp_path / "swin.pth"
    torch.save({"model": reference.state_dict()}, path)
    encoder = TimmEncoder(timm_name, weights=str(path)).eval()
    blocks = [n for n in encoder.output_info if n.count(".") == 2]  # layers.{stage}.{block}
    assert len(blocks) == sum(len(layer.blocks) for layer in reference.layers)
    encoder.select_outputs(blocks)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        want = extract_feats(reference, x)
        got = encoder(x)
    assert list(got) == blocks
    for name, expected in zip(blocks, want, strict=True):
        assert encoder.output_info[name].stride == size // expected.shape[-1], name
        scale = expected.abs().max().item()
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-5 * scale, msg=name)
