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

import argparse
import copy
import logging
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn

import frontend as frontend_lib

log = logging.getLogger("birdclef")

# Bumped whenever the checkpoint layout changes incompatibly.
CHECKPOINT_FORMAT = 1

ACTIVATIONS = ("softmax", "sigmoid")
HEADS = ("linear", "mlp", "sed")
HEAD_INITS = ("copy", "fresh", "extend")      # --init-from: what becomes of the pre-trained head


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for and cannot be had; never fall back to random."""


def activate(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Logits (N, C) -> scores (N, C). The one place where activations live."""
    if activation == "softmax":
        return logits.float().softmax(dim=-1)
    if activation == "sigmoid":
        return logits.float().sigmoid()
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def checked_scores(logits: torch.Tensor, activation: str, source: str) -> np.ndarray:
    """Logits (N, C) -> activated scores as numpy, refusing non-finite logits.

    Evaluation, soundscape validation and inference all pass through here, so no
    nan/inf ever reaches a metric or a submission.
    """
    bad = int((~torch.isfinite(logits)).sum())
    if bad:
        raise FloatingPointError(f"{source} produced {bad} non-finite logits; refusing to score or submit them")
    return activate(logits, activation).numpy()


def check_backbone_name(name: str) -> None:
    """Fail with timm's own "Unknown model (...)" message for a name timm does not know."""
    if not timm.is_model(name):
        try:
            timm.create_model(name)
        except RuntimeError as error:
            raise ValueError(f"--backbone {name!r}: {error} (see timm.list_models())") from error


def first_line(error: BaseException) -> str:
    """'TypeName: first line of the message', for one-line errors (some timm asserts have no message)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def create_backbone(name: str, pretrained: bool, pretrained_file: str | None) -> nn.Module:
    """A timm feature extractor with one input channel and no classifier.

    Unknown names fail with timm's own error; a model timm cannot build without its classifier and
    pooling fails with a one-line ValueError. When pretrained weights were asked for and cannot be
    loaded, raise PretrainedWeightsError naming the alternatives.
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
        try:
            return timm.create_model(name, pretrained=True,
                                     pretrained_cfg_overlay=dict(file=str(path.resolve())), **kwargs)
        except (RuntimeError, KeyError) as error:   # load_state_dict's mismatches (~100 lines); older timm: KeyError
            if isinstance(error, RuntimeError) and "state_dict" not in str(error) and "size mismatch" not in str(error):
                raise
            guess = backbone_of_weights(path, name)
            raise PretrainedWeightsError(
                f"--pretrained-file {path} does not fit --backbone {name} ({first_line(error)[:120]}...); "
                + (f"it looks like weights for --backbone {guess}" if guess else
                   "no backbone of that family has these tensor shapes")) from None
    if pretrained:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as error:  # network, hub or file errors: all mean "no weights"
            raise PretrainedWeightsError(
                f"could not load pretrained weights for '{name}' from the timm hub "
                f"({type(error).__name__}: {error}). Pass --pretrained-file PATH with a local copy "
                f"of the weights, or --no-pretrained to train from random initialisation.") from error
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as error:  # e.g. "Cannot disable pooling": the model has no unpooled feature map
        raise ValueError(f"--backbone {name} cannot be built as a feature extractor (timm.create_model with "
                         f"in_chans=1, num_classes=0, global_pool='': {first_line(error)}); choose another "
                         f"backbone") from error


# Backbones BirdCLEF solutions used, tried first when guessing what a weights file is for.
COMMON_BACKBONES = ("tf_efficientnet_b0", "tf_efficientnet_b1", "tf_efficientnet_b2", "tf_efficientnet_b3",
                    "efficientnet_b0", "tf_efficientnetv2_s", "tf_efficientnetv2_b0", "tf_efficientnetv2_b3",
                    "efficientnetv2_rw_s", "eca_nfnet_l0", "resnet18", "resnet34", "resnet50", "seresnext26t_32x4d",
                    "regnety_008", "convnext_tiny", "mobilenetv3_large_100", "rexnet_150")


