"""The options of train.py: every flag with its default and help, the check that rejects impossible
combinations before any data is read, and the typed settings the flags become. Below this module (and
train.py's command-line layer) nothing sees the Namespace: each part of a run reads its own frozen
settings (data.DataSettings, loader.LoaderSettings, learner.LearnerSettings, ...).

    python train.py --help
    args = options.parse_args([...])                     # --config files replayed, each value checked
    settings = options.training_settings(args)           # TrainingSettings: .data, .loader, .learner, ...
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import audio
import augment
import cli
import data
import distributed
import evaluation
import frontend as frontend_lib
import learner as learner_lib
import loader
import losses
import model as model_lib
import progress
import pseudo_labels
import runfolder
import sampling

log = logging.getLogger("birdclef")

AUGMENT = augment.AugmentSettings()   # the augmentation flags' defaults are its fields' (one place)

MONITORED = ("cmap5", "cmap3", "macro_ap", "lrap", "val_loss",
             "ema_cmap5", "ema_cmap3", "ema_macro_ap", "ema_lrap", "ema_val_loss",
             "soundscape_cmap5", "soundscape_cmap3", "soundscape_macro_ap", "soundscape_lrap")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """train.py's parser, in groups: data, model, optimisation, augmentation, evaluation and checkpoints."""
    parser = argparse.ArgumentParser(description="Train a BirdCLEF bird-call classifier.",
                                     add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("data")
    cli.add_data_dir(group)
    cli.add_split_flags(group)
    cli.add_crop_flags(group)
    group.add_argument("--secondary-weight", type=float, default=0.0,
                       help="target value for secondary labels (0 = ignore them)")
    cli.add_workers(group)
    group.add_argument("--pad", choices=audio.PAD_MODES, default="zero",
                       help="recordings shorter than the window: pad with zeros or repeat the clip")
    group.add_argument("--strict", action="store_true",
                       help="stop if any recording cannot be read (default: skip it, listed in bad_files.csv)")
    group.add_argument("--sampler", choices=sampling.SAMPLERS, default="none",
                       help="none: every recording once per epoch; inverse / sqrt: draws weighted 1/N or "
                            "1/sqrt(N) per species (with replacement); cap: at most --cap-per-class "
                            "recordings per species per epoch. Check with --audit-sampling")
    group.add_argument("--cap-per-class", type=int, default=0,
                       help="at most this many recordings per species per epoch (a fresh subset each epoch): "
                            "--sampler cap, or inverse / sqrt weighting within that subset (0 = no cap)")
    group.add_argument("--cache", default=None,
                       help="folder written by `python data.py cache` with the same data, sample rate and "
                            "crop policy: crops are read from it instead of decoded (a mismatch is refused)")
    group.add_argument("--extras", default=None,
                       help="extras.csv from `python data.py extras`: fixed 5-s windows of training "
                            "recordings added to each epoch (windows of validation recordings are dropped)")
    group.add_argument("--extras-chunk", type=float, default=0.0,
                       help="train on random --window-seconds crops inside a chunk of this many seconds centred on "
                            "each --extras window (the log wrote 8-s chunks); 0: the window itself")
    group.add_argument("--nocall", action="store_true",
                       help="add a 'nocall' class trained on background windows: --nocall-audio files (a crop "
                            "anywhere in each file per epoch), --nocall-soundscapes rows and --nocall-detections "
                            "windows (--bg-dir audio too where none of them is given: deprecated)")
    group.add_argument("--nocall-audio", default=None,
                       help="folder of background recordings without the vocabulary's birds: with --nocall, a "
                            "5-s crop anywhere in each file per epoch trains the nocall class")
    group.add_argument("--nocall-soundscapes", default=None,
                       help="labelled-soundscape table (file,start_s,end_s,labels or BirdCLEF 2021's "
                            "train_soundscape_labels.csv) whose no-call rows train the nocall class; a teacher's "
                            "probability table (infer.py --format csv): the rows it scores below "
                            "--nocall-max-score for every species; or a folder of recordings without the "
                            "vocabulary's birds: every 5-s row of each file, once per epoch")
    group.add_argument("--nocall-detections", default=None,
                       help="infer.py --detections table: windows whose best score is below "
                            "--nocall-max-score train the nocall class")
    group.add_argument("--nocall-max-score", type=float, default=0.05,
                       help="a detections window, or a row of a teacher's --nocall-soundscapes table, is no-call "
                            "below this best score")
    group.add_argument("--nocall-per-recording", type=int, default=1,
                       help="no-call windows taken from each recording's detections, quietest first")
    group.add_argument("--soundscape-labels", default=None,
                       help="5-s soundscape windows to train on: file,start_s,end_s with a labels column (hard "
                            "labels) or one probability column per species (a teacher's infer.py --format csv "
                            "output: pseudo-labels). Windows of files --val-soundscapes or --test-soundscapes "
                            "score are left out")
    group.add_argument("--soundscape-audio", default=None,
                       help="folder of the --soundscape-labels files (default: the table's folder); also where a "
                            "teacher's --nocall-soundscapes table finds its files")
    group.add_argument("--soundscape-share", type=float, default=0.25,
                       help="share of every training batch drawn from the --soundscape-labels windows")
    group.add_argument("--soundscape-power", type=float, default=1.0,
                       help="a teacher's probability p becomes the target p ** power (above 1: low "
                            "probabilities fade, the teacher's confident calls stay)")
    group.add_argument("--soundscape-threshold", type=float, default=0.0,
                       help="a teacher's probability below this becomes a target of 0")
    group.add_argument("--soundscape-weight", choices=pseudo_labels.WEIGHTINGS, default="none",
                       help="confidence: each window's loss weight is the teacher's top probability in it "
                            "(windows the teacher hears nothing in count little); none: every window 1")
    group.add_argument("--audit-sampling", action="store_true",
                       help="build the sampler exactly as training would, write sampling_audit.csv, print "
                            "the summary and exit without training")

    group = parser.add_argument_group("model")
    group.add_argument("--backbone", default="tf_efficientnet_b0.ns_jft_in1k", help="timm model name")
    pretrained = group.add_mutually_exclusive_group()
    pretrained.add_argument("--pretrained", dest="pretrained", action="store_true", default=True,
                            help="start from the timm hub's pretrained weights")
    pretrained.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=argparse.SUPPRESS,
                            help="start from random weights (offline machines)")
    group.add_argument("--pretrained-file", default=None,
                       help="local pretrained weights for --backbone (implies pretrained)")
    cli.add_sample_rate(group)
    cli.add_window_seconds(group)
    group.add_argument("--n-fft", type=int, default=1024, help="STFT size")
    group.add_argument("--hop", type=int, default=512, help="STFT hop in samples")
    group.add_argument("--n-mels", type=int, default=128, help="mel bands")
    group.add_argument("--fmin", type=float, default=20.0, help="lowest mel frequency (Hz)")
    group.add_argument("--fmax", type=float, default=16000.0, help="highest mel frequency (Hz)")
    group.add_argument("--normalization", choices=frontend_lib.NORMALIZATIONS, default="standard",
                       help="per-example normalisation of the dB spectrogram")
    group.add_argument("--dropout", type=float, default=0.0, help="dropout in the head")
    group.add_argument("--head", choices=model_lib.HEADS, default="linear",
                       help="linear; mlp: Linear-ReLU-Dropout-Linear (the log's complex head); sed: "
                            "attention pooling over time with framewise outputs")
    group.add_argument("--frontend", choices=frontend_lib.FRONTENDS, default="mel",
                       help="mel: log-mel in dB; pcen: per-channel energy normalisation")
    group.add_argument("--pcen-gain", dest="pcen_gain", type=float, default=frontend_lib.PCEN_DEFAULTS["pcen_gain"],
                       help="PCEN gain")
    group.add_argument("--pcen-bias", dest="pcen_bias", type=float, default=frontend_lib.PCEN_DEFAULTS["pcen_bias"],
                       help="PCEN bias")
    group.add_argument("--pcen-power", dest="pcen_power", type=float, default=frontend_lib.PCEN_DEFAULTS["pcen_power"],
                       help="PCEN compression exponent")
    group.add_argument("--pcen-time-constant", dest="pcen_time_constant", type=float,
                       default=frontend_lib.PCEN_DEFAULTS["pcen_time_constant"], help="PCEN smoother time constant (s)")
    group.add_argument("--pcen-eps", dest="pcen_eps", type=float, default=frontend_lib.PCEN_DEFAULTS["pcen_eps"],
                       help="PCEN epsilon")
    group.add_argument("--pcen-input-scale", dest="pcen_input_scale", type=float,
                       default=frontend_lib.PCEN_DEFAULTS["pcen_input_scale"],
                       help="multiplier on the magnitude mel spectrogram before PCEN (librosa's defaults "
                            "assume int32-range audio; ours is in [-1, 1])")
    group.add_argument("--pcen-initial-state", dest="pcen_initial_state", choices=frontend_lib.PCEN_INITIAL_STATES,
                       default=frontend_lib.PCEN_DEFAULTS["pcen_initial_state"],
                       help="first_frame: smoother starts at the first frame's level; librosa: "
                            "librosa.pcen's default state")
    group.add_argument("--img-size", type=image_size, default=None,
                       help="resize the spectrogram image to HxW, e.g. 256x256 (the log's 256x157, 256x256)")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--loss", choices=losses.LOSSES, default="ce",
                       help="ce: softmax cross-entropy on soft targets; bce: sigmoid BCE; focal: sigmoid "
                            "focal loss. Sets the activation (softmax for ce, else sigmoid) used by "
                            "evaluation and inference")
    group.add_argument("--focal-gamma", type=float, default=2.0, help="focal loss focusing parameter")
    group.add_argument("--focal-alpha", type=float, default=None, help="focal loss positive weight (None = off)")
    group.add_argument("--label-smoothing", type=float, default=0.0,
                       help="ce: mix targets with uniform; bce/focal: move targets towards 0.5")
    group.add_argument("--loss-switch-epoch", type=int, default=None,
                       help="epoch from which --loss-after replaces --loss")
    group.add_argument("--loss-after", choices=losses.LOSSES, default=None, help="loss used from --loss-switch-epoch on")
    group.add_argument("--init-from", default=None,
                       help="start from a (pre-training) checkpoint with another vocabulary: frontend and "
                            "backbone copied, head rows of shared species copied by name")
    group.add_argument("--head-init", choices=model_lib.HEAD_INITS, default="copy",
                       help="with --init-from: copy the head rows of shared species by name; fresh: replace the "
                            "whole head; extend: keep the pre-trained head whole and add a new output layer on top "
                            "(weights 1, as in the log)")
    group.add_argument("--freeze-backbone-epochs", type=int, default=0,
                       help="train only the head for this many epochs (backbone frozen, BatchNorm statistics too)")
    group.add_argument("--freeze-head-epochs", type=int, default=0,
                       help="keep the head frozen for this many epochs (with --head-init extend: the pre-trained "
                            "head under the new layer, which always trains)")
    group.add_argument("--ema", type=float, default=0.0,
                       help="decay of an exponential moving average of the weights, evaluated and saved "
                            "alongside (0 = off; e.g. 0.999)")
    group.add_argument("--sync-bn", action="store_true",
                       help="under torchrun on CUDA: BatchNorm statistics over the whole batch of all "
                            "processes (SyncBatchNorm) instead of each process's share")
    group.add_argument("--channels-last", action="store_true",
                       help="channels-last memory format for the backbone (faster convolutions on recent GPUs)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the backbone (minutes of compilation first; checkpoints are unchanged)")
    group.add_argument("--flush-denormal", action="store_true",
                       help="flush denormal floats to zero on the CPU")
    group.add_argument("--optimizer", choices=learner_lib.OPTIMIZERS, default="adamw",
                       help="adamw (decoupled weight decay), adam (weight decay as L2) or sgd")
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum; beta1 of adam and adamw")
    group.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    group.add_argument("--weight-decay", type=float, default=1e-2,
                       help="weight decay of convolution and linear weights (not of biases or normalisation layers)")
    group.add_argument("--lr-schedule", choices=learner_lib.LR_SCHEDULES, default="cosine",
                       help="after the warm-up: cosine to 0, constant, step (x --step-gamma every --step-epochs), "
                            "or onecycle (torch's OneCycleLR; the warm-up is its rise)")
    group.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up to --lr over this many epochs")
    group.add_argument("--warmup-lr", type=float, default=0.0, help="learning rate the warm-up starts from")
    group.add_argument("--schedule-epochs", type=float, default=None,
                       help="length of the schedule in epochs (default --epochs), so runs that stop at different "
                            "epochs (patience, --epochs) follow the same curve")
    group.add_argument("--step-epochs", type=float, default=10.0, help="--lr-schedule step: epochs between steps")
    group.add_argument("--step-gamma", type=float, default=0.1, help="--lr-schedule step: factor at each step")
    group.add_argument("--epochs", type=int, default=30, help="maximum number of epochs")
    group.add_argument("--batch-size", type=int, default=32, help="training batch size")
    group.add_argument("--mixup-alpha", type=float, default=0.2, help="Beta(alpha, alpha); 0 turns mixup off")
    group.add_argument("--mixup-prob", type=float, default=0.5, help="share of examples mixed")
    group.add_argument("--clip-grad-norm", type=float, default=0.0, help="gradient norm clip (0 = off)")
    group.add_argument("--skip-nonfinite", type=int, default=0,
                       help="skip up to this many batches with a non-finite loss or gradient (each logged); "
                            "0 = stop at the first, naming its files")
    group.add_argument("--amp", choices=("auto", "fp16", "bf16", "off"), default="auto",
                       help="mixed precision; auto = bf16 or fp16+GradScaler on CUDA, off on CPU")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")

    group = parser.add_argument_group("augmentation (training only; all off by default except mixup)")
    group.add_argument("--aug-strength", type=float, default=1.0,
                       help="scales every augmentation's probability and magnitude at once (the log's AUG "
                            "factor); 0 turns all of them off, mixup included")
    group.add_argument("--noise-prob", type=float, default=AUGMENT.noise_prob, help="probability of coloured noise")
    group.add_argument("--noise-snr", type=float, nargs=2, default=list(AUGMENT.noise_snr), metavar=("LOW", "HIGH"),
                       help="SNR range of coloured (white, pink, brown) noise in dB")
    group.add_argument("--bg-dir", default=None,
                       help="folder of background audio (e.g. no-call soundscape segments) mixed into training "
                            "crops (augmentation only; the nocall class takes --nocall-audio)")
    group.add_argument("--bg-prob", type=float, default=0.5, help="probability of background noise, with --bg-dir")
    group.add_argument("--bg-snr", type=float, nargs=2, default=list(AUGMENT.bg_snr), metavar=("LOW", "HIGH"),
                       help="SNR range of background noise in dB")
    group.add_argument("--cutmix-prob", type=float, default=AUGMENT.cutmix_prob, help="probability of cutmix along time")
    group.add_argument("--cutmix-alpha", type=float, default=AUGMENT.cutmix_alpha, help="cutmix Beta(alpha, alpha)")
    group.add_argument("--gain-prob", type=float, default=AUGMENT.gain_prob, help="probability of a random gain")
    group.add_argument("--gain-db", type=float, default=AUGMENT.gain_db, help="random gain range, +-dB")
    group.add_argument("--shift-prob", type=float, default=AUGMENT.shift_prob, help="probability of a circular time shift")
    group.add_argument("--shift-max", type=float, default=AUGMENT.shift_max, help="largest time shift, fraction of the window")
    group.add_argument("--freq-masks", type=int, default=AUGMENT.freq_masks, help="SpecAugment frequency masks per example")
    group.add_argument("--time-masks", type=int, default=AUGMENT.time_masks, help="SpecAugment time masks per example")
    group.add_argument("--mask-max-pct", type=float, default=AUGMENT.mask_max_pct,
                       help="SpecAugment: widest mask as a fraction of the bands or frames")
    group.add_argument("--mix-prob", type=float, default=AUGMENT.mix_prob,
                       help="probability that a window gets 1 to --mix-clips - 1 other windows of its batch added "
                            "at full weight (targets: the union), as soundscape rows hold several calls")
    group.add_argument("--mix-clips", type=int, default=AUGMENT.mix_clips, help="most calls in one window, with --mix-prob")
    group.add_argument("--mix-gain-db", type=float, nargs=2, default=list(AUGMENT.mix_gain_db), metavar=("LOW", "HIGH"),
                       help="power of each added window relative to the window it joins, in dB")
    group.add_argument("--distance-prob", type=float, default=AUGMENT.distance_prob,
                       help="probability of a distant call: a gain from --distance-db and a low-pass cutoff "
                            "from --distance-lowpass")
    group.add_argument("--distance-db", type=float, nargs=2, default=list(AUGMENT.distance_db), metavar=("LOW", "HIGH"),
                       help="gain range of a distant call in dB (relative to what is mixed in later)")
    group.add_argument("--distance-lowpass", type=float, nargs=2, default=list(AUGMENT.distance_lowpass_hz),
                       metavar=("LOW_HZ", "HIGH_HZ"), help="low-pass cutoff range of a distant call (log-uniform)")
    group.add_argument("--reverb-prob", type=float, default=AUGMENT.reverb_prob,
                       help="probability of reverberation by a synthetic exponentially decaying impulse response")
    group.add_argument("--reverb-rt60", type=float, nargs=2, default=list(AUGMENT.reverb_rt60), metavar=("LOW", "HIGH"),
                       help="reverberation time range in seconds (the time to decay by 60 dB)")

    group = parser.add_argument_group("evaluation and checkpoints")
    group.add_argument("--evals-per-epoch", type=int, default=2,
                       help="evaluations (each with a checkpoint) per epoch")
    group.add_argument("--monitor", choices=MONITORED, default="cmap5",
                       help="metric for best.pt and patience (val_loss: lower is better; ema_*: of the "
                            "--ema weights; soundscape_*: on --val-soundscapes)")
    group.add_argument("--val-soundscapes", default=None,
                       help="file,start_s,end_s,labels table of labelled soundscape segments (e.g. "
                            "demo_data/test_soundscapes_labels.csv): scored at every evaluation next to "
                            "the clip-level numbers")
    group.add_argument("--val-soundscape-audio", default=None,
                       help="folder of those soundscapes' audio (default: test_soundscapes/ beside the table)")
    group.add_argument("--test-soundscapes", default=None,
                       help="labelled-soundscape table scored at every evaluation for the record only (test_* "
                            "columns), never for best.pt or patience: to see whether validation tracks it")
    group.add_argument("--test-soundscape-audio", default=None,
                       help="folder of the --test-soundscapes audio (default: test_soundscapes/ beside the table)")
    group.add_argument("--patience", type=int, default=8,
                       help="stop after this many evaluations without improvement (0 = never)")
    group.add_argument("--min-delta", type=float, default=0.0,
                       help="smallest change of the monitored metric that counts as improvement")
    group.add_argument("--keep-last", type=int, default=3,
                       help="periodic checkpoints of this run kept on disk (at least 1: the one to resume from)")
    group.add_argument("--keep-best", type=int, default=0,
                       help="also keep the K best evaluations by --monitor as best-stepN.pt, for ensembles "
                            "(infer.py --ckpts RUN/best-*.pt); 0 = only best.pt")
    group.add_argument("--out-dir", default=None,
                       help="run folder (default runs/<date-time>); one that holds files is refused unless "
                            "--resume continues it or --overwrite")
    group.add_argument("--overwrite", action="store_true",
                       help="start a new run in a --out-dir that holds files: they are moved to "
                            "<out-dir>.previous-N, never deleted")
    group.add_argument("--resume", default=None,
                       help="checkpoint to continue from, or 'auto': the newest complete one in --out-dir")
    cli.add_seed(group)
    group.add_argument("--max-steps", type=int, default=0,
                       help="stop after this many optimiser steps in total (0 = no limit; for smoke tests)")
    group.add_argument("--lr-find", action="store_true",
                       help="run a learning-rate range test instead of training: writes lr_find.png "
                            "and lr_find.csv and suggests --lr")
    group.add_argument("--lr-find-steps", type=int, default=200, help="steps of the range test")
    group.add_argument("--log-every", type=float, default=progress.LOG_EVERY_SECONDS,
                       help="without a terminal (nohup, pipes, Kaggle's saved runs): a progress line every this "
                            "many seconds instead of a bar")
    group.add_argument("--config", default=None,
                       help="a run's config.json: its arguments (but --resume and --overwrite) become the defaults, "
                            "so the run is replayed; flags given on the command line override them")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """train.py's arguments; with --config (a run's config.json or a recipes/ file), its values are the
    defaults under the command line. Each replayed value passes its flag's type, choices and nargs."""
    parser = get_args_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        replayed = json.loads(Path(known.config).read_text())
        if not isinstance(replayed, dict):
            raise ValueError(f"--config {known.config}: expected a JSON object of flag values")
        # config.json holds the resolved --resume of a resumed run: replaying it must start a run, not
        # continue (and append to) that one
        parser.set_defaults(**checked_config(parser, {key: value for key, value in replayed.items()
                                                      if key not in ("config", "resume", "overwrite")}, known.config))
    return parser.parse_args(argv)


