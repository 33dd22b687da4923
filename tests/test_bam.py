"""BAM: the head against a reference written from the official ``model/BAM.py``
(chunbolang/BAM), on checkpoints in the official layout; the base learner from a
``tasks.semantic`` checkpoint; the two-stage recipe on the embedded set."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures_models import randomise_norms
from lightning.pytorch import Trainer
from test_pfenet import IMAGE, episode, interp, weighted_gap
from test_semantic import ReferencePSPNet
from torch import Tensor, nn

from backbones import ResNet
from tasks import segment, semantic
from tasks.callbacks.data_settings import CHECKPOINT_KEY
from tasks.heads import BAMHead
from tasks.heads.bam import base_channel_lookup, check_base_learner_split, read_base_learner
from tasks.scoring import upsample
from tasks.segment import FewShotSegmentation
from tasks.semantic import SemanticSegmentation


def reference_gram(fea: Tensor) -> Tensor:
    """``get_gram_matrix``."""
    b, c, h, w = fea.shape
    fea = fea.reshape(b, c, h * w)
    fea_t = fea.permute(0, 2, 1)
    return torch.bmm(fea, fea_t) / (torch.bmm(fea.norm(2, 2, True), fea_t.norm(2, 1, True)) + 1e-7)


class ReferenceASPP(nn.Module):
    """``model/ASPP.py``."""

    def __init__(self, c: int = 256) -> None:
        super().__init__()
        self.layer6_0 = nn.Sequential(nn.Conv2d(c, c, 1, bias=True), nn.ReLU())
        self.layer6_1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=True), nn.ReLU())
        self.layer6_2 = nn.Sequential(nn.Conv2d(c, c, 3, padding=6, dilation=6), nn.ReLU())
        self.layer6_3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=12, dilation=12), nn.ReLU())
        self.layer6_4 = nn.Sequential(nn.Conv2d(c, c, 3, padding=18, dilation=18), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        g = self.layer6_0(F.avg_pool2d(x, kernel_size=size)).expand(-1, -1, size[0], size[1])
        return torch.cat([g, self.layer6_1(x), self.layer6_2(x), self.layer6_3(x),
                          self.layer6_4(x)], 1)  # fmt: skip


class ReferenceBAM(nn.Module):
    """``model/BAM.py``'s ``OneModel`` (ResNet-50, ``cls_type='Base'``, ``low_fea: layer2``,
    ``kshot_trans_dim: 2``) on a base learner :class:`ReferencePSPNet`, written from its
    definitions; ``forward`` returns (final, meta, base) at ``(H - 1) / 8 * 8 + 1`` and, given
    ``cat_idx`` in training, leaves that base class out of the base map."""

    def __init__(self, pspnet: ReferencePSPNet, shot: int, base_classes: int = 15) -> None:
        super().__init__()
        self.shot, self.base_classes = shot, base_classes
        self.layer0, self.layer1, self.layer2 = pspnet.layer0, pspnet.layer1, pspnet.layer2
        self.layer3, self.layer4 = pspnet.layer3, pspnet.layer4
        self.learner_base = nn.Sequential(pspnet.ppm, pspnet.cls)
        r = 256

        def down() -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(1536, r, 1, bias=False), nn.ReLU(), nn.Dropout2d(0.5))

        self.down_query, self.down_supp = down(), down()
        self.init_merge = nn.Sequential(nn.Conv2d(2 * r + 1, r, 1, bias=False), nn.ReLU())
        self.ASPP_meta = ReferenceASPP(r)
        self.res1_meta = nn.Sequential(nn.Conv2d(5 * r, r, 1, bias=False), nn.ReLU())
        self.res2_meta = nn.Sequential(
            nn.Conv2d(r, r, 3, padding=1, bias=False), nn.ReLU(),
            nn.Conv2d(r, r, 3, padding=1, bias=False), nn.ReLU(),
        )  # fmt: skip
        self.cls_meta = nn.Sequential(
            nn.Conv2d(r, r, 3, padding=1, bias=False), nn.ReLU(), nn.Dropout2d(0.1),
            nn.Conv2d(r, 2, 1),
        )  # fmt: skip
        self.gram_merge = nn.Conv2d(2, 1, 1, bias=False)
        self.cls_merge = nn.Conv2d(2, 1, 1, bias=False)
        if shot > 1:
            self.kshot_rw = nn.Sequential(nn.Conv2d(shot, 2, 1), nn.ReLU(), nn.Conv2d(2, shot, 1))

    def forward(self, x, s_x, s_y, cat_idx=None):
        bs = x.shape[0]
        h = w = int((x.shape[2] - 1) / 8 * 8 + 1)
        q0 = self.layer0(x)
        q1 = self.layer1(q0)
        q2 = self.layer2(q1)
        q3 = self.layer3(q2)
        q4 = self.layer4(q3)
        query_feat = self.down_query(torch.cat([q3, q2], 1))
        supp_pro_list, final_supp_list, mask_list, supp_feat_list = [], [], [], []
        for i in range(self.shot):
            mask = (s_y[:, i] == 1).float().unsqueeze(1)
            mask_list.append(mask)
            s2 = self.layer2(self.layer1(self.layer0(s_x[:, i])))
            s3 = self.layer3(s2)
            mask = interp(mask, s3.shape[-2:])
            final_supp_list.append(self.layer4(s3 * mask))
            supp = self.down_supp(torch.cat([s3, s2], 1))
            supp_pro_list.append(weighted_gap(supp, mask))
            supp_feat_list.append(s2)
        que_gram = reference_gram(q2)
        norm_max = torch.ones_like(que_gram).norm(dim=(1, 2))
        est_val_list = []
        for supp_item in supp_feat_list:
            diff = que_gram - reference_gram(supp_item)
            est_val_list.append((diff.norm(dim=(1, 2)) / norm_max).reshape(bs, 1, 1, 1))
        est_val_total = torch.cat(est_val_list, 1)
        if self.shot > 1:
            val1, idx1 = est_val_total.sort(1)
            _, idx2 = idx1.sort(1)
            weight = self.kshot_rw(val1).gather(1, idx2)
            weight_soft = torch.softmax(weight, 1)
        else:
            weight_soft = torch.ones_like(est_val_total)
        est_val = (weight_soft * est_val_total).sum(1, True)
        corr_list = []
        for i, tmp in enumerate(final_supp_list):
            side = tmp.size(2)
            s = tmp * interp(mask_list[i], (side, side))
            bsize, ch, sp, _ = q4.shape
            tq = q4.reshape(bsize, ch, -1)
            tq_norm = torch.norm(tq, 2, 1, True)
            ts = s.reshape(bsize, ch, -1).permute(0, 2, 1)
            ts_norm = torch.norm(ts, 2, 2, True)
            sim = torch.bmm(ts, tq) / (torch.bmm(ts_norm, tq_norm) + 1e-7)
            sim = sim.max(1)[0].reshape(bsize, sp * sp)
            low, high = sim.min(1)[0].unsqueeze(1), sim.max(1)[0].unsqueeze(1)
            sim = (sim - low) / (high - low + 1e-7)
            corr_list.append(interp(sim.reshape(bsize, 1, sp, sp), q3.shape[-2:]))
        corr_query_mask = (weight_soft * torch.cat(corr_list, 1)).sum(1, True)
        supp_pro = torch.cat(supp_pro_list, 2)
        supp_pro = (weight_soft.permute(0, 2, 1, 3) * supp_pro).sum(2, True)
        merge_feat = self.init_merge(
            torch.cat([query_feat, supp_pro.expand_as(query_feat), corr_query_mask], 1)
        )
        base_out = self.learner_base(q4)
        query_meta = self.res1_meta(self.ASPP_meta(merge_feat))
        query_meta = self.res2_meta(query_meta) + query_meta
        meta_out = self.cls_meta(query_meta)
        meta_soft, base_soft = meta_out.softmax(1), base_out.softmax(1)
        meta_bg, meta_fg = meta_soft[:, 0:1], meta_soft[:, 1:]
        if cat_idx is not None:
            c_id_array = torch.arange(self.base_classes + 1)
            maps = []
            for b in range(bs):
                c_mask = (c_id_array != 0) & (c_id_array != cat_idx[0][b] + 1)
                maps.append(base_soft[b, c_mask].unsqueeze(0).sum(1, True))
            base_map = torch.cat(maps, 0)
        else:
            base_map = base_soft[:, 1:].sum(1, True)
        est_map = est_val.expand_as(meta_fg)
        meta_bg = self.gram_merge(torch.cat([meta_bg, est_map], 1))
        meta_fg = self.gram_merge(torch.cat([meta_fg, est_map], 1))
        merge_bg = self.cls_merge(torch.cat([meta_bg, base_map], 1))
        final_out = torch.cat([merge_bg, meta_fg], 1)
        return tuple(interp(o, (h, w)) for o in (final_out, meta_out, base_out))


def official_bam(shots: int, seed: int = 0) -> ReferenceBAM:
    """Random weights everywhere (the merges off their (1, 0) start, so every input counts),
    random BatchNorm statistics; eval mode."""
    torch.manual_seed(seed)
    model = ReferenceBAM(ReferencePSPNet(16), shots)
    randomise_norms(model)
    with torch.no_grad():
        model.gram_merge.weight.copy_(torch.tensor([0.8, 0.3]).view(1, 2, 1, 1))
        model.cls_merge.weight.copy_(torch.tensor([0.7, 0.4]).view(1, 2, 1, 1))
    return model.eval()


def write_official(model: nn.Module, path: Path) -> Path:
    """As BAM's ``train.py`` saves: ``{'epoch', 'state_dict', 'optimizer'}``, ``module.``."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 200, "state_dict": state, "optimizer": {}}, path)
    return path


