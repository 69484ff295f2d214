"""Video: decoding and frame selection, tracking, smoothing, summary, annotated output, bad input.

Clips are generated here with cv2.VideoWriter: frames that carry their own index as a row of
black/white blocks (to check which frames were decoded), coloured squares read by a tiny
analyser (to test tracking through decoding without a model), and scikit-image's astronaut
face for the end-to-end runs through ``ensemble predict`` with a tiny trained run.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest

cv2 = pytest.importorskip("cv2")

from conftest import run_cli, train_tiny_hierarchy  # noqa: E402

from ensemble.classes import CLASSES  # noqa: E402
from ensemble.errors import UserError  # noqa: E402
from ensemble.tracking import IoUTracker, iou, smooth  # noqa: E402
from ensemble.video import (  # noqa: E402
    COLUMNS,
    PROBA_COLUMNS,
    DecodeEnd,
    FaceResult,
    FrameSelection,
    add_smoothing,
    analyse_video,
    iter_frames,
    open_video,
    predict_video,
)
from ensemble.video_report import annotate_video, draw_faces, plot_tracks, summary_line, track_summary  # noqa: E402

CODECS = {".avi": "MJPG", ".mp4": "mp4v", ".mkv": "mp4v"}
BITS, BLOCK = 8, 16


def write_clip(path, frames, fps: float = 10.0) -> "Path":  # noqa: F821
    """Write RGB frames with OpenCV; the codec follows the suffix."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*CODECS[path.suffix]), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def code_frame(i: int) -> np.ndarray:
    """A (32, 128) frame whose 8 blocks spell ``i`` in binary (white = 1)."""
    f = np.zeros((32, BITS * BLOCK, 3), np.uint8)
    for b in range(BITS):
        if i >> b & 1:
            f[8 : 8 + BLOCK, b * BLOCK : (b + 1) * BLOCK] = 255
    return f


def read_code(frame: np.ndarray) -> int:
    return sum(1 << b for b in range(BITS) if frame[8 : 8 + BLOCK, b * BLOCK : (b + 1) * BLOCK].mean() > 128)


def decoded(path, selection=None) -> tuple[list[int], list[int], DecodeEnd]:
    cap, info = open_video(path)
    items = list(iter_frames(cap, info, selection or FrameSelection()))
    cap.release()
    frames = items[:-1]
    assert all(t == pytest.approx(i / info.fps) for i, t, _ in frames)  # constant frame rate: index / fps
    return [i for i, _, _ in frames], [read_code(f) for _, _, f in frames], items[-1]


@pytest.fixture(scope="module")
def coded_clips(tmp_path_factory):
    """40 frames at 10 fps carrying their index, in three containers."""
    root = tmp_path_factory.mktemp("coded")
    return {ext: write_clip(root / f"coded{ext}", [code_frame(i) for i in range(40)]) for ext in CODECS}


# --------------------------------------------------------------------------- decoding and frame selection


@pytest.mark.parametrize("ext", list(CODECS))
def test_every_frame_decodes_in_order(coded_clips, ext):
    idx, codes, end = decoded(coded_clips[ext])
    assert idx == list(range(40)) and codes == idx
    assert end.n_decoded == 40 and end.truncated is None


@pytest.mark.parametrize("ext", list(CODECS))
def test_start_end_seek_to_the_right_frames(coded_clips, ext):
    # 10 fps: 1.0 s is frame 10; frames before 2.5 s end at frame 24
    idx, codes, _ = decoded(coded_clips[ext], FrameSelection(start=1.0, end=2.5))
    assert idx == list(range(10, 25)) and codes == idx
    idx, codes, _ = decoded(coded_clips[ext], FrameSelection(every=4, start=1.55))
    assert idx == [16, 20, 24, 28, 32, 36] and codes == idx


def test_every_and_fps_select_by_hand(coded_clips):
    idx, codes, end = decoded(coded_clips[".avi"], FrameSelection(every=5))
    assert idx == [0, 5, 10, 15, 20, 25, 30, 35] and codes == idx
    assert end.n_decoded == 40  # skipped frames are still read past
    # 4 of 10 frames a second: the first frame of each 0.25 s interval (k * 0.4 crosses an integer)
    idx, codes, _ = decoded(coded_clips[".avi"], FrameSelection(fps=4, end=2.0))
    assert idx == [0, 3, 5, 8, 10, 13, 15, 18] and codes == idx
    idx, _, _ = decoded(coded_clips[".avi"], FrameSelection(fps=25))  # above the source rate: every frame
    assert idx == list(range(40))


