"""Face detection, landmarks and the 3-point alignment of SPEC §8 (frame -> 512x512 aligned crop).

    aligner = FaceAligner()                          # mediapipe backend, largest face
    aligner = FaceAligner(face_box=(x, y, w, h))     # the face whose center is in / nearest the box
    for frame in VideoReader("talk.mp4"):            # np.uint8 [H, W, 3] RGB
        face = aligner.align(frame)                  # AlignedFace, or None: pass the frame through
        if face is not None:
            face.image                               # np.uint8 [512, 512, 3] RGB
            face.matrix, face.inverse                # [2, 3] frame -> crop and crop -> frame pixels
    where = aligner.locate(frame)                    # the transform alone (host work), warp it on the device

Alignment: three anchor points, the mean of the image-left eyebrow landmarks (the subject's right
brow), the mean of the image-right eyebrow landmarks and the nose tip, are mapped by a least-squares
similarity transform (Umeyama / SVD: rotation, uniform scale, translation, no reflection) onto the
template TEMPLATE in a 420 (w) x 560 (h) crop. "Nose bias" smoothing: the translation column t of that
2x3 transform is an exponential moving average over frames, t = 0.2 t_prev + 0.8 t_new (rotation and
scale are not smoothed); it restarts after a pass-through gap. The crop is then resized to 512x512;
both steps are folded into one 2x3 matrix so the frame is interpolated once (bilinear, fill 127).

Faces: boxes must have w >= 50, h >= 80 and 0.2 <= w / h <= 1.5 pixels; the largest passing box is
used unless `face_box` is given. Detection runs every `detect_every` frames (default 5); between
detections the landmarks are re-fitted in a window around the previous frame's landmarks (tracking),
and a failed track triggers a detection at once. A frame where no face is found reuses the last good
alignment while fewer than `max_reuse` (60) consecutive frames have missed; from the 60th missed frame
on `align` returns None (the pipeline passes the frame through unchanged).

Backends implement `FaceBackend` (detect + landmarks). `MediaPipeBackend` uses the legacy
`mediapipe.solutions` models shipped inside the mediapipe 0.10.21 wheel (no download); `KnownBoxBackend`
takes a face box known in advance (a fixed camera, the benchmark's synthetic face) and needs no package.
Warps: `warp_affine_cv2` (CPU reference) and `warp_affine_torch` (grid_sample; CPU or CUDA, batched).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, WeightsError

log = logging.getLogger("lipforcing")

TEMPLATE = np.array([[95.2, 112.0], [324.8, 112.0], [210.0, 224.0]])  # anchors in the 420x560 crop
CROP_WIDTH, CROP_HEIGHT = 420, 560
FACE_SIZE = 512
FILL = 127
MIN_FACE_W, MIN_FACE_H, MIN_ASPECT, MAX_ASPECT = 50, 80, 0.2, 1.5
EMA_NEW = 0.8  # weight of the new translation in the "nose bias" moving average

# MediaPipe face-mesh (468 points) indices: its "right" brow is the subject's right = image left.
MP_IMAGE_LEFT_BROW = (46, 52, 53, 55, 63, 65, 66, 70, 105, 107)
MP_IMAGE_RIGHT_BROW = (276, 282, 283, 285, 293, 295, 296, 300, 334, 336)
MP_NOSE_TIP = 1


T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------
# Geometry


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama) mapping src points onto dst: float64 [2, 3].

    src, dst: [K, 2] with K >= 2. dst ~= s R src + t with R a proper rotation.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0**2).sum() / len(src)
    cov = d0.T @ s0 / len(src)
    u, sing, vt = np.linalg.svd(cov)
    sign = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rot = u @ sign @ vt
    scale = np.trace(np.diag(sing) @ sign) / var_s
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def crop_to_face_matrix(size: int = FACE_SIZE) -> np.ndarray:
    """Resize of the 420x560 crop to size x size (512) as a [2, 3] matrix (pixel centers, like cv2.resize)."""
    sx, sy = size / CROP_WIDTH, size / CROP_HEIGHT
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """[2, 3] affine of x -> outer(inner(x))."""
    return outer[:, :2] @ inner + np.hstack([np.zeros((2, 2)), outer[:, 2:]])


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a [2, 3] affine."""
    a_inv = np.linalg.inv(matrix[:, :2])
    return np.hstack([a_inv, -a_inv @ matrix[:, 2:]])