def checked_config(parser: argparse.ArgumentParser, values: dict, source: str) -> dict:
    """A config file's {dest: value} -> the same values as the flags would have parsed them; a key that is
    no flag, a value of the wrong type or count, or outside the flag's choices is refused naming the flag."""
    actions = {}
    for action in parser._actions:
        actions.setdefault(action.dest, action)
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ValueError(f"--config {source}: {unknown} are no flags of train.py")
    checked = {}
    for dest, value in values.items():
        action = actions[dest]
        flag = max(action.option_strings, key=len)
        try:
            checked[dest] = config_value(action, value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            raise ValueError(f"--config {source}: {dest} = {json.dumps(value)} is not a valid {flag} ({error})") \
                from None
    return checked


def config_value(action: argparse.Action, value):
    """One replayed value, checked and converted like a command-line value of `action`."""
    if value is None:
        if action.default is not None:
            raise ValueError("it takes a value")
        return None
    if action.nargs == 0:                     # store_true / store_false
        if not isinstance(value, bool):
            raise TypeError("expected true or false")
        return value
    if action.type is image_size and isinstance(value, list):
        value = "x".join(str(side) for side in value)
    if isinstance(action.nargs, int) or action.nargs in ("+", "*"):
        if not isinstance(value, list) or (isinstance(action.nargs, int) and len(value) != action.nargs):
            raise TypeError(f"expected a list of {action.nargs} values")
        return [config_item(action, item) for item in value]
    return config_item(action, value)


def config_item(action: argparse.Action, value):
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise TypeError(f"expected {getattr(action.type, '__name__', 'a string')}")
    if action.type is int and not isinstance(value, int):
        raise TypeError("expected an integer")
    if action.type is float and not isinstance(value, (int, float)):
        raise TypeError("expected a number")
    if action.type is None and not isinstance(value, str):
        raise TypeError("expected a string")
    converted = action.type(value) if action.type in (int, float) else (action.type or str)(str(value))
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"choose from {', '.join(map(str, action.choices))}")
    return converted


