"""Use trained runs: ``FlatPredictor`` and ``HierarchicalPredictor``.

Both load from a run folder, read their preprocessing from the artifacts (never from CLI
defaults), and take a list of PIL images or file paths (already face crops)::

    from ensemble import HierarchicalPredictor
    hp = HierarchicalPredictor.load("artifacts/demo")
    proba = hp.predict_proba(["face.png"])        # (n, 8), canonical class order
    out = hp.predict(["face.png"])                # + valence, arousal, neighborhood, expert
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .artifacts import flat_identity, read_meta  # noqa: F401  (flat_identity re-exported)
from .classes import CLASSES
from .config import DEFAULT_TEMPERATURE
from .errors import UserError
from .images import ImageError, face_array, uint8_to_input  # noqa: F401  (uint8_to_input re-exported)
from .images import as_image_list as _as_image_list
from .router import MODES, HierarchyNet, RegionPosterior


def _preprocess(images, size: int, mean, std) -> np.ndarray:
    """(n, 3, size, size) float32, exactly what the networks see."""
    arrs = []
    for im in _as_image_list(images):
        try:
            arrs.append(face_array(im, None, size))
        except ImageError as exc:
            raise UserError(f"{im if not hasattr(im, 'size') else 'image'}: {exc}") from None
    return uint8_to_input(np.stack(arrs) if arrs else np.zeros((0, size, size, 3), np.uint8), mean, std)


PRECISIONS = ("fp32", "bf16", "fp16")


def check_device(device) -> str:
    """``auto`` (CUDA, then MPS, then the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked
    against this machine (``runtime.resolve_device``): one line instead of torch's traceback."""
    from .runtime import resolve_device

    return resolve_device(device, "device")


def check_precision(precision: str, device) -> str:
    """Inference precision: fp32 (default), bf16 (autocast; fast where the CPU or GPU has bf16
    units) or fp16 (autocast, CUDA only)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of auto, {', '.join(PRECISIONS)}, int8, got {precision!r}")
    if precision == "fp16" and torch.device(device).type != "cuda":
        raise UserError("precision fp16 needs a CUDA device; on a CPU use bf16 or fp32")
    return precision


class _Base:
    size: int
    mean: tuple
    std: tuple
    device: torch.device
    precision: str = "fp32"  # set with check_precision; the networks run under autocast unless fp32

    def preprocess(self, images) -> np.ndarray:
        return _preprocess(images, self.size, self.mean, self.std)

    def _batches(self, x: np.ndarray, batch_size: int = 64):
        for s in range(0, len(x), batch_size):
            yield torch.from_numpy(x[s : s + batch_size]).to(self.device).contiguous(memory_format=torch.channels_last)

    def _autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)


def _damaged_run_is_one_line(load):
    """A meta.json that passes its checks but lacks a field, or holds one of the wrong kind,
    is a damaged or foreign run: say so in one line instead of a traceback."""
    import functools

    @functools.wraps(load)
    def wrapper(cls, run, *args, **kwargs):
        r = Path(run)
        if r.is_dir() and not any((r / stage / "meta.json").is_file() for stage in ("flat", "stage1")):
            raise UserError(
                f"{run} is not a trained run: it has no flat/ or stage1/ (train one, or pass another --run)"
            )
        try:
            return load(cls, run, *args, **kwargs)
        except (KeyError, TypeError, ValueError, IndexError, json.JSONDecodeError) as exc:
            raise UserError(
                f"{run}: the run's artifacts are damaged or from an incompatible version "
                f"({type(exc).__name__}: {str(exc)[:120]})"
            ) from None

    return wrapper


class FlatPredictor(_Base):
    """The flat 8-class model of a run."""

    def __init__(self, net, meta: dict, device: str = "cpu"):
        self.net, self.meta = net, meta
        self.size, self.mean, self.std = meta["input_size"], tuple(meta["mean"]), tuple(meta["std"])
        self.device = torch.device(device)
        self.net.to(self.device).eval()
        self.classes = meta["classes"]

    @classmethod
    @_damaged_run_is_one_line
    def load(cls, run, device: str = "cpu") -> "FlatPredictor":
        from stages.neural import load_network

        run = Path(run)
        net, meta = load_network(run / "flat", run)
        if meta.get("classes") != list(CLASSES):
            raise UserError(f"{run}/flat does not predict the 8 canonical classes")
        return cls(net, meta, device)

    @torch.no_grad()
    def proba_from_input(self, x: np.ndarray) -> np.ndarray:
        with self._autocast():
            out = [torch.softmax(self.net(b).float(), 1).cpu().numpy() for b in self._batches(x)]
        return np.concatenate(out) if out else np.zeros((0, len(CLASSES)), np.float32)

    def predict_proba(self, images) -> np.ndarray:
        return self.proba_from_input(self.preprocess(images))


class HierarchicalPredictor(_Base):
    """Stage 1 -> router -> experts, loaded from a run; ``router``: hard | soft (default: the run's choice)."""

    #: stage folder -> (meta, state_dict) of every file the hierarchy was read from (its tensors
    #: are the network's own): where each weight came from, for :func:`ensemble.export.write_onnx_stage`
    sources: dict = {}

    def __init__(self, net: HierarchyNet, nbh, meta: dict, router: dict, device: str = "cpu"):
        self.net, self.nbh, self.meta, self.router = net, nbh, meta, router
        self.size, self.mean, self.std = meta["input_size"], tuple(meta["mean"]), tuple(meta["std"])
        self.device = torch.device(device)
        self.net.to(self.device).eval()
        self.expert_classes = [
            [CLASSES[j] for j in getattr(net, f"map{i}").argmax(1).tolist()] for i in range(len(net.expert_heads))
        ]

    @property
    def mode(self) -> str:
        return self.net.mode

    @classmethod
    @_damaged_run_is_one_line
    def load(cls, run, router: str | None = None, device: str = "cpu") -> "HierarchicalPredictor":
        from stages.experts import load_neighborhoods, neighborhoods_sha, read_index
        from stages.neural import first_own_block, load_network

        run = Path(run)
        if not run.is_dir():
            from .paths import bundled_models

            names = ", ".join(p.name for p in bundled_models())
            raise UserError(f"run folder not found: {run}" + (f" (bundled models: {names})" if names else ""))
        sources: dict = {}  # a trunk borrowed by several stages is verified and read once
        stage1, m1 = load_network(run / "stage1", run, sources)
        if not (run / "neighborhoods" / "meta.json").is_file():
            raise UserError(f"{run} has stage 1 but no neighborhoods and experts yet (run ensemble fit-experts)")
        nbh = load_neighborhoods(run / "neighborhoods")
        index = read_index(run)
        if index["k"] != nbh.k_:
            raise UserError(
                f"{run}: experts were trained for {index['k']} neighborhoods, the neighborhoods have {nbh.k_}"
            )
        nbh_sha = neighborhoods_sha(run / "neighborhoods")
        if index.get("neighborhoods_sha256") != nbh_sha:
            raise UserError(
                f"{run}: the experts were trained for other neighborhoods than {run / 'neighborhoods'} "
                f"(refit with ensemble fit-experts)"
            )
        trunks: dict[str, torch.nn.Module] = {}

        def share(net, meta, own_from=None) -> str:
            key = meta["trunk_sha256"][:16]
            if key not in trunks and own_from is not None:  # not its own blocks: the trunk it borrows
                trunks[key] = load_network(run / meta["trunk_from"], run, sources)[0].trunk
            trunks.setdefault(key, net.trunk)
            return key

        s1_key = share(stage1, m1)
        heads, keys, classes, boundaries = [], [], [], []
        for r, info in enumerate(index["experts"]):
            folder = run / "experts" / str(r)
            if info.get("constant"):
                meta = read_meta(folder, f"expert {r}")
                heads.append(None)
                keys.append(s1_key)
                boundaries.append(None)
            else:
                net, meta = load_network(folder, run, sources)
                for key in ("input_size", "mean", "std"):
                    if meta[key] != m1[key]:
                        raise UserError(
                            f"expert {r} and stage 1 disagree on {key} ({meta[key]} vs {m1[key]}); "
                            f"they do not belong to one hierarchy"
                        )
                own_from = first_own_block(meta) if meta.get("trunk_from") else len(net.trunk)
                if own_from < len(net.trunk):  # its own blocks run from the shared trunk's boundary
                    heads.append(torch.nn.Sequential(net.trunk[own_from:], net.head))
                    keys.append(share(net, meta, own_from))
                    boundaries.append(own_from)
                else:
                    heads.append(net.head)
                    keys.append(share(net, meta))
                    boundaries.append(None)
            if meta["classes"] != info["classes"]:
                raise UserError(
                    f"expert {r}: classes {meta['classes']} differ from experts/index.json {info['classes']}"
                )
            classes.append([CLASSES.index(c) for c in meta["classes"]])
        rinfo = None
        if (run / "router" / "meta.json").is_file():
            read_meta(run / "router", "router")  # verifies router.json before it is read
            rinfo = json.loads((run / "router" / "router.json").read_text())
            if rinfo.get("neighborhoods_sha256") != nbh_sha:
                if router is None:
                    raise UserError(
                        f"{run / 'router'} was calibrated for other neighborhoods "
                        f"(rerun ensemble fit-experts, which calibrates it)"
                    )
                rinfo = None
        if rinfo is None:
            if router is None:
                raise UserError(
                    f"{run} has no router (run ensemble fit-experts, which calibrates it, or pass a router mode)"
                )
            rinfo = {"mode": router, "temperature": DEFAULT_TEMPERATURE}  # calibration itself, or an explicit mode
        if rinfo.get("stage1_model") is not None and rinfo["stage1_model"] != flat_identity(m1):
            raise UserError(
                f"{run / 'router'} was calibrated with another stage 1 than {run / 'stage1'} "
                f"(rerun ensemble fit-experts, which refits the experts on it and calibrates the router)"
            )
        mode = router or rinfo["mode"]
        if mode not in ("hard", "soft"):
            raise UserError(f"router must be hard or soft, got {mode!r}")
        post = RegionPosterior(nbh, rinfo.get("temperature", DEFAULT_TEMPERATURE))
        flat_head, flat_key = None, None
        if rinfo.get("alpha") or rinfo.get("inputs") == "va+flat":  # the flat model is used: the one it was chosen with
            flat, mf = load_network(run / "flat", run, sources)
            if flat_identity(mf) != rinfo.get("flat_model") or mf["input_size"] != m1["input_size"]:
                raise UserError(
                    f"{run / 'flat'} is not the flat model the router was calibrated with (rerun ensemble fit-experts)"
                )
            flat_head, flat_key = flat.head, share(flat, mf)
        net = HierarchyNet(
            trunks,
            stage1.head,
            s1_key,
            heads,
            keys,
            classes,
            post,
            mode,
            flat_head=flat_head,
            flat_trunk=flat_key,
            alpha=rinfo.get("alpha", 0.0),
            tau=rinfo.get("tau", 0.0),
            log_prior=rinfo.get("log_prior"),
            inputs=rinfo.get("inputs", "va"),
            expert_from=boundaries,
        )
        hp = cls(net, nbh, m1, rinfo, device)
        hp.sources = sources
        return hp

    @torch.no_grad()
    def parts_from_input(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """V/A (n, 2) and expert probabilities (k, n, 8) for preprocessed faces."""
        vas, eps = [], []
        with self._autocast():
            for b in self._batches(x):
                va, ep = self.net.parts(b)
                vas.append(va.float().cpu().numpy())
                eps.append(ep.float().cpu().numpy())
        if not vas:
            rows = len(self.net.expert_heads) + (self.net.flat_head is not None)
            return np.zeros((0, 2), np.float32), np.zeros((rows, 0, len(CLASSES)), np.float32)
        return np.concatenate(vas), np.concatenate(eps, axis=1)

    @torch.no_grad()
    def route(
        self,
        va: np.ndarray,
        expert_probs: np.ndarray,
        mode: str | None = None,
        true_va: np.ndarray | None = None,
        final: bool = True,
        p_flat: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Final (n, 8) probabilities and region weights (n, k) under a router mode; ``expert_probs``
        as :meth:`parts_from_input` gives them. ``final=False``: the hierarchy alone, without the
        flat model's share or the logit adjustment the run chose. ``p_flat``: the flat model's (n, 8)
        for routing on ``inputs = "va+flat"`` when ``expert_probs`` does not carry them."""
        mode = mode or self.mode
        if mode not in MODES:
            raise UserError(f"router must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "oracle":
            if true_va is None:
                raise UserError("oracle routing needs the true valence/arousal")
            w = torch.nn.functional.one_hot(
                torch.as_tensor(self.nbh.predict(true_va), dtype=torch.long), self.nbh.k_
            ).float()
        else:
            _, pf = self.net.split(torch.as_tensor(expert_probs, dtype=torch.float32, device=self.device))
            if pf is None and p_flat is not None:
                pf = torch.as_tensor(p_flat, dtype=torch.float32, device=self.device)
            w = self.net.weights(torch.as_tensor(va, dtype=torch.float32, device=self.device), mode, pf).cpu()
        ep, pf = self.net.split(torch.as_tensor(expert_probs, dtype=torch.float32))
        p = HierarchyNet.mix(w, ep)
        if final:
            p = self.net.finish(p, pf)
        return p.numpy(), w.numpy()

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Final probabilities (n, 8), V/A (n, 2) and region weights (n, k) of preprocessed faces
        under the run's router: what :class:`ensemble.onnx_runtime.OnnxHierarchy` computes too."""
        va, ep = self.parts_from_input(x)
        proba, w = self.route(va, ep)
        return proba, va, w

    def predict(self, images, router: str | None = None) -> dict:
        """Per image: probabilities (n, 8), label, valence, arousal, neighborhood (whose expert weighed most;
        one expert per neighborhood, its classes in ``expert_classes``) and the region weights (n, k)."""
        va, ep = self.parts_from_input(self.preprocess(images))
        proba, w = self.route(va, ep, router)
        region = w.argmax(1) if len(w) else np.zeros(0, int)
        return {
            "proba": proba,
            "label": [CLASSES[i] for i in proba.argmax(1)],
            "valence": va[:, 0],
            "arousal": va[:, 1],
            "neighborhood": region,
            "region_weights": w,
        }

    def predict_proba(self, images, router: str | None = None) -> np.ndarray:
        return self.predict(images, router)["proba"]