def warp_affine_cv2(
    image: np.ndarray, matrix: np.ndarray, size: tuple[int, int], fill: float = FILL
) -> np.ndarray:
    """cv2 reference warp: image [H, W, C] -> [size[1], size[0], C]; matrix maps source -> output pixels.

    size is (width, height) like cv2. Bilinear; outside the source reads `fill`.
    """
    import cv2

    return cv2.warpAffine(
        image, np.asarray(matrix, np.float64), size, flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT, borderValue=(fill,) * 4,
    )


def _pixel_to_normalized(size: int) -> np.ndarray:
    """1-D map pixel x -> grid coordinate u (align_corners=False): u = (2x + 1) / size - 1."""
    return np.array([2.0 / size, 1.0 / size - 1.0])


def affine_to_theta(matrix: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """Turn pixel-space affines (source -> output) into affine_grid thetas: [B, 2, 3] float64.

    matrix: [B, 2, 3] or [2, 3]. The theta maps normalized output coordinates to normalized source
    coordinates (align_corners=False), i.e. it is N_src . matrix^-1 . N_dst^-1.
    """
    matrix = np.asarray(matrix, np.float64).reshape(-1, 2, 3)
    (sh, sw), (dh, dw) = src_hw, dst_hw
    ax, bx = _pixel_to_normalized(sw)
    ay, by = _pixel_to_normalized(sh)
    n_src = np.array([[ax, 0, bx], [0, ay, by], [0, 0, 1]])
    cx, dx = _pixel_to_normalized(dw)
    cy, dy = _pixel_to_normalized(dh)
    n_dst_inv = np.array([[1 / cx, 0, -dx / cx], [0, 1 / cy, -dy / cy], [0, 0, 1]])
    thetas = []
    for m in matrix:
        inv = np.vstack([invert_affine(m), [0, 0, 1]])
        thetas.append((n_src @ inv @ n_dst_inv)[:2])
    return np.stack(thetas)


def _affine_grid(theta: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """F.affine_grid(theta, align_corners=False) by broadcasting: [B, 2, 3] -> [B, h, w, 2].

    Same values; on CPU it is ~10x faster than affine_grid's batched matmul (21 ms -> 2 ms at 512^2).
    """
    h, w = out_hw
    xs = (2 * torch.arange(w, device=theta.device, dtype=theta.dtype) + 1) / w - 1  # [w]
    ys = (2 * torch.arange(h, device=theta.device, dtype=theta.dtype) + 1) / h - 1  # [h]
    grid = torch.empty(theta.shape[0], h, w, 2, device=theta.device, dtype=theta.dtype)
    for k in range(2):  # one full-size add per coordinate: row term [B, h, 1] + column term [B, 1, w]
        col = theta[:, k, 0, None] * xs  # [B, w]
        row = theta[:, k, 1, None] * ys + theta[:, k, 2, None]  # [B, h]
        torch.add(row[:, :, None], col[:, None, :], out=grid[..., k])
    return grid


def warp_with_coverage(
    images: torch.Tensor, matrix: np.ndarray | torch.Tensor, out_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear warp with zero outside the source, and the warped coverage of the source.

    images: [B, C, H, W] float; matrix: [B, 2, 3] (or [2, 3] shared) source -> output pixels.
    Returns (warped [B, C, h, w], coverage [B, 1, h, w] in [0, 1]: the weight of in-source samples).
    """
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu().double().numpy()
    batch, channels, height, width = images.shape
    theta = affine_to_theta(matrix, (height, width), out_hw)
    if theta.shape[0] == 1 and batch > 1:
        theta = np.repeat(theta, batch, axis=0)
    grid = _affine_grid(torch.from_numpy(theta).to(device=images.device, dtype=torch.float32), out_hw)
    ones = torch.ones(batch, 1, height, width, device=images.device, dtype=images.dtype)
    sampled = F.grid_sample(
        torch.cat([images, ones], 1), grid.to(images.dtype), mode="bilinear", padding_mode="zeros",
        align_corners=False,
    )
    return sampled[:, :channels], sampled[:, channels:]


def warp_affine_torch(
    images: torch.Tensor, matrix: np.ndarray | torch.Tensor, out_hw: tuple[int, int], fill: float = FILL
) -> torch.Tensor:
    """Batched bilinear warp with grid_sample: images [B, C, H, W] float -> [B, C, out_h, out_w].

    matrix: [B, 2, 3] (or [2, 3] shared) mapping source -> output pixels, like cv2.warpAffine.
    Outside the source reads `fill`, blended at the border exactly as cv2's constant border does.
    """
    warped, coverage = warp_with_coverage(images, matrix, out_hw)
    return warped + (1 - coverage) * fill if fill else warped


# ---------------------------------------------------------------------------------------------------
# Backends


@contextlib.contextmanager
def native_stderr_silenced(enabled: bool = True):
    """Send file descriptor 2 to /dev/null while the block runs: native libraries log there directly,
    around Python's ``sys.stderr``."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@dataclass(frozen=True)
class FaceBox:
    """A detected face in frame pixels."""

    x: float
    y: float
    w: float
    h: float
    score: float = 1.0

    @property
    def center(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y + self.h / 2

    @property
    def area(self) -> float:
        return self.w * self.h

    def passes_size_filter(self) -> bool:
        """SPEC §8: w >= 50, h >= 80, 0.2 <= w / h <= 1.5."""
        return self.w >= MIN_FACE_W and self.h >= MIN_FACE_H and MIN_ASPECT <= self.w / self.h <= MAX_ASPECT


@dataclass(frozen=True)
class FaceLandmarks:
    """Landmarks of one face in frame pixels."""

    points: np.ndarray
    """float64 [K, 2] (x, y), backend-specific K."""
    anchors: np.ndarray
    """float64 [3, 2]: image-left brow mean, image-right brow mean, nose tip (TEMPLATE order)."""

    @property
    def box(self) -> FaceBox:
        lo, hi = self.points.min(0), self.points.max(0)
        return FaceBox(float(lo[0]), float(lo[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1]))


class FaceBackend(ABC):
    """Face detector + landmarker. Frames are np.uint8 [H, W, 3] RGB."""

    name: str = "abstract"

    @abstractmethod
    def detect(self, frame: np.ndarray) -> list[FaceBox]:
        """All faces in the frame (unfiltered)."""

    @abstractmethod
    def landmarks(self, frame: np.ndarray, box: FaceBox) -> FaceLandmarks | None:
        """Landmarks of the face in (a window around) `box`, or None if no face is there."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing to release
        """Release native resources."""


def _crop_window(box: FaceBox, scale: float, frame_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Square window of side scale * max(w, h) around the box center, clipped: (x0, y0, x1, y1)."""
    cx, cy = box.center
    half = scale * max(box.w, box.h) / 2
    h, w = frame_hw
    return max(0, int(cx - half)), max(0, int(cy - half)), min(w, int(cx + half) + 1), min(h, int(cy + half) + 1)


class MediaPipeBackend(FaceBackend):
    """MediaPipe BlazeFace detection (short-range model, full-range as fallback) + 468-point face mesh.

    Landmarks are fitted on a window of 1.8 x the box around the face, so a given face (not
    whichever face MediaPipe prefers) is measured.
    """

    name = "mediapipe"

    def __init__(self, min_confidence: float = 0.5, window_scale: float = 1.8) -> None:
        try:
            from mediapipe.python.solutions import face_detection, face_mesh
        except ImportError as err:
            raise ConfigError(
                "the mediapipe face backend needs mediapipe 0.10.21: pip install mediapipe==0.10.21"
            ) from err
        self.window_scale = window_scale
        # MediaPipe's native code logs to file descriptor 2 when its graphs are built and first run
        # ("Created TensorFlow Lite XNNPACK delegate", "Feedback manager requires ..."); build and run them
        # once here, with those lines silenced unless the engine logs verbosely (-v).
        with native_stderr_silenced(not log.isEnabledFor(logging.INFO)):
            self._detectors = [
                face_detection.FaceDetection(model_selection=m, min_detection_confidence=min_confidence)
                for m in (0, 1)
            ]
            self._mesh = face_mesh.FaceMesh(
                static_image_mode=True, max_num_faces=1, refine_landmarks=False,
                min_detection_confidence=min_confidence,
            )
            blank = np.zeros((64, 64, 3), np.uint8)
            for model in (*self._detectors, self._mesh):
                model.process(blank)
        self._mesh_warm = False

    def detect(self, frame: np.ndarray) -> list[FaceBox]:
        h, w = frame.shape[:2]
        frame = np.ascontiguousarray(frame)
        for detector in self._detectors:  # short range suits talking heads; full range finds far faces
            result = detector.process(frame)
            if result.detections:
                boxes = []
                for det in result.detections:
                    rel = det.location_data.relative_bounding_box
                    boxes.append(FaceBox(rel.xmin * w, rel.ymin * h, rel.width * w, rel.height * h, det.score[0]))
                return boxes
        return []

    def landmarks(self, frame: np.ndarray, box: FaceBox) -> FaceLandmarks | None:
        x0, y0, x1, y1 = _crop_window(box, self.window_scale, frame.shape[:2])
        if x1 - x0 < 16 or y1 - y0 < 16:
            return None
        window = np.ascontiguousarray(frame[y0:y1, x0:x1])
        with native_stderr_silenced(not self._mesh_warm and not log.isEnabledFor(logging.INFO)):
            result = self._mesh.process(window)  # the first fit on a face logs a native warning once
        self._mesh_warm = self._mesh_warm or bool(result.multi_face_landmarks)
        if not result.multi_face_landmarks:
            return None
        marks = result.multi_face_landmarks[0].landmark
        points = np.array([(p.x * (x1 - x0) + x0, p.y * (y1 - y0) + y0) for p in marks], np.float64)
        anchors = np.stack([
            points[list(MP_IMAGE_LEFT_BROW)].mean(0), points[list(MP_IMAGE_RIGHT_BROW)].mean(0), points[MP_NOSE_TIP],
        ])
        return FaceLandmarks(points=points, anchors=anchors)

    def close(self) -> None:
        for model in (*self._detectors, self._mesh):
            model.close()


class KnownBoxBackend(FaceBackend):
    """A face whose box is known in advance (a fixed camera, a synthetic benchmark face): no detector, no
    landmark model, no third-party package. ``detect`` returns the box; the anchors sit where the alignment
    template puts them inside a face box of that size (``box_anchors``), so the aligned crop frames the box as
    a detected face would be framed. The face does not move for this backend: the head motion of a real video
    is not followed (use mediapipe for that)."""

    name = "box"

    def __init__(self, face_box: tuple[float, float, float, float]) -> None:
        x, y, w, h = (float(v) for v in face_box)
        self.box = FaceBox(x, y, w, h)
        if not self.box.passes_size_filter():
            raise ConfigError(f"the face box {face_box} is not a face: it needs w >= {MIN_FACE_W}, "
                              f"h >= {MIN_FACE_H} and {MIN_ASPECT} <= w/h <= {MAX_ASPECT} pixels")
        self._landmarks = FaceLandmarks(points=box_anchors(self.box), anchors=box_anchors(self.box))

    def detect(self, frame: np.ndarray) -> list[FaceBox]:
        return [self.box]

    def landmarks(self, frame: np.ndarray, box: FaceBox) -> FaceLandmarks | None:
        return self._landmarks


# Anchors inside a face box (fractions of its width; the brow line at 30 % of its height), with the template's
# proportions: brows 0.46 w apart, the nose tip below their midpoint by 0.46 w x (112 / 229.6).
_BOX_BROW_X, _BOX_BROW_Y = 0.27, 0.3
_BOX_NOSE_DROP = (1 - 2 * _BOX_BROW_X) * (TEMPLATE[2, 1] - TEMPLATE[0, 1]) / (TEMPLATE[1, 0] - TEMPLATE[0, 0])


def box_anchors(box: FaceBox) -> np.ndarray:
    """float64 [3, 2]: the alignment anchors (image-left brow, image-right brow, nose tip) of a face that fills
    ``box``, in the template's proportions (``KnownBoxBackend``; the benchmark draws its face to match)."""
    brow_y = box.y + _BOX_BROW_Y * box.h
    return np.array([
        [box.x + _BOX_BROW_X * box.w, brow_y],
        [box.x + (1 - _BOX_BROW_X) * box.w, brow_y],
        [box.x + 0.5 * box.w, brow_y + _BOX_NOSE_DROP * box.w],
    ])


INSIGHTFACE_FILES = ("det_10g.onnx", "2d106det.onnx")
FACE_BACKENDS = ("mediapipe", "box")


def make_backend(
    name: str = "mediapipe",
    model_dir: str | os.PathLike[str] | None = None,
    *,
    face_box: tuple[float, float, float, float] | None = None,
) -> FaceBackend:
    """Backend by name: "mediapipe" (built in), "box" (the face is ``face_box``: no detection, no package) or
    "insightface" (interface only; needs local models)."""
    if name == "mediapipe":
        return MediaPipeBackend()
    if name == "box":
        if face_box is None:
            raise ConfigError("the box face backend needs the face's box: give --face-box x,y,w,h")
        return KnownBoxBackend(face_box)
    if name == "insightface":
        missing = [f for f in INSIGHTFACE_FILES if model_dir is None or not (Path(model_dir) / f).is_file()]
        if missing:
            where = f"in {model_dir}" if model_dir else "(no --face-model-dir given)"
            raise WeightsError(
                f"the insightface face backend needs the models {', '.join(missing)} {where}; "
                "put the buffalo_l ONNX files in a local directory, or use the mediapipe backend"
            )
        raise ConfigError("the insightface face backend is not implemented in this build; use mediapipe")
    raise ConfigError(f"unknown face backend {name!r}; choose mediapipe, box or insightface")


# ---------------------------------------------------------------------------------------------------
# Aligner


@dataclass(frozen=True)
class FaceTransform:
    """Where one frame's face is: the transforms between frame and 512x512 crop pixels."""

    matrix: np.ndarray
    """float64 [2, 3]: frame pixels -> 512x512 crop pixels."""
    inverse: np.ndarray
    """float64 [2, 3]: crop pixels -> frame pixels (for paste-back)."""
    reused: bool
    """True when no face was found in this frame and the last good alignment was reused."""
    anchors: np.ndarray | None
    """float64 [3, 2] anchor points found in this frame (frame pixels), None when reused."""


@dataclass(frozen=True)
class AlignedFace(FaceTransform):
    """A face transform and the aligned crop it gives."""

    image: np.ndarray
    """np.uint8 [512, 512, 3] RGB aligned crop."""


def select_face(boxes: Sequence[FaceBox], face_box: tuple[float, float, float, float] | None) -> FaceBox | None:
    """Pick the face: among boxes passing the size filter, the largest, or, with face_box = (x, y, w, h),
    the one whose center lies inside it (nearest its center if several), else the nearest center."""
    boxes = [b for b in boxes if b.passes_size_filter()]
    if not boxes:
        return None
    if face_box is None:
        return max(boxes, key=lambda b: b.area)
    x, y, w, h = face_box
    cx, cy = x + w / 2, y + h / 2

    def key(b: FaceBox) -> tuple[bool, float]:
        bx, by = b.center
        inside = x <= bx <= x + w and y <= by <= y + h
        return (not inside, math.hypot(bx - cx, by - cy))

    return min(boxes, key=key)


class FaceAligner:
    """Per-frame SPEC §8 alignment with detection every k frames, tracking, smoothing and reuse. ``size``: side of
    the aligned crops (SPEC: 512; a model's ``face_size``)."""

    def __init__(
        self,
        backend: FaceBackend | str = "mediapipe",
        *,
        face_box: tuple[float, float, float, float] | None = None,
        detect_every: int = 5,
        max_reuse: int = 60,
        warp: Literal["cv2", "torch"] = "cv2",
        device: str | torch.device = "cpu",
        size: int = FACE_SIZE,
    ) -> None:
        if detect_every < 1:
            raise ConfigError(f"detect_every must be >= 1, got {detect_every}")
        self.size = size
        self.backend = make_backend(backend, face_box=face_box) if isinstance(backend, str) else backend
        self.face_box = face_box
        self.detect_every = detect_every
        self.max_reuse = max_reuse
        self.warp = warp
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Forget tracking, smoothing and the last alignment (start of a new clip)."""
        self._tracked: FaceLandmarks | None = None
        self._since_detect = 0
        self._translation: np.ndarray | None = None
        self._last_matrix: np.ndarray | None = None
        self._missed = 0

    def find_landmarks(self, frame: np.ndarray) -> FaceLandmarks | None:
        """Track the previous face, or detect (every detect_every frames, or when tracking fails)."""
        marks = None
        if self._tracked is not None and self._since_detect < self.detect_every:
            marks = self.backend.landmarks(frame, self._tracked.box)
            self._since_detect += 1
        if marks is None:
            box = select_face(self.backend.detect(frame), self.face_box)
            marks = self.backend.landmarks(frame, box) if box is not None else None
            self._since_detect = 1
        self._tracked = marks
        return marks

    def has_face(self, frame: np.ndarray) -> bool:
        """Whether the detector finds a usable face in this frame (detection only: cheap, no state change)."""
        return select_face(self.backend.detect(frame), self.face_box) is not None

    def crop_matrix(self, anchors: np.ndarray) -> np.ndarray:
        """Frame -> 420x560 crop similarity for these anchors, with the translation EMA applied."""
        matrix = similarity_transform(anchors, TEMPLATE)
        if self._translation is not None:
            matrix[:, 2] = (1 - EMA_NEW) * self._translation + EMA_NEW * matrix[:, 2]
        self._translation = matrix[:, 2].copy()
        return matrix

    def locate(self, frame: np.ndarray) -> FaceTransform | None:
        """frame: np.uint8 [H, W, 3] RGB -> where its face is, or None when the frame is passed through.
        Host work only (detection, landmarks, smoothing); ``warp_frame`` / ``warp_affine_torch`` make the crop."""
        marks = self.find_landmarks(frame)
        if marks is not None:
            self._missed = 0
            self._last_matrix = compose(crop_to_face_matrix(self.size), self.crop_matrix(marks.anchors))
        else:
            self._missed += 1
            if self._last_matrix is None or self._missed >= self.max_reuse:
                self._last_matrix, self._translation = None, None
                return None
        matrix = self._last_matrix
        return FaceTransform(matrix=matrix, inverse=invert_affine(matrix), reused=marks is None,
                             anchors=None if marks is None else marks.anchors)

    def align(self, frame: np.ndarray) -> AlignedFace | None:
        """frame: np.uint8 [H, W, 3] RGB -> AlignedFace (transform and crop), or None (pass-through)."""
        where = self.locate(frame)
        if where is None:
            return None
        return AlignedFace(image=self.warp_frame(frame, where.matrix), matrix=where.matrix, inverse=where.inverse,
                           reused=where.reused, anchors=where.anchors)

    def warp_frame(self, frame: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        """frame [H, W, 3] uint8 -> crop [size, size, 3] uint8 with the selected warp backend."""
        if self.warp == "cv2":
            return warp_affine_cv2(frame, matrix, (self.size, self.size))
        images = torch.from_numpy(np.ascontiguousarray(frame)).to(self.device).permute(2, 0, 1)[None].float()
        out = warp_affine_torch(images, matrix, (self.size, self.size))
        return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> FaceAligner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def group_by_size(frames: Sequence[np.ndarray]) -> dict[tuple[int, ...], list[int]]:
    """Indices of the frames grouped by frame size (batched warps and paste-back need one size)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, f in enumerate(frames):
        groups.setdefault(tuple(f.shape), []).append(i)
    return groups


def frames_and_crops(
    frames: Sequence[np.ndarray], matrices: Sequence[np.ndarray], device: torch.device, size: int = FACE_SIZE
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Frames on the device and their aligned crops. frames: np.uint8 [H, W, 3] each (any sizes); matrices:
    [2, 3] frame -> crop each. Returns (one uint8 [H, W, 3] tensor per frame, crops float [T, 3, size, size] in
    [0, 1] rounded to 8-bit levels). On a CPU cv2 warps (the fast one there); on CUDA the frames are uploaded
    (pinned, asynchronous) and warped in batches on the device, so the crops never leave it."""
    out = upload_frames(frames, device)
    if device.type != "cuda":
        crops = [warp_affine_cv2(f, m, (size, size)) for f, m in zip(frames, matrices)]
        return out, faces_to_tensor(crops, device)
    crops = torch.empty(len(out), 3, size, size, device=device)
    for idx in group_by_size(frames).values():
        images = torch.stack([out[i] for i in idx]).permute(0, 3, 1, 2).float()
        warped = warp_affine_torch(images, np.stack([matrices[i] for i in idx]), (size, size))
        crops[idx] = warped.round_().clamp_(0, 255)
    return out, crops.div_(255.0)


def upload_frames(frames: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """np.uint8 [H, W, 3] frames -> tensors on ``device`` (pinned, asynchronous copies on CUDA)."""
    if device.type != "cuda":
        return [torch.from_numpy(np.ascontiguousarray(f)) for f in frames]
    return [torch.from_numpy(np.ascontiguousarray(f)).pin_memory().to(device, non_blocking=True) for f in frames]


def faces_to_tensor(images: np.ndarray | Sequence[np.ndarray], device: str | torch.device = "cpu") -> torch.Tensor:
    """Aligned uint8 crops [B, 512, 512, 3] (or a list of [512, 512, 3]) -> float [B, 3, 512, 512] in [0, 1]."""
    device = torch.device(device)
    array = torch.from_numpy(np.ascontiguousarray(np.stack(images) if not isinstance(images, np.ndarray) else images))
    if device.type == "cuda":
        array = array.pin_memory().to(device, non_blocking=True)
    return array.permute(0, 3, 1, 2).float() / 255.0


def fill_gaps(items: Sequence[T | None]) -> list[T]:
    """Per frame, its own alignment (a transform, a matrix) or, for a frame without one, the nearest later one,
    else the nearest earlier one. At least one item must be present."""
    out: list[T | None] = list(items)
    following = None
    for i in range(len(out) - 1, -1, -1):
        following = out[i] if out[i] is not None else following
        out[i] = following
    preceding = None
    for i, item in enumerate(out):
        preceding = item if item is not None else preceding
        out[i] = preceding
    return out