def image_size(text: str) -> list[int]:
    """'256x157' -> [256, 157]."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 256x157, got {text!r}") from None
    return [height, width]


# Flags that are probabilities or shares, checked by name: a value outside [0, 1] (or NaN) would otherwise
# run as if clipped (`rng.random() < 5` is always true) or fail deep inside an epoch without naming the flag.
UNIT_INTERVAL_FLAGS = ("bg_prob", "cutmix_prob", "distance_prob", "gain_prob", "mix_prob", "mixup_prob",
                       "noise_prob", "reverb_prob", "shift_prob", "mask_max_pct", "secondary_weight",
                       "nocall_max_score", "soundscape_threshold")
BELOW_ONE_FLAGS = ("label_smoothing", "val_fraction")      # 1 would leave no signal / no training data


def check_numbers(args) -> None:
    """Every float flag finite; probabilities and shares within [0, 1]; each error names its flag."""
    for name, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(item, float) and not math.isfinite(item) for item in values):
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be a finite number")
    for name in UNIT_INTERVAL_FLAGS:
        if not 0 <= getattr(args, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be within [0, 1]")
    for name in BELOW_ONE_FLAGS:
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 0 and below 1")


def check_arguments(args) -> None:
    """Reject impossible combinations before any work is done."""
    check_numbers(args)
    if args.keep_last < 1:
        raise ValueError(f"--keep-last {args.keep_last}: keep at least 1 checkpoint, the one a resume needs")
    if args.evals_per_epoch < 1:
        raise ValueError(f"--evals-per-epoch {args.evals_per_epoch}: evaluate (and save) at least once an epoch")
    if args.folds > 1 and not 0 <= args.fold < args.folds:
        raise ValueError(f"--fold {args.fold} must be in [0, {args.folds})")
    if args.monitor.startswith("ema_") and not args.ema:
        raise ValueError(f"--monitor {args.monitor} needs --ema")
    if args.monitor.startswith("soundscape_") and not args.val_soundscapes:
        raise ValueError(f"--monitor {args.monitor} needs --val-soundscapes")
    if (args.loss_after is None) != (args.loss_switch_epoch is None):
        raise ValueError("--loss-switch-epoch and --loss-after go together")
    if args.head_init != "copy" and not args.init_from:
        raise ValueError(f"--head-init {args.head_init} needs --init-from (a pre-trained checkpoint)")
    if args.head_init == "extend" and args.head == "sed":
        raise ValueError("--head-init extend adds a layer on clip logits; use --head linear or mlp")
    if args.soundscape_labels:
        check_soundscape_share(args.soundscape_share, args.batch_size)
    if args.nocall and not (args.nocall_audio or args.bg_dir or args.nocall_soundscapes or args.nocall_detections):
        raise ValueError("--nocall needs background audio: --nocall-audio, --nocall-soundscapes or --nocall-detections")
    learner_lib.precision_settings(args.amp, distributed.local_device(args.device))
    model_lib.check_backbone_name(args.backbone)  # fail before any data is read, with timm's error


def check_soundscape_share(share: float, batch_size: int) -> None:
    """--soundscape-share must leave at least one soundscape window and one recording in every batch."""
    per_batch = sampling.soundscape_windows_per_batch(share, batch_size)
    if not 0 < per_batch < batch_size:
        raise ValueError(f"--soundscape-share {share} of --batch-size {batch_size} is {per_batch} window(s) per "
                         f"batch: it must leave at least one soundscape window and one recording in every batch")


def resolve_deprecated(args) -> None:
    """Old meanings that still work, with a one-line warning: under --nocall, --bg-dir audio was also a
    no-call source. Without --nocall-audio it still is (set here, so config.json replays it by its new name)."""
    if args.nocall and args.bg_dir and args.nocall_audio is None:
        log.warning("--nocall takes --bg-dir audio as no-call audio too (deprecated): pass --nocall-audio %s "
                    "to keep that, or another folder", args.bg_dir)
        args.nocall_audio = args.bg_dir


# ----------------------------------------------------------------------------- flags -> settings

@dataclass(frozen=True)
class RunSettings:
    """How long the loop runs, when it evaluates and stops, and what it keeps."""
    epochs: int
    evals_per_epoch: int
    max_steps: int               # 0 = no limit
    monitor: str
    patience: int                # 0 = never stop early
    min_delta: float
    keep_last: int
    keep_best: int
    log_every: float


@dataclass(frozen=True)
class TrainingSettings:
    """train.py's flags by concern: what each part of a run reads, and nothing else."""
    data: data.DataSettings
    loader: loader.LoaderSettings
    learner: learner_lib.LearnerSettings
    step: learner_lib.StepSettings
    validation: evaluation.ValidationSettings
    run: RunSettings
    config: dict                 # every resolved argument, plain: config.json and each checkpoint's "args"


