"""Any timm backbone a competitor picks trains, or fails when the model is built, naming the fix (issue 18).

Each family is built the way train.py builds it (one input channel, no classifier, no pooling,
random weights: nothing is downloaded) on a short input -- 2 s at 16 kHz, hop 256, 80 mels: an
80x126 image, whose sides are not multiples of 32 -- and run forward on a batch of two. The
families are the 28 backbones of the issue (18 that worked, 10 that failed at the first training
step), a few more layouts (NHWC, tokens) and one that timm cannot build without pooling.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from conftest import quick_args

import model as model_lib
import train

SAMPLE_RATE, SECONDS, N_FFT, HOP, N_MELS, FMAX = 16000, 2.0, 512, 256, 80, 8000.0
IMAGE = (N_MELS, 1 + int(SECONDS * SAMPLE_RATE) // HOP)                   # (80, 126)

# family -> what the model has to do for it:
#   plain      nothing; the head sits on num_features channels, as before issue 18
#   head_conv  a head convolution after timm's pooling: C = head_hidden_size, not num_features
#   pad        the image is padded to multiples of the stride (32) inside the model
#   nhwc       timm returns (B, H', W', C); the model permutes it
#   tokens     timm returns (B, prefix + H'W', C) tokens; the model puts them back on their grid
#   (H, W)     a fixed input size: refused with "pass --img-size HxW", then built with it
FAMILIES = {
    # worked before: unchanged
    "resnet18": "plain", "resnet34": "plain", "convnext_atto": "plain", "regnety_002": "plain",
    "efficientnet_b0": "plain", "tf_efficientnetv2_b0": "plain", "tf_efficientnetv2_s": "plain",
    "rexnet_100": "plain", "densenet121": "plain", "efficientvit_m0": "plain", "mobilevit_xxs": "plain",
    "fastvit_t8": "plain", "eca_nfnet_l0": "plain", "resnest14d": "plain", "inception_v3": "plain",
    "seresnext26t_32x4d": "plain", "mixnet_s": "plain", "edgenext_xx_small": "plain",
    # failed at the first training step before issue 18
    "mobilenetv3_small_100": "head_conv", "mobilenetv3_large_100": "head_conv",
    "mobilenetv4_conv_small": "head_conv", "ghostnet_100": "head_conv", "lcnet_050": "head_conv",
    "dla34": "pad", "hrnet_w18_small": "pad",
    "maxvit_nano_rw_256": (256, 256), "coatnet_nano_rw_224": (224, 224), "vit_tiny_patch16_224": (224, 224),
    # other layouts
    "swin_tiny_patch4_window7_224": (224, 224),          # NHWC as well
    "mambaout_femto": "nhwc",                            # NHWC with a head convolution
    "xcit_nano_12_p16_224": "tokens",                    # a partial last column of patches counts
    "twins_svt_small": "tokens",                         # drops a partial last column: padded to whole patches
}
LAYOUTS = {"swin_tiny_patch4_window7_224": "NHWC", "mambaout_femto": "NHWC", "vit_tiny_patch16_224": "tokens",
           "xcit_nano_12_p16_224": "tokens", "twins_svt_small": "tokens"}     # the others: NCHW
HEAD_CONV = {"mobilenetv3_small_100", "mobilenetv3_large_100", "mobilenetv4_conv_small", "ghostnet_100",
             "lcnet_050", "mambaout_femto"}
PADDED = {"dla34", "hrnet_w18_small", "twins_svt_small"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batches of two small images: one thread is as fast, and far faster beside another busy process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_config(backbone: str, head: str = "linear", img_size=None) -> dict:
    return {"backbone": backbone, "labels": ["aaa1", "bbb1", "ccc1"], "activation": "softmax",
            "sample_rate": SAMPLE_RATE, "window_seconds": SECONDS, "n_fft": N_FFT, "hop": HOP, "n_mels": N_MELS,
            "fmin": 50.0, "fmax": FMAX, "normalization": "standard", "dropout": 0.0, "frontend": "mel",
            "img_size": img_size, "head": head}


def waveforms(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Chirps over noise, one per example, at different levels."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(int(SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    chirps = torch.stack([torch.sin(2 * math.pi * (800 + 900 * i) * t * (1 + t)) * 10 ** -i for i in range(batch)])
    return 0.3 * chirps + 0.01 * torch.randn(batch, len(t), generator=generator)


def heads_for(name: str) -> tuple[str, ...]:
    """Every head on the families that change the width or layout; the sed head, which needs the time
    axis, on padded and re-laid-out ones; the linear head (the old behaviour) on plain ones."""
    if name in HEAD_CONV:
        return model_lib.HEADS
    return ("linear",) if FAMILIES[name] == "plain" else ("sed",)


def check_forward(net: model_lib.BirdCallModel, image_size: tuple[int, int]) -> None:
    """One batch through the model: logits (2, 3), the head on the channels the backbone returns."""
    x = waveforms()
    with torch.no_grad():
        image = net.frontend(x)
        assert image.shape == (2, 1, *image_size)
        features = net.features(image)                                     # (2, C, F', T')
        logits = net(x)
    assert features.ndim == 4 and features.shape[0] == 2 and features.shape[2] * features.shape[3] >= 1
    assert logits.shape == (2, 3) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    channels = features.shape[1]
    if net.head_type == "sed":
        assert net.head.framewise.in_channels == net.head.attention.in_channels == channels
        frames = net.framewise_logits(x)
        assert frames.shape == (2, features.shape[3], 3)
        torch.testing.assert_close(net.sed_outputs(x)[0], logits, atol=1e-6, rtol=1e-5)
    else:
        linears = [module for module in net.head.modules() if isinstance(module, nn.Linear)]
        assert linears[0].in_features == channels and linears[-1].out_features == 3
    backbone = net.backbone
    if net.config["backbone"] in HEAD_CONV:
        assert channels == backbone.head_hidden_size != backbone.num_features
    else:
        assert channels == backbone.num_features


@pytest.mark.parametrize("name", list(FAMILIES))
def test_backbone_family_builds_and_runs_one_batch(name):
    kind = FAMILIES[name]
    torch.manual_seed(0)
    if isinstance(kind, tuple):                                   # fixed size: refused first, naming the fix
        size = f"{kind[0]}x{kind[1]}"
        with pytest.raises(ValueError) as raised:
            model_lib.BirdCallModel(make_config(name))
        assert str(raised.value) == (f"--backbone {name} needs a {size} image, not the {IMAGE[0]}x{IMAGE[1]} "
                                     f"spectrogram: pass --img-size {size}")
    for head in heads_for(name):
        img_size = list(kind) if isinstance(kind, tuple) else None
        net = model_lib.BirdCallModel(make_config(name, head, img_size))
        assert net.training and net.backbone.training                # the probe ran in eval mode, then restored
        check_forward(net.eval(), tuple(img_size) if img_size else IMAGE)
        assert net.feature_layout == LAYOUTS.get(name, "NCHW")
        if name in PADDED:
            assert net.config["pad_to_multiple"] == [32, 32] and net.pad_multiple == (32, 32)
        else:
            assert "pad_to_multiple" not in net.config and net.pad_multiple == (1, 1)
        if kind == "plain":   # exactly the model before issue 18: backbone -> mean -> Linear(num_features)
            x = waveforms(seed=1)
            with torch.no_grad():
                old = net.head(net.dropout(net.backbone(net.frontend(x)).mean(dim=(2, 3))))
                assert torch.equal(net(x), old)


def test_padding_is_inside_the_model_with_silence_after_the_window():
    torch.manual_seed(0)
    net = model_lib.BirdCallModel(make_config("dla34")).eval()
    x = waveforms(3)
    with torch.no_grad():
        image = net.frontend(x)                                            # (3, 1, 80, 126)
        padded = model_lib.pad_image(image, net.pad_multiple)              # (3, 1, 96, 128)
        assert padded.shape == (3, 1, 96, 128)
        assert torch.equal(padded[..., :80, :126], image)
        floor = image.amin(dim=(1, 2, 3))                                  # each example's own silence
        for example in range(3):
            assert torch.equal(padded[example, :, 80:], floor[example].expand(1, 16, 128))
            assert torch.equal(padded[example, :, :, 126:], floor[example].expand(1, 96, 2))
        # classify pads: the logits are those of the backbone on the padded image
        expected = net.head(net.dropout(net.backbone(padded).mean(dim=(2, 3))))
        torch.testing.assert_close(net.classify(image), expected, atol=0, rtol=0)
        # an example's padding, and so its logits, do not depend on its batch mates
        torch.testing.assert_close(net(x[1:2]), net(x)[1:2], atol=1e-5, rtol=1e-5)
    assert model_lib.pad_image(image, (1, 1)) is image
    assert model_lib.pad_image(image, (16, 2)) is image                    # 80 and 126 are multiples already


def test_padded_checkpoint_keeps_its_padding_and_reloads_exactly(tmp_path):
    torch.manual_seed(1)
    original = model_lib.BirdCallModel(make_config("dla34", "sed")).eval()
    path = tmp_path / "best.pt"
    torch.save({"format": model_lib.CHECKPOINT_FORMAT, "model": original.state_dict(),
                "model_config": original.config, "labels": original.labels}, path)
    loaded = model_lib.load_model(path)
    assert loaded.config == original.config and loaded.pad_multiple == (32, 32)
    x = waveforms(2, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))
        assert torch.equal(loaded.framewise_logits(x), original.framewise_logits(x))


@pytest.mark.parametrize("name, img_size", [("dla34", None), ("vit_tiny_patch16_224", [224, 224])])
def test_padded_and_token_models_export_to_onnx_with_the_same_scores(name, img_size):
    """classify (padding, backbone, token grid, head) is what infer.py exports: it must trace."""
    pytest.importorskip("onnxruntime")
    import engines
    torch.manual_seed(2)
    net = model_lib.BirdCallModel(make_config(name, "sed", img_size)).eval()
    x = waveforms(3, seed=5)
    with torch.no_grad():
        expected = net(x)
    runner = engines.ExportedRunner(net, "onnxruntime", bf16=False, threads=1, tolerance=1e-4)
    torch.testing.assert_close(runner(x), expected, atol=1e-4, rtol=1e-4)   # batch 3, exported with 2


def test_a_backbone_timm_cannot_build_without_pooling_is_refused_in_one_line():
    with pytest.raises(ValueError) as raised:
        model_lib.BirdCallModel(make_config("efficientvit_b0"))
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("--backbone efficientvit_b0 cannot be built as a feature extractor")
    assert "Cannot disable pooling" in message and message.endswith("choose another backbone")


def test_train_stops_before_reading_any_data_naming_the_img_size(tmp_path, caplog):
    """train.py's argument check builds the model with random weights: no data, no download."""
    args = quick_args(tmp_path / "no-such-data", tmp_path / "run", "--backbone", "vit_tiny_patch16_224")
    with pytest.raises(ValueError, match=r"^--backbone vit_tiny_patch16_224 needs a 224x224 image, not the "
                                         r"32x126 spectrogram: pass --img-size 224x224$"):
        train.main(args)
    assert not (tmp_path / "run").exists()
    # a padded backbone passes the check and says so; the run then stops at the missing data
    caplog.set_level("INFO", logger="birdclef")
    args = quick_args(tmp_path / "no-such-data", tmp_path / "run", "--backbone", "dla34")
    with pytest.raises((FileNotFoundError, ValueError), match="no-such-data"):
        train.main(args)
    assert "the 32x126 spectrogram image is padded to 32x128 inside the model" in caplog.text