@pytest.mark.parametrize(
    "kw",
    [
        dict(every=0),
        dict(every=2, fps=3.0),
        dict(fps=0.0),
        dict(start=-1.0),
        dict(start=2.0, end=1.0),
        dict(start=math.inf),
        dict(end=math.nan),
    ],
)
def test_bad_selection_is_a_user_error(kw):
    with pytest.raises(UserError):
        FrameSelection(**kw)


def test_start_after_the_end_is_named(coded_clips):
    with pytest.raises(Exception, match="after the end"):
        decoded(coded_clips[".avi"], FrameSelection(start=10.0))


# --------------------------------------------------------------------------- tracking and smoothing (by hand)


def test_iou_by_hand():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[5, 0, 10, 10], [20, 20, 5, 5], [0, 0, 10, 10]])
    np.testing.assert_allclose(iou(a, b), [[50 / 150, 0.0, 1.0]])


def _crossing(n=21, speed=10.0, gap=(), size=60):
    """Face A moves right from x=0 at y=0, face B left from x=200 at y=15: at frame 10 they
    overlap with IoU 0.6 (each overlaps the other more than half). Frames in ``gap`` lose
    face A (hidden behind B). Returns per frame [(name, box)]."""
    frames = []
    for k in range(n):
        faces = [("B", (200 - speed * k, 15, size, size))]
        if k not in gap:
            faces.insert(0, ("A", (speed * k, 0, size, size)))
        frames.append(faces)
    return frames


@pytest.mark.parametrize("gap", [(), (10,), (9, 10, 11)])
def test_tracker_keeps_ids_through_a_crossing_and_missed_frames(gap):
    tr = IoUTracker(max_gap_s=0.5)
    seen: dict[str, set] = {"A": set(), "B": set()}
    for k, faces in enumerate(_crossing(gap=gap)):
        for (name, _), tid in zip(faces, tr.update(k / 10, [b for _, b in faces])):
            seen[name].add(tid)
    assert seen == {"A": {1}, "B": {2}}


def test_track_survives_a_short_gap_and_not_a_long_one():
    tr = IoUTracker(max_gap_s=0.25)
    assert tr.update(0.0, [(0, 0, 50, 50)]) == [1]
    assert tr.update(0.2, [(2, 0, 50, 50)]) == [1]  # 0.2 s gap: same track
    assert tr.update(0.3, []) == []
    assert tr.update(0.6, [(4, 0, 50, 50)]) == [2]  # 0.4 s unseen: a new track


def test_landmarks_decide_between_equal_boxes():
    lm_a = np.array([[10, 10], [30, 10], [20, 20], [12, 30], [28, 30]], float)
    lm_b = lm_a + np.array([0, 15])  # same box, the face lower in it
    tr = IoUTracker()
    assert tr.update(0.0, [(0, 0, 40, 40), (2, 0, 40, 40)], [lm_a, lm_b]) == [1, 2]
    # both boxes now sit at the same place: the landmarks tell which face is which
    assert tr.update(0.1, [(1, 0, 40, 40), (1, 0, 40, 40)], [lm_b, lm_a]) == [2, 1]


def test_centred_smoothing_by_hand():
    t = [0.0, 1.0, 2.0, 3.0]
    x = [0.0, 0.0, 3.0, 0.0]
    # window 2 s: each point averages its neighbours within 1 s
    np.testing.assert_allclose(smooth(t, x, 2.0, "centred"), [0.0, 1.0, 1.0, 1.5])
    np.testing.assert_allclose(smooth(t, x, 0.5, "centred"), x)  # nothing else within 0.25 s


