"""From recordings to batches: the training/validation dataset, collate, and the DataLoader.

`RecordingDataset` gives one crop per draw: an item (record, epoch, position) is
cropped by a generator seeded from (seed, epoch, position), so a run produces the
same batches whatever the number of loader workers, and a resumed run continues
exactly where the interrupted one stopped. Evaluation items are plain indices:
the first window. Which records an epoch visits is sampling.py's job.

With --cache, crops are read from the decoded-audio cache (cache.py) as int16
and, from loader workers, travel through a `BatchRing` of shared buffers instead
of a new shared-memory tensor per batch.
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import queue
from dataclasses import dataclass

import numpy as np
import torch

import audio
import distributed
import sampling
import soundscapes

log = logging.getLogger("birdclef")


class RecordingDataset(torch.utils.data.Dataset):
    """One crop per draw: item (record, epoch, position) -> dict, or None if the file fails.

    Training items are tuples from `EpochBatchSampler`, so the crop depends only on
    (seed, epoch, position). Evaluation items are plain indices: the first window.
    """

    def __init__(self, paths, durations, targets: np.ndarray, crop: audio.CropSettings, seed: int = 0,
                 primary_labels=None, starts=None, cache=None, cache_rows=None, chunks=None, anywhere=None):
        self.paths = list(paths)
        self.durations = list(durations)
        self.targets = targets
        self.crop = crop
        self.seed = seed
        self.primary_labels = list(primary_labels) if primary_labels is not None else None  # for samplers
        # a fixed 5-s window (extras, no-call rows of soundscapes) instead of a crop by policy; NaN: by policy
        self.starts = np.full(len(self.paths), np.nan) if starts is None else np.asarray(starts, dtype=np.float64)
        if len(self.starts) != len(self.paths):
            raise ValueError(f"{len(self.starts)} starts for {len(self.paths)} recordings")
        # seconds of a chunk centred on a fixed window that training crops randomly inside (--extras-chunk); 0: none
        self.chunks = np.zeros(len(self.paths)) if chunks is None else np.asarray(chunks, dtype=np.float64)
        # files cropped anywhere whatever the policy (--nocall --bg-dir beds: no calls at the ends to prefer)
        self.anywhere = np.zeros(len(self.paths), bool) if anywhere is None else np.asarray(anywhere, dtype=bool)
        self.cache = cache  # decoded crops (python data.py cache); row -1: not in the cache
        self.cache_rows = np.full(len(self.paths), -1) if cache_rows is None else np.asarray(cache_rows)
        self.ring = None  # set for loader workers by `RingDataLoader`

    def __len__(self):
        return len(self.paths)

    @property
    def crop_samples(self) -> int:
        return int(round(self.crop.window_seconds * self.crop.sample_rate))

    def crop_start(self, item) -> tuple[int, float]:
        """item -> (record, start second of its crop)."""
        if isinstance(item, tuple):
            index, epoch, position = item
            rng = np.random.default_rng([self.seed, epoch, position])
        else:
            index, rng = item, None
        duration, window, chunk = self.durations[index], self.crop.window_seconds, self.chunks[index]
        if np.isnan(self.starts[index]):
            policy = "random" if self.anywhere[index] else self.crop.policy
            return index, audio.choose_crop_start(duration, window, policy, self.crop.ends_seconds, rng)
        if rng is None or chunk <= window:
            return index, soundscapes.fixed_window_start(self.starts[index], duration, window)
        chunk_start = soundscapes.fixed_window_start(self.starts[index], duration, chunk)   # inside the recording
        return index, chunk_start + float(rng.uniform(0.0, max(min(chunk, duration) - window, 0.0)))

    def __getitem__(self, item):
        index, start = self.crop_start(item)
        try:
            waveform = None
            if self.cache is not None and self.cache_rows[index] >= 0:
                waveform = self.cache.window(self.cache_rows[index], start, self.crop.window_seconds, self.crop.pad)
            if waveform is None:  # not cached, or a crop the cache does not cover
                waveform = self.decode(index, start)
        except Exception as error:  # the header was fine but decoding failed: skip, never crash
            log.warning("skipping %s: %s: %s", self.paths[index], type(error).__name__, error)
            return None
        return {"waveform": torch.from_numpy(waveform), "target": torch.from_numpy(self.targets[index]),
                "path": self.paths[index], "index": index}

    def decode(self, index: int, start: float) -> np.ndarray:
        waveform = audio.read_window(self.paths[index], start, self.crop.window_seconds, self.crop.sample_rate,
                               self.crop.pad)
        return waveform if self.cache is None else audio.to_int16(waveform)  # with a cache, batches are int16

    def __getitems__(self, items: list) -> list:
        """A whole batch (the DataLoader calls this when it exists). From the cache, every crop is
        read straight into its row of one (B, samples) int16 batch -- in a loader worker, in
        shared memory -- which `collate` then passes on without copying it again."""
        if self.cache is None:
            return [self[item] for item in items]
        samples = self.crop_samples
        ring = self.ring if torch.utils.data.get_worker_info() is not None else None
        if ring is not None and len(items) <= ring.waveforms.shape[1]:
            slot = ring.take()
            batch = ring.waveforms[slot, :len(items)]                      # (B, samples) in shared memory
        else:
            slot, batch = None, _empty_batch((len(items), samples), torch.int16)
        results = []
        for row, item in enumerate(items):
            index, start = self.crop_start(item)
            try:
                cache_row = self.cache_rows[index]
                if cache_row < 0 or not self.cache.read_into(cache_row, start, self.crop.window_seconds,
                                                             self.crop.pad, batch[row].numpy()):
                    batch[row] = torch.from_numpy(self.decode(index, start))
            except Exception as error:  # as in __getitem__
                log.warning("skipping %s: %s: %s", self.paths[index], type(error).__name__, error)
                results.append(None)
                continue
            if slot is None:
                results.append({"waveform": batch[row], "target": torch.from_numpy(self.targets[index]),
                                "path": self.paths[index], "index": index})
            else:  # the waveform stays in the ring: `collate` sends (slot, row), BatchRing.receive copies it
                results.append({"ring_row": (slot, row), "target": self.targets[index],
                                "path": self.paths[index], "index": index})
        if slot is not None and all(result is None for result in results):
            ring.give_back(slot)   # nothing to send, so the trainer would never free it
        return results


def collate(items):
    """Stack the items that decoded; drop the Nones (failures were already logged)."""
    items = [item for item in items if item is not None]
    if not items:
        return None
    if "ring_row" in items[0]:  # a cached batch in a BatchRing slot: plain arrays, pickled with the message
        return {"ring_slot": items[0]["ring_row"][0],
                "ring_rows": np.array([item["ring_row"][1] for item in items]),   # (B,) rows of the slot
                "target": np.stack([item["target"] for item in items]),            # (B, C)
                "path": [item["path"] for item in items],
                "index": np.array([item["index"] for item in items])}
    return {"waveform": _stack([item["waveform"] for item in items]),        # (B, samples)
            "target": _stack([item["target"] for item in items]),            # (B, C)
            "path": [item["path"] for item in items],
            "index": torch.tensor([item["index"] for item in items])}        # (B,) rows of the dataset


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack; in a loader worker straight into shared memory, which saves the copy the
    worker would otherwise make to send the batch (as torch's default_collate does). Rows that
    already are one whole batch, in order (RecordingDataset.__getitems__), are that batch."""
    first = tensors[0]
    storage = first.untyped_storage()
    if (storage.nbytes() == len(tensors) * first.numel() * first.element_size()
            and all(t.untyped_storage().data_ptr() == storage.data_ptr() and t.is_contiguous()
                    and t.storage_offset() == row * first.numel() for row, t in enumerate(tensors))):
        return first.new_empty(0).set_(storage, 0, (len(tensors), *first.shape))
    out = _empty_batch((len(tensors), *first.shape), first.dtype)
    return torch.stack(tensors, out=out)