def backbone_of_weights(path: Path, requested: str, limit: int = 60) -> str | None:
    """The timm backbone whose tensors (names and shapes, classifier aside) all match a weights file, among
    the common BirdCLEF backbones and the requested one's family; None if none does. Models are built
    on the meta device: no memory, no download."""
    from timm.models import load_state_dict
    weights = {key: tuple(value.shape) for key, value in load_state_dict(str(path)).items()}
    family = re.match(r"(tf_)?[a-z]+", requested).group(0)
    candidates = list(dict.fromkeys([*COMMON_BACKBONES, *timm.list_models(f"{family}*")]))[:limit]
    for candidate in candidates:
        try:
            with torch.device("meta"):
                tensors = timm.create_model(candidate, num_classes=0, global_pool="").state_dict()
        except Exception:       # a model that cannot be built this way is simply not the answer
            continue
        if tensors and all(weights.get(key) == tuple(value.shape) for key, value in tensors.items()):
            return candidate
    return None


# ----------------------------------------------------------------------------- fitting a backbone to the image
#
# timm backbones differ in what they need and what they return; BirdCallModel measures both once, on one
# window of silence, when it is built (`BirdCallModel.fit_backbone`):
#   - what they need: most take any image size; some only multiples of their total stride (dla, hrnet:
#     their upsampled branches are added to the downsampled ones), and those get the image padded up to
#     the next multiple inside `classify` (`pad_image`); fixed-size ones (vit, swin, coatnet, maxvit) are
#     refused with the --img-size to pass.
#   - what they return: (B, C, H', W') feature maps; (B, H', W', C) for timm's NHWC models (swin, mambaout);
#     (B, prefix + H'W', C) tokens for vision transformers. `feature_map` turns all three into
#     (B, C, F', T'). C is measured, not read from `num_features`: mobilenetv3/v4, ghostnet, lcnet and other
#     models with a head convolution after their pooling return `head_hidden_size` channels, not
#     `num_features`, when pooling is off (the head convolution then runs at every position).

def backbone_stride(backbone: nn.Module) -> int:
    """The backbone's total downsampling (32 for most CNNs, 16 for ViT-*/16), from timm's feature_info."""
    info = getattr(backbone, "feature_info", None) or []
    reductions = [int(entry["reduction"]) for entry in info if isinstance(entry, dict) and "reduction" in entry]
    return max(reductions) if reductions else 32