def test_ema_smoothing_by_hand():
    t = [0.0, 1.0, 2.0, 4.0]
    x = [0.0, 0.0, 3.0, 0.0]
    a1 = 1 - math.exp(-1)
    a2 = 1 - math.exp(-2)  # a two-second step moves further
    y2 = 3 * a1
    np.testing.assert_allclose(smooth(t, x, 1.0, "ema"), [0.0, 0.0, y2, y2 - a2 * y2])
    two = smooth(t, np.stack([x, x], 1), 1.0, "ema")
    assert two.shape == (4, 2) and np.allclose(two[:, 0], two[:, 1])


def _table(rows):
    out = []
    for f, frame, t, track, cls, v, a in rows:
        p = np.zeros(8)
        p[CLASSES.index(cls)] = 1.0
        out.append((f, frame, t, track, 0, 0, 10, 10, cls, *p, v, a, 0))
    return pd.DataFrame(out, columns=COLUMNS)


def test_add_smoothing_keeps_tracks_apart():
    table = _table(
        [
            ("c", 0, 0.0, 1, "happy", 0.0, 0.0),
            ("c", 0, 0.0, 2, "sad", 1.0, 1.0),
            ("c", 1, 1.0, 1, "happy", 0.0, 0.0),
            ("c", 1, 1.0, 2, "sad", 1.0, 1.0),
            ("c", 2, 2.0, 1, "sad", 0.6, 0.3),
            ("c", 2, 2.0, 2, "sad", 1.0, 1.0),
        ]
    )
    out = add_smoothing(table, 2.0, "centred")
    t1 = out[out.track == 1]
    np.testing.assert_allclose(t1["valence_smooth"], [0.0, 0.2, 0.3])
    np.testing.assert_allclose(t1["p_happy_smooth"], [1.0, 2 / 3, 0.5])
    assert list(t1["emotion_smooth"]) == ["happy", "happy", "happy"]  # ties go to the first class: happy < sad
    assert (out[out.track == 2]["valence_smooth"] == 1.0).all()  # track 1 never leaks into track 2
    assert list(out["emotion"]) == list(table["emotion"])  # raw values beside the smoothed
    np.testing.assert_allclose(out[[f"{c}_smooth" for c in PROBA_COLUMNS]].sum(axis=1), 1.0)


def test_track_summary_by_hand(tmp_path):
    table = _table(
        [("c", k, k / 10, 1, "happy" if k < 3 else "neutral", 0.5, -0.1) for k in range(4)]
        + [("c", 1, 0.1, 2, "sad", -0.4, 0.2)]
    )
    s = track_summary(table)
    assert list(s.track) == [1, 2]
    r = s.iloc[0]
    assert (r.share_happy, r.share_neutral, r.n_frames, r.emotion) == (0.75, 0.25, 4, "happy")
    assert r.first_s == 0.0 and r.last_s == pytest.approx(0.3)
    assert summary_line(r) == "c track 1: 0.00-0.30 s, 4 frames: happy 75%, neutral 25%; mean V +0.50 A -0.10"
    paths = plot_tracks(add_smoothing(table, 0.2), tmp_path, "c")
    assert [p.name for p in paths] == ["c.track1.png", "c.track2.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


# --------------------------------------------------------------------------- through decoding, without a model

RED, BLUE = (230, 20, 20), (20, 20, 230)


def square_clip(path, n=30, gap=(), size=24, fps=10.0):
    """Red moves right, blue moves left on a grey 160x64 frame; they cross at frame n // 2.
    In ``gap`` frames the red square is hidden. Red is drawn a little higher than blue."""
    frames = []
    for k in range(n):
        f = np.full((64, 160, 3), 90, np.uint8)
        xb = int(round(136 - 112 * k / (n - 1)))
        f[20 : 20 + size, xb : xb + size] = BLUE
        if k not in gap:
            xr = int(round(112 * k / (n - 1)))
            f[14 : 14 + size, xr : xr + size] = RED
        frames.append(f)
    return write_clip(path, frames, fps)


def colour_analyser(frames):
    """Finds the red and the blue square (their bounding boxes); red is 'happy', blue 'sad'."""
    out = []
    for f in frames:
        faces = []
        f = f.astype(int)
        for colour, cls, va in ((RED, "happy", (0.8, 0.3)), (BLUE, "sad", (-0.6, -0.2))):
            mask = np.abs(f - np.array(colour)).sum(2) < 90
            if mask.sum() < 20:
                continue
            ys, xs = np.nonzero(mask)
            p = np.full(8, 0.02)
            p[CLASSES.index(cls)] = 0.86
            faces.append(
                FaceResult((int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)), p, *va, 0)
            )
        out.append(faces)
    return out