def training_settings(args) -> TrainingSettings:
    """The parsed (and resolved: --resume auto, the kept schedule length) flags -> the settings."""
    loss = losses.LossSettings(args.loss, args.label_smoothing, args.focal_gamma, args.focal_alpha,
                               args.loss_after, args.loss_switch_epoch)
    return TrainingSettings(
        data=data_settings(args),
        loader=loader.LoaderSettings(args.batch_size, args.workers, args.sampler, args.cap_per_class, args.seed,
                                     args.soundscape_share if args.soundscape_labels else 0.0),
        learner=learner_settings(args),
        step=learner_lib.StepSettings(args.seed, loss, args.mixup_alpha, min(args.mixup_prob * args.aug_strength, 1.0),
                                      args.amp, args.clip_grad_norm, args.skip_nonfinite),
        validation=evaluation.ValidationSettings(args.batch_size, args.workers, args.seed, args.focal_gamma,
                                                 args.focal_alpha, args.val_soundscapes, args.val_soundscape_audio,
                                                 args.test_soundscapes, args.test_soundscape_audio),
        run=RunSettings(args.epochs, args.evals_per_epoch, args.max_steps, args.monitor, args.patience,
                        args.min_delta, args.keep_last, args.keep_best, args.log_every),
        config=plain_config(args))


