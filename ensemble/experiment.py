"""The experiment (``Experiment``, ``open_experiment``): a config, a run folder, the data set and its prepared images, the runtime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .artifacts import check_output_dir
from .config import Config, save_config
from .data import SELECTION_SPLIT, TEST_SPLITS, load_dataset
from .locks import lock_run
from .prepare import ImageSource, load_images
from .runtime import Runtime, runtime


@dataclass
class Experiment:
    cfg: Config
    run: Path
    manifest: pd.DataFrame
    images: ImageSource
    rt: Runtime
    config_out: Path | None = None  # where the run's config.json goes once a stage succeeds

    def save_config(self) -> None:
        """Record the config in the run's ``config.json`` (what ``compare`` and ``calibrate``
        read back). Called when a stage has been published: a command refused or failed part
        way leaves the config of the run's last success in place."""
        if self.config_out is not None:
            save_config(self.cfg, self.config_out)

    def idx(self, split: str) -> np.ndarray:
        """Manifest positions of a split's faces (empty when the split is absent)."""
        return np.flatnonzero(self.manifest["split"].to_numpy() == split)

    def eval_splits(self) -> list[str]:
        """The selection split and every test split present: what a stage reports its metrics on
        (the test figures are information only; nothing is chosen on them)."""
        present = set(self.manifest["split"])
        return [s for s in (SELECTION_SPLIT, *TEST_SPLITS) if s in present]


def open_experiment(
    cfg: Config, run: Path, log=print, progress: bool = True, out: Path | None = None, save: bool = True
) -> Experiment:
    """Check the output folder (``out``, by default the run), take the run's lock, load the data
    set, prepare its images once, pick the device. The resolved config is written into the
    output folder now if it holds none yet, else when a stage succeeds (:meth:`Experiment.save_config`).
    ``save=False`` (the per-GPU expert workers of a parent that holds the run) neither locks nor
    writes the config."""
    run = Path(run)
    out = Path(out) if out is not None else run
    check_output_dir(out)
    rt = runtime(cfg.train)
    if rt.is_main and save:  # one writer per run; under DDP, rank 0 speaks for the job
        lock_run(run)
    ds = load_dataset(cfg.data, seed=cfg.train.seed)
    images = load_images(
        ds.manifest,
        cfg.data.image_size,
        cfg.data.cache_dir,
        cfg.data.cache,
        cfg.data.num_workers,
        progress=progress and rt.is_main,
    )
    if rt.is_main:
        counts = ds.manifest.groupby("split").size().to_dict()
        log(
            f"data: {cfg.data.format} {', '.join(f'{k} {v}' for k, v in counts.items())}"
            + (f"; dropped {sum(ds.dropped.values())}" if ds.dropped else "")
            + f"; device {rt.device}, precision {rt.amp_dtype or 'fp32'}"
        )
    exp = Experiment(cfg, run, ds.manifest, images, rt)
    if rt.is_main and save:  # not from the per-GPU expert workers: the parent's config is the run's
        exp.config_out = out / "config.json"
        if not exp.config_out.is_file():
            exp.save_config()
    return exp