@pytest.mark.parametrize("gap", [(), (15,)])
def test_crossing_squares_keep_their_ids_through_decoding(tmp_path, gap):
    clip = square_clip(tmp_path / "cross.avi", gap=gap)
    res = analyse_video(clip, colour_analyser, batch_size=4, progress=False)
    t = res.table
    assert res.n_analysed == res.n_decoded == 30
    assert set(t[t.emotion == "happy"].track) == {1} and set(t[t.emotion == "sad"].track) == {2}
    assert len(t) == 60 - len(gap)
    # boxes move the way the squares do
    red = t[t.track == 1].sort_values("frame")
    assert red.box_x.is_monotonic_increasing and red.box_x.iloc[-1] > 100


def test_predict_video_api_with_every_and_smoothing(tmp_path):
    clip = square_clip(tmp_path / "cross.mp4")
    t = predict_video(clip, colour_analyser, every=3, smooth=1.0, progress=False)
    assert sorted(t.frame.unique()) == list(range(0, 30, 3))
    np.testing.assert_allclose(t.time_s.unique(), np.arange(0, 30, 3) / 10)
    assert {"emotion_smooth", "valence_smooth", "p_happy_smooth"} <= set(t.columns)
    assert t.attrs["n_decoded"] == 30 and t.attrs["n_analysed"] == 10 and t.attrs["truncated"] is None


def test_annotated_video_has_the_source_frames_and_size(tmp_path):
    clip = square_clip(tmp_path / "cross.avi")
    table = analyse_video(clip, colour_analyser, FrameSelection(every=4), progress=False).table
    out = tmp_path / "out" / "annotated.avi"  # MJPG keeps thin lines' colours
    n = annotate_video(clip, table, out, FrameSelection(every=4))
    cap = cv2.VideoCapture(str(out))
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (160, 64)
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(10.0)
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    assert n == len(frames) == 30
    assert not list(tmp_path.glob("out/.*part*"))  # the partial file was renamed into place
    # frame 5 is not analysed: it carries frame 4's faces. Compare it with the source frame
    # with frame 4's faces drawn by hand, and with the plain source frame.
    src = cv2.VideoCapture(str(clip))
    src.set(cv2.CAP_PROP_POS_FRAMES, 5)
    plain = src.read()[1]
    expected = draw_faces(plain.copy(), table[table.frame == 4].to_dict("records"))
    drawn = (expected != plain).any(2)  # the pixels the drawing changes
    to_expected = np.abs(frames[5][drawn].astype(int) - expected[drawn].astype(int)).mean()
    to_plain = np.abs(frames[5][drawn].astype(int) - plain[drawn].astype(int)).mean()
    assert to_expected < to_plain / 3, (to_expected, to_plain)
    # frame 8 is analysed: its own faces, not frame 4's
    own = draw_faces(frames[8].copy() * 0 + plain, table[table.frame == 8].to_dict("records"))
    assert not np.array_equal(own, expected)


# --------------------------------------------------------------------------- end to end with a tiny trained run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny hierarchy (flat, stage 1, neighborhoods, experts, router) on 32-px synthetic faces."""
    root = tmp_path_factory.mktemp("video-run")
    train_tiny_hierarchy(root)
    return root / "run"


def astronaut_face(side=160) -> np.ndarray:
    skimage = pytest.importorskip("skimage")
    face = skimage.data.astronaut()[0:256, 100:356]  # head and shoulders: OpenCV's Haar cascade finds it
    return cv2.resize(face, (side, side), interpolation=cv2.INTER_AREA)


def astronaut_clip(path, n=12, fps=6.0, width=520, height=220, faces=1):
    """The astronaut's face moving right 6 px a frame (and a second one moving left)."""
    face = astronaut_face()
    frames = []
    for k in range(n):
        f = np.full((height, width, 3), 120, np.uint8)
        x = 10 + 6 * k
        f[30:190, x : x + 160] = face
        if faces == 2:
            f[30:190, width - 170 - 6 * k : width - 10 - 6 * k] = face
        frames.append(f)
    return write_clip(path, frames, fps)