def training_settings_from_saved(saved: dict) -> TrainingSettings:
    """A checkpoint's "args" (or a config.json) -> its settings; flags added since take their defaults."""
    args = get_args_parser().parse_args([])
    vars(args).update(saved)
    resolve_deprecated(args)
    return training_settings(args)


def data_settings(args) -> data.DataSettings:
    nocall = (data.NocallSources(args.nocall_audio, args.nocall_soundscapes, args.soundscape_audio,
                                 args.nocall_detections, args.nocall_max_score, args.nocall_per_recording)
              if args.nocall else None)
    windows = (pseudo_labels.PseudoLabelSettings(args.soundscape_labels, args.soundscape_audio, args.soundscape_share,
                                                 args.soundscape_power, args.soundscape_threshold,
                                                 args.soundscape_weight) if args.soundscape_labels else None)
    return data.DataSettings(
        data_dirs=tuple(args.data_dir), split=data.SplitSettings(args.seed, args.val_fraction, args.folds, args.fold),
        crop=audio.CropSettings(args.sample_rate, args.window_seconds, args.crop_policy, args.ends_seconds, args.pad),
        secondary_weight=args.secondary_weight, strict=args.strict, cache=args.cache, extras=args.extras,
        extras_chunk=args.extras_chunk, nocall=nocall, background_dir=args.bg_dir,
        val_soundscapes=args.val_soundscapes, test_soundscapes=args.test_soundscapes, soundscape_windows=windows)


