"""The speed switches change nothing but speed: channels_last, torch.compile and bf16 autocast
give the results of the float64 model within float32's own error (bf16 within its precision).

The reference is float64 because float32 itself differs from it by ~1% in the gradients of
this small network (BatchNorm over 8x8 maps), and channels_last sums in another order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_segment import tiny_args

from backbones import ResNet
from tasks.heads import ASGNetHead, HSNetHead, PFENetHead, PrototypeHead
from tasks.segment import FewShotSegmentation, compile_unsupported_reason, main


def episode(size: int = 64, batch: int = 2, shots: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(batch, shots, size, size, dtype=torch.long)
    masks[..., size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = 1
    return {
        "query_image": torch.randn(batch, 3, size, size, generator=generator),
        "support_images": torch.randn(batch, shots, 3, size, size, generator=generator),
        "support_masks": masks,
        "query_mask": masks[:, 0].clone(),
    }


def loss_and_grads(model: FewShotSegmentation, batch: dict, autocast: bool = False):
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model.loss(model.segment(batch), batch["query_mask"]).total
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def build(head, **switches) -> FewShotSegmentation:
    """Dropout off: compiled code draws its random numbers from another generator."""
    torch.manual_seed(0)
    backbone = ResNet("resnet18", output_stride=8)
    model = FewShotSegmentation(backbone, head=head, freeze_backbone=False, **switches)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout2d):
            module.p = 0.0
    return model


def float64_reference(head, batch: dict):
    as_double = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    return loss_and_grads(build(head).double(), as_double)


def assert_close(reference, other, loss_tolerance: float, grad_tolerance: float) -> None:
    """Relative error of the loss and of each parameter's gradient (as a whole)."""
    (loss, grads), (other_loss, other_grads) = reference, other
    assert abs(loss - other_loss) <= loss_tolerance * abs(loss)
    assert grads.keys() == other_grads.keys()
    for name, grad in grads.items():
        error = (grad - other_grads[name].double()).norm() / grad.norm().clamp_min(1e-12)
        assert error <= grad_tolerance, (name, error.item())


@pytest.mark.slow
@pytest.mark.parametrize(
    "head",
    [PrototypeHead, ASGNetHead, PFENetHead, HSNetHead],
    ids=["prototype", "asgnet", "pfenet", "hsnet"],
)
def test_channels_last_and_bf16_match_float32(head) -> None:
    batch = episode()
    reference = float64_reference(head, batch)
    assert_close(reference, loss_and_grads(build(head), batch), 1e-5, 0.03)
    assert_close(reference, loss_and_grads(build(head, channels_last=True), batch), 1e-5, 0.03)
    loss, grads = loss_and_grads(build(head, channels_last=True), batch, autocast=True)
    # bf16 keeps 8 bits of mantissa: single small gradients move by up to ~40%, the loss and
    # the update direction as a whole do not
    assert abs(loss - reference[0]) <= 1e-3 * reference[0]
    flat = [
        torch.cat([g[n].double().flatten() for n in reference[1]]) for g in (reference[1], grads)
    ]
    assert torch.nn.functional.cosine_similarity(*flat, dim=0) >= 0.98


@pytest.mark.slow
@pytest.mark.skipif(compile_unsupported_reason() is not None, reason="torch.compile unsupported")
@pytest.mark.parametrize("head", [PrototypeHead, HSNetHead], ids=["prototype", "hsnet"])
def test_compiled_model_matches_eager(head) -> None:
    batch = episode()
    compiled = build(head, compile=True)
    assert list(compiled.state_dict()) == list(build(head).state_dict())
    assert_close(float64_reference(head, batch), loss_and_grads(compiled, batch), 1e-5, 0.03)


def test_switches_from_the_command_line(tmp_path: Path) -> None:
    main(["fit", *tiny_args(tmp_path), "--model.channels_last", "true",
          "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "1",
          "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"])  # fmt: skip
    (last,) = (tmp_path / "runs").rglob("last.ckpt")
    checkpoint = torch.load(last, weights_only=False, map_location="cpu")
    assert checkpoint["hyper_parameters"]["channels_last"] is True
    assert checkpoint["global_step"] == 2