class BatchRing:
    """Shared-memory buffers through which loader workers send cached batches.

    torch sends each batch from a worker in a new shared-memory tensor: made and
    page-faulted in the worker, mapped and faulted again in the trainer, unmapped
    later; for a batch read from the cache that costs more than the read itself
    (bench/loader_speed.py). Here a worker takes a free slot, reads
    the batch into it and sends only (slot, rows); the trainer copies the rows out
    and frees the slot at once (`receive`), so a batch it keeps is never overwritten.
    One slot per batch the DataLoader can have in flight (workers * prefetch_factor)
    plus one, so a worker never waits for a slot.
    """

    WAIT_SECONDS = 300.0  # a worker waiting longer for a free slot stops with an error instead of hanging

    def __init__(self, slots: int, batch_size: int, samples: int):
        self.waveforms = torch.zeros((slots, batch_size, samples), dtype=torch.int16).share_memory_()
        self.free = multiprocessing.Queue()  # slot numbers; made before the workers start
        for slot in range(slots):
            self.free.put(slot)

    def take(self) -> int:
        try:
            return self.free.get(timeout=self.WAIT_SECONDS)
        except queue.Empty:
            raise RuntimeError(f"no free batch slot in {self.WAIT_SECONDS:.0f} s: more batches in flight than the "
                               f"{len(self.waveforms)} slots of the ring") from None

    def give_back(self, slot: int) -> None:
        self.free.put(slot)

    def receive(self, batches, pin_memory: bool = False):
        """Batches as `collate` makes them: waveforms copied out of their slot (which is freed)."""
        for batch in batches:
            if batch is not None and "ring_slot" in batch:
                rows = torch.from_numpy(batch["ring_rows"])
                waveform = torch.empty((len(rows), self.waveforms.shape[2]), dtype=torch.int16,
                                       pin_memory=pin_memory)
                slot = self.waveforms[batch["ring_slot"]]                                    # (batch, samples)
                if torch.equal(rows, torch.arange(len(rows))):
                    waveform.copy_(slot[:len(rows)])           # every crop decoded: a plain copy, faster
                else:
                    torch.index_select(slot, 0, rows, out=waveform)                           # (B, samples)
                self.give_back(batch["ring_slot"])
                target = torch.from_numpy(batch["target"])                                  # (B, C)
                batch = {"waveform": waveform, "target": target.pin_memory() if pin_memory else target,
                         "path": batch["path"], "index": torch.from_numpy(batch["index"])}
            yield batch