_cli = run_cli  # (exit code, stdout, stderr) of ensemble ARGV, in-process


def test_predict_video_cli_end_to_end(tiny_run, tmp_path, capsys):
    clip = astronaut_clip(tmp_path / "talk.mp4")
    csv = tmp_path / "table.csv"
    code, out, err = _cli(
        [
            "predict",
            str(clip),
            "--run",
            str(tiny_run),
            "--csv",
            str(csv),
            "--smooth",
            "1",
            "--summary",
            str(tmp_path / "summary"),
            "--annotate",
            str(tmp_path / "talk.annotated.mp4"),
        ],
        capsys,
    )
    assert code == 0, err
    table = pd.read_csv(csv)
    assert list(table.columns[:9]) == [
        "file",
        "frame",
        "time_s",
        "track",
        "box_x",
        "box_y",
        "box_w",
        "box_h",
        "emotion",
    ]
    assert list(table.frame) == list(range(12)) and set(table.track) == {1}  # one face, one track, every frame
    np.testing.assert_allclose(table[PROBA_COLUMNS].sum(axis=1), 1.0, atol=1e-3)
    assert table.valence.between(-1.5, 1.5).all() and "valence_smooth" in table
    assert "talk.mp4: 12 frames (520x220, 6 fps), 12 analysed" in out
    assert f"{clip} track 1: 0.00-1.83 s, 12 frames:" in out
    assert (tmp_path / "summary" / "talk.track1.png").is_file()
    assert len(pd.read_csv(tmp_path / "summary" / "summary.csv")) == 1
    cap = cv2.VideoCapture(str(tmp_path / "talk.annotated.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 12 and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 520


def test_predict_video_json_and_two_faces(tiny_run, tmp_path, capsys):
    clip = astronaut_clip(tmp_path / "two.avi", faces=2, n=6)
    code, out, err = _cli(["predict", str(clip), "--run", str(tiny_run), "--json", "--every", "2"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["frame"] for r in rows] == [0, 0, 2, 2, 4, 4]
    assert {r["track"] for r in rows} == {1, 2}
    assert set(rows[0]) >= {
        "file",
        "frame",
        "time_s",
        "track",
        "box",
        "emotion",
        "probabilities",
        "valence",
        "arousal",
        "neighborhood",
    }
    assert "track 2:" in err  # the summary goes to stderr beside JSON rows


def test_bad_videos_are_named_and_the_rest_still_done(tiny_run, tmp_path, capsys):
    good = astronaut_clip(tmp_path / "good.avi", n=4)
    text = tmp_path / "text.mp4"
    text.write_text("not a video at all\n")
    empty = tmp_path / "empty.mkv"
    empty.write_bytes(b"")
    png = tmp_path / "photo.mov"
    png.write_bytes(cv2.imencode(".png", astronaut_face())[1].tobytes())
    long_clip = astronaut_clip(tmp_path / "long.avi", n=30)
    cut = tmp_path / "cut.avi"
    data = long_clip.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    blank = write_clip(tmp_path / "blank.avi", [np.full((64, 96, 3), 128, np.uint8)] * 5)
    missing = tmp_path / "missing.webm"
    code, out, err = _cli(
        [
            "predict",
            str(text),
            str(empty),
            str(png),
            str(cut),
            str(blank),
            str(missing),
            str(good),
            "--run",
            str(tiny_run),
        ],
        capsys,
    )
    assert code == 1
    lines = err.splitlines()
    assert any(f"{text}: not a readable video" in x for x in lines)
    assert any(f"{empty}: empty file" in x for x in lines)
    assert any(f"{png}: this is a PNG image, not a video" in x for x in lines)
    assert any(f"{cut}: truncated or damaged: decoding stopped at frame" in x for x in lines)
    assert any(f"{missing}: no such file" in x for x in lines)
    assert "5 of 7 video(s) could not be (fully) read" in err
    assert "Traceback" not in err
    assert f"{blank}: 5 frames" in out and "no face found" in out
    assert f"{good} track 1:" in out  # the good one is still done, after the bad ones
    assert f"{cut} track 1:" in out  # the frames before the cut are reported


def test_video_options_without_a_video(tmp_path, capsys):
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), astronaut_face())
    code, out, err = _cli(["predict", str(img), "--every", "2", "--run", str(tmp_path)], capsys)
    assert code == 2 and "--every applies to videos" in err
    for args, name in ((["--fps", "2"], "--fps applies"), (["--summary", str(tmp_path / "s")], "--summary applies")):
        code, out, err = _cli(["predict", str(img), *args, "--run", str(tmp_path)], capsys)
        assert code == 2 and name in err, err  # the option as typed, not its parameter's name


def test_one_annotated_file_for_several_videos_is_refused(tiny_run, tmp_path, capsys):
    a = astronaut_clip(tmp_path / "a.avi", n=2)
    b = astronaut_clip(tmp_path / "b.avi", n=2)
    code, _, err = _cli(
        ["predict", str(a), str(b), "--run", str(tiny_run), "--annotate", str(tmp_path / "x.mp4")], capsys
    )
    assert code == 2 and "pass a folder instead" in err
    code, out, err = _cli(
        ["predict", str(tmp_path), "--run", str(tiny_run), "--annotate", str(tmp_path / "ann")], capsys
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "ann").iterdir()) == ["a.annotated.mp4", "b.annotated.mp4"]


