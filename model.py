"""The classifier: raw waveform in, logits out.

The spectrogram frontend is a layer of the model, so training, validation and
inference cannot preprocess differently (the original experiments lost days to a
train/infer mismatch). Everything needed to rebuild the model -- frontend
settings, backbone, head, label list, activation -- travels in `model.config`
and therefore in every checkpoint; `load_model(path)` needs nothing else.

The model returns logits. Turning logits into probabilities happens in exactly
one place, `activate()`, with the activation that matches the training loss.
"""
from __future__ import annotations

import copy
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torchaudio

# Bumped whenever the checkpoint layout changes incompatibly.
CHECKPOINT_FORMAT = 1

ACTIVATIONS = ("softmax", "sigmoid")


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for and cannot be had; never fall back to random."""


def activate(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Logits (N, C) -> scores (N, C). The one place where activations live."""
    if activation == "softmax":
        return logits.float().softmax(dim=-1)
    if activation == "sigmoid":
        return logits.float().sigmoid()
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


class MelFrontend(nn.Module):
    """Waveform (B, samples) -> normalised log-mel image (B, 1, n_mels, frames).

    Always computed in float32, even under autocast: an STFT in fp16 loses the
    quiet high-frequency detail that bird calls live in.
    """

    def __init__(self, sample_rate: int, n_fft: int, hop: int, n_mels: int,
                 fmin: float, fmax: float, normalization: str = "standard"):
        super().__init__()
        if fmax > sample_rate / 2:
            raise ValueError(f"fmax {fmax} Hz is above the Nyquist frequency of {sample_rate} Hz audio")
        if normalization not in ("standard", "minmax", "none"):
            raise ValueError(f"unknown normalization {normalization!r}")
        self.normalization = normalization
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels,
            f_min=fmin, f_max=fmax, power=2.0, center=True, pad_mode="reflect")
        # With a 4-D input torchaudio applies top_db per example, not per batch,
        # so a window's image does not depend on what else is in its batch.
        self.to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=80.0)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            image = self.melspec(waveform.float()).unsqueeze(1)  # (B, 1, n_mels, T)
            image = self.to_db(image)
            if self.normalization == "standard":
                mean = image.mean(dim=(2, 3), keepdim=True)
                std = image.std(dim=(2, 3), keepdim=True)
                image = (image - mean) / (std + 1e-6)
            elif self.normalization == "minmax":
                low = image.amin(dim=(2, 3), keepdim=True)
                high = image.amax(dim=(2, 3), keepdim=True)
                image = (image - low) / (high - low + 1e-6)
        return image


def check_backbone_name(name: str) -> None:
    """Fail with timm's own "Unknown model (...)" message for a name timm does not know."""
    if not timm.is_model(name):
        try:
            timm.create_model(name)
        except RuntimeError as error:
            raise ValueError(f"--backbone {name!r}: {error} (see timm.list_models())") from error


def create_backbone(name: str, pretrained: bool, pretrained_file: str | None) -> nn.Module:
    """A timm feature extractor with one input channel and no classifier.

    Unknown names fail with timm's own error. When pretrained weights were asked
    for and cannot be loaded, raise PretrainedWeightsError naming the alternatives.
    """
    check_backbone_name(name)
    # num_classes=0 and global_pool='' give the feature map; pooling is the head's job.
    kwargs = dict(in_chans=1, num_classes=0, global_pool="")
    if pretrained_file:
        path = Path(pretrained_file)
        if not path.is_file():
            raise PretrainedWeightsError(
                f"--pretrained-file {path} does not exist. Give the path of a local copy of the "
                f"'{name}' weights, or pass --no-pretrained to train from random initialisation.")
        # timm loads the local file and adapts the RGB stem to one channel (sums the filters).
        return timm.create_model(name, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path.resolve())), **kwargs)
    if pretrained:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as error:  # network, hub or file errors: all mean "no weights"
            raise PretrainedWeightsError(
                f"could not load pretrained weights for '{name}' from the timm hub "
                f"({type(error).__name__}: {error}). Pass --pretrained-file PATH with a local copy "
                f"of the weights, or --no-pretrained to train from random initialisation.") from error
    return timm.create_model(name, pretrained=False, **kwargs)


class BirdCallModel(nn.Module):
    """Waveform (B, samples) -> logits (B, n_classes)."""

    def __init__(self, config: dict, pretrained: bool = False, pretrained_file: str | None = None):
        super().__init__()
        self.config = copy.deepcopy(config)
        self.frontend = MelFrontend(config["sample_rate"], config["n_fft"], config["hop"],
                                    config["n_mels"], config["fmin"], config["fmax"],
                                    config["normalization"])
        self.backbone = create_backbone(config["backbone"], pretrained, pretrained_file)
        self.dropout = nn.Dropout(config["dropout"])
        self.head = nn.Linear(self.backbone.num_features, len(config["labels"]))

    @property
    def labels(self) -> list[str]:
        return self.config["labels"]

    @property
    def activation(self) -> str:
        return self.config["activation"]

    @property
    def window_samples(self) -> int:
        return int(round(self.config["window_seconds"] * self.config["sample_rate"]))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.classify(self.frontend(waveform))

    def classify(self, image: torch.Tensor) -> torch.Tensor:
        """Spectrogram image (B, 1, n_mels, T) -> logits; the part exported to ONNX."""
        features = self.backbone(image)            # (B, C, n_mels/32, T/32)
        pooled = features.mean(dim=(2, 3))         # (B, C)
        return self.head(self.dropout(pooled))     # (B, n_classes)


def model_config(args, labels: list[str]) -> dict:
    """The plain-dict description of a model, from train.py's arguments."""
    return {
        "backbone": args.backbone,
        "labels": list(labels),
        "activation": "softmax" if args.loss == "ce" else "sigmoid",
        "sample_rate": args.sample_rate,
        "window_seconds": args.window_seconds,
        "n_fft": args.n_fft,
        "hop": args.hop,
        "n_mels": args.n_mels,
        "fmin": args.fmin,
        "fmax": args.fmax,
        "normalization": args.normalization,
        "dropout": args.dropout,
    }


def build_model(args, labels: list[str]) -> BirdCallModel:
    return BirdCallModel(model_config(args, labels),
                         pretrained=args.pretrained and not args.pretrained_file,
                         pretrained_file=args.pretrained_file)


class CheckpointError(RuntimeError):
    """A file that is not a checkpoint of this project, or cannot be read safely."""


def read_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint dict with weights_only=True: a file carrying pickled code is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"cannot load {path} as a plain-data checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Checkpoints are loaded with "
            f"weights_only=True, so files that carry pickled code are refused.") from error
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_config" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint written by train.py "
                              f"(expected a dict with 'model' and 'model_config')")
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {checkpoint.get('format')!r}, "
                              f"this code reads format {CHECKPOINT_FORMAT}")
    return checkpoint


def load_model(path, map_location="cpu") -> BirdCallModel:
    """Rebuild the exact trained model from a checkpoint alone, in eval mode."""
    checkpoint = read_checkpoint(path, map_location)
    model = BirdCallModel(checkpoint["model_config"], pretrained=False)
    model.load_state_dict(checkpoint["model"])
    return model.eval()
