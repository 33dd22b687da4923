"""The dilated ResNet encoder against torchvision's ResNet and the PSPNet recipe."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torchvision
from fixtures_models import randomise_norms
from jsonargparse import ActionConfigFile, ArgumentParser
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from backbones import ARCHS, Backbone, ResNet, WeightsError, build_backbone
from backbones.weights import torchvision_checkpoint_path

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs", "backbones").glob("*.yaml"))
DILATION_SETTINGS = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}


def torchvision_features(model: torchvision.models.ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    features = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(model, name)(x)
        features.append(x)
    return features


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# The fast lane keeps one network per block type and width; the deep and wide ones run in CI.
FAST_ARCHS = ("resnet18", "resnet34", "resnet50")


@pytest.mark.parametrize(
    "arch", [a if a in FAST_ARCHS else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS]
)
def test_parity_with_torchvision(arch: str, image: torch.Tensor, tmp_path: Path) -> None:
    """torchvision's state dict, loaded by path, reproduces its features at OS 32/16/8."""
    torch.manual_seed(0)
    settings = DILATION_SETTINGS if ARCHS[arch].block.__name__ == "Bottleneck" else {32: None}
    reference = getattr(torchvision.models, arch)()
    randomise_norms(reference)
    path = tmp_path / f"{arch}.pth"
    torch.save(reference.state_dict(), path)
    for output_stride, replace in settings.items():
        if replace is not None:
            reference = getattr(torchvision.models, arch)(replace_stride_with_dilation=replace)
            reference.load_state_dict(torch.load(path))
        ours = build_backbone(arch, output_stride=output_stride, weights=str(path)).eval()
        with torch.no_grad():
            expected = torchvision_features(reference.eval(), image)
            got = ours(image)
        assert list(got) == ["layer1", "layer2", "layer3", "layer4"]
        for name, want in zip(got, expected, strict=True):
            assert got[name].shape == want.shape, (arch, output_stride, name)
            assert (got[name] - want).abs().max() < 1e-5, (arch, output_stride, name)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34"])