def model_settings(args) -> dict:
    """The model flags and the loss's activation (model_lib.MODEL_SETTINGS), as BirdCallModel.config holds them."""
    settings = {key: getattr(args, key) for key in model_lib.MODEL_SETTINGS if key != "activation"}
    return settings | {"activation": model_lib.activation_for_loss(args.loss)}


def learner_settings(args) -> learner_lib.LearnerSettings:
    optimization = learner_lib.OptimizerSettings(
        args.optimizer, args.lr, args.momentum, args.weight_decay, args.lr_schedule,
        args.schedule_epochs if args.schedule_epochs else args.epochs, args.warmup_epochs, args.warmup_lr,
        args.step_epochs, args.step_gamma)
    return learner_lib.LearnerSettings(
        model=model_settings(args), pretrained=args.pretrained, pretrained_file=args.pretrained_file,
        init_from=args.init_from, head_init=args.head_init, freeze_backbone_epochs=args.freeze_backbone_epochs,
        freeze_head_epochs=args.freeze_head_epochs, optimization=optimization, amp=args.amp, ema=args.ema,
        sync_bn=args.sync_bn, channels_last=args.channels_last, compile=args.compile,
        augment=augment_settings(args), background_dir=args.bg_dir if args.aug_strength > 0 else None,
        seed=args.seed)