def assert_close(got: Tensor, want: Tensor) -> None:
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("shots", [1, 3])
def test_official_checkpoint_matches_official_forward(shots: int, tmp_path: Path) -> None:
    """A BAM model in the official layout, loaded through ``official_checkpoint``, gives the
    official forward's final, meta and base outputs (eval mode) to float32 precision."""
    reference = official_bam(shots)
    path = write_official(reference, tmp_path / "train_epoch_200.pth")
    model = FewShotSegmentation(official_checkpoint=str(path)).eval()  # K read from the file
    assert isinstance(model.head, BAMHead) and model.head.shots == shots
    assert model.backbone.summary()[1] == "resnet50-deep-os8-uniform"
    assert model.hparams.freeze_backbone and model.head.base_learner_ready
    query, support, masks = episode(2, shots)
    with torch.no_grad():
        final, meta, base = reference(query, support, masks)
        output = model(query, support, masks)
        feats = model.backbone(query)
        ours_base = model.head.base_learner.decode(feats["layer4"])
    assert_close(upsample(output.logits, (IMAGE, IMAGE)), final)
    assert_close(upsample(output.aux_logits[0], (IMAGE, IMAGE)), meta)
    assert_close(upsample(ours_base, (IMAGE, IMAGE)), base)


def test_training_leaves_the_episodes_class_out_of_the_base_map(tmp_path: Path) -> None:
    """With each episode's class (mapped to the base learner's channels as ``setup`` maps
    them), the output is the official training forward's with ``cat_idx``: BAM's base map
    without the episode's class; and the loss is its main plus the meta learner's."""
    reference = official_bam(2, seed=1)
    path = write_official(reference, tmp_path / "m.pth")
    model = FewShotSegmentation(official_checkpoint=str(path),
                                head=partial(BAMHead, shots=2)).eval()  # fmt: skip
    query, support, masks = episode(2, 2, seed=3)
    cat_idx = [torch.tensor([4, 11])]  # base-class indices (``sub_list.index``)
    target = (torch.rand(2, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0)) > 0.5).long()
    with torch.no_grad():
        final, meta, _ = reference(query, support, masks, cat_idx)
        model.head.base_channel_of = base_channel_lookup(list(range(5, 20)), 20, 15)
        output = model(query, support, masks, class_ids=cat_idx[0] + 5)  # fold 0's base
        everything = model(query, support, masks)
    assert_close(upsample(output.logits, (IMAGE, IMAGE)), final)
    assert not torch.allclose(output.logits, everything.logits)
    total, main, _ = model.loss(output, target)
    assert_close(main, F.cross_entropy(final, target))
    assert_close(total - main, F.cross_entropy(meta, target))