def test_basic_block_dilation_matches_strided_network(arch: str, image: torch.Tensor) -> None:
    """Contracted dilation is the strided network evaluated densely: subsampling the dilated
    features by the traded stride gives the strided network's features exactly."""
    torch.manual_seed(0)
    strided = build_backbone(arch, output_stride=32).eval()
    randomise_norms(strided)
    with torch.no_grad():
        reference = strided(image)
    for output_stride, steps in ((16, {"layer4": 2}), (8, {"layer3": 2, "layer4": 4})):
        dilated = build_backbone(arch, output_stride=output_stride).eval()
        dilated.load_state_dict(strided.state_dict())
        with torch.no_grad():
            features = dilated(image)
        for info in dilated.feature_info:
            step = steps.get(info.name, 1)
            assert info.stride == strided.output_info[info.name].stride // step
            assert features[info.name].shape[-1] == image.shape[-1] // info.stride
            sub = features[info.name][..., ::step, ::step]
            want = reference[info.name]
            error = (sub - want).abs().max() / want.abs().max()
            assert error < 1e-6, (arch, output_stride, info)
        rate = steps["layer4"]
        blocks = len(dilated.layer4)
        expected = [(rate // 2, rate)] + [(rate, rate)] * (blocks - 1)
        assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in dilated.layer4] == expected


def pspnet_reference(image_size: int = 64) -> torchvision.models.ResNet:
    """torchvision ResNet-50 dilated the way PSPNet/PFENet/ASGNet do it after construction."""
    model = torchvision.models.resnet50()
    for stage, rate in (("layer3", 2), ("layer4", 4)):
        for name, module in getattr(model, stage).named_modules():
            if "conv2" in name:
                module.dilation, module.padding, module.stride = (rate, rate), (rate, rate), (1, 1)
            elif "downsample.0" in name:
                module.stride = (1, 1)
    return model


def test_uniform_scheme_matches_pspnet_recipe(image: torch.Tensor, tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = pspnet_reference()
    randomise_norms(reference)
    torch.save(reference.state_dict(), tmp_path / "r50.pth")
    ours = ResNet(
        "resnet50", output_stride=8, dilation_scheme="uniform", weights=str(tmp_path / "r50.pth")
    )
    assert [b.conv2.dilation[0] for b in ours.layer3] == [2] * 6
    assert [b.conv2.dilation[0] for b in ours.layer4] == [4] * 3
    assert ours.layer3[0].downsample[0].stride == (1, 1)
    contracted = ResNet("resnet50", output_stride=8)
    assert contracted.layer3[0].conv2.dilation[0] == 1
    assert contracted.layer4[0].conv2.dilation[0] == 2
    with torch.no_grad():
        expected = torchvision_features(reference.eval(), image)
        got = ours.eval()(image)
    for want, name in zip(expected, got, strict=True):
        assert (got[name] - want).abs().max() < 1e-5, name


def test_multi_grid_rates() -> None:
    model = build_backbone("resnet50", output_stride=16, multi_grid=(1, 2, 4))
    assert [b.conv2.dilation[0] for b in model.layer4] == [2, 4, 8]
    assert [b.conv2.padding[0] for b in model.layer4] == [2, 4, 8]
    at_os8 = build_backbone("resnet101", output_stride=8, multi_grid={"layer4": [1, 2, 1]})
    assert [b.conv2.dilation[0] for b in at_os8.layer4] == [4, 8, 4]
    assert at_os8(torch.randn(1, 3, 33, 33))["layer4"].shape[-1] == 5


def test_deep_stem_has_pspnet_channels() -> None:
    model = build_backbone("resnet50", stem="deep", output_stride=8, dilation_scheme="uniform")
    convs = [m for m in model.stem if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 2),
        (64, 64, 1),
        (64, 128, 1),
    ]
    assert model.layer1[0].conv1.in_channels == 128
    assert model.layer1[0].downsample[0].in_channels == 128
    features = build_backbone("resnet50", stem="deep", out_layers=["stem", "layer1"])(
        torch.randn(2, 3, 64, 64)
    )
    assert {k: v.shape[1:] for k, v in features.items()} == {
        "stem": (128, 16, 16),
        "layer1": (256, 16, 16),
    }


def pspnet_layout(model: ResNet, with_fc: bool = True) -> dict[str, torch.Tensor]:
    state = {k.removeprefix("stem."): v.clone() for k, v in model.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if with_fc:
        state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    return state


def pfenet_layout(model: ResNet) -> dict[str, torch.Tensor]:
    index = {"conv1": 0, "bn1": 1, "conv2": 3, "bn2": 4, "conv3": 6, "bn3": 7}
    state = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "stem":
            key = ".".join(["layer0", str(index[parts[1]]), *parts[2:]])
        state["module." + key] = value.clone()
    state["module.down_query.0.weight"] = torch.randn(256, 1536, 1, 1)
    return {"state_dict": state, "epoch": 200}


@pytest.mark.parametrize("layout", [pspnet_layout, pfenet_layout])
def test_deep_stem_checkpoints_round_trip(layout, image: torch.Tensor, tmp_path: Path) -> None:
    torch.manual_seed(0)
    options = dict(stem="deep", output_stride=8, dilation_scheme="uniform")
    source = build_backbone("resnet50", **options).eval()
    randomise_norms(source)
    path = tmp_path / "resnet50_v2.pth"
    torch.save(layout(source), path)
    loaded = build_backbone("resnet50", weights=str(path), **options).eval()
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        assert all(
            torch.equal(a, b)
            for a, b in zip(source(image).values(), loaded(image).values(), strict=True)
        )


def test_lightning_checkpoint_loads_backbone_only(tmp_path: Path) -> None:
    source = build_backbone("resnet18")
    state = {"backbone." + k: v for k, v in source.state_dict().items()}
    state["classifier.weight"] = torch.randn(10, 512)
    path = tmp_path / "last.ckpt"
    torch.save({"pytorch-lightning_version": "2.5.0", "state_dict": state, "epoch": 3}, path)
    from backbones import load_weights

    target = build_backbone("resnet18")
    report = load_weights(target, path)
    assert report.layout == "lightning"
    assert report.skipped == ["classifier.weight"]
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())


def test_torchvision_weight_name_uses_download_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url, cached = torchvision_checkpoint_path("resnet18", "IMAGENET1K_V1")
    assert cached.parent == tmp_path / "hub" / "checkpoints"
    assert url.endswith(cached.name)
    reference = torchvision.models.resnet18()
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    model = build_backbone("resnet18", weights="IMAGENET1K_V1")
    assert torch.equal(model.stem.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_freezing_keeps_parameters_and_statistics_bit_identical() -> None:
    torch.manual_seed(0)
    model = build_backbone("resnet18", output_stride=8, frozen_stages=2)
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    assert not model.stem.training and not model.layer2.training and model.layer3.training
    for _ in range(3):
        loss = model(torch.randn(2, 3, 64, 64))["layer4"].square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    for key, value in before.items():
        frozen = key.startswith(("stem.", "layer1.", "layer2."))
        assert torch.equal(after[key], value) == frozen, key


def test_norm_eval_keeps_all_statistics() -> None:
    torch.manual_seed(0)
    model = build_backbone("resnet18", norm_eval=True).train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(2, 3, 32, 32))["layer4"].mean().backward()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    assert model.layer3[0].conv1.weight.grad is not None
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model).train()
    assert all(not m.training for m in synced.modules() if isinstance(m, nn.SyncBatchNorm))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_gradient_checkpointing_is_exact(arch: str) -> None:
    torch.manual_seed(0)
    plain = build_backbone(arch, output_stride=8, frozen_stages=0).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.grad_checkpointing = True
    x = torch.randn(2, 3, 48, 48)
    outputs = []
    for model in (plain, checkpointed):
        features = model(x)
        (features["layer4"].square().mean() + features["layer2"].mean()).backward()
        outputs.append(features)
    for name in outputs[0]:
        assert (outputs[0][name] - outputs[1][name]).abs().max() < 1e-6
    for (key, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        if p.requires_grad:
            assert (p.grad - q.grad).abs().max() < 1e-6, key
    for (key, buffer), other in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        assert torch.equal(buffer, other), key


def test_frozen_batchnorm_and_zero_init() -> None:
    torch.manual_seed(0)
    model = build_backbone("resnet50", zero_init_residual=True)
    assert all(torch.count_nonzero(block.bn3.weight) == 0 for block in model.layer1)
    frozen = build_backbone("resnet50", norm_layer="frozen_batchnorm")
    assert isinstance(frozen.stem.bn1, FrozenBatchNorm2d)
    model.eval()
    frozen.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "num_batches" not in k}, strict=True
    )
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (frozen(x)["layer4"] - model(x)["layer4"]).abs().max() < 1e-5