def augment_settings(args) -> augment.AugmentSettings:
    """The augmentation flags, scaled by --aug-strength."""
    settings = augment.AugmentSettings(
        noise_prob=args.noise_prob, noise_snr=tuple(args.noise_snr), bg_prob=args.bg_prob if args.bg_dir else 0.0,
        bg_snr=tuple(args.bg_snr), cutmix_prob=args.cutmix_prob, cutmix_alpha=args.cutmix_alpha,
        gain_prob=args.gain_prob, gain_db=args.gain_db, shift_prob=args.shift_prob, shift_max=args.shift_max,
        freq_masks=args.freq_masks, time_masks=args.time_masks, mask_max_pct=args.mask_max_pct,
        mix_prob=args.mix_prob, mix_clips=args.mix_clips, mix_gain_db=tuple(args.mix_gain_db),
        distance_prob=args.distance_prob, distance_db=tuple(args.distance_db),
        distance_lowpass_hz=tuple(args.distance_lowpass), reverb_prob=args.reverb_prob,
        reverb_rt60=tuple(args.reverb_rt60), sample_rate=args.sample_rate)
    return settings.scaled(args.aug_strength)


def plain_config(args) -> dict:
    """vars(args) with only JSON/weights_only-safe values (no Namespace, no Path objects)."""
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}


def check_resume(checkpoint: dict, args, world_size: int) -> None:
    """The resumed run's settings against the checkpoint's (runfolder.check_resume_settings); where --epochs
    changed without --schedule-epochs, the schedule keeps the length the run started with."""
    kept_schedule = runfolder.check_resume_settings(checkpoint, plain_config(args), args.resume, world_size)
    if kept_schedule is not None:
        args.schedule_epochs = kept_schedule
