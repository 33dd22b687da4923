import math

import pytest
import torch

from tasks.metrics import FewShotIoU


def test_hand_computed_example():
    # Three 2x3 episodes, classes 0, 2, 0 (class 1 never occurs); 255 marks ignored pixels.
    target = torch.tensor(
        [
            [[1, 1, 0], [0, 255, 0]],
            [[0, 0, 0], [1, 1, 1]],
            [[255, 1, 1], [1, 1, 0]],
        ]
    )
    preds = torch.tensor(
        [
            [[1, 0, 0], [1, 1, 0]],
            [[0, 0, 0], [0, 1, 1]],
            [[1, 1, 1], [1, 1, 1]],
        ]
    )
    # Episode 1: fg I=1 U=3; bg I=2 U=4 (the predicted pixel under 255 does not count).
    # Episode 2: fg I=2 U=3; bg I=3 U=4.
    # Episode 3: fg I=4 U=5; bg I=0 U=1.
    metric = FewShotIoU(num_classes=3)
    metric.update(preds[:2], target[:2], torch.tensor([0, 2]))
    metric.update(preds[2:], target[2:], torch.tensor([0]))
    out = metric.compute()

    class0, class2 = (1 + 4) / (3 + 5), 2 / 3
    assert out["iou_per_class"][0].item() == pytest.approx(class0)
    assert math.isnan(out["iou_per_class"][1].item())
    assert out["iou_per_class"][2].item() == pytest.approx(class2)
    assert out["miou"].item() == pytest.approx((class0 + class2) / 2)
    fg, bg = (1 + 2 + 4) / (3 + 3 + 5), (2 + 3 + 0) / (4 + 4 + 1)
    assert out["fbiou"].item() == pytest.approx((fg + bg) / 2)


def test_absent_classes_are_nan_and_excluded():
    metric = FewShotIoU(num_classes=4)
    perfect = torch.ones(1, 4, 4, dtype=torch.long)
    metric.update(perfect, perfect, torch.tensor([3]))
    out = metric.compute()
    assert torch.isnan(out["iou_per_class"][:3]).all()
    assert out["iou_per_class"][3].item() == 1.0
    assert out["miou"].item() == 1.0


def random_episodes(generator: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
    preds = torch.randint(0, 2, (n, 8, 8), generator=generator)
    target = torch.randint(0, 2, (n, 8, 8), generator=generator)
    target[torch.rand(n, 8, 8, generator=generator) < 0.1] = 255
    return preds, target, torch.randint(0, 5, (n,), generator=generator)


def test_merged_states_equal_one_metric_over_all_data():
    generator = torch.Generator().manual_seed(0)
    first, second = random_episodes(generator, 6), random_episodes(generator, 5)
    single, rank0, rank1 = FewShotIoU(5), FewShotIoU(5), FewShotIoU(5)
    for batch in (first, second):
        single.update(*batch)
    rank0.update(*first)
    rank1.update(*second)
    rank0.merge_state(rank1)  # sum reduction, as the DDP sync does
    merged, expected = rank0.compute(), single.compute()
    for key in ("miou", "fbiou"):
        assert merged[key].item() == pytest.approx(expected[key].item())
    torch.testing.assert_close(merged["iou_per_class"], expected["iou_per_class"], equal_nan=True)


GOOD = {
    "preds": torch.zeros(2, 4, 4, dtype=torch.long),
    "target": torch.zeros(2, 4, 4, dtype=torch.long),
    "class_ids": torch.tensor([0, 2]),
}


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"preds": torch.zeros(2, 4, 4)}, "integer"),
        ({"preds": torch.zeros(4, 4, dtype=torch.long)}, "preds must have shape"),
        ({"target": torch.zeros(2, 4, 5, dtype=torch.long)}, "target shape"),
        ({"preds": torch.full((2, 4, 4), 2)}, "preds must contain"),
        ({"target": torch.full((2, 4, 4), 7)}, "target must contain"),
        ({"class_ids": torch.tensor([0, 3])}, "class_ids must lie"),
        ({"class_ids": torch.tensor([-1, 0])}, "class_ids must lie"),
        ({"class_ids": torch.tensor([0])}, "class_ids must have shape"),
    ],
)
def test_bad_inputs_name_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        FewShotIoU(num_classes=3).update(**(GOOD | bad))
