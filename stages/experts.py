"""Neighborhoods of the training V/A labels, and one expert classifier per neighborhood.

Routing errors cascade: an expert that only ever saw faces whose *true* V/A lies in its
region meets, at test time, the faces stage 1 *sends* there. ``experts.train_on`` chooses
what trains an expert: ``true`` (the true region), ``routed`` (where stage 1's V/A,
predicted out-of-fold on the training faces, sends them) or ``both`` (the union). An expert
covers every class that reaches it in meaningful numbers under that assignment.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from ensemble.artifacts import StageWriter, load_weights, read_meta, sha256_file, versions
from ensemble.checkpoints import resume_fingerprint
from ensemble.classes import CLASSES
from ensemble.config import records_config
from ensemble.engine import StageData, evaluate, fit, predict_outputs
from ensemble.errors import UserError
from ensemble.files import atomic_write, swap_into_place, write_json
from ensemble.tasks import CLASSIFY, VA_REGRESSION

from .flat import ensure_flat_trunk
from .neighborhoods import VANeighborhoods, complete_membership, membership, plot_va_map, routed_membership
from .neural import build_stage_net, first_own_block, load_network, train_network
from .stage1 import va_targets


def fit_neighborhoods(exp, log=print, staging: Path | None = None) -> tuple[VANeighborhoods, Path]:
    """Cluster the training V/A labels; reuse ``RUN/neighborhoods`` if its settings match, else
    write a new fit (under ``staging`` when given, to be swapped in with the experts).
    Returns the neighborhoods and the folder that holds them."""
    nc = exp.cfg.neighborhoods
    settings = {
        **nc.__dict__,
        "min_count": exp.cfg.experts.min_count,
        "seed": exp.cfg.train.seed,
        "n_train": int(len(exp.idx("train"))),
    }
    folder = (staging or exp.run) / "neighborhoods"
    for existing in dict.fromkeys([exp.run / "neighborhoods", folder]):
        if (existing / "meta.json").is_file() and _recorded_meta(existing).get("settings") == settings:
            log(f"neighborhoods: reusing {existing}")
            return load_neighborhoods(existing), existing  # verified here
    if exp.rt.world > 1:  # one rank fits and writes, the others read what it wrote
        if exp.rt.is_main:
            _fit_and_write_neighborhoods(exp, settings, folder, log)
        torch.distributed.barrier()
        return load_neighborhoods(folder), folder
    return _fit_and_write_neighborhoods(exp, settings, folder, log), folder


def _fit_and_write_neighborhoods(exp, settings: dict, folder: Path, log) -> VANeighborhoods:
    nc = exp.cfg.neighborhoods
    tr = exp.idx("train")
    va = va_targets(exp.manifest)[tr]
    labels = exp.manifest["label"].to_numpy()[tr]
    nbh = VANeighborhoods(
        method=nc.method,
        k=nc.k,
        k_min=nc.k_min,
        k_max=nc.k_max,
        min_share=nc.min_share,
        min_count=exp.cfg.experts.min_count,
        max_fit_samples=nc.max_fit_samples,
        random_state=exp.cfg.train.seed,
    ).fit(va, labels)
    writer = StageWriter(folder)
    nbh.save_arrays(writer.path("model.npz"))  # what the tool loads: plain arrays, never unpickled
    import joblib

    joblib.dump(nbh, writer.path("model.joblib"))  # the scikit-learn estimator, for users' own analysis
    desc = nbh.describe(CLASSES)
    writer.json("neighborhoods.json", desc)
    plot_va_map(va, labels, nbh, CLASSES, writer.path("va_map.png"))
    writer.publish({"stage": "neighborhoods", "classes": list(CLASSES), "settings": settings, "k": int(nbh.k_)})
    for n in desc["neighborhoods"]:
        log(
            f"neighborhood {n['id']}: V {n['center']['valence']:+.2f} A {n['center']['arousal']:+.2f}  "
            f"{', '.join(n['classes'])}"
        )
    return nbh


def load_neighborhoods(folder: Path) -> VANeighborhoods:
    """The fitted neighborhoods from ``model.npz`` (sha256-checked, plain arrays: no pickle is
    ever loaded; ``model.joblib`` beside it is for users who want the scikit-learn object)."""
    read_meta(folder, "neighborhoods")
    if not (folder / "model.npz").is_file():
        raise UserError(f"{folder} has no model.npz (written by an older ensemble); rerun ensemble fit-experts")
    try:
        return VANeighborhoods.load_arrays(folder / "model.npz")
    except (OSError, ValueError, KeyError, SyntaxError, TypeError) as exc:
        raise UserError(f"{folder}/model.npz is damaged: {type(exc).__name__}: {str(exc)[:120]}") from None


def stage1_va(exp, idx: np.ndarray) -> np.ndarray:
    """Stage 1's predicted V/A for faces ``idx`` (faces stage 1 did not train on)."""
    net, meta = load_network(exp.run / "stage1", exp.run)
    out, _ = predict_outputs(net.to(exp.rt.device), exp.images, idx, meta["mean"], meta["std"], exp.rt)
    return np.clip(out, -1, 1)


