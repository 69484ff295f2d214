"""The run's int8 graph against its fp32 one (``--precision int8``, :mod:`ensemble.quantize`): accuracy
on a test split, agreement, and milliseconds a face in one alternation.

    python benchmarks/int8.py [--run RUN] [--split valid] [--card]

``--run``: default the bundled model; it needs an ``onnx`` stage with an int8 graph
(``ensemble export --run RUN --format onnx-run`` writes one where the run's training faces can be read).
The figures are ``ensemble compare``'s on ``--split`` (FER+: ``valid`` is FER2013Valid, on which
nothing was chosen; the int8 ranges come from training faces): the run's answer (``mixed+la``)
in fp32 and in int8, their paired bootstrap difference and the share of faces on which they agree.
Expected calibration error of both, before and after the run's temperature (chosen for fp32 on the
selection split). Speed: the networks alone on 256 faces of that split, batches of 32, 1 and 2 ONNX Runtime threads,
fp32 and int8 alternating three times (median). ``--card`` writes the int8 figures into the run's
model card (``ensemble models`` prints them).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import save


def _ms_per_face(hierarchy, x: np.ndarray, batch: int = 32) -> float:
    hierarchy.infer(x[:batch], batch)  # warm-up
    t = time.perf_counter()
    hierarchy.infer(x, batch)
    return (time.perf_counter() - t) / len(x) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="run folder (default: the bundled model)")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--card", action="store_true", help="write the int8 figures into the run's model card")
    ap.add_argument("--name", default="int8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from ensemble.bundle import default_run, read_card, write_card
    from ensemble.calibration import apply_temperature, ece, load_temperature
    from ensemble.cli import _run_config
    from ensemble.errors import UserError
    from ensemble.experiment import open_experiment
    from ensemble.images import uint8_to_input
    from ensemble.onnx_runtime import OnnxHierarchy, _stage_meta, has_int8
    from ensemble.reports import compare

    run = Path(args.run) if args.run else default_run()
    if not has_int8(run):
        raise SystemExit(f"{run} has no int8 graph: ensemble export --run {run} --format onnx-run")
    with tempfile.TemporaryDirectory(prefix="int8-bench-") as tmp:
        exp = open_experiment(_run_config(None, (), run), run, print, progress=False, out=Path(tmp))
        result = compare(exp, args.split, Path(tmp) / "report", print, n_resamples=1000)
        idx = exp.idx(args.split)
        idx = idx[exp.images.ok[idx]]
        faces = np.stack([exp.images.get(int(i)) for i in idx])
        y = exp.manifest["label"].to_numpy()[idx]
    if "int8" not in result["models"]:
        raise UserError(f"compare did not score {run}'s int8 graph")
    keep = ("accuracy", "balanced_accuracy", "macro_f1", "per_class_recall")
    fp32 = {k: result["models"]["mixed+la"][k] for k in keep}
    int8 = {k: result["models"]["int8"][k] for k in keep}
    vs = result["vs_flat"]["int8"]

    # calibration: the run's temperature was chosen for fp32 on the selection split; does it hold in int8?
    temperature = load_temperature(run, "hierarchy")
    calibration = {"temperature": temperature}
    for p in ("fp32", "int8"):
        net = OnnxHierarchy.load(run, precision=p)
        proba = net.infer(uint8_to_input(faces, net.mean, net.std))[0]
        calibration[f"ece_{p}"] = [round(ece(proba, y), 4), round(ece(apply_temperature(proba, temperature), y), 4)]
    print(f"ECE on {args.split}, before -> after the temperature {temperature:g}: {calibration}")
    faces = faces[:256]
    speed = {}
    for threads in (1, 2):
        nets = {p: OnnxHierarchy.load(run, threads=threads, precision=p) for p in ("fp32", "int8")}
        x = uint8_to_input(faces, nets["fp32"].mean, nets["fp32"].std)
        times = {p: [] for p in nets}
        for _ in range(3):
            for p, net in nets.items():
                times[p].append(_ms_per_face(net, x))
        speed[f"{threads}_threads"] = {f"{p}_ms_per_face": round(statistics.median(t), 2) for p, t in times.items()}
        speed[f"{threads}_threads"]["int8_speedup"] = round(
            statistics.median(times["fp32"]) / statistics.median(times["int8"]), 2
        )

    figures = {
        "run": str(run),
        "split": result["split"],
        "n": result["n"],
        "fp32": fp32,
        "int8": int8,
        "agreement": vs["agreement"],
        "int8_minus_fp32": {k: vs[k] for k in ("accuracy", "balanced_accuracy")},
        "calibration": _stage_meta(run)["int8"]["calibration"],
        "ece_before_after_temperature": calibration,
        "speed_networks_only": speed,
    }
    print(
        f"{result['split']} ({result['n']} faces): fp32 accuracy {fp32['accuracy']:.4f} balanced {fp32['balanced_accuracy']:.4f}; "
        f"int8 {int8['accuracy']:.4f} / {int8['balanced_accuracy']:.4f}; agreement {vs['agreement']:.4f}"
    )
    print(f"networks alone, ms a face: {speed}")
    save(args.name, figures, args.out)
    if args.card:
        card = read_card(run)
        card["figures"]["int8"] = {
            **int8,
            "agreement_with_fp32": round(vs["agreement"], 4),
            "minus_fp32": figures["int8_minus_fp32"],
            "calibration": figures["calibration"],
            "ece_before_after_temperature": calibration["ece_int8"],
            "measured_by": "python benchmarks/int8.py --card",
        }
        write_card(run, card)
        print(f"model card of {run}: int8 figures written")


if __name__ == "__main__":
    main()
