"""BatchNorm folding (``--to none``): structure measured, exact float64 fold, kept BatchNorms with their reasons.

References are independent of the code under test: the float64 formula written out by hand, the stock transformers
class, and the unfolded model itself.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normswap.batchnorm import (
    BatchStatisticsError,
    NothingToFoldError,
    discover,
    fold_batchnorms_,
    fold_saved_batchnorms_,
)
from normswap.batchnorm.perturb import perturb_batchnorms_


def perturb_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from identity, and nonzero-mean weights everywhere else."""
    perturb_batchnorms_(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.add_(0.02 * torch.randn(m.weight.shape, generator=gen) + 0.01)
    return model.eval()


def tiny_resnet() -> nn.Module:
    cfg = T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck",
                         num_labels=5, image_size=32)
    torch.manual_seed(0)
    return perturb_bn_(T.ResNetForImageClassification(cfg))


def tiny_mobilenet_v2() -> nn.Module:
    torch.manual_seed(0)
    return perturb_bn_(T.MobileNetV2ForImageClassification(
        T.MobileNetV2Config(image_size=32, depth_multiplier=0.25, num_labels=5)))


def tiny_levit() -> nn.Module:
    cfg = T.LevitConfig(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
                        key_dim=[8, 8, 8], num_labels=5)
    torch.manual_seed(0)
    return perturb_bn_(T.LevitForImageClassification(cfg))


def pixels(model: nn.Module, batch: int = 3, seed: int = 1) -> torch.Tensor:
    size = model.config.image_size
    return torch.randn(batch, model.config.num_channels, size, size, generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).logits.double()


def bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


@pytest.mark.parametrize("factory", [tiny_resnet, tiny_mobilenet_v2, tiny_levit])
def test_fold_is_exact_and_keeps_the_stock_form(factory):
    model = factory()
    x = pixels(model)
    before = logits(model, x)
    n_bn = bn_count(model)
    report = fold_batchnorms_(model)
    assert report.passed and report.folded
    assert len(report.folded) + len(report.kept) == n_bn
    after = logits(model, x)
    assert float((after - before).abs().max() / before.abs().max()) <= 1e-5
    for pair in report.folded:  # stored form: x + c per channel
        bn = model.get_submodule(pair.batchnorm)
        assert torch.all(bn.running_mean == 0) and torch.all(bn.weight == 1)
        assert torch.all(bn.running_var + bn.eps == 1)
    meta = model.config.normswap
    assert meta["target"] == "none" and len(meta["batchnorm_folded"]) == len(report.folded)
    # runtime form: no BatchNorm left where one was folded, same outputs
    fold_saved_batchnorms_(model, meta["batchnorm_folded"])
    assert bn_count(model) == len(report.kept)
    assert float((logits(model, x) - before).abs().max() / before.abs().max()) <= 1e-5


def test_fold_matches_the_float64_formula():
    model = tiny_resnet()
    conv = model.resnet.embedder.embedder.convolution
    bn = model.resnet.embedder.embedder.normalization
    w, mu, var = conv.weight.double().clone(), bn.running_mean.double().clone(), bn.running_var.double().clone()
    gamma, beta, eps = bn.weight.double().clone(), bn.bias.double().clone(), bn.eps
    assert conv.bias is None
    fold_batchnorms_(model)
    s = gamma / torch.sqrt(var + eps)
    torch.testing.assert_close(conv.weight.double(), (w * s[:, None, None, None]).float().double(), rtol=0, atol=0)
    torch.testing.assert_close(bn.bias.double(), ((0 - mu) * s + beta).float().double(), rtol=0, atol=0)


def test_levit_batchnorm_after_linear_folds_and_the_one_after_pooling_stays():
    model = tiny_levit()
    report = fold_batchnorms_(model)
    into = {p.batchnorm: p.into for p in report.folded}
    linear_bns = [b for b, layer in into.items() if isinstance(model.get_submodule(layer), nn.Linear)]
    assert linear_bns, "LeViT's MLPLayerWithBN (linear → flatten → BatchNorm1d) must fold"
    assert "classifier.batch_norm" in report.kept  # reads the mean over tokens, not a linear output
    assert "not from a convolution or linear layer" in report.kept["classifier.batch_norm"]


class _Probe(nn.Module):
    """A bare module with the attributes ``fold_batchnorms_`` reads (config, main input)."""

    main_input_name = "pixel_values"

    def __init__(self) -> None:
        super().__init__()
        self.config = T.PretrainedConfig(image_size=8, num_channels=3)
        self.config.model_type = "synthetic"


class BnBeforePaddedConv(_Probe):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, pixel_values):
        return (self.conv(self.bn(self.act(pixel_values))),)