def test_channels_last_and_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = build_backbone("resnet50", output_stride=8, stem="deep").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)["layer4"]
        cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        channels_last = cl_model(x.to(memory_format=torch.channels_last))["layer4"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x)["layer4"]
    assert (channels_last - reference).abs().max() / reference.abs().max() < 1e-5
    assert half.dtype == torch.bfloat16
    assert (
        torch.nn.functional.cosine_similarity(half.float().flatten(), reference.flatten(), 0) > 0.99
    )


class BackboneHolder:
    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_backbone_configs_instantiate(config: Path) -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    # As LightningCLI adds a task: sub_configs lets ``--model.backbone FILE.yaml`` load the file.
    parser.add_class_arguments(BackboneHolder, "model", sub_configs=True)
    parsed = parser.parse_args(["--model.backbone", str(config)])
    if "weights" in parsed.model.backbone.init_args:  # a torchvision name: not offline
        parsed.model.backbone.init_args.weights = None
    model = parser.instantiate_classes(parsed).model.backbone
    assert isinstance(model, Backbone)
    if isinstance(model, ResNet):
        assert model.output_info["layer4"].stride == model.output_stride


BAD_OPTIONS = [
    (dict(name="resnet51"), "unknown backbone arch 'resnet51'"),
    (dict(name="resnet50", output_stride=12), "output_stride=12"),
    (dict(name="resnet50", multi_grid={"layer5": [1, 2]}), "stage 'layer5'"),
    (dict(name="resnet50", multi_grid=[1, 2]), "expected 3 positive multipliers"),
    (dict(name="resnet50", dilation_scheme="dense"), "dilation_scheme='dense'"),
    (dict(name="resnet50", stem="tiny"), "stem='tiny'"),
    (dict(name="resnet50", out_layers=["layer5"]), "out_layers"),
    (dict(name="resnet50", frozen_stages=5), "frozen_stages=5"),
    (dict(name="resnet50", norm_layer="layernorm"), "norm_layer='layernorm'"),
    (dict(name="resnet50", dilaton=2), "unknown backbone option(s) ['dilaton']"),
    (dict(name="resnet50", weights="IMAGENET_V9"), "neither an existing checkpoint"),
    (dict(name="resnet50", weights="missing.pth"), "missing.pth' does not exist"),
    (dict(name="resnet50", stem="deep", weights="IMAGENET1K_V2"), "stem='deep'"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS)
def test_bad_options_name_the_problem(options: dict, message: str) -> None:
    options = dict(options)
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as error:
        build_backbone(options.pop("name"), **options)
    assert message in str(error.value)


def test_weights_of_another_depth_list_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(WeightsError, match=r"missing: layer1\.2\.bn1\.bias") as error:
        build_backbone("resnet34", weights=str(path))
    assert str(path) in str(error.value)
    with pytest.raises(WeightsError, match=r"shape mismatch: .*\(expected"):
        build_backbone("resnet18", stem="deep", weights=str(path))


def test_corrupt_and_truncated_checkpoints(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"could not read checkpoint .*corrupt\.pth"):
        build_backbone("resnet18", weights=str(corrupt))
    whole = tmp_path / "whole.pth"
    torch.save(torchvision.models.resnet18().state_dict(), whole)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(WeightsError, match=r"could not read checkpoint .*truncated\.pth"):
        build_backbone("resnet18", weights=str(truncated))


def test_offline_torchvision_weights_say_where_to_put_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # no network, even where there is one
    _, cached = torchvision_checkpoint_path("resnet18", "IMAGENET1K_V1")
    with pytest.raises(WeightsError, match="place it at") as error:
        build_backbone("resnet18", weights="IMAGENET1K_V1")
    assert str(cached) in str(error.value)


def test_stages_after_the_last_output_are_not_run() -> None:
    model = build_backbone("resnet18", out_layers=["stem", "layer2"])
    assert [m is model.layer3 or m is model.layer4 for m in model.idle_stages()] == [True, True]
    calls = []
    model.layer3.register_forward_hook(lambda *args: calls.append("layer3"))
    assert list(model(torch.randn(1, 3, 32, 32))) == ["stem", "layer2"]
    assert calls == []
    assert [i.name for i in model.feature_info] == ["stem", "layer2"]


@pytest.mark.parametrize("split", ["stem", "layer1", "layer2.0", "layer3.0", "layer3"])
def test_forward_from_splits_the_forward_anywhere(split: str) -> None:
    """``forward_from(None, x, until=split)`` then ``forward_from(split, ...)`` give the outputs
    of one forward, each once, and run only the modules on their side of ``split``."""
    torch.manual_seed(0)
    outputs = ["stem", "layer1", "layer2.0", "layer2", "layer3.0", "layer3", "layer4"]
    model = build_backbone("resnet18", output_stride=16, out_layers=outputs).eval()
    x = torch.randn(1, 3, 48, 48)
    expected = model(x)
    calls = []
    for name in ("layer1", "layer4"):
        getattr(model, name).register_forward_hook(lambda *args, n=name: calls.append(n))
    head = model.forward_from(None, x, until=split)
    tail = model.forward_from(split, head[split])
    order = list(model.output_info)
    assert list(head) == [n for n in outputs if order.index(n) <= order.index(split)]
    assert list(tail) == [n for n in outputs if order.index(n) > order.index(split)]
    assert calls.count("layer1") == 1 and calls.count("layer4") == 1
    for name, value in {**head, **tail}.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"until='layer2' does not come after 'layer3'"):
        model.forward_from("layer3", head[split], until="layer2")
    with pytest.raises(ValueError, match=r"unknown output 'layer5'"):
        model.forward_from("layer5", x)