def crossing_clip(path, n=24, fps=8.0, width=560, height=260):
    """Two astronauts cross paths: A (in front, lower) moves right, B (mirrored, behind, higher)
    moves left; for a few frames in the middle A hides B's face from the detector."""
    face = astronaut_face()
    mirror = face[:, ::-1].copy()
    frames = []
    for k in range(n):
        f = np.full((height, width, 3), 120, np.uint8)
        xa = int(round(10 + (width - 180) * k / (n - 1)))
        xb = int(round(width - 170 - (width - 180) * k / (n - 1)))
        f[10:170, xb : xb + 160] = mirror
        f[90:250, xa : xa + 160] = face
        frames.append(f)
    return write_clip(path, frames, fps)


@pytest.mark.parametrize("detector", ["mtcnn", "haar"])
def test_two_astronauts_cross_without_swapping_ids(tiny_run, tmp_path, capsys, detector):
    clip = crossing_clip(tmp_path / "cross.mp4")
    csv = tmp_path / "cross.csv"
    code, out, err = _cli(
        ["predict", str(clip), "--run", str(tiny_run), "--csv", str(csv), "--detector", detector], capsys
    )
    assert code == 0, err
    t = pd.read_csv(csv)
    per_frame = t.groupby("frame").size()
    assert per_frame.loc[0] == 2 and per_frame.loc[23] == 2
    if detector == "haar":  # Haar loses B behind A: a real occlusion, not just a crossing
        assert (per_frame == 1).any()
    else:  # MTCNN (landmarks) still finds B's half-hidden face
        assert (per_frame == 2).all()
    a, b = t[t.box_y > 80], t[t.box_y <= 80]  # A's face is lower in the frame than B's
    assert set(a.track) == {1} and set(b.track) == {2}
    assert a.sort_values("frame").box_x.is_monotonic_increasing
    assert b.sort_values("frame").box_x.is_monotonic_decreasing
    assert "2 track(s)" in out


def test_fps_option_through_the_cli(tiny_run, tmp_path, capsys):
    clip = astronaut_clip(tmp_path / "talk.mp4")  # 12 frames at 6 fps
    code, out, err = _cli(
        ["predict", str(clip), "--run", str(tiny_run), "--json", "--fps", "2", "--start", "0.5"], capsys
    )
    assert code == 0, err
    # from frame 3 (0.5 s), the first frame of each half second: 3, 6, 9
    assert [json.loads(line)["frame"] for line in out.splitlines()] == [3, 6, 9]
    assert [json.loads(line)["time_s"] for line in out.splitlines()] == [0.5, 1.0, 1.5]


def test_progress_bar_shows_frames_per_second(tmp_path, capsys):
    clip = square_clip(tmp_path / "cross.avi")
    analyse_video(clip, colour_analyser, batch_size=4, progress=True)
    err = capsys.readouterr().err
    assert "cross.avi" in err and "frame/s" in err