def oof_stage1_va(exp, log=print, resume: bool = False) -> np.ndarray:
    """Stage 1's V/A on the training faces, each predicted by a refit that did not see it."""
    cfg = exp.cfg.for_stage("stage1")
    folds = exp.cfg.experts.oof_folds
    tr, vi = exp.idx("train"), exp.idx("val")
    y = va_targets(exp.manifest)
    # each fold's predictions are kept as it finishes (keyed by stage 1's weights, the stage-1
    # settings and the faces), and a fold cut short resumes from its checkpoint with --resume
    stage1_sha = read_meta(exp.run / "stage1").get("files", {}).get("weights.pt")
    key = hashlib.sha256(
        json.dumps([stage1_sha, folds, resume_fingerprint(cfg, tr, vi)], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    folder = exp.run / ".oof" / key
    if exp.rt.is_main:
        for other in (exp.run / ".oof").glob("*"):  # folds of an earlier stage 1 or other settings
            if other.name != key:
                shutil.rmtree(other, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    pred = np.zeros((len(tr), 2), np.float32)
    from sklearn.model_selection import KFold

    kf = KFold(folds, shuffle=True, random_state=cfg.train.seed)
    for f, (a, b) in enumerate(kf.split(tr)):
        done = folder / f"fold{f}.npy"
        if done.is_file():
            pred[b] = np.load(done)
            continue
        torch.manual_seed(cfg.train.seed + 1 + f)
        net, src = build_stage_net(cfg, 2, exp.run)
        from .backbones import normalization

        mean, std = (src["mean"], src["std"]) if src else normalization(cfg.model.backbone)
        work = folder / f"fold{f}.work"
        fit(
            net,
            VA_REGRESSION,
            StageData(exp.images, tr[a], y[tr[a]], vi, y[vi]),
            cfg,
            mean,
            std,
            exp.rt,
            work,
            resume=resume,
            desc=f"stage1 fold {f + 1}/{folds}",
            log=log,
            fingerprint_extra={"trunk it builds on": src.get("trunk_sha256", "")},
        )
        out, _ = predict_outputs(net, exp.images, tr[b], mean, std, exp.rt)
        pred[b] = np.clip(out, -1, 1)
        if exp.rt.is_main:
            with atomic_write(done) as fh:
                np.save(fh, pred[b])
        shutil.rmtree(work, ignore_errors=True)
    return pred


def assignments(exp, nbh: VANeighborhoods, log=print, resume: bool = False) -> dict:
    """Per region: training and validation positions (into exp.idx) and the expert's classes."""
    ec = exp.cfg.experts
    tr, vi = exp.idx("train"), exp.idx("val")
    va_true = va_targets(exp.manifest)
    labels = exp.manifest["label"].to_numpy()
    k = nbh.k_
    true_tr = np.eye(k, dtype=bool)[nbh.predict(va_true[tr])]
    true_vi = np.eye(k, dtype=bool)[nbh.predict(va_true[vi])] if len(vi) else np.zeros((0, k), bool)
    if ec.train_on == "true_va":
        in_tr, in_vi = true_tr, true_vi
    else:
        log(f"experts: routing training faces with stage 1 predicted out-of-fold ({ec.oof_folds} folds)")
        routed_tr = np.eye(k, dtype=bool)[nbh.predict(oof_stage1_va(exp, log, resume))]
        routed_vi = np.eye(k, dtype=bool)[nbh.predict(stage1_va(exp, vi))] if len(vi) else true_vi
        in_tr = routed_tr if ec.train_on == "routed" else routed_tr | true_tr
        in_vi = routed_vi if ec.train_on == "routed" else routed_vi | true_vi
    counts = np.zeros((k, len(CLASSES)), np.int64)
    for r in range(k):
        np.add.at(counts[r], labels[tr][in_tr[:, r]], 1)
    members = membership(counts, nbh.min_share, ec.min_count)
    share = exp.cfg.neighborhoods.route_share
    if share > 0 and len(vi):  # overlap where the router actually sends a class's selection faces
        routed_v = routed_vi if ec.train_on != "true_va" else np.eye(k, dtype=bool)[nbh.predict(stage1_va(exp, vi))]
        sent = np.zeros((k, len(CLASSES)), np.int64)
        for r in range(k):
            np.add.at(sent[r], labels[vi][routed_v[:, r]], 1)
        members, added = routed_membership(members, sent, share)
        for r, c, got in added:
            log(
                f"neighborhood {r}: {CLASSES[c]} joins it, stage 1 routes {100 * got:.0f}% of its selection faces "
                f"there (neighborhoods.route_share = {share:g})"
            )
    members, merged, notes = complete_membership(members, counts, nbh.centers_, CLASSES)
    for note in notes:
        log(note)
    regions = []
    for r in range(k):
        cls, src = members[r], merged.get(r, r)  # a merged neighborhood learns from its target's faces
        t = np.flatnonzero(in_tr[:, src] & np.isin(labels[tr], cls))
        v = np.flatnonzero(in_vi[:, src] & np.isin(labels[vi], cls)) if len(vi) else np.zeros(0, int)
        true_v = np.flatnonzero(true_vi[:, src] & np.isin(labels[vi], cls)) if len(vi) else np.zeros(0, int)
        regions.append(
            {
                "id": r,
                "classes": cls,
                "train_pos": t,
                "val_pos": v,
                "true_val_pos": true_v,  # the expert against the restricted flat model, inside its true neighborhood
                "counts": {CLASSES[c]: int(counts[src, c]) for c in cls},
            }
        )
    return {"train_on": ec.train_on, "regions": regions}


def _staging(run: Path) -> Path:
    """New experts are trained here and swapped in whole when all are done, so an interrupted
    refit leaves the run's working experts untouched."""
    return run / ".experts.new"


def _train_expert(exp, region: dict, resume: bool, log) -> dict:
    r, cls = region["id"], region["classes"]
    out = _staging(exp.run) / str(r)
    names = [CLASSES[c] for c in cls]
    cfg = exp.cfg.for_stage("experts")
    if len(cls) == 1:  # a one-class neighborhood needs no network
        writer = StageWriter(out)
        writer.json("metrics.json", {})
        writer.publish({"stage": f"expert{r}", "task": "constant", "classes": names, "region": r})
        log(f"expert {r}: one class ({names[0]}), no network")
        return {"region": r, "classes": names, "constant": True}
    tr, vi = exp.idx("train"), exp.idx("val")
    labels = exp.manifest["label"].to_numpy()
    local = {c: i for i, c in enumerate(cls)}

    def to_local(y):
        return np.array([local[int(c)] for c in y], dtype=int)

    t_idx, v_idx = tr[region["train_pos"]], vi[region["val_pos"]]
    # information only: the test splits' faces of the expert's classes
    tests = {s: exp.idx(s)[np.isin(labels[exp.idx(s)], cls)] for s in exp.eval_splits() if s != "val"}
    if len(t_idx) == 0:
        raise UserError(f"expert {r}: no training faces in its neighborhood")
    data = StageData(
        exp.images,
        t_idx,
        to_local(labels[t_idx]),
        v_idx,
        to_local(labels[v_idx]),
        names,
    )
    log(f"expert {r}: {', '.join(names)} on {len(t_idx)} faces ({region['counts']})")
    init_head = restricted_flat_head(exp.run, cfg, cls) if cfg.model.trunk_from == "flat" else None
    if init_head is not None and cfg.model.trainable != "head":
        log(
            f"expert {r}: its own copy of the flat model's {_blocks_from(cfg.model.trainable)} and the flat head's "
            f"rows for its classes: it starts exactly at the flat model restricted to its classes, and is kept "
            f"only if training beats that on the selection faces of its true neighborhood"
        )
    eval_sets = {"val": (v_idx, data.val_y), **{s: (idx, to_local(labels[idx])) for s, idx in tests.items()}}
    metrics = train_network(
        f"expert{r}",
        CLASSIFY,
        cfg,
        data,
        out,
        exp.run,
        exp.rt,
        resume,
        eval_sets,
        extra_meta={
            "region": r,
            "train_on": exp.cfg.experts.train_on,
            "init": "flat" if init_head else "fresh",
            **({"keep_rule": "kept only if it beats the restricted flat model"} if init_head else {}),
        },
        log=log,
        fingerprint_extra={
            "neighborhoods": region["neighborhoods_sha256"],
            "experts.train_on": exp.cfg.experts.train_on,
            "experts.init": "flat" if init_head else "fresh",
        },
        init_head=init_head,
    )
    against = None
    if init_head is not None and exp.rt.is_main:
        true_v = vi[region["true_val_pos"]]
        against = _keep_or_restricted_flat(
            exp, out, r, names, init_head, true_v, to_local(labels[true_v]), eval_sets, log
        )
        metrics = json.loads((out / "metrics.json").read_text())
    meta = read_meta(out, f"expert {r}") if exp.rt.is_main else {}
    return {
        "region": r,
        "classes": names,
        "constant": False,
        "val_balanced_accuracy": metrics.get("val", {}).get("balanced_accuracy"),
        **({"true_neighborhood_val": against} if against else {}),
        **{k: meta[k] for k in ("trainable", "n_own_params") if k in meta},
    }


def _blocks_from(trainable: str) -> str:
    return "whole trunk" if trainable == "all" else f"blocks {trainable[5:]}.. (from {trainable})"


def restricted_flat_head(run: Path, cfg, classes: list[int]) -> dict | None:
    """The flat model's head with only its output rows for ``classes``: a network that starts
    exactly at "the flat model restricted to my classes" (softmax over those logits). None when
    the expert's head (``model.head``, ``model.hidden``) differs from the flat model's."""
    meta = read_meta(run / "flat", "flat (model.trunk_from)")
    if (cfg.model.head, cfg.model.hidden) != (meta["head"], meta["hidden"]):
        return None
    head = {k[len("head.") :]: v for k, v in load_weights(run / "flat").items() if k.startswith("head.")}
    *_, weight, bias = head  # the output layer's, last in the head
    head[weight], head[bias] = head[weight][classes].clone(), head[bias][classes].clone()
    return head


def keep_score(m: dict, names: list, min_faces: int) -> tuple[float, str]:
    """The figure the keep rule compares, from ``m`` (``classification_metrics`` of the faces
    that were scored): balanced accuracy over the classes with at least ``min_faces`` faces (a
    class with one face would swing it by its single answer), or plain accuracy where fewer than
    two classes have that many."""
    counts = np.asarray(m["confusion"]).sum(1)
    judged = [c for c, n in zip(names, counts) if n >= min_faces]
    if len(judged) >= 2:
        return float(np.mean([m["per_class_recall"][c] for c in judged])), f"balanced accuracy over {', '.join(judged)}"
    return float(m["accuracy"]), f"accuracy (fewer than 2 classes with {min_faces}+ selection faces)"


def _keep_or_restricted_flat(exp, out: Path, r: int, names, init_head: dict, idx, y, eval_sets: dict, log) -> dict:
    """Keep the trained expert only if it beats the flat model restricted to its classes on the
    selection faces of its true neighborhood (``keep_score``: classes with too few faces there do
    not decide); else publish the restricted flat model as the expert. Both figures go into the
    expert's metrics.json; returns them."""
    trained, meta = load_network(out, exp.run)
    mean, std = meta["mean"], meta["std"]
    flat_r, _ = load_network(out, exp.run)
    flat_r.head.load_state_dict(init_head)
    own_from = first_own_block(meta)
    if own_from < len(flat_r.trunk):  # the expert's own blocks back to the flat model's
        flat_trunk = {
            k[len("trunk.") :]: v for k, v in load_weights(exp.run / "flat").items() if k.startswith("trunk.")
        }
        flat_r.trunk.load_state_dict(flat_trunk)
    if len(idx) == 0:
        fig = {"n": 0, "expert": None, "restricted_flat": None, "kept": "expert"}
        log(f"expert {r}: no selection faces in its true neighborhood to compare with the restricted flat model; kept")
    else:
        e, f = (evaluate(n, CLASSIFY, exp.images, idx, y, names, mean, std, exp.rt) for n in (trained, flat_r))
        min_faces = exp.cfg.experts.keep_min_faces
        (se, rule), (sf, _) = (keep_score(m, names, min_faces) for m in (e, f))
        kept = "expert" if se > sf else "restricted flat"
        fig = {
            "n": int(len(idx)),
            "rule": rule,
            "expert": se,
            "restricted_flat": sf,
            "expert_balanced_accuracy": e["balanced_accuracy"],
            "restricted_flat_balanced_accuracy": f["balanced_accuracy"],
            "kept": kept,
        }
        log(
            f"expert {r}: in its true neighborhood (selection split, {len(idx)} faces), {rule}: {se:.4f}, "
            f"the flat model restricted to its classes {sf:.4f} -> "
            + ("the trained expert" if kept == "expert" else "the restricted flat model replaces it")
        )
    metrics = json.loads((out / "metrics.json").read_text())
    if fig["kept"] == "restricted flat":
        for split, (sidx, sy) in eval_sets.items():
            if len(sidx):
                metrics[split] = evaluate(flat_r, CLASSIFY, exp.images, sidx, sy, names, mean, std, exp.rt)
    metrics["true_neighborhood_val"] = fig  # the keep rule's figures (see "rule")
    writer = StageWriter(out)
    published = {k: v for k, v in meta.items() if k not in ("files", "versions", "git_commit")} | {"kept": fig["kept"]}
    if fig["kept"] == "restricted flat":
        # the restricted flat model is a head on the flat trunk: its blocks are the flat model's, not copies
        writer.save_weights({f"head.{k}": v for k, v in init_head.items()})
        published |= {
            "trainable": "head",
            "trained_trainable": meta["trainable"],
            "n_own_params": sum(p.numel() for p in flat_r.head.parameters()),
        }
    else:
        writer.copy(out / "weights.pt")
    writer.copy(out / "config.json")
    writer.copy(out / "history.csv")
    writer.json("metrics.json", metrics)
    writer.publish(published)
    return fig


def _expert_job(cfg_dict: dict, run: str, regions: list[dict], device: str, resume: bool) -> list[dict]:
    """One GPU's share of the experts, in its own process."""
    from ensemble.config import config_from_dict
    from ensemble.experiment import open_experiment

    cfg_dict["train"]["device"] = device
    exp = open_experiment(config_from_dict(cfg_dict), Path(run), progress=False, save=False)
    return [_train_expert(exp, reg, resume, print) for reg in regions]


@records_config
def fit_experts(exp, resume: bool = False, log=print) -> dict:
    """Neighborhoods, then one expert per neighborhood; write ``RUN/experts``."""
    if not (exp.run / "stage1" / "meta.json").is_file() and exp.cfg.experts.train_on != "true_va":
        raise UserError(f"experts.train_on = {exp.cfg.experts.train_on!r} needs stage 1: run ensemble fit-stage1 first")
    ecfg = exp.cfg.for_stage("experts")
    _check_own_blocks(exp, ecfg)  # before the flat model is trained for it, if it must be
    ensure_flat_trunk(exp, ecfg, "experts", resume, log)
    final, staging = exp.run / "experts", _staging(exp.run)
    if exp.rt.is_main:
        if not resume:
            shutil.rmtree(staging, ignore_errors=True)
        elif not staging.exists() and final.is_dir():
            shutil.copytree(final, staging)  # finished experts are kept where their settings still match
        staging.mkdir(parents=True, exist_ok=True)
    if exp.rt.world > 1:
        torch.distributed.barrier()
    nbh, nbh_folder = fit_neighborhoods(exp, log, staging)
    plan = assignments(exp, nbh, log, resume)
    nbh_sha = neighborhoods_sha(nbh_folder)
    for region in plan["regions"]:
        region["neighborhoods_sha256"] = nbh_sha
    n_gpu = torch.cuda.device_count() if exp.rt.device.type == "cuda" and exp.rt.world == 1 else 0
    if n_gpu > 1:
        log(f"experts: training in parallel on {n_gpu} GPUs")
        shares = [plan["regions"][i::n_gpu] for i in range(n_gpu)]
        with ProcessPoolExecutor(n_gpu, mp_context=get_context("spawn")) as pool:
            jobs = [
                pool.submit(_expert_job, exp.cfg.to_dict(), str(exp.run), s, f"cuda:{i}", resume)
                for i, s in enumerate(shares)
                if s
            ]
            results = sorted((x for j in jobs for x in j.result()), key=lambda d: d["region"])
    else:
        results = [_train_expert(exp, reg, resume, log) for reg in plan["regions"]]
    index = {"train_on": plan["train_on"], "k": int(nbh.k_), "experts": results, "neighborhoods_sha256": nbh_sha}
    if exp.rt.is_main:
        _log_own_params(exp.run, ecfg, results, log)
        for stale in list(staging.iterdir()):  # experts of an earlier, larger k; leftovers of interruptions
            if stale.is_dir() and not (stale.name.isdigit() and int(stale.name) < nbh.k_) and stale != nbh_folder:
                shutil.rmtree(stale)
        if nbh_folder != exp.run / "neighborhoods":  # a new fit: it goes in with its experts
            swap_into_place(nbh_folder, exp.run / "neighborhoods")
            shutil.rmtree(exp.run / "router", ignore_errors=True)  # calibrated for the old ones
        write_index(staging, index)
        swap_into_place(staging, final)
    return index


def _log_own_params(run: Path, cfg, results: list[dict], log) -> None:
    """One line: what the experts add to the flat model they build on (their blocks and heads)."""
    own = [(e["region"], e.get("trainable"), e.get("n_own_params")) for e in results if not e["constant"]]
    if not own or cfg.model.trunk_from != "flat" or any(n is None for _, _, n in own):
        return
    total = sum(n for _, _, n in own)
    flat = read_meta(run / "flat", "flat")["n_params"]
    log(
        f"experts: {total:,} parameters of their own over the flat model's {flat:,} ({100 * total / flat:.0f}%): "
        + ", ".join(f"{r} {t} {n:,}" for r, t, n in own)
    )


def _check_own_blocks(exp, cfg) -> None:
    """``experts.model.trainable`` names blocks the borrowed trunk has (before anything trains)."""
    mc = cfg.model
    if not (mc.trunk_from and mc.trainable.startswith("block")):
        return
    src = exp.run / mc.trunk_from
    if (src / "meta.json").is_file():
        meta = read_meta(src, f"{mc.trunk_from} (model.trunk_from)")
        backbone, n = meta["backbone"], int(meta["n_blocks"])
    else:  # not trained yet: the trunk the config will give it
        from .backbones import build_trunk

        backbone = exp.cfg.for_stage(mc.trunk_from).model.backbone
        n = len(build_trunk(backbone, "none")[0])
    if int(mc.trainable[5:]) > n:
        raise UserError(
            f"experts.model.trainable = {mc.trainable!r}: the {mc.trunk_from} model's trunk ({backbone}) has "
            f"blocks block1..block{n}; use head, all or one of those"
        )


def _recorded_meta(folder: Path) -> dict:
    """meta.json as written, not re-verified: for folders :func:`load_neighborhoods` verifies."""
    return json.loads((folder / "meta.json").read_text())


def neighborhoods_sha(folder: Path) -> str:
    """Identifies the neighborhoods (``RUN/neighborhoods``) the experts and the router were fitted
    for: the digest of model.npz that its meta.json records (checked whenever they are loaded)."""
    return _recorded_meta(folder)["files"]["model.npz"]


def write_index(folder: Path, index: dict) -> None:
    """``folder/index.json`` and the ``meta.json`` that records its sha256 (checked like every
    artifact file by ``read_index``)."""
    write_json(folder / "index.json", index)
    write_json(
        folder / "meta.json",
        {"stage": "experts", "files": {"index.json": sha256_file(folder / "index.json")}, "versions": versions()},
    )


def read_index(run: Path) -> dict:
    """experts/index.json, checked: one expert per neighborhood, in order."""
    f = run / "experts" / "index.json"
    if not f.is_file():
        raise UserError(f"no experts in {run} (run ensemble fit-experts first)")
    read_meta(run / "experts", "experts")
    try:
        index = json.loads(f.read_text())
        experts, k = index["experts"], int(index["k"])
        if len(experts) != k or any(int(e["region"]) != r for r, e in enumerate(experts)):
            raise ValueError("one expert per neighborhood, in order")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(
            f"{f} is damaged or incomplete ({exc}); rerun ensemble fit-experts to refit the "
            f"neighborhoods and experts together"
        ) from None
    return index