def pad_image(image: torch.Tensor, multiple: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 1, H + pad_h, W + pad_w), the smallest sizes that are multiples of `multiple`.

    The rows go above the highest mel band and the columns after the window's last frame, filled with
    each example's own minimum -- silence, whatever the normalisation (0 for minmax, the -80 dB floor for
    none, the lowest z-score for standard) -- so the network sees the window followed by a short silence.
    The image itself is copied unchanged. Only H and W enter the arithmetic, with non-negative operands
    (the ONNX exporter traces // and % on sizes with ONNX's semantics, which differ from Python's for
    negative numbers), and only the batch size is dynamic in the export.
    """
    height, width = image.shape[-2], image.shape[-1]
    pad_h, pad_w = (multiple[0] - height % multiple[0]) % multiple[0], (multiple[1] - width % multiple[1]) % multiple[1]
    if pad_h == 0 and pad_w == 0:
        return image
    floor = image.amin(dim=(1, 2, 3), keepdim=True)                                  # (B, 1, 1, 1)
    if pad_w:
        image = torch.cat([image, floor.expand(-1, image.shape[1], height, pad_w)], dim=3)      # (B, 1, H, W')
    if pad_h:
        image = torch.cat([image, floor.expand(-1, image.shape[1], pad_h, width + pad_w)], dim=2)  # (B, 1, H', W')
    return image


class SEDHead(nn.Module):
    """Sound-event-detection head (PANNs attention pooling, as the BirdCLEF 2021-2023 winners used).

    Backbone features (B, C, F', T') -> mean over frequency -> (B, C, T') -> two 1x1 convolutions:
    framewise logits (B, n_classes, T') and attention logits (B, n_classes, T'). The attention
    weights are a softmax over time of tanh(attention logits) (tanh bounds them to [-1, 1], so no
    single frame can take all the weight early in training), and the clip logits are the
    attention-weighted sum of the framewise logits over time -- still logits, no activation.
    """

    def __init__(self, in_features: int, n_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.framewise = nn.Conv1d(in_features, n_classes, kernel_size=1)
        self.attention = nn.Conv1d(in_features, n_classes, kernel_size=1)

    def frames(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, C, F', T') -> framewise logits and attention weights, both (B, n_classes, T')."""
        x = self.dropout(features.mean(dim=2))                                 # (B, C, T')
        framewise = self.framewise(x)                                          # (B, n_classes, T')
        weights = torch.tanh(self.attention(x)).softmax(dim=-1)                # (B, n_classes, T'), sums to 1 over T'
        return framewise, weights

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        framewise, weights = self.frames(features)
        return (weights * framewise).sum(dim=-1)                               # (B, n_classes)


class BirdCallModel(nn.Module):
    """Waveform (B, samples) -> logits (B, n_classes).

    forward = classify(frontend(waveform)): train.py puts SpecAugment between the two (the
    `image_augment` argument, so that one forward call serves DistributedDataParallel too) and
    infer.py exports `classify` alone, so everything up to the backbone input (spectrogram,
    PCEN or dB, normalisation, resize) lives in `frontend`, and everything after -- padding for
    backbones that need it, the backbone, the head -- in `classify`.

    Building the model runs the backbone once on one window of silence (`fit_backbone`): the head
    is sized from the channels the backbone really returns, and a backbone that cannot take this
    image fails here, with a one-line ValueError naming the fix.
    """

    def __init__(self, config: dict, pretrained: bool = False, pretrained_file: str | None = None):
        super().__init__()
        self.config = copy.deepcopy(config)
        self.frontend = frontend_lib.build_frontend(config)
        self.backbone = create_backbone(config["backbone"], pretrained, pretrained_file)
        self.backbone_stride = backbone_stride(self.backbone)
        features = self.fit_backbone()                         # (1, C, F', T'); sets the padding and layout
        channels, n_classes = features.shape[1], len(config["labels"])
        self.head_type = config.get("head", "linear")       # checkpoints before `head` existed: linear
        # --head-init extend: the head keeps the pre-trained vocabulary's outputs, and a new layer on top
        # maps them to this vocabulary
        extended_from = int(config.get("head_extended_from", 0))
        n_outputs = extended_from or n_classes
        self.dropout = nn.Dropout(config["dropout"])
        if self.head_type == "linear":
            self.head = nn.Linear(channels, n_outputs)
        elif self.head_type == "mlp":
            # the log's "complex head"; its own dropout sits between the two layers
            self.head = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(),
                                      nn.Dropout(config["dropout"]), nn.Linear(channels, n_outputs))
        elif self.head_type == "sed":
            self.head = SEDHead(channels, n_outputs, config["dropout"])
        else:
            raise ValueError(f"unknown head {self.head_type!r}; expected one of {HEADS}")
        self.extension = nn.Linear(extended_from, n_classes) if extended_from else None

    @property
    def labels(self) -> list[str]:
        return self.config["labels"]

    @property
    def activation(self) -> str:
        return self.config["activation"]

    @property
    def window_samples(self) -> int:
        return int(round(self.config["window_seconds"] * self.config["sample_rate"]))

    def fit_backbone(self) -> torch.Tensor:
        """Run the backbone once on the frontend's image of one silent window -> its features (1, C, F', T').

        Sets `pad_multiple` (the image is padded up to multiples of it in `classify`; (1, 1): not padded),
        `feature_layout` ("NCHW", "NHWC" or "tokens", see `feature_map`) and `image_size` (the frontend's
        (H, W)): plain attributes, not weights, so state dicts are unchanged. A config with `pad_to_multiple`
        (a checkpoint's) keeps that padding. Otherwise the image is padded, to multiples of the backbone's
        stride, only where the backbone needs it: when it fails on the image as it is, or returns tokens that
        are not a whole grid of patches; the padding is then written to the config, so checkpoints carry it.
        A backbone that fails padded too raises a one-line ValueError: --img-size HxW for fixed-size
        networks (the size timm's weights were trained at), else "choose another backbone".

        In eval mode without gradients, on zeros: no BatchNorm statistics move and no random numbers are
        drawn, so the weights built before and after are the same as without this call.
        """
        name = self.config["backbone"]
        modes = [(module, module.training) for module in self.backbone.modules()]
        self.backbone.eval()
        try:
            with torch.no_grad():
                image = self.frontend(torch.zeros(1, self.window_samples))               # (1, 1, H, W)
                self.image_size = (int(image.shape[-2]), int(image.shape[-1]))
                stored = self.config.get("pad_to_multiple")
                stride = self.backbone_stride
                candidates = [tuple(int(n) for n in stored)] if stored else [(1, 1), (stride, stride)]
                problems = []
                for multiple in candidates:
                    features = self._measure(image, multiple)
                    if isinstance(features, torch.Tensor):
                        if multiple != (1, 1) and not stored:
                            self.config["pad_to_multiple"] = list(multiple)
                        return features
                    problems.append(features)
                height, width = self.image_size
                # the size timm's weights were trained at (input_size is (C, H, W)): the --img-size to suggest, if it runs
                native = tuple((getattr(self.backbone, "pretrained_cfg", None) or {}).get("input_size", ())[-2:])
                if (len(native) == 2 and native != self.image_size
                        and isinstance(self._measure(image.new_zeros(1, 1, *native), (1, 1)), torch.Tensor)):
                    raise ValueError(f"--backbone {name} needs a {native[0]}x{native[1]} image, not the "
                                     f"{height}x{width} spectrogram: pass --img-size {native[0]}x{native[1]}")
                padded = "" if stored or stride == 1 else f" nor padded to multiples of {stride}"
                raise ValueError(f"--backbone {name} does not run on the {height}x{width} spectrogram image{padded} "
                                 f"({problems[0]}); choose another backbone, or another --img-size")
        finally:
            self.backbone.train()                           # clears caches timm models fill in eval mode
            for module, training in modes:
                module.training = training

    def _measure(self, image: torch.Tensor, multiple: tuple[int, int]) -> torch.Tensor | str:
        """One probe: the features (1, C, F', T') for `image` padded to `multiple`, or what went wrong."""
        self.pad_multiple = multiple
        padded = pad_image(image, multiple)                                            # (1, 1, H', W')
        try:
            output = self.backbone(padded)
        except Exception as error:  # any failure means "not at this size"; the message goes to the user
            return first_line(error)
        if output.ndim == 4:
            self.feature_layout = "NHWC" if getattr(self.backbone, "output_fmt", "NCHW") == "NHWC" else "NCHW"
        elif output.ndim == 3:
            self.feature_layout = "tokens"
            grid_h, grid_w = self.token_grid(padded.shape[-2], padded.shape[-1])
            prefix = getattr(self.backbone, "num_prefix_tokens", 0)        # class, distillation, register tokens
            if output.shape[1] != prefix + grid_h * grid_w:   # e.g. patches that drop a partial last column (twins)
                return f"its {output.shape[1]} tokens are not {prefix} prefix tokens and a {grid_h}x{grid_w} grid"
        else:
            return f"it returns a {output.ndim}-D output {tuple(output.shape)}, not a feature map"
        features = self.feature_map(output, padded.shape[-2], padded.shape[-1])
        if features.shape[2] * features.shape[3] == 0:
            return f"its feature map {tuple(features.shape)} is empty"
        return features

    def feature_map(self, output: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The backbone's output for a (B, 1, height, width) image -> (B, C, F', T'), F' along mel, T' along time."""
        if self.feature_layout == "NCHW":
            return output                                                          # (B, C, F', T')
        if self.feature_layout == "NHWC":
            return output.permute(0, 3, 1, 2)                                      # (B, F', T', C) -> (B, C, F', T')
        # tokens (B, prefix + F' T', C): class/register tokens first, then the patches row by row
        grid = self.token_grid(height, width)
        patches = output[:, output.shape[1] - grid[0] * grid[1]:]                  # (B, F' T', C)
        return patches.transpose(1, 2).unflatten(2, grid)                          # (B, C, F', T')

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid (F', T') of a token backbone on a height x width image: a partial last row or
        column of patches counts (xcit, levit); fit_backbone checks the token count against it and pads the
        image to whole patches where it does not match (twins)."""
        # ceil division on non-negative sizes only: traced for export, // follows ONNX (truncation), not Python
        stride = self.backbone_stride
        return (height + stride - 1) // stride, (width + stride - 1) // stride

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """Spectrogram image (B, 1, H, W) -> backbone features (B, C, F', T'), the image padded first where
        the backbone needs it (pad_image; see fit_backbone)."""
        image = pad_image(image, self.pad_multiple)                                # (B, 1, H', W')
        return self.feature_map(self.backbone(image), image.shape[-2], image.shape[-1])

    def forward(self, waveform: torch.Tensor, image_augment=None) -> torch.Tensor:
        image = self.frontend(waveform)                # (B, 1, n_mels, T)
        if image_augment is not None:                  # training only: SpecAugment
            image = image_augment(image)
        return self.classify(image)                    # (B, n_classes)

    def classify(self, image: torch.Tensor) -> torch.Tensor:
        """Spectrogram image (B, 1, H, W) -> logits (B, n_classes); the part exported to ONNX."""
        features = self.features(image)                # (B, C, F', T'), e.g. (B, 1280, H/32, W/32)
        if self.head_type == "sed":
            logits = self.head(features)               # (B, n_outputs), attention-pooled over time
        elif self.head_type == "mlp":
            logits = self.head(features.mean(dim=(2, 3)))                  # (B, n_outputs)
        else:
            logits = self.head(self.dropout(features.mean(dim=(2, 3))))    # (B, n_outputs)
        return self.extension(logits) if self.extension is not None else logits   # (B, n_classes)

    def sed_outputs(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """sed head only: (clip logits (B, n_classes), framewise logits (B, T', n_classes),
        attention weights (B, T', n_classes)), T' the backbone's time resolution.
        clip logits == (attention weights * framewise logits).sum(dim=1) == forward(waveform)."""
        if self.head_type != "sed":
            raise ValueError(f"framewise outputs need head='sed'; this model's head is {self.head_type!r}")
        framewise, weights = self.head.frames(self.features(self.frontend(waveform)))  # (B, n_classes, T') each
        clip = (weights * framewise).sum(dim=-1)                                         # (B, n_classes)
        return clip, framewise.transpose(1, 2), weights.transpose(1, 2)

    def framewise_logits(self, waveform: torch.Tensor) -> torch.Tensor:
        """Waveform (B, samples) -> framewise logits (B, T', n_classes); sed head only (else ValueError)."""
        return self.sed_outputs(waveform)[1]


def activation_for_loss(loss_name: str) -> str:
    """Softmax goes with cross-entropy; the per-species losses (bce, focal) go with sigmoid."""
    return "softmax" if loss_name == "ce" else "sigmoid"


MODEL_SETTINGS = ("backbone", "activation", "sample_rate", "window_seconds", "n_fft", "hop", "n_mels", "fmin", "fmax",
                  "normalization", "dropout", "frontend", "img_size", "head", *frontend_lib.PCEN_DEFAULTS)
OPTIONAL_SETTINGS = {"frontend": "mel", "img_size": None, "head": "linear", **frontend_lib.PCEN_DEFAULTS}


def model_config(settings: dict, labels: list[str]) -> dict:
    """The plain-dict description of a model (what `BirdCallModel.config` holds and checkpoints store):
    `settings` (MODEL_SETTINGS: train.py's model flags and the loss's activation) with the labels.

    Settings added after the first checkpoints (OPTIONAL_SETTINGS) may be absent and take their
    defaults; the values are always written out.
    """
    unknown = sorted(set(settings) - set(MODEL_SETTINGS))
    if unknown:
        raise ValueError(f"not model settings: {unknown}")
    config = {"backbone": settings["backbone"], "labels": list(labels)}
    for key in MODEL_SETTINGS[1:]:
        config[key] = settings.get(key, OPTIONAL_SETTINGS.get(key)) if key in OPTIONAL_SETTINGS else settings[key]
    config["img_size"] = [int(n) for n in config["img_size"]] if config["img_size"] else None
    return config


def build_model(settings: dict, labels: list[str], pretrained: bool, pretrained_file: str | None = None,
                extended_from: int = 0) -> BirdCallModel:
    """A fresh model (model_config's `settings`), with timm's pretrained weights (`pretrained`) or a local
    file's; extended_from > 0 (--head-init extend): the head keeps that many pre-trained outputs with a
    new layer on top."""
    config = model_config(settings, labels)
    if extended_from:
        config["head_extended_from"] = int(extended_from)
    return BirdCallModel(config, pretrained=pretrained and not pretrained_file, pretrained_file=pretrained_file)


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


def transfer_weights(model: BirdCallModel, checkpoint: dict, head_init: str = "copy") -> dict:
    """Initialise `model` from a checkpoint trained on another vocabulary (pre-train -> fine-tune).

    Frontend and backbone weights are copied. The head, by `head_init`:
      copy    every head tensor indexed by species (its first dimension is the label count) gets the
              rows of the species both vocabularies share, matched by name; others keep their fresh
              initialisation;
      fresh   nothing is copied: the whole head is replaced by a fresh one;
      extend  the pre-trained head is copied whole, and the new layer on top of it (model.extension,
              pre-trained vocabulary -> this one) starts with every weight 1 and bias 0, as in the log.
    Returns counts for the log.
    """
    if head_init not in HEAD_INITS:
        raise ValueError(f"unknown head_init {head_init!r}; expected one of {HEAD_INITS}")
    source_config, target = checkpoint["model_config"], model.state_dict()
    for key in ("backbone", "head", "frontend", "n_mels", "sample_rate"):
        if source_config.get(key) != model.config.get(key):
            raise ValueError(f"--init-from: the checkpoint's {key} is {source_config.get(key)!r}, "
                             f"this run's is {model.config.get(key)!r}")
    source_labels, target_labels = source_config["labels"], model.labels
    source_row = {label: i for i, label in enumerate(source_labels)}
    shared = [(i, source_row[label]) for i, label in enumerate(target_labels) if label in source_row]
    rows_to, rows_from = [i for i, _ in shared], [j for _, j in shared]
    for key, value in checkpoint["model"].items():
        if key not in target or (key.startswith("head.") and head_init == "fresh"):
            continue
        if (key.startswith("head.") and head_init == "copy" and value.dim() >= 1
                and value.shape[0] == len(source_labels) and target[key].shape[0] == len(target_labels)
                and value.shape[1:] == target[key].shape[1:]):
            target[key][rows_to] = value[rows_from].to(target[key].dtype)     # species rows, by name
        elif value.shape == target[key].shape:
            target[key] = value
    if head_init == "extend":
        target["extension.weight"] = torch.ones_like(target["extension.weight"])
        target["extension.bias"] = torch.zeros_like(target["extension.bias"])
    model.load_state_dict(target)
    return {"shared_species": len(shared), "new_species": len(target_labels) - len(shared),
            "dropped_species": len(source_labels) - len(shared)}


def load_model(path, map_location="cpu", ema: bool = False) -> BirdCallModel:
    """Rebuild the exact trained model from a checkpoint alone, in eval mode.

    ema=True loads the exponential moving average of the weights (train.py --ema).
    """
    checkpoint = read_checkpoint(path, map_location)
    if ema and "model_ema" not in checkpoint:
        raise CheckpointError(f"{path} has no EMA weights (it was not trained with --ema)")
    model = BirdCallModel(checkpoint["model_config"], pretrained=False)
    try:
        model.load_state_dict(checkpoint["model_ema" if ema else "model"])
    except RuntimeError as error:            # a hand-edited label list, or weights of another model
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]   # torch: one per tensor
        raise CheckpointError(f"{path}: its weights do not fit the model its config describes ({len(model.labels)} "
                              f"labels, --backbone {model.config['backbone']}): "
                              f"{(details[0] if details else first_line(error))[:200]}") from None
    return model.eval()


class ExportError(ValueError):
    """`python model.py export` refusing where it was asked to write: one line, said before any file is touched."""


def check_export_target(source, target) -> None:
    """ExportError for a target that is the source under any spelling (a symlink, `./`, `..`, a hard
    link): the export would replace the training checkpoint, optimiser state and all, by the weights
    alone. Also for a folder, and for a file in a folder that does not exist: the folder is not
    created, since a typo'd name would otherwise put the export where nobody looks for it."""
    source, target = Path(source), Path(target)
    if target.is_dir():
        raise ExportError(f"{target} is a folder: name the file to write (e.g. {target / 'small.pt'})")
    if not target.parent.is_dir():
        raise ExportError(f"cannot write {target}: the folder {target.parent} does not exist (not created, in "
                          f"case its name is a typo: create it first)")
    if target.exists() and source.exists() and os.path.samefile(source, target):
        raise ExportError(f"refusing to export {source} onto itself ({target} is the same file): that would "
                          f"replace the checkpoint, optimiser and training state included, by its weights alone; "
                          f"write the export to another file")


def export_weights(source, target, ema: bool = False) -> dict:
    """`python model.py export best.pt small.pt`: the model's weights, config and labels only -- no
    optimiser, scaler or training state (about a third of a b0 checkpoint) -- for inference and
    --init-from; every loader (load_model, infer.py, Predictor) reads it. -> what was written."""
    check_export_target(source, target)
    checkpoint = read_checkpoint(source)
    if ema and "model_ema" not in checkpoint:
        raise CheckpointError(f"{source} has no EMA weights (it was not trained with --ema)")
    exported = {"format": CHECKPOINT_FORMAT, "model": checkpoint["model_ema" if ema else "model"],
                "model_config": checkpoint["model_config"], "labels": checkpoint["model_config"]["labels"],
                "exported_from": str(source), "global_step": checkpoint.get("global_step")}
    target = Path(target)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    torch.save(exported, temporary)
    os.replace(temporary, target)
    return exported


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Model tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a checkpoint's weights, config and labels only",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    export.add_argument("checkpoint", help="a checkpoint written by train.py (e.g. runs/x/best.pt)")
    export.add_argument("out", help="the file to write")
    export.add_argument("--ema", action="store_true", help="export the exponential-moving-average weights")
    return parser


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    export_weights(args.checkpoint, args.out, args.ema)
    print(f"wrote {args.out}: {Path(args.out).stat().st_size / 1e6:.1f} MB "
          f"(from {args.checkpoint}: {Path(args.checkpoint).stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def check_model(settings: dict) -> None:
    """Build train.py's model with random weights -- one forward on one window of silence -- before any data is read.

    options.check_arguments calls this, so a backbone that cannot take this input (or a frontend setting
    that cannot work) stops the run at once with BirdCallModel's one-line ValueError naming the fix,
    instead of at the first training step. Random weights: nothing is downloaded here; build_model builds
    the pretrained model once, later. The random streams are restored, so the run's numbers do not change.
    """
    check_backbone_name(settings["backbone"])
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            model = BirdCallModel(model_config(settings, ["check_a", "check_b"]), pretrained=False)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    if model.pad_multiple != (1, 1):
        (height, width), (step_h, step_w) = model.image_size, model.pad_multiple
        log.info("--backbone %s needs image sides that are multiples of %d: the %dx%d spectrogram image is padded "
                 "to %dx%d inside the model (with silence after the window and above the top mel band)",
                 settings["backbone"], step_w, height, width, -(-height // step_h) * step_h, -(-width // step_w) * step_w)
