"""``ViewLoader``: the batches the training loop sees, one DALI pipeline per epoch.

Building the pipeline per epoch (a fraction of a second) keeps an epoch a pure function of
(seed, epoch, rank, world size): a training epoch's order is :mod:`pipelines.order`'s (the shard list
and every shard's samples permuted per (seed, epoch), then split among the ranks by count), handed to
DALI as this rank's (tar, index) segments; the epoch number is a constant inside the graph. A training
epoch opens the next one (its order, its sample check, its pipeline built and prefetching) while its
own last batches are made, so epochs follow each other without a pause; on a small split such as the
digits (23 batches an epoch) that pause was a sixth of the time. Evaluation reads the split in shard
order, each rank its contiguous slice (DALI's sharding by sample count). Ranks yield the same number
of batches so DDP never waits on a rank that ran out.

Before DALI decodes a sample, the loader checks it (:func:`shards.index.check_lines`): its members'
bytes against the per-sample checksums written with the shard, its ``sid`` against its key and the
manifest's order, its label against the classes. Bytes flipped inside an image pass every structural
check and can crash DALI's decoder (SIGSEGV, no file named); here they are one line naming the shard,
the sample and the member. Each process checks the samples of each epoch it reads, each sample once;
with ``skip_bad`` every sample of the split is checked at start (so all ranks agree) and the bad ones
are left out of every epoch's order, said once. Every batch's ids are also compared with the ids
the epoch's order puts there.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipelines.finish import Finisher
from pipelines.order import ORDER_VERSION
from pipelines.plan import ViewConfig, colour_views, turn_views, view_labels
from shards.format import IMAGE_EXTS, MANIFEST, load_manifest, sample_key, split_files
from shards.index import check_lines, check_shard, parse_index
from sskd.core.errors import SSKDError

log = logging.getLogger(__name__)
_UNSUMMED_WARNED: set[str] = set()  # shard folders already warned about (no per-sample checksums)

DEFAULT_SIZE = {"cifar": 32, "imagenet": 224}
# Bump when any view's pixels change for the same plan parameters (caches record it). 5: normalisation
# as x * (1 / 255 std) - mean / std (float rounding); 4: colour drop resamples the luma; 3: colour
# distortion in float before rounding (pipelines.finish); 2: DALI's luma for colour drop, flip folded
# into windows.
PIPELINE_VERSION = 5
PREFETCH = 2  # DALI's prefetch_queue_depth: batches made ahead of the one being consumed
SOURCE_INFO = re.compile(
    r"^(.*):(\d+):(\w+)\.(\w+)$"
)  # DALI's webdataset source info: <tar>:<offset>:<key>.<ext>


def rank_counts(n: int, world_size: int) -> list[int]:
    """Samples per rank under DALI's sharding: rank r reads [floor(n r / W), floor(n (r+1) / W))."""
    return [(n * (r + 1)) // world_size - (n * r) // world_size for r in range(world_size)]


@dataclass
class _Opened:
    """One epoch made ready to read (:meth:`ViewLoader._open`)."""

    epoch: int
    segments: list[tuple[int, np.ndarray]] | None = None  # this rank's part of the order
    expected: np.ndarray | None = None  # the sample ids DALI must yield, in order
    pipe: Any = None  # the built DALI pipeline, its first iterations scheduled

    def close(self) -> None:
        self.pipe = None  # DALI shuts a pipeline down with its last reference


class ViewLoader:
    """Batches ``{"views": (b, v, 3, s, s), "label": (b,), "id": (b,)}`` of one split and rank.

    Args:
        shards: shard folder written by ``sskd shard``.
        split: ``train`` or ``val``.
        batch_size: samples per batch on this rank.
        views: SS views after the normal view (``ViewConfig``, a preset name, or None for view 0 only).
        train: training augmentation (seeded per epoch) or the deterministic evaluation view.
        seed: plan seed.
        rank, world_size: this process among all (each reads a disjoint part).
        device: ``cpu`` or ``gpu`` (DALI decode with nvJPEG and views on the GPU).
        threads: DALI CPU threads.
        dtype: float32, float16 or bfloat16 output.
        size: output size; default from the manifest's layout (32 CIFAR-like, 224 ImageNet-like).
        torch_device: where the yielded tensors go (default: where DALI made them).
        reuse_buffers: yield DALI's output buffers without a copy; a batch is then only valid until the
            next one is requested (the training loop's case). Saves a full copy of every batch.
        subset_fraction: few-shot: read only this stratified share of the ``train`` split
            (:mod:`pipelines.settings`; other splits ignore it).
        label_noise: symmetric label noise at this rate on the ``train`` split's training batches,
            drawn from ``seed`` (:mod:`pipelines.settings`); ``flipped_ids`` lists the flipped samples.
        skip_bad: check every sample of the split at start and leave out those that fail (corrupted
            bytes, a rewritten id, a cut-off member), listed once in the log and in ``skipped``; without
            it the first bad sample a rank is about to read stops the run with one line naming it.
        verify_samples: check samples against their recorded checksums before DALI decodes them (on
            by default; off only to measure what the check costs).
        manifest: the shard manifest when the caller has read it already (a run reads it once); default:
            read from ``shards``.
    """

    def __init__(
        self,
        shards: str | Path,
        split: str = "train",
        batch_size: int = 64,
        views: ViewConfig | str | None = None,
        train: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str = "cpu",
        threads: int = 2,
        dtype: torch.dtype = torch.float32,
        size: int | None = None,
        torch_device: torch.device | str | None = None,
        reuse_buffers: bool = False,
        subset_fraction: float = 1.0,
        label_noise: float = 0.0,
        skip_bad: bool = False,
        verify_samples: bool = True,
        manifest: dict[str, Any] | None = None,
    ):
        if device not in ("cpu", "gpu"):
            raise SSKDError(f"device must be cpu or gpu, not {device!r}")
        if not 0 <= rank < world_size:
            raise SSKDError(f"rank {rank} is outside world size {world_size}")
        self.shards = Path(shards)
        self.manifest = manifest if manifest is not None else load_manifest(self.shards)
        self.tars, self.idxs = split_files(self.shards, self.manifest, split)
        self.skip_bad, self.verify_samples = bool(skip_bad), bool(verify_samples) or bool(skip_bad)
        check_split(self.shards, self.manifest, split, lenient=self.skip_bad)
        self.split, self.batch_size, self.train, self.seed = split, batch_size, train, seed
        self.rank, self.world_size, self.device, self.threads = rank, world_size, device, threads
        self.dtype, self.torch_device = dtype, torch_device
        self.reuse_buffers = reuse_buffers
        self.layout = self.manifest["layout"]
        self.size = size or DEFAULT_SIZE[self.layout]
        self.views = ViewConfig.parse(views) if train else ViewConfig(())
        self.num_samples = int(self.manifest["splits"][split]["num_samples"])
        self.num_classes = int(self.manifest["num_classes"])
        self.id_count = int(
            self.manifest["splits"][split].get("id_count", self.num_samples)
        )  # ids lie in 0..id_count-1
        self.subset_fraction = float(subset_fraction) if split == "train" else 1.0
        self.label_noise = float(label_noise) if split == "train" and train else 0.0
        self._subset = None
        self._shards = None  # the split's shards as pipelines.order sees them (training order)
        self._segments = None  # this rank's per-epoch index files
        self.label_map: torch.Tensor | None = None  # noisy label by sample id
        self.flipped_ids: list[int] = []
        self.skipped: dict[int, str] = {}  # skip_bad: the samples left out, by id, with what is wrong
        if self.skip_bad:
            self._find_bad()
        if self.subset_fraction < 1 or self.label_noise > 0 or self.skipped:
            self._apply_settings()
        counts = rank_counts(self.num_samples, world_size)
        if min(counts) == 0:
            raise SSKDError(
                f"{self.shards}: split {split!r} has {self.num_samples} samples, fewer than {world_size} ranks"
            )
        self.rank_num_samples = counts[rank]
        per_rank = [-(-c // batch_size) for c in counts]
        self._batches = min(per_rank)  # the extra tail batch of larger ranks is merged into their last one
        self._merge_tail = per_rank[rank] > self._batches
        self._running: tuple[Any, int] | None = None  # (pipeline, epoch) while an epoch is being read
        self._ahead: _Opened | None = None  # the next training epoch, opened before it is asked for
        self._yielded = 0  # batches of the running epoch handed out
        self.replayed = 0  # batches made and dropped to resume without a usable DALI checkpoint

    @classmethod
    def for_run(
        cls,
        spec: Any,
        split: str = "train",
        *,
        rank: int = 0,
        world_size: int = 1,
        torch_device: torch.device | str | None = None,
        train: bool | None = None,
        **overrides: Any,
    ) -> ViewLoader:
        """The loader of one split of a run, from its spec (:class:`sskd.engine.prepare.RunSpec`, read by
        attribute only: ``cfg``, ``stage``, ``manifest``, ``views``, ``size``, ``data_device``).

        The ``train`` split (or ``train=True``) gives training batches: the method's views, the stage's batch
        size, the run's data settings (subset, label noise, bad samples); any other split the evaluation view
        at ``data.eval_batch_size``. ``overrides`` replace any constructor argument (a cache's batch size)."""
        cfg = spec.cfg
        if train is None:
            train = split == "train"
        kwargs: dict[str, Any] = dict(
            batch_size=getattr(cfg, spec.stage).batch_size if train else cfg.data.eval_batch_size,
            views=spec.views if train else None,
            train=train,
            seed=cfg.run.seed,
            rank=rank,
            world_size=world_size,
            device=spec.data_device,
            threads=cfg.data.threads,
            size=spec.size,
            torch_device=torch_device,
            subset_fraction=cfg.data.subset_fraction,
            label_noise=cfg.data.label_noise,
            skip_bad=cfg.data.skip_bad,
            manifest=spec.manifest,
        )
        kwargs.update(overrides)
        return cls(cfg.data.shards, split, **kwargs)

    def _apply_settings(self) -> None:
        """Few-shot subset and bad samples left out (DALI indexes of the kept samples), noisy labels (a
        lookup by id). Which samples a subset keeps does not depend on the bad ones; those are then
        removed from it."""
        from pipelines.order import split_shards
        from pipelines.settings import SubsetIndexes, noisy_labels, subset_ids
        from shards.labels import split_labels

        if not 0 < self.subset_fraction <= 1 or not 0 <= self.label_noise < 1:
            raise SSKDError(
                f"subset_fraction {self.subset_fraction} must be in (0, 1] and label_noise "
                f"{self.label_noise} in [0, 1)"
            )
        labels = (
            split_labels(self.shards, self.split)
            if self.subset_fraction < 1 or self.label_noise > 0
            else None
        )
        keep = subset_ids(labels, self.subset_fraction) if self.subset_fraction < 1 else None
        if self.skipped:
            if keep is None:
                keep = np.concatenate([s.ids for s in split_shards(self.shards, self.manifest, self.split)])
            keep = np.sort(keep[~np.isin(keep, np.fromiter(self.skipped, dtype=np.int64))])
            if not len(keep):
                raise SSKDError(
                    f"{self.shards}: every sample of split {self.split!r} that would be read is bad "
                    f"(first: {next(iter(self.skipped.values()))}); nothing left to read"
                )
        if keep is not None:
            self._subset = SubsetIndexes(self.shards, self.manifest, self.split, keep)
            self.tars, self.idxs = self._subset.tars, self._subset.idxs
            self.num_samples = self._subset.num_samples
        if self.label_noise > 0:
            noisy, flipped = noisy_labels(labels, self.label_noise, self.seed, self.num_classes)
            self.label_map = torch.from_numpy(np.maximum(noisy, 0))
            self.flipped_ids = [int(i) for i in flipped]

    def _order_shards(self):
        from pipelines.order import split_shards

        if self._shards is None:
            keep = None if self._subset is None else np.asarray(self.kept_ids, dtype=np.int64)
            self._shards = split_shards(self.shards, self.manifest, self.split, keep)
        return self._shards

    def _epoch_segments(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """What this rank reads in ``epoch``, in order, as runs of one shard ``(shard number, index lines)``:
        a training epoch's order (:func:`pipelines.order.rank_segments`), or for evaluation this rank's
        contiguous slice of the split in shard order (DALI's sharding)."""
        from pipelines.order import eval_segments, rank_segments

        if self.train:
            return rank_segments(self._order_shards(), self.seed, epoch, self.rank, self.world_size)
        return eval_segments(self._order_shards(), self.rank, self.world_size)

    def _check_samples(self, segments) -> list[tuple[int, int, str]]:
        """Check the samples of ``segments`` (those not checked before in this process) before DALI decodes
        them (all of the split if None); returns ``(shard, index line, one-line problem)`` of the bad ones
        (shards in parallel over ``threads``)."""
        shards = self._order_shards() if segments is not None else self._all_shards()
        lines: dict[int, list[np.ndarray]] = {}
        for s, ls in segments if segments is not None else [(s, None) for s in range(len(shards))]:
            lines.setdefault(s, []).append(ls)

        def one(s: int):
            parts = lines[s]
            todo = None if any(p is None for p in parts) else np.unique(np.concatenate(parts))
            return check_lines(
                shards[s].tar, shards[s].idx, shards[s].entry, todo, num_classes=self.num_classes
            )

        todo = sorted(lines)
        if self.threads > 1 and len(todo) > 1:
            with ThreadPoolExecutor(
                max_workers=min(self.threads, len(todo)), thread_name_prefix="sskd-check"
            ) as pool:
                results = list(pool.map(one, todo))
        else:
            results = [one(s) for s in todo]
        unsummed = [shards[s].tar for s, r in zip(todo, results) if not r.summed]
        if unsummed and str(self.shards) not in _UNSUMMED_WARNED:
            _UNSUMMED_WARNED.add(str(self.shards))
            log.warning(
                "%s: %d shard(s) have no per-sample checksums (e.g. %s, written before they were "
                "recorded): each is checked whole against the manifest's sha256 instead (slower; a damaged "
                "image is named only if PIL cannot decode it); `sskd shard reindex %s` adds them",
                self.shards,
                len(unsummed),
                Path(unsummed[0]).name,
                self.shards,
            )
        return [(s, line, text) for s, r in zip(todo, results) for line, text in r.problems]

    def _all_shards(self):
        from pipelines.order import split_shards

        return split_shards(self.shards, self.manifest, self.split)

    def _find_bad(self) -> None:
        """skip_bad: check every sample of the split now (every rank the same, so all agree on what is
        left out) and record the bad ones in ``skipped``, said once."""
        shards = self._all_shards()
        for s, line, text in self._check_samples(None):
            self.skipped[int(shards[s].ids[line])] = text
        if self.skipped:
            shown = "; ".join(list(self.skipped.values())[:20])
            more = f"; and {len(self.skipped) - 20} more" if len(self.skipped) > 20 else ""
            log.warning(
                "%s: leaving out %d bad sample(s) of split %r (skip_bad): %s%s",
                self.shards,
                len(self.skipped),
                self.split,
                shown,
                more,
            )

    def _verify_epoch(self, segments) -> None:
        """The samples this rank is about to read, checked before DALI decodes them: one line and a stop
        on the first bad one."""
        problems = self._check_samples(segments)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise SSKDError(
                f"{problems[0][2]}{more}; `sskd shard verify {self.shards}` lists every bad sample, or "
                "rerun with --skip-bad (data.skip_bad) to leave them out"
            )

    def epoch_files(self, epoch: int, segments=None) -> tuple[list[str], list[str]]:
        """DALI's ``paths`` and ``index_paths`` for this rank's part of a training epoch (``segments``: its
        :func:`pipelines.order.rank_segments`, if already made)."""
        from pipelines.order import SegmentFiles, rank_segments

        if self._segments is None:
            self._segments = SegmentFiles()
        shards = self._order_shards()
        segs = (
            segments
            if segments is not None
            else rank_segments(shards, self.seed, epoch, self.rank, self.world_size)
        )
        return self._segments.write(shards, segs)

    @property
    def kept_ids(self) -> list[int] | None:
        """The sample ids a few-shot subset reads, in shard order (None: the whole split)."""
        return None if self._subset is None else [i for e in self._subset.entries for i in e["ids"]]

    @property
    def _finish_device(self) -> torch.device:
        """Where uint8 views become floats: the consumer's device if given, else where DALI made them."""
        if self.torch_device is not None:
            return torch.device(self.torch_device)
        return (
            torch.device("cuda", torch.cuda.current_device()) if self.device == "gpu" else torch.device("cpu")
        )

    @property
    def num_views(self) -> int:
        return self.views.num_views

    @property
    def view_names(self) -> tuple[str, ...]:
        return self.views.names

    def __len__(self) -> int:
        return self._batches

    def _pipeline(self, epoch: int, checkpoint: bytes | None = None, segments=None):
        from nvidia.dali import types

        from pipelines.dali import eval_pipeline, train_pipeline

        common = dict(
            batch_size=self.batch_size,
            num_threads=self.threads,
            device_id=None if self.device == "cpu" else torch.cuda.current_device(),
            size=self.size,
            layout=self.layout,
            device=self.device,
            shard_id=self.rank,
            num_shards=self.world_size,
            prefetch_queue_depth=PREFETCH,
            seed=self.seed,
        )  # DALI's RNG is unused
        if self.train:  # DALI's pipeline checkpointing: exact mid-epoch resume without re-making batches
            # This rank's part of the epoch's order (pipelines.order), spelled out as (tar, index) segments.
            tars, idxs = self.epoch_files(epoch, segments)
            common.update(shard_id=0, num_shards=1)
            return train_pipeline(
                tars,
                idxs,
                views=self.view_names,
                plan_seed=self.seed,
                epoch=epoch,
                enable_checkpointing=True,
                checkpoint=checkpoint,
                **common,
            )
        dali_dtype = types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT
        return eval_pipeline(
            self.tars,
            self.idxs,
            mean=self.manifest["mean"],
            std=self.manifest["std"],
            dtype=dali_dtype,
            **common,
        )

    def _open(self, opened: _Opened, checkpoint: bytes | None = None) -> None:
        """Everything before an epoch's first batch, filled into ``opened`` step by step (an error message
        names what is known): this rank's segments of the order, its samples checked, the ids DALI must
        yield, and the pipeline built with its first ``PREFETCH`` iterations scheduled."""
        opened.segments = self._epoch_segments(opened.epoch)
        if self.verify_samples:
            self._verify_epoch(opened.segments)
        shards = self._order_shards()
        opened.expected = (
            np.concatenate([shards[s].ids[lines] for s, lines in opened.segments])
            if opened.segments
            else np.zeros(0, np.int64)
        )  # the ids DALI must yield, in order
        opened.pipe = self._pipeline(opened.epoch, checkpoint, opened.segments)
        opened.pipe.build()
        opened.pipe.schedule_run()  # the first call schedules PREFETCH iterations

    def _open_ahead(self, epoch: int) -> None:
        """Open the next training epoch while this one's last batches are being made, so that it starts
        with batches ready rather than with a pipeline to build (on a digits epoch of 23 batches that
        start cost about a sixth of the time). Best effort: whatever fails here (a bad sample, DALI) is
        dropped and fails again, with its message, when the epoch is asked for."""
        if self._ahead is not None:
            self._ahead.close()
        self._ahead = _Opened(epoch)
        try:
            self._open(self._ahead)
        except Exception:  # noqa: BLE001 - reported when the epoch itself is opened
            self._ahead.close()
            self._ahead = None

    def _raw_batches(
        self, epoch: int, start: int = 0, checkpoint: bytes | None = None, next_epoch: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches of one epoch from batch ``start`` on, straight from DALI's outputs.

        The reader pads this rank's last batch (``pad_last_batch``); we run exactly
        ceil(rank samples / batch size) iterations and trim the padding, so every sample comes once.
        With a DALI ``checkpoint`` taken after batch ``start`` - 1 the pipeline continues from there;
        without one, the batches before ``start`` are made and dropped (counted in ``self.replayed``).
        A training epoch opens ``next_epoch`` (the one its caller reads next; None: none) once its own
        last iteration is scheduled (:meth:`_open_ahead`); asking for another epoch, or resuming from a
        checkpoint, drops that one.
        """
        opened, self._ahead = self._ahead, None
        if opened is not None and (opened.epoch != epoch or checkpoint is not None):
            opened.close()
            opened = None
        opened = opened or _Opened(epoch)
        shards = self._order_shards()
        n, bs, nv = self.rank_num_samples, self.batch_size, self.num_views
        first, last = (start if checkpoint is not None else 0), -(-n // bs)
        at = first  # the batch being made (named if DALI fails)
        colour = colour_views(self.view_names) if self.train else []
        turned = turn_views(self.view_names) if self.train else []
        finish = Finisher(
            self.manifest["mean"], self.manifest["std"], dtype=self.dtype
        )  # buffers kept per epoch
        finish_device = self._finish_device
        try:
            if opened.pipe is None:
                self._open(opened, checkpoint)
            pipe, expected = opened.pipe, opened.expected
            self._running = (pipe, epoch)
            # Exactly the iterations the epoch needs: ``pipe.run()`` schedules one more than it returns
            # (its first call prefetches two), so one batch past every epoch's end was made, thrown away
            # and waited for at shutdown (4 % of a digits epoch's work).
            scheduled = first + PREFETCH
            for i in range(first, last):
                at = i
                outs = pipe.outputs()
                if scheduled < last:
                    pipe.schedule_run()
                    scheduled += 1
                elif self.train and next_epoch is not None and i == max(first, last - PREFETCH):
                    self._open_ahead(next_epoch)  # this epoch's last iteration is scheduled
                if i < start:
                    self.replayed += 1
                    continue
                keep = min(bs, n - i * bs)
                # DALI reuses its output buffers on the next run (DALI#3239), and so does ``finish``: copy
                # unless the consumer is done with a batch before asking for the next; the tail batch that
                # may be merged is kept.
                copy = not self.reuse_buffers or (self._merge_tail and i >= self._batches - 1)
                if self.train:  # uint8 views -> finish on the training device (pipelines.finish)
                    u8 = [_to_torch(o, False)[:keep].to(finish_device, non_blocking=True) for o in outs[:nv]]
                    params = [_to_torch(o, False)[:keep] for o in outs[nv + 2 :]]
                    mats = {v: (params[2 * j], params[2 * j + 1]) for j, v in enumerate(colour)}
                    turns = {v: params[2 * len(colour) + j] for j, v in enumerate(turned)}
                    views = finish(u8, mats, turns, reuse=not copy)
                else:
                    views = _to_torch(outs[0], copy)[:keep]
                label, ids = (
                    _to_torch(outs[nv], True)[:keep].long(),
                    _to_torch(outs[nv + 1], True)[:keep].long(),
                )
                check_batch(outs[nv], outs[nv + 1], label, ids, self.num_classes, self.id_count)
                check_order(outs[nv + 1], ids, expected[i * bs : i * bs + keep])
                if self.label_map is not None:
                    label = self.label_map[ids]
                yield {"views": views, "label": label, "id": ids}
        except RuntimeError as exc:
            # DALI makes up to prefetch_queue_depth batches ahead: the failing sample is in batches at..at+2
            raise SSKDError(
                _explain(
                    exc, self.tars, lambda: _suspects(shards, opened.segments or [], at * bs, (at + 3) * bs)
                )
            ) from exc
        finally:
            self._running = None
            pipe = outs = None  # with the last reference DALI shuts the pipeline down
            opened.close()

    def epoch(
        self,
        epoch: int,
        start_batch: int = 0,
        resume_state: dict | None = None,
        next_epoch: int | None | Literal["default"] = "default",
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``epoch`` on this rank, from batch ``start_batch`` on (exact resume).

        A training loader opens ``next_epoch`` (default ``epoch + 1``) while this one's last batches are
        made; a caller that knows better says which (a cached run's augmentation epochs wrap around) or
        None after its last epoch, so that no pipeline is built that nobody reads.

        With ``resume_state`` (from :meth:`state` at that batch, by the same rank and set-up) DALI's
        pipeline restarts from its checkpoint; otherwise (or if the state does not fit) the batches
        before ``start_batch`` are made and dropped: exact either way, since the epoch is a pure
        function of its seed.
        """
        if start_batch >= self._batches:  # resumed exactly at the end of the epoch: nothing left
            return
        checkpoint = None
        if resume_state is not None and start_batch > 0:
            expect = self._state_key(epoch, start_batch)
            if {k: resume_state.get(k) for k in expect} == expect:
                checkpoint = resume_state["dali"]
            else:
                log.warning(
                    "data state does not fit this run (%s vs %s): re-making %d batches to resume",
                    {k: resume_state.get(k) for k in expect},
                    expect,
                    start_batch,
                )
        self._yielded = start_batch
        held = None  # the last batch of a rank whose extra tail is merged into it (a copy, see _raw_batches)
        after = epoch + 1 if next_epoch == "default" else next_epoch
        for i, batch in enumerate(
            self._raw_batches(epoch, start_batch, checkpoint, after), start=start_batch
        ):
            if self._merge_tail and i == self._batches - 1:
                held = batch
                continue
            if held is not None:
                batch = {k: torch.cat([held[k], batch[k]]) for k in batch}
            self._yielded += 1
            yield self._emit(self._with_view_labels(batch, epoch))

    def _state_key(self, epoch: int, batch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "batch": batch,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "views": list(self.view_names),
            "num_samples": self.num_samples,
            "pipeline_version": PIPELINE_VERSION,
            "subset_fraction": self.subset_fraction,
            "order_version": ORDER_VERSION,
        }

    def state(self) -> dict[str, Any] | None:
        """Where this rank's running training epoch stands: DALI's pipeline checkpoint after the last
        batch yielded, with what it is valid for; None between epochs (or for evaluation loaders)."""
        if self._running is None or not self.train:
            return None
        pipe, epoch = self._running
        return {**self._state_key(epoch, self._yielded), "dali": pipe.checkpoint()}

    def _with_view_labels(self, batch, epoch: int):
        """Training batches also carry each pretext label the SS views have (``rotation_label``,
        ``jigsaw_label``: (b, V) int64, -1 where a view has none), recomputed here from the plan and the
        batch's ids (:func:`pipelines.plan.view_labels`) rather than carried through DALI."""
        if self.train:
            ids = batch["id"].cpu().numpy()
            for kind, lab in view_labels(ids, seed=self.seed, epoch=epoch, views=self.view_names).items():
                batch[f"{kind}_label"] = torch.from_numpy(lab).to(batch["id"].device)
        return batch

    def _emit(self, batch):
        if self.dtype == torch.bfloat16 and not self.train:
            batch["views"] = batch["views"].to(torch.bfloat16)
        if self.torch_device is not None:
            batch = {k: v.to(self.torch_device, non_blocking=True) for k, v in batch.items()}
        return batch

    def __iter__(self):
        return self.epoch(0)


def _to_torch(tl, copy: bool) -> torch.Tensor:
    """A DALI TensorList as one torch tensor: zero-copy on the CPU unless ``copy``; GPU batches are copied
    into a new CUDA tensor with DALI's own ``feed_ndarray``."""
    import numpy as np

    if hasattr(tl, "as_cpu") and not hasattr(tl, "as_array"):  # TensorListGPU
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        t = tl.as_tensor()
        out = torch.empty(
            t.shape(), dtype=to_torch_type[t.dtype], device=torch.device("cuda", torch.cuda.current_device())
        )
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream())
        return out
    arr = torch.from_numpy(np.asarray(tl.as_tensor()))
    return arr.clone() if copy else arr


def check_split(shards: Path, manifest: dict[str, Any], split: str, lenient: bool = False) -> None:
    """The manifest's counts and ids against the shards' indexes, and each index against its tar, before
    DALI reads anything (:func:`shards.index.check_shard`): a bad shard is an error naming it, not a crash.

    The split's ids run 0..N-1 once each in shard order (shard ``k`` holds ``first_id`` .. ``first_id +
    samples - 1``, the next starts after it); a subset folder's shards list their ``ids``, each once
    and inside the split they come from. ``lenient``: see :func:`shards.index.check_shard`."""
    info = manifest["splits"][split]
    where = shards / MANIFEST
    held = sum(int(e.get("samples", -1)) for e in info["shards"])
    if held != info.get("num_samples"):
        raise SSKDError(
            f"{where}: splits.{split}.num_samples is {info.get('num_samples')} but "
            f"its shards hold {held} samples (edited manifest?)"
        )
    for entry in info["shards"]:
        check_shard(shards / entry["file"], shards / entry["index"], entry, lenient=lenient)
    id_count = int(info.get("id_count", info["num_samples"]))
    next_first, seen = 0, set()
    for k, entry in enumerate(info["shards"]):
        at = f"splits.{split}.shards[{k}] ({entry.get('file')})"
        if entry.get("ids"):
            ids = [int(i) for i in entry["ids"]]
            dup = seen.intersection(ids) or (
                len(set(ids)) != len(ids) and {i for i in ids if ids.count(i) > 1}
            )
            if len(ids) != entry.get("samples"):
                raise SSKDError(
                    f"{where}: {at} lists {len(ids)} ids for {entry.get('samples')} samples (edited manifest?)"
                )
            if dup:
                raise SSKDError(
                    f"{where}: {at}: sample id {min(dup)} appears twice in split {split!r} (edited manifest?)"
                )
            if min(ids) < 0 or max(ids) >= id_count:
                raise SSKDError(
                    f"{where}: {at}: ids {min(ids)}..{max(ids)} lie outside the split's 0..{id_count - 1}"
                )
            seen.update(ids)
        else:
            first = entry.get("first_id", 0)
            if first != next_first:
                raise SSKDError(
                    f"{where}: {at} starts at id {first}, expected {next_first}: a split's ids run "
                    "0..N-1 in shard order, each once (edited manifest?)"
                )
            next_first += int(entry.get("samples", 0))


def check_order(id_tl, ids: torch.Tensor, expected: np.ndarray) -> None:
    """The batch's ids are the ones the epoch's order puts there (:mod:`pipelines.order`): a sample whose
    ``sid`` says another (valid) id, or an index that reads other samples, is an error naming the shard
    and sample, not another sample's views, label or cached teacher outputs."""
    got = ids.cpu().numpy()
    if got.shape == expected.shape and np.array_equal(got, expected):
        return
    j = (
        int(np.flatnonzero(got[: len(expected)] != expected[: len(got)])[0])
        if len(got) and len(expected)
        else 0
    )
    found = SOURCE_INFO.match(id_tl[j].source_info() or "") if j < len(id_tl) else None
    where = f"{found.group(1)}: sample {found.group(3)}" if found else "a shard"
    want = int(expected[j]) if j < len(expected) else None
    raise SSKDError(
        f"{where}: read as id {int(got[j]) if j < len(got) else None}, but the epoch's order puts sample "
        f"{want} there (a rewritten sample id or a stale index; `sskd shard verify` checks it)"
    )


def _suspects(shards, segments, lo: int, hi: int) -> list[tuple[str, str, int, int]]:
    """The samples at positions lo..hi-1 of this rank's epoch: ``(tar, key, image offset, image size)``."""
    out, pos, members = [], 0, {}
    for s, lines in segments:
        if pos + len(lines) > lo and pos < hi:
            if s not in members:
                members[s] = parse_index(shards[s].idx)[1]
            for line in lines[max(0, lo - pos) : hi - pos]:
                img = [(off, size) for ext, off, size, _ in members[s][line] if ext in IMAGE_EXTS]
                out.append(
                    (shards[s].tar, sample_key(int(shards[s].ids[line])), *(img[0] if img else (0, 0)))
                )
        pos += len(lines)
        if pos >= hi:
            break
    return out


def _undecodable(suspects) -> tuple[str, str, str] | None:
    """The first of ``suspects`` that PIL cannot decode either: ``(tar, key, reason)``, or None."""
    import io

    from PIL import Image

    for tar, key, off, size in suspects:
        if not size:
            continue
        try:
            with open(tar, "rb") as fh:
                fh.seek(off)
                data = fh.read(size)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        except Exception as exc:  # noqa: BLE001 - any failure names the sample
            return tar, key, f"{type(exc).__name__}: {str(exc).split(' <_io.', 1)[0]}"[:200]
    return None


def _explain(exc: Exception, tars: list[str], suspects=None) -> str:
    """A one-line message naming the shard and sample behind a DALI error.

    DALI names a sample by its source info, ``<tar>:<offset>:<key>.<ext>``; that becomes
    ``<tar>: sample <key> (<ext> at byte <offset>): <reason>``. Where DALI names none (its decoder's own
    failures), ``suspects()`` gives the samples of the batches being made: the first that PIL cannot
    decode either is named, else the shard and the range of samples.
    """
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    reason = lines[0] if lines else type(exc).__name__
    if "encountered:" in lines:  # DALI puts the actual cause after this marker
        after = lines[lines.index("encountered:") + 1 :]
        reason = next((ln for ln in after if not ln.startswith("C++ context")), reason)
    for tar in tars:
        found = re.search(re.escape(tar) + r":(\d+):(\w+)\.(\w+)", text)
        if found:
            offset, key, ext = found.groups()
            reason = reason.replace(found.group(0), "").rstrip(" :")
            return f"{tar}: sample {key} ({ext} at byte {offset}) cannot be read ({reason[:300]})"
    for tar in tars:
        if Path(tar).with_suffix("").name in text:
            return f"{tar}: DALI could not read this shard ({reason[:300]})"
    window = []
    if suspects is not None:
        try:
            window = suspects()
        except Exception:  # noqa: BLE001 - naming the samples is best effort; the error is raised anyway
            window = []
    if window:
        bad = _undecodable(window)
        if bad:
            return f"{bad[0]}: sample {bad[1]} cannot be decoded ({reason[:200]}; PIL: {bad[2]})"
        files = sorted({w[0] for w in window})
        others = f" (and {len(files) - 1} other shard(s))" if len(files) > 1 else ""
        return (
            f"{files[0]}{others}: DALI failed on one of samples {', '.join(w[1] for w in window[:8])}"
            f"{' ...' if len(window) > 8 else ''} ({reason[:300]})"
        )
    return f"DALI pipeline failed on {Path(tars[0]).parent} ({reason[:300]})"


def check_batch(
    label_tl, id_tl, label: torch.Tensor, ids: torch.Tensor, num_classes: int, num_samples: int
) -> None:
    """Labels in 0..K-1 and ids in 0..N-1, or an error naming the shard and sample (a corrupt ``lbl`` or
    ``sid`` would otherwise be a traceback deep in the loss, or a silently wrong cache lookup)."""
    bad = (label < 0) | (label >= num_classes) | (ids < 0) | (ids >= num_samples)
    if not bool(bad.any()):
        return
    j = int(bad.nonzero()[0, 0])
    found = SOURCE_INFO.match(label_tl[j].source_info() or id_tl[j].source_info() or "")
    where = f"{found.group(1)}: sample {found.group(3)}" if found else "a shard"
    raise SSKDError(
        f"{where}: label {int(label[j])} / id {int(ids[j])} outside 0..{num_classes - 1} / "
        f"0..{num_samples - 1} (corrupt shard; `sskd shard verify` checks it)"
    )
