"""ensemble tune on the demo config: how much time pruning saves, and what the search finds.

Three runs on the same data, each scored on the selection split (val):
1. the config's own values (the default the search has to beat);
2. a pruned search: ``trials`` trials, TPE, the median pruner of ``[tune]``;
3. the very same parameter sets, enqueued in a new study, run to the end (no pruning).
Saved time = (3) - (2); whether pruning lost the best = best of (3) vs best of (2).

    python benchmarks/tune.py                       # configs/tune-demo.toml, 20 trials
    python benchmarks/tune.py --trials 8 --set train.epochs=2
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from common import ROOT, machine, save  # noqa: F401  (common puts the repo on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tune-demo.toml"))
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value (repeatable)")
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench-tune"), help="scratch folder (emptied)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/tune.json)")
    args = ap.parse_args()

    import optuna

    from ensemble.config import load_config
    from ensemble.tune import TuneOptions, _Data, open_log, run_stage, run_tune

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    load_before = os.getloadavg()

    def quiet(msg):
        pass

    # 1. the config as it is
    cfg = load_config(args.config, args.overrides)
    t0 = time.time()
    data = _Data(cfg, work / "default", quiet)
    with open_log(work / "default") as log:
        default_value = run_stage("flat", data.experiment(cfg, work / "default" / "run", log, False), log)
    default_s = time.time() - t0
    print(f"default config: val balanced accuracy {default_value:.4f} ({default_s:.0f} s)")

    # 2. the pruned search
    t0 = time.time()
    pruned = run_tune(
        args.config,
        args.overrides,
        TuneOptions(stage="flat", trials=args.trials, out=str(work / "pruned"), study="pruned", keep="none"),
        print,
    )
    pruned_s = time.time() - t0
    s_pruned = optuna.load_study(study_name="pruned", storage=f"sqlite:///{(work / 'pruned' / 'study.db').resolve()}")

    # 3. the same parameter sets, unpruned
    url = f"sqlite:///{(work / 'unpruned' / 'study.db').resolve()}"
    (work / "unpruned").mkdir()
    s_full = optuna.create_study(study_name="unpruned", storage=url, direction="maximize")
    for t in s_pruned.trials:
        s_full.enqueue_trial(t.params)
    t0 = time.time()
    run_tune(
        args.config,
        args.overrides,
        TuneOptions(
            stage="flat", trials=args.trials, out=str(work / "unpruned"), study="unpruned", keep="none", pruner="none"
        ),
        print,
    )
    unpruned_s = time.time() - t0
    s_full = optuna.load_study(study_name="unpruned", storage=url)

    by_params = {tuple(sorted(t.params.items())): t for t in s_full.trials}
    rows = []
    for t in s_pruned.trials:
        full = by_params[tuple(sorted(t.params.items()))]
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "value": t.value,
                "epochs_run": len(t.intermediate_values),
                "seconds": t.duration.total_seconds(),
                "unpruned_value": full.value,
                "unpruned_seconds": full.duration.total_seconds(),
                "params": t.params,
            }
        )
    n_pruned = sum(r["state"] == "PRUNED" for r in rows)
    best_pruned = max(r["value"] for r in rows if r["state"] == "COMPLETE")
    best_full = max(r["unpruned_value"] for r in rows)
    lost = [r["trial"] for r in rows if r["state"] == "PRUNED" and r["unpruned_value"] > best_pruned]
    trial_s_pruned = sum(r["seconds"] for r in rows)
    trial_s_full = sum(r["unpruned_seconds"] for r in rows)
    epochs_pruned = sum(r["epochs_run"] for r in rows)
    epochs_full = sum(len(by_params[tuple(sorted(r["params"].items()))].intermediate_values) for r in rows)
    # the same estimate from one phase only (the unpruned run's own seconds per epoch), which the
    # load of a shared machine cannot tilt between the two runs
    n_epochs = max(epochs_full // max(1, len(rows)), 1)
    skipped_s = sum(r["unpruned_seconds"] * (1 - r["epochs_run"] / n_epochs) for r in rows if r["state"] == "PRUNED")
    figures = {
        "config": args.config,
        "overrides": args.overrides,
        "trials": args.trials,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "default_val_balanced_accuracy": default_value,
        "default_seconds": default_s,
        "pruned_search_seconds": pruned_s,
        "unpruned_same_trials_seconds": unpruned_s,
        "trial_seconds_pruned": trial_s_pruned,
        "trial_seconds_unpruned": trial_s_full,
        "time_saved_fraction": 1 - trial_s_pruned / trial_s_full,
        "n_pruned": n_pruned,
        "epochs_trained_pruned": epochs_pruned,
        "epochs_trained_unpruned": epochs_full,
        "epochs_saved_fraction": 1 - epochs_pruned / epochs_full,
        "time_saved_fraction_same_phase_estimate": skipped_s / trial_s_full,
        "best_pruned_search": best_pruned,
        "best_params": pruned["best"]["params"],
        "best_unpruned_same_trials": best_full,
        "pruned_trials_that_would_have_won": lost,
        "beats_default": best_pruned > default_value,
        "trials_detail": rows,
    }
    print(
        f"\npruned search: {args.trials} trials in {pruned_s / 60:.1f} min ({n_pruned} pruned), best "
        f"{best_pruned:.4f}; default {default_value:.4f} ({'beaten' if best_pruned > default_value else 'NOT beaten'})"
    )
    print(
        f"same trials unpruned: {unpruned_s / 60:.1f} min, best {best_full:.4f}; training time saved by pruning "
        f"{100 * figures['time_saved_fraction']:.0f} % ({trial_s_full / 60:.1f} -> {trial_s_pruned / 60:.1f} min)"
    )
    print(
        f"epochs trained: {epochs_full} unpruned, {epochs_pruned} pruned "
        f"({100 * figures['epochs_saved_fraction']:.0f} % fewer); from the unpruned run's own times, pruning "
        f"skipped {100 * figures['time_saved_fraction_same_phase_estimate']:.0f} % of the training time"
    )
    print(f"pruned trials that would have beaten the pruned search's best: {lost or 'none'}")
    print(
        f"load average before {load_before[0]:.1f}, after {figures['load_average_after'][0]:.1f} "
        f"on {os.cpu_count()} cores"
    )
    save("tune", figures, args.out)


if __name__ == "__main__":
    main()