def test_base_channels_follow_the_folds_base_classes() -> None:
    """A fold's base class -> 1 + its rank among the base classes (BAM's ``sub_list.index``);
    novel classes -> 0; the base learner's class count must match the fold's."""
    base = [c for c in range(20) if c not in range(5, 10)]  # PASCAL-5i fold 1
    lookup = base_channel_lookup(base, 20, 15)
    assert lookup[[0, 4, 10, 19]].tolist() == [1, 5, 6, 15]
    assert lookup[5:10].tolist() == [0] * 5
    with pytest.raises(ValueError, match=r"base learner knows 15 base classes but .* has 16"):
        base_channel_lookup([*base, 7], 20, 15)


def semantic_checkpoint(tmp_path: Path, **backbone: object) -> Path:
    """A ``tasks.semantic`` model (15 base classes) saved as Lightning saves it."""
    torch.manual_seed(0)
    model = SemanticSegmentation(ResNet("resnet18", output_stride=8, **backbone), num_classes=16)
    randomise_norms(model)
    trainer = Trainer(logger=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = tmp_path / "base_learner.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_base_learner_from_a_semantic_checkpoint_sets_the_encoder_and_reloads(
    tmp_path: Path,
) -> None:
    """``base_learner`` supplies the base learner's decoder and the task's frozen encoder; the
    few-shot checkpoint holds both and reloads without the file."""
    path = semantic_checkpoint(tmp_path)
    learned = SemanticSegmentation.load_from_checkpoint(path)
    model = FewShotSegmentation(ResNet("resnet18", output_stride=8),
                                head=partial(BAMHead, base_learner=str(path)))  # fmt: skip
    assert model.hparams.freeze_backbone and model.head.num_base_classes == 15
    for key, value in learned.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    for key, value in learned.decoder.state_dict().items():
        assert torch.equal(model.head.base_learner.state_dict()[key], value), key
    assert model.hparams["head"]["init_args"]["base_learner"] is None
    trainer = Trainer(logger=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    path.rename(tmp_path / "gone.ckpt")
    trainer.save_checkpoint(tmp_path / "fewshot.ckpt")
    reloaded = FewShotSegmentation.load_from_checkpoint(tmp_path / "fewshot.ckpt")
    assert reloaded.head.base_learner_ready  # its tensors came with the checkpoint
    query, support, masks = episode(1, 1)
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(query, support, masks).logits,
                           reloaded(query, support, masks).logits)  # fmt: skip


