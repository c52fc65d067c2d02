"""What the metrics need of the faces in a video, from the engine's own face landmarks (MediaPipe's 468-point
mesh; no download): the mouth landmarks (LMD), the mouth region (mouth SSIM/PSNR), the face box (SyncNet's
crop) and five points (the ArcFace crop for CSIM).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MediaError
from ..media.face import FaceAligner, similarity_transform, warp_affine_cv2

# Face-mesh indices of the outer and inner lip contours.
MOUTH = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185,
         78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191)
# Image-left eye corners, image-right eye corners, nose tip, image-left and image-right mouth corners.
_EYE_LEFT, _EYE_RIGHT, _NOSE, _MOUTH_LEFT, _MOUTH_RIGHT = (33, 133), (362, 263), 1, 61, 291
# Where ArcFace models expect those five points in their 112 x 112 input (the insightface convention).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                             [70.7299, 92.2041]])


@dataclass
class FaceTrack:
    """Per-frame landmarks of the largest face of a video (None where none was found)."""

    points: list[np.ndarray | None]
    """float64 [468, 2] frame pixels, or None."""

    @property
    def found(self) -> np.ndarray:
        return np.array([p is not None for p in self.points])

    def mouth(self, i: int) -> np.ndarray | None:
        p = self.points[i]
        return None if p is None else p[list(MOUTH)]

    def five_points(self, i: int) -> np.ndarray | None:
        p = self.points[i]
        if p is None:
            return None
        return np.stack([p[list(_EYE_LEFT)].mean(0), p[list(_EYE_RIGHT)].mean(0), p[_NOSE], p[_MOUTH_LEFT],
                         p[_MOUTH_RIGHT]])

    def filled(self, values: list[np.ndarray | None]) -> np.ndarray:
        """Per-frame values with the frames that have none taken from the nearest frame that has one."""
        have = [i for i, v in enumerate(values) if v is not None]
        if not have:
            raise MediaError("no face was found in any frame")
        idx = np.array(have)
        out = []
        for i in range(len(values)):
            out.append(values[i] if values[i] is not None else values[int(idx[np.abs(idx - i).argmin()])])
        return np.stack(out)

    def face_boxes(self) -> np.ndarray:
        """float64 [N, 4] (x, y, w, h) of the landmarks, every frame (gaps filled from the nearest)."""
        boxes = [None if p is None else np.r_[p.min(0), p.max(0) - p.min(0)] for p in self.points]
        return self.filled(boxes)

    def mouth_boxes(self, margin: float = 0.3) -> np.ndarray:
        """int [N, 4] (x, y, w, h) of one size for the whole video (the median mouth extent plus ``margin`` on
        each side), centred on each frame's mouth."""
        mouths = self.filled([self.mouth(i) for i in range(len(self.points))])  # [N, 40, 2]
        lo, hi = mouths.min(1), mouths.max(1)
        size = np.median(hi - lo, axis=0) * (1 + 2 * margin)
        w, h = max(11, int(round(size[0]))), max(11, int(round(size[1])))
        centre = (lo + hi) / 2
        return np.stack([np.round(centre[:, 0] - w / 2), np.round(centre[:, 1] - h / 2),
                         np.full(len(centre), w), np.full(len(centre), h)], 1).astype(np.int64)


def track_faces(frames: np.ndarray, aligner: FaceAligner) -> FaceTrack:
    """Landmarks of every frame (uint8 [N, H, W, 3] RGB), tracked from frame to frame."""
    aligner.reset()
    points = []
    for frame in frames:
        marks = aligner.find_landmarks(frame)
        points.append(None if marks is None else marks.points)
    return FaceTrack(points)


def landmark_distance(pred: FaceTrack, ref: FaceTrack) -> tuple[float, int]:
    """LMD: the mean Euclidean distance (pixels of the frames) between corresponding mouth landmarks, over the
    frames where both videos have a face; and that number of frames."""
    distances = []
    for i in range(min(len(pred.points), len(ref.points))):
        a, b = pred.mouth(i), ref.mouth(i)
        if a is not None and b is not None:
            distances.append(float(np.linalg.norm(a - b, axis=1).mean()))
    if not distances:
        raise MediaError("no frame has a face in both videos")
    return float(np.mean(distances)), len(distances)


def arcface_crops(frames: np.ndarray, track: FaceTrack) -> np.ndarray:
    """112 x 112 RGB crops with the five points on the ArcFace template: uint8 [N, 112, 112, 3]."""
    points = track.filled([track.five_points(i) for i in range(len(track.points))])
    return np.stack([warp_affine_cv2(frame, similarity_transform(p, ARCFACE_TEMPLATE), (112, 112), fill=0)
                     for frame, p in zip(frames, points)])