def test_a_folder_with_videos_images_and_other_files(tiny_run, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    astronaut_clip(folder / "clip.avi", n=3)
    cv2.imwrite(str(folder / "photo.png"), cv2.cvtColor(astronaut_face(), cv2.COLOR_RGB2BGR))
    (folder / "notes.txt").write_text("not media")
    code, out, err = _cli(["predict", str(folder), "--run", str(tiny_run)], capsys)
    assert code == 0, err
    assert f"{folder / 'clip.avi'}: 3 frames" in out  # the video path
    assert f"{folder / 'photo.png'}" in out and "track" not in out.split("photo.png")[1].splitlines()[0]
    assert "skipped 1 file(s) without an image or video extension" in err and "notes.txt" in err


def test_an_output_that_cannot_be_written_is_one_line(tmp_path, capsys):
    clip = square_clip(tmp_path / "c.avi", n=3)
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder is needed")
    code, _, err = _cli(["predict", str(clip), "--run", str(tmp_path), "--csv", str(blocker / "t.csv")], capsys)
    assert code == 2 and err.startswith("error: the --csv folder") and "is not a folder" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    code, _, err = _cli(["predict", str(clip), "--run", str(tmp_path), "--csv", str(fifo)], capsys)
    assert code == 2 and "refusing to write the --csv table" in err and "a FIFO" in err


def test_one_csv_or_annotated_file_for_images_and_videos_is_refused(tmp_path, capsys):
    clip = square_clip(tmp_path / "c.avi", n=3)
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), astronaut_face())
    code, _, err = _cli(
        ["predict", str(clip), str(img), "--run", str(tmp_path), "--csv", str(tmp_path / "t.csv")], capsys
    )
    assert code == 2 and "--csv with both images and videos" in err
    code, _, err = _cli(
        ["predict", str(clip), str(img), "--run", str(tmp_path), "--annotate", str(tmp_path / "x.mp4")], capsys
    )
    assert code == 2 and "images are given too: pass a folder" in err
    assert not (tmp_path / "t.csv").exists() and not (tmp_path / "x.mp4").exists()


def test_images_and_videos_annotated_into_one_folder(tiny_run, tmp_path, capsys):
    clip = astronaut_clip(tmp_path / "clip.avi", n=3)
    img = tmp_path / "photo.png"
    cv2.imwrite(str(img), cv2.cvtColor(astronaut_face(), cv2.COLOR_RGB2BGR))
    out = tmp_path / "ann"
    code, _, err = _cli(
        ["predict", str(clip), str(img), "--run", str(tiny_run), "--detector", "haar", "--annotate", str(out)], capsys
    )
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["clip.annotated.mp4", "photo.jpg"]


def test_model_predict_video_is_the_python_api(tiny_run, tmp_path):
    import ensemble

    clip = astronaut_clip(tmp_path / "talk.avi", n=6)
    model = ensemble.load(tiny_run, detector="haar")
    t = model.predict_video(clip, every=2, smooth=0.5, progress=False)
    assert list(t.frame) == [0, 2, 4] and set(t.track) == {1} and "valence_smooth" in t
    # the same faces and probabilities as the photo API gives for the frame itself
    cap = cv2.VideoCapture(str(clip))
    ok, frame = cap.read()
    rec = model.predict(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))[0]
    assert [t.box_x[0], t.box_y[0], t.box_w[0], t.box_h[0]] == rec["box"]
    np.testing.assert_allclose(t.loc[0, PROBA_COLUMNS].to_numpy(float), [rec["probabilities"][c] for c in CLASSES])
    assert t.valence[0] == pytest.approx(rec["valence"]) and t.neighborhood[0] == rec["neighborhood"]
    whole = model.predict_video(clip, detector="none", progress=False)
    assert len(whole) == 6 and (whole.box_w == 520).all()  # each frame one face crop


def test_video_outputs_never_replace_the_video(tmp_path, capsys):
    clip = astronaut_clip(tmp_path / "a.avi", n=2)
    before = clip.read_bytes()
    for option in ("--csv", "--annotate"):
        code, out, err = _cli(["predict", str(clip), option, str(clip), "--run", str(tmp_path)], capsys)
        assert code == 2 and "would replace the input" in err, err  # refused before any model loads
    assert clip.read_bytes() == before