def test_a_base_learner_of_another_encoder_or_an_unfrozen_encoder_is_refused(
    tmp_path: Path,
) -> None:
    path = semantic_checkpoint(tmp_path, stem="deep")
    with pytest.raises(ValueError, match=r"was trained with the encoder .*'stem': 'deep'"):
        FewShotSegmentation(ResNet("resnet18", output_stride=8),
                            head=partial(BAMHead, base_learner=str(path)))  # fmt: skip
    with pytest.raises(ValueError, match=r"freeze_backbone=false: BAMHead requires a frozen"):
        FewShotSegmentation(head=partial(BAMHead, num_base_classes=15), freeze_backbone=False)
    with pytest.raises(ValueError, match=r"BAMHead has no trained base learner to fit with"):
        FewShotSegmentation(head=BAMHead).on_fit_start()
    with pytest.raises(ValueError, match=r"built for shots=1 .* have 2; set --model.head"):
        FewShotSegmentation(head=BAMHead)(*episode(1, 2))


def test_a_base_learner_of_another_fold_is_refused(tmp_path: Path) -> None:
    """A base learner whose checkpoint records fold 1 (as ``tasks.semantic fit --data.fold 1``
    writes it) has learned fold 0's novel classes: fitting fold 0 on it fails before any step,
    naming both splits; on fold 1 it is accepted."""
    path = semantic_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint[CHECKPOINT_KEY] = {"dataset": "datamodules.semantic.ShapesSemantic", "fold": 1,
                                  "novel_classes": [5, 6, 7, 8, 9]}  # fmt: skip
    torch.save(checkpoint, path)
    data = ["--data.root", str(tmp_path / "shapes"), "--data.num_train", "200",
            "--data.num_test", "80", "--data.image_size", "64", "--data.num_workers", "0",
            "--data.min_pixels", "32"]  # fmt: skip
    with pytest.raises(ValueError, match=(
        rf"base_learner='{path}' was trained with fold 1 \(novel classes \[5, 6, 7, 8, 9\]\) "
        r"but the data's novel classes are \[0, 1, 2, 3, 4\]: it has learned some of them as "
        r"base classes, which would leak; train the base learner on this fold"
    )):  # fmt: skip
        segment.main(["fit", *data, "--model.head", "tasks.heads.BAMHead",
                      "--model.head.init_args.base_learner", str(path),
                      "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                      "--trainer.max_steps", "1"])  # fmt: skip
    assert not list((tmp_path / "runs").rglob("*.ckpt"))
    check_base_learner_split(read_base_learner(str(path)), [5, 6, 7, 8, 9])


@pytest.mark.slow
def test_two_stage_recipe_on_the_embedded_set(tmp_path: Path) -> None:
    """``tasks.semantic fit`` trains a base learner on the embedded set's fold 0; ``tasks.segment
    fit --model.head tasks.heads.BAMHead --model.head.init_args.base_learner`` trains and tests
    BAM on it, the base learner's channels following the fold's base classes."""
    root = str(tmp_path / "shapes")  # one generated set for both stages
    semantic.main(["fit", "--data.root", root, "--data.num_train", "200", "--data.num_test", "80",
                   "--data.image_size", "48", "--data.batch_size", "4", "--data.num_workers",
                   "0", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                   "--trainer.logger.init_args.save_dir", str(tmp_path / "base")])  # fmt: skip
    base = next((tmp_path / "base").rglob("last.ckpt"))
    data = ["--data.root", root, "--data.num_train", "200", "--data.num_test", "80",
            "--data.image_size", "64", "--data.batch_size", "2", "--data.num_workers", "0",
            "--data.val_episodes", "4", "--data.test_episodes", "8",
            "--data.min_pixels", "32"]  # fmt: skip
    cli = segment.main(["fit", *data, "--model.head", "tasks.heads.BAMHead",
                        "--model.head.init_args.base_learner", str(base),
                        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])  # fmt: skip
    assert isinstance(cli.model.head, BAMHead)
    assert cli.model.head.base_channel_of is not None
    assert cli.model.head.base_channel_of.max() == 15
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    runs = ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    tested = segment.main(["test", *data, "--ckpt_path", str(last), *runs])
    assert 0 <= tested.trainer.callback_metrics["test/miou"].item() <= 1


def test_a_released_k_shot_model_is_tested_with_no_head_option(
    tmp_path: Path, shapes_root: Path
) -> None:
    """``test --model.official_checkpoint <3-shot BAM file> --data.shots 3`` needs no head
    option (K is ``kshot_rw``'s); other episodes are refused before any step naming both
    options, and a configured K that disagrees with the file is replaced with a warning."""
    path = write_official(official_bam(3), tmp_path / "train_epoch_200.pth")
    data = ["--data.root", str(shapes_root), "--data.num_train", "200",
            "--data.num_test", "80", "--data.image_size", "65", "--data.batch_size", "2",
            "--data.num_workers", "0", "--data.test_episodes", "5", "--data.min_pixels", "32",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "runs"),
            "--model.official_checkpoint", str(path)]  # fmt: skip
    cli = segment.main(["test", *data, "--data.shots", "3"])
    assert cli.model.head.shots == 3 and 0 <= cli.trainer.callback_metrics["test/miou"] <= 1
    with pytest.raises(ValueError, match=r"BAMHead is built for 3-shot episodes .* but "
                       r"--data\.shots is 1: pass --data\.shots 3"):  # fmt: skip
        segment.main(["test", *data])
    with pytest.warns(UserWarning, match=r"built with shots=3 \(configured 5\)"):
        model = FewShotSegmentation(official_checkpoint=str(path),
                                    head=partial(BAMHead, shots=5))  # fmt: skip
    assert model.head.shots == 3