class RingDataLoader(torch.utils.data.DataLoader):
    """torch's DataLoader; with workers and a cache, batches of up to `ring_batch_size` crops come
    through a BatchRing made for each pass (each set of workers)."""

    def __init__(self, dataset, *args, ring_batch_size: int = 0, **kwargs):
        self.ring_batch_size = ring_batch_size
        super().__init__(dataset, *args, **kwargs)

    def __iter__(self):
        if (not self.ring_batch_size or not self.num_workers or self.persistent_workers
                or getattr(self.dataset, "cache", None) is None):
            return super().__iter__()
        ring = BatchRing(self.num_workers * self.prefetch_factor + 1, self.ring_batch_size, self.dataset.crop_samples)
        self.dataset.ring = ring
        try:
            batches = super().__iter__()     # the workers start here, each with its copy of the dataset
        finally:
            self.dataset.ring = None
        return ring.receive(batches, self.pin_memory)


def _empty_batch(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor; in a loader worker in shared memory, ready to be sent to the main process."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(size), 0, shape)


def make_loader(dataset, batch_size: int, workers: int, device, batch_sampler=None) -> RingDataLoader:
    """The DataLoader of train.py: batches from `batch_sampler` (training), else the dataset in
    order in `batch_size` batches (validation)."""
    common = dict(num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
                  worker_init_fn=_worker_init if workers else None)
    if batch_sampler is not None:
        return RingDataLoader(dataset, batch_sampler=batch_sampler, ring_batch_size=batch_size, **common)
    return RingDataLoader(dataset, batch_size=batch_size, shuffle=False, ring_batch_size=batch_size, **common)


def _worker_init(_):
    torch.set_num_threads(1)  # workers only decode and resample; don't fight the model for cores


@dataclass(frozen=True)
class LoaderSettings:
    """How training batches are drawn and loaded: --batch-size (per process), --workers, --sampler,
    --cap-per-class, --seed, --soundscape-share."""
    batch_size: int
    workers: int
    sampler: str
    cap_per_class: int
    seed: int
    soundscape_share: float          # share of each batch from --soundscape-labels windows (0 without them)


def epoch_draw(train_set, settings: LoaderSettings, epoch: int) -> np.ndarray:
    """The epoch's single draw, every rank's share: the sampler's draw of the recordings (and extra and
    no-call windows), with --soundscape-share of every batch from the soundscape windows, which come
    last in the dataset."""
    soundscape = getattr(train_set, "soundscape", None)
    if soundscape is None or not soundscape.any():
        return sampling.draw_epoch(len(train_set), settings.seed, epoch, train_set.primary_labels, settings.sampler,
                                   settings.cap_per_class)
    recordings = int((~soundscape).sum())
    draw = sampling.draw_epoch(recordings, settings.seed, epoch, train_set.primary_labels[:recordings],
                               settings.sampler, settings.cap_per_class)
    per_batch = sampling.soundscape_windows_per_batch(settings.soundscape_share, settings.batch_size)
    return sampling.with_soundscape_windows(draw, np.arange(recordings, len(train_set)), per_batch, settings.batch_size,
                                            distributed.rank_and_world_size()[1], settings.seed, epoch)


def epoch_batches(train_set, settings: LoaderSettings, epoch: int, start_batch: int = 0) -> sampling.EpochBatchSampler:
    """This rank's batches of one epoch, from `start_batch`: its shard of the epoch's single draw."""
    return sampling.EpochBatchSampler(epoch_draw(train_set, settings, epoch), settings.batch_size, epoch,
                                      start_batch, *distributed.rank_and_world_size())


def training_loader(train_set, settings: LoaderSettings, device, batches: sampling.EpochBatchSampler) -> RingDataLoader:
    """The loader of one epoch's `batches` (epoch_batches)."""
    return make_loader(train_set, settings.batch_size, settings.workers, device, batches)
