"""The options of train.py: every flag with its default and help, and the check that rejects
impossible combinations before any data is read.

    python train.py --help
    args = options.get_args_parser().parse_args([...])     # as tests and bench/ scripts build a run
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import audio
import data
import distributed
import frontend as frontend_lib
import learner as learner_lib
import losses
import model as model_lib
import progress
import sampling

MONITORED = ("cmap5", "cmap3", "macro_ap", "lrap", "val_loss",
             "ema_cmap5", "ema_cmap3", "ema_macro_ap", "ema_lrap", "ema_val_loss",
             "soundscape_cmap5", "soundscape_cmap3", "soundscape_macro_ap", "soundscape_lrap")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """train.py's parser, in groups: data, model, optimisation, augmentation, evaluation and checkpoints."""
    parser = argparse.ArgumentParser(description="Train a BirdCLEF bird-call classifier.",
                                     add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", nargs="+", default=[str(data.DEMO_DIR)],
                       help="one or more BirdCLEF folders (the 2021-2025 layouts are recognised); several "
                            "are merged: the vocabulary is their union and a xeno-canto recording in more "
                            "than one is used once. The default demo folder is generated on first use")
    group.add_argument("--val-fraction", type=float, default=0.2,
                       help="share of each species' recordings held out (ignored with --folds)")
    group.add_argument("--folds", type=int, default=0, help="K-fold split when > 1")
    group.add_argument("--fold", type=int, default=0, help="which fold is validation, with --folds")
    group.add_argument("--crop-policy", choices=audio.CROP_POLICIES, default="ends",
                       help="ends: random window inside the first or last --ends-seconds (the "
                            "original recipe); random: anywhere in the recording")
    group.add_argument("--ends-seconds", type=float, default=8.0, help="length of the 'ends' segments")
    group.add_argument("--secondary-weight", type=float, default=0.0,
                       help="target value for secondary labels (0 = ignore them)")
    group.add_argument("--workers", type=int, default=2, help="data loader processes")
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
                       help="add a 'nocall' class trained on background windows: --bg-dir audio (a crop "
                            "anywhere in each file per epoch), --nocall-soundscapes rows and --nocall-detections windows")
    group.add_argument("--nocall-soundscapes", default=None,
                       help="labelled-soundscape table (file,start_s,end_s,labels or BirdCLEF 2021's "
                            "train_soundscape_labels.csv) whose no-call rows train the nocall class; or a folder "
                            "of recordings without the vocabulary's birds (e.g. unlabeled soundscapes): every 5-s "
                            "row of each file, once per epoch")
    group.add_argument("--nocall-detections", default=None,
                       help="infer.py --detections table: windows whose best score is below "
                            "--nocall-max-score train the nocall class")
    group.add_argument("--nocall-max-score", type=float, default=0.05,
                       help="a detections window is no-call below this best score")
    group.add_argument("--nocall-per-recording", type=int, default=1,
                       help="no-call windows taken from each recording's detections, quietest first")
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
    group.add_argument("--sample-rate", type=int, default=32000, help="audio is resampled to this rate")
    group.add_argument("--window-seconds", type=float, default=5.0, help="length of one input window")
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
    group.add_argument("--noise-prob", type=float, default=0.0, help="probability of coloured noise")
    group.add_argument("--noise-snr", type=float, nargs=2, default=[3.0, 30.0], metavar=("LOW", "HIGH"),
                       help="SNR range of coloured (white, pink, brown) noise in dB")
    group.add_argument("--bg-dir", default=None,
                       help="folder of background audio (e.g. no-call soundscape segments) mixed into training crops")
    group.add_argument("--bg-prob", type=float, default=0.5, help="probability of background noise, with --bg-dir")
    group.add_argument("--bg-snr", type=float, nargs=2, default=[0.0, 2.0], metavar=("LOW", "HIGH"),
                       help="SNR range of background noise in dB")
    group.add_argument("--cutmix-prob", type=float, default=0.0, help="probability of cutmix along time")
    group.add_argument("--cutmix-alpha", type=float, default=1.0, help="cutmix Beta(alpha, alpha)")
    group.add_argument("--gain-prob", type=float, default=0.0, help="probability of a random gain")
    group.add_argument("--gain-db", type=float, default=6.0, help="random gain range, +-dB")
    group.add_argument("--shift-prob", type=float, default=0.0, help="probability of a circular time shift")
    group.add_argument("--shift-max", type=float, default=0.5, help="largest time shift, fraction of the window")
    group.add_argument("--freq-masks", type=int, default=0, help="SpecAugment frequency masks per example")
    group.add_argument("--time-masks", type=int, default=0, help="SpecAugment time masks per example")
    group.add_argument("--mask-max-pct", type=float, default=0.1,
                       help="SpecAugment: widest mask as a fraction of the bands or frames")
    group.add_argument("--mix-prob", type=float, default=0.0,
                       help="probability that a window gets 1 to --mix-clips - 1 other windows of its batch added "
                            "at full weight (targets: the union), as soundscape rows hold several calls")
    group.add_argument("--mix-clips", type=int, default=3, help="most calls in one window, with --mix-prob")
    group.add_argument("--mix-gain-db", type=float, nargs=2, default=[-12.0, 0.0], metavar=("LOW", "HIGH"),
                       help="power of each added window relative to the window it joins, in dB")
    group.add_argument("--distance-prob", type=float, default=0.0,
                       help="probability of a distant call: a gain from --distance-db and a low-pass cutoff "
                            "from --distance-lowpass")
    group.add_argument("--distance-db", type=float, nargs=2, default=[-20.0, 0.0], metavar=("LOW", "HIGH"),
                       help="gain range of a distant call in dB (relative to what is mixed in later)")
    group.add_argument("--distance-lowpass", type=float, nargs=2, default=[2000.0, 16000.0],
                       metavar=("LOW_HZ", "HIGH_HZ"), help="low-pass cutoff range of a distant call (log-uniform)")
    group.add_argument("--reverb-prob", type=float, default=0.0,
                       help="probability of reverberation by a synthetic exponentially decaying impulse response")
    group.add_argument("--reverb-rt60", type=float, nargs=2, default=[0.2, 1.5], metavar=("LOW", "HIGH"),
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
    group.add_argument("--seed", type=int, default=42, help="seed of every random stream")
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
    """train.py's arguments; with --config, that config.json's values are the defaults under the command line."""
    parser = get_args_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        replayed = json.loads(Path(known.config).read_text())
        unknown = sorted(set(replayed) - set(vars(known)))
        if unknown:
            raise ValueError(f"--config {known.config}: {unknown} are no flags of train.py")
        # config.json holds the resolved --resume of a resumed run: replaying it must start a run, not
        # continue (and append to) that one
        parser.set_defaults(**{key: value for key, value in replayed.items()
                               if key not in ("config", "resume", "overwrite")})
    return parser.parse_args(argv)


def image_size(text: str) -> list[int]:
    """'256x157' -> [256, 157]."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 256x157, got {text!r}") from None
    return [height, width]


def check_arguments(args) -> None:
    """Reject impossible combinations before any work is done."""
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
    learner_lib.precision_settings(args.amp, distributed.local_device(args.device))
    model_lib.check_backbone_name(args.backbone)  # fail before any data is read, with timm's error
    model_lib.check_model(args)  # build with random weights, one forward on silence: fails here, naming the fix
