"""The experiment (``Experiment``, ``open_experiment``): a config, a run folder, the data set and its prepared images, the runtime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .artifacts import check_output_dir
from .config import Config, save_config
from .data import load_dataset
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

    def idx(self, split: str) -> np.ndarray:
        """Manifest positions of a split's faces (empty when the split is absent)."""
        return np.flatnonzero(self.manifest["split"].to_numpy() == split)


def open_experiment(
    cfg: Config, run: Path, log=print, progress: bool = True, out: Path | None = None, save: bool = True
) -> Experiment:
    """Check the output folder (``out``, by default the run), take the run's lock, load the data
    set, prepare its images once, pick the device; the resolved config is written into the
    output folder. ``save=False`` (the per-GPU expert workers of a parent that holds the run)
    neither locks nor writes the config."""
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
        if save:  # not from the per-GPU expert workers: the parent's config is the run's
            save_config(cfg, out / "config.json")
    return Experiment(cfg, run, ds.manifest, images, rt)