class Residual(_Probe):
    """conv → BN, with the conv's output also added back: folding would change the residual."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, pixel_values):
        y = self.conv(pixel_values)
        z = self.bn2(self.conv2(self.bn(y) + y))
        return (z,)


class SharedConv(_Probe):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn_a = nn.BatchNorm2d(3)
        self.bn_b = nn.BatchNorm2d(3)

    def forward(self, pixel_values):
        return (self.bn_a(self.conv(pixel_values)) + self.bn_b(self.conv(pixel_values * 2)),)


class LinearBn(_Probe):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 6)
        self.bn = nn.BatchNorm1d(6)
        self.untracked = nn.BatchNorm1d(6, track_running_stats=False)
        self.linear2 = nn.Linear(6, 6)

    def forward(self, pixel_values):
        x = pixel_values.flatten(0, 2)  # (B*3*8, 8)
        return (self.untracked(self.linear2(self.bn(self.linear(x)))),)


def test_batchnorm_before_a_padded_conv_is_refused_with_the_reason():
    model = perturb_bn_(BnBeforePaddedConv())
    with pytest.raises(NothingToFoldError) as exc:
        fold_batchnorms_(model)
    msg = str(exc.value)
    assert "\n" not in msg and "bn" in msg and "pads" in msg and "padding zeros are not normalised" in msg


def test_residual_and_shared_producers_are_kept():
    x = {"pixel_values": torch.randn(2, 3, 8, 8)}
    found = discover(perturb_bn_(Residual()), x)
    assert [p.batchnorm for p in found.pairs] == ["bn2"]
    assert "also read by 1 other operation" in found.kept["bn"]
    found = discover(perturb_bn_(SharedConv()), x)
    assert not found.pairs and all("runs 2 times" in r for r in found.kept.values())


def test_linear_batchnorm1d_folds_and_batch_statistics_stay():
    model = perturb_bn_(LinearBn())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)[0].double()
    report = fold_batchnorms_(model, probes={"pixel_values": x})
    assert [(p.batchnorm, p.into) for p in report.folded] == [("bn", "linear")]
    assert "batch statistics" in report.kept["untracked"]
    with torch.no_grad():
        after = model(x)[0].double()
    assert float((after - before).abs().max() / before.abs().max()) <= 1e-5


def test_training_mode_and_keep_batch_stats_are_refused():
    model = tiny_resnet().train()
    with pytest.raises(BatchStatisticsError, match="training mode"):
        fold_batchnorms_(model)
    with pytest.raises(BatchStatisticsError, match="batch statistics"):
        fold_batchnorms_(model.eval(), keep_batch_stats=True)
    assert torch.all(model.resnet.embedder.embedder.normalization.weight != 1)  # nothing touched


def test_a_model_without_batchnorm_is_told_what_was_found():
    cfg = T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      image_size=16, patch_size=4)
    with pytest.raises(NothingToFoldError, match="found no BatchNorm.*LayerNorm"):
        fold_batchnorms_(T.ViTModel(cfg).eval())


class TransposedConvBn(_Probe):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 2, stride=2)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, pixel_values):
        return (self.bn(self.up(pixel_values)),)


def test_transposed_convolution_is_kept_with_the_reason():
    found = discover(perturb_bn_(TransposedConvBn()), {"pixel_values": torch.randn(2, 3, 8, 8)})
    assert not found.pairs and "transposed convolution" in found.kept["bn"]


class TwoMaps(_Probe):
    """A backbone: its first output field is a tuple of feature maps, not one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(5, affine=False)

    def forward(self, pixel_values):
        a = torch.relu(self.bn(self.conv(pixel_values)))
        return ((a, self.bn2(self.conv2(a))),)


def test_backbone_with_tuple_outputs_and_affine_free_batchnorm():
    model = perturb_bn_(TwoMaps())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = [t.double() for t in model(x)[0]]
    report = fold_batchnorms_(model, probes={"pixel_values": x})
    assert report.passed and len(report.folded) == 2
    assert report.verification.converted_error is not None  # the float64 reference ran too
    with torch.no_grad():
        after = [t.double() for t in model(x)[0]]
    for b, a in zip(before, after, strict=True):
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-5
    assert torch.any(model.bn2.running_mean != 0)  # affine=False: the running mean carries the shift
    fold_saved_batchnorms_(model, model.config.normswap["batchnorm_folded"])
    assert bn_count(model) == 0 and model.conv.bias is not None and model.conv2.bias is not None
    with torch.no_grad():
        runtime = [t.double() for t in model(x)[0]]
    for b, a in zip(before, runtime, strict=True):
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-5


class AuxiliaryHead(_Probe):
    """A branch whose result the model does not return (a training-only head): its BatchNorm still folds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.aux_conv = nn.Conv2d(4, 2, 1)
        self.aux_bn = nn.BatchNorm2d(2)

    def forward(self, pixel_values):
        main = self.bn(self.conv(pixel_values))
        self.aux_bn(self.aux_conv(main))
        return (main,)


def test_batchnorm_in_an_unreturned_branch_folds():
    found = discover(perturb_bn_(AuxiliaryHead()), {"pixel_values": torch.randn(2, 3, 8, 8)})
    assert sorted(p.batchnorm for p in found.pairs) == ["aux_bn", "bn"] and not found.kept
