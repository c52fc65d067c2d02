"""Face alignment (SPEC §8): geometry, torch vs cv2 warps, face selection, the reuse/pass-through
rule, smoothing, a real clip through MediaPipe, and paste-back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lipforcing.engine.errors import ConfigError, WeightsError
from lipforcing.engine.media.face import (
    FACE_SIZE,
    TEMPLATE,
    FaceAligner,
    FaceBackend,
    FaceBox,
    FaceLandmarks,
    compose,
    crop_to_face_matrix,
    faces_to_tensor,
    invert_affine,
    make_backend,
    select_face,
    similarity_transform,
    warp_affine_torch,
)
from lipforcing.engine.media.paste_back import edge_width, feather, footprint_area, paste_back

cv2 = pytest.importorskip("cv2")
from lipforcing.engine.media.face import warp_affine_cv2  # noqa: E402

# Template anchors in the 512x512 crop: x scaled by 512/420, y by 512/560 (pixel centers).
TEMPLATE_512 = (crop_to_face_matrix()[:, :2] @ TEMPLATE.T + crop_to_face_matrix()[:, 2:]).T


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random low-frequency RGB image, uint8 [H, W, 3] (bilinear-friendly, never flat)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3)).astype(np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def face_matrix(frame_hw: tuple[int, int], scale: float = 1.1, angle: float = 0.15) -> np.ndarray:
    """A plausible frame -> 512 crop matrix centred on the frame."""
    h, w = frame_hw
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    m = np.array([[c, -s, 0.0], [s, c, 0.0]])
    m[:, 2] = np.array([FACE_SIZE / 2, FACE_SIZE / 2]) - m[:, :2] @ np.array([w / 2, h / 2])
    return m


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    mse = float(((torch.as_tensor(a).double() - torch.as_tensor(b).double()) ** 2).mean())
    return 10 * np.log10(255**2 / max(mse, 1e-12))


# ---------------------------------------------------------------------------------------------------
# Geometry and warps


def test_similarity_transform_recovers_known_transform() -> None:
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 500, (3, 2))
    angle, scale, t = 0.4, 1.7, np.array([12.0, -30.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + t
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m, np.hstack([scale * rot, t[:, None]]), atol=1e-9)
    mirrored = src * [-1, 1]  # no reflection: a mirrored set cannot be matched exactly
    assert np.linalg.det(similarity_transform(mirrored, dst)[:, :2]) > 0


def test_compose_and_invert() -> None:
    a, b = face_matrix((300, 200)), crop_to_face_matrix()
    x = np.array([17.0, 42.0, 1.0])
    np.testing.assert_allclose(compose(b, a) @ x, b @ np.append(a @ x, 1))
    np.testing.assert_allclose(compose(invert_affine(a), a), np.hstack([np.eye(2), np.zeros((2, 1))]), atol=1e-12)


@pytest.mark.parametrize("frame_hw", [(257, 301), (640, 360)])
def test_torch_warp_matches_cv2(frame_hw: tuple[int, int]) -> None:
    frame = smooth_image(*frame_hw)
    matrices = [face_matrix(frame_hw, 1.3, 0.2), face_matrix(frame_hw, 0.8, -0.1)]
    images = torch.from_numpy(frame).permute(2, 0, 1)[None].float().repeat(2, 1, 1, 1)
    out = warp_affine_torch(images, np.stack(matrices), (FACE_SIZE, FACE_SIZE))
    for i, m in enumerate(matrices):
        ref = warp_affine_cv2(frame, m, (FACE_SIZE, FACE_SIZE)).astype(np.float64)
        diff = np.abs(out[i].permute(1, 2, 0).double().numpy() - ref)
        # cv2 quantizes bilinear weights to 1/32 and rounds to uint8: <= ~1 level on smooth images.
        assert diff.mean() < 0.3 and diff.max() <= 3


def test_torch_warp_fill_and_inverse_round_trip() -> None:
    frame = smooth_image(200, 240)
    images = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
    shift = np.array([[1.0, 0.0, 50.0], [0.0, 1.0, 0.0]])
    out = warp_affine_torch(images, shift, (200, 240), fill=127)
    assert torch.all(out[0, :, :, :49] == 127)
    torch.testing.assert_close(out[0, :, :, 60:], images[0, :, :, 10:-50], atol=1e-3, rtol=0)
    m = face_matrix((200, 240), 2.5, 0.3)
    back = warp_affine_torch(warp_affine_torch(images, m, (FACE_SIZE, FACE_SIZE)), invert_affine(m), (200, 240))
    assert psnr(back[0, :, 40:-40, 40:-40], images[0, :, 40:-40, 40:-40]) > 35


# ---------------------------------------------------------------------------------------------------
# Face selection, reuse rule and smoothing (fake backend)


def test_select_face_rules() -> None:
    small = FaceBox(0, 0, 40, 90)  # too narrow
    wide = FaceBox(0, 0, 200, 100)  # w / h = 2 > 1.5
    a, b = FaceBox(100, 100, 100, 120), FaceBox(400, 100, 150, 180)
    assert select_face([small, wide], None) is None
    assert select_face([small, a, b, wide], None) == b
    assert select_face([a, b], face_box=(90, 90, 150, 150)) == a  # center inside the box
    assert select_face([a, b], face_box=(0, 0, 10, 10)) == a  # none inside: nearest center


class ScriptedBackend(FaceBackend):
    """Returns landmarks for frames whose top-left pixel is nonzero, offset by that value."""

    name = "scripted"

    def __init__(self) -> None:
        self.detect_calls = self.landmark_calls = 0

    def detect(self, frame: np.ndarray) -> list[FaceBox]:
        self.detect_calls += 1
        return [FaceBox(100, 100, 120, 150)] if frame[0, 0, 0] else []

    def landmarks(self, frame: np.ndarray, box: FaceBox) -> FaceLandmarks | None:
        self.landmark_calls += 1
        if not frame[0, 0, 0]:
            return None
        anchors = np.array([[130.0, 150.0], [190.0, 150.0], [160.0, 180.0]]) + float(frame[0, 0, 0])
        return FaceLandmarks(points=np.vstack([anchors, [[100, 100], [220, 250]]]), anchors=anchors)


def frame_with(value: int) -> np.ndarray:
    frame = np.full((300, 320, 3), 90, np.uint8)
    frame[0, 0, 0] = value
    return frame


def test_reuse_rule_then_pass_through() -> None:
    backend = ScriptedBackend()
    aligner = FaceAligner(backend)
    first = aligner.align(frame_with(5))
    assert first is not None and not first.reused
    gray = frame_with(0)
    results = [aligner.align(gray) for _ in range(70)]
    assert all(r is not None and r.reused for r in results[:59])  # 1st .. 59th missed frame: reuse
    np.testing.assert_array_equal(results[0].matrix, first.matrix)
    assert all(r is None for r in results[59:])  # the 60th missed frame on: pass through
    again = aligner.align(frame_with(9))  # smoothing restarted: equals the raw fit
    raw = compose(crop_to_face_matrix(), similarity_transform(again.anchors, TEMPLATE))
    np.testing.assert_allclose(again.matrix, raw, atol=1e-9)


def test_no_face_from_the_start_passes_through() -> None:
    aligner = FaceAligner(ScriptedBackend())
    assert aligner.align(frame_with(0)) is None


def test_translation_ema_and_detection_cadence() -> None:
    backend = ScriptedBackend()
    aligner = FaceAligner(backend, detect_every=4)
    faces = [aligner.align(frame_with(v)) for v in (10, 20, 20, 20, 20, 20)]
    assert backend.detect_calls == 2  # frames 0 and 4; frames 1-3 and 5 are tracked
    raw = [similarity_transform(f.anchors, TEMPLATE) for f in faces]
    to_crop = invert_affine(crop_to_face_matrix())
    used = [compose(to_crop, f.matrix) for f in faces]
    np.testing.assert_allclose(used[0], raw[0], atol=1e-9)
    np.testing.assert_allclose(used[1][:, :2], raw[1][:, :2], atol=1e-9)  # rotation/scale not smoothed
    np.testing.assert_allclose(used[1][:, 2], 0.2 * used[0][:, 2] + 0.8 * raw[1][:, 2], atol=1e-9)
    np.testing.assert_allclose(used[2][:, 2], 0.2 * used[1][:, 2] + 0.8 * raw[2][:, 2], atol=1e-9)


def test_backend_factory_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="det_10g.onnx"):
        make_backend("insightface")
    with pytest.raises(WeightsError, match=str(tmp_path)):
        make_backend("insightface", tmp_path)
    with pytest.raises(ConfigError, match="unknown face backend"):
        make_backend("dlib")


def test_known_box_backend_aligns_the_box_without_a_detector() -> None:
    """The box backend's anchors have the template's proportions, so the crop maps them exactly onto the
    template's anchors; it needs no mediapipe, and a box that is not a face is refused."""
    from lipforcing.engine.media.face import KnownBoxBackend, box_anchors

    frame = smooth_image(300, 420, seed=3)
    box = (131.0, 57.0, 118.0, 150.0)
    aligner = FaceAligner("box", face_box=box, warp="cv2")
    assert isinstance(aligner.backend, KnownBoxBackend)
    faces = [aligner.align(frame) for _ in range(7)]  # detection and "tracking" frames alike
    anchors = box_anchors(FaceBox(*box))
    for face in faces:
        mapped = (face.matrix[:, :2] @ anchors.T + face.matrix[:, 2:]).T
        np.testing.assert_allclose(mapped, TEMPLATE_512, atol=1e-6)
        assert face.image.shape == (FACE_SIZE, FACE_SIZE, 3) and not face.reused
    np.testing.assert_array_equal(faces[0].image, warp_affine_cv2(frame, faces[0].matrix, (FACE_SIZE, FACE_SIZE)))
    with pytest.raises(ConfigError, match="needs the face's box"):
        make_backend("box")
    with pytest.raises(ConfigError, match="is not a face"):
        make_backend("box", face_box=(0, 0, 300, 20))


def test_run_config_face_backend_options() -> None:
    from lipforcing.engine.app.engine import RunConfig

    assert RunConfig(model="tiny", face_backend="box", face_box=(1, 2, 90, 120)).face_backend == "box"
    with pytest.raises(ConfigError, match="needs the face's box"):
        RunConfig(model="tiny", face_backend="box")
    with pytest.raises(ConfigError, match="unknown face backend"):
        RunConfig(model="tiny", face_backend="dlib")


# ---------------------------------------------------------------------------------------------------
# Real clip through MediaPipe


@pytest.fixture(scope="module")
def clip_frames(shared_dir: Path) -> list[np.ndarray]:
    pytest.importorskip("av")
    from lipforcing.engine.media.io import VideoReader

    with VideoReader(shared_dir / "assets" / "clips" / "face3.mp4", max_frames=6) as reader:
        return list(reader)


def test_real_face_alignment(clip_frames: list[np.ndarray]) -> None:
    pytest.importorskip("mediapipe")
    with FaceAligner() as aligner:
        faces = [aligner.align(f) for f in clip_frames]
        assert all(f is not None and not f.reused for f in faces)
        face = faces[0]
        assert face.image.shape == (FACE_SIZE, FACE_SIZE, 3) and face.image.dtype == np.uint8
        mapped = (face.matrix[:, :2] @ face.anchors.T + face.matrix[:, 2:]).T
        # Three points cannot all hit the template (brow gap vs nose drop differs per face):
        # the fit lands them within ~30 px of it in the 512 crop.
        assert np.abs(mapped - TEMPLATE_512).max() < 40
        # Measure the crop itself: its brows and nose sit near the template rows and columns.
        found = aligner.backend.landmarks(face.image, FaceBox(0, 0, FACE_SIZE, FACE_SIZE))
        assert found is not None
        assert np.abs(found.anchors[:2, 1] - TEMPLATE_512[:2, 1]).max() < 35
        assert np.abs(found.anchors[:, 0] - TEMPLATE_512[:, 0]).max() < 45
        assert np.abs(found.anchors[2, 1] - TEMPLATE_512[2, 1]).max() < 45
        # Gray frames: reuse, then pass through.
        gray = np.full_like(clip_frames[0], 128)
        results = [aligner.align(gray) for _ in range(60)]
        assert all(r is not None and r.reused for r in results[:59]) and results[59] is None


def test_real_frame_torch_warp_path(clip_frames: list[np.ndarray]) -> None:
    pytest.importorskip("mediapipe")
    with FaceAligner(warp="cv2") as a, FaceAligner(warp="torch") as b:
        ref, out = a.align(clip_frames[0]), b.align(clip_frames[0])
    np.testing.assert_array_equal(ref.matrix, out.matrix)
    diff = np.abs(ref.image.astype(int) - out.image)
    assert diff.mean() < 0.3 and diff.max() <= 3


# ---------------------------------------------------------------------------------------------------
# Paste-back


def test_edge_width_and_feather() -> None:
    assert [edge_width(a) for a in (399, 400, 1600, 160000, 250000)] == [0, 1, 2, 20, 25]
    region = torch.zeros(1, 1, 60, 80)
    region[..., 10:50, 15:70] = 1
    w = feather(region, 5)
    assert torch.all(w[region == 0] == 0)
    assert torch.all(w[..., 20:40, 25:60] > 0.99) and torch.all(w <= 1)
    assert torch.all(w[..., 10, 15:70] < 0.05)  # the region's edge row is nearly transparent
    # Reference check of the separable erosion: the support of w is the square erosion dilated back by the
    # blur (a square of radius e), inside the region.
    blob = (torch.rand(2, 1, 50, 70) > 0.3).float()
    square = -torch.nn.functional.max_pool2d(-blob, 7, stride=1, padding=3)
    assert torch.equal(feather(blob, 3) > 0, torch.nn.functional.max_pool2d(square, 7, stride=1, padding=3) * blob > 0)


def synthetic_batch(frame_hw: tuple[int, int], batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    frames = torch.from_numpy(np.stack([smooth_image(*frame_hw, seed=s) for s in range(batch)]))
    matrices = [face_matrix(frame_hw, 1.6 + 0.2 * i, 0.1 * i) for i in range(batch)]
    crops = warp_affine_torch(frames.permute(0, 3, 1, 2).float(), np.stack(matrices), (FACE_SIZE, FACE_SIZE))
    aligned = crops.round().clamp(0, 255) / 255.0
    return frames, aligned, np.stack([invert_affine(m) for m in matrices])


def test_footprint_area_matches_pixel_count() -> None:
    frames, _, inverse = synthetic_batch((333, 401))
    inverse = np.concatenate([inverse, inverse + [[0, 0, 150], [0, 0, -60]]])  # one crossing two edges
    for i, area in enumerate(footprint_area(inverse, (333, 401))):
        coverage = warp_affine_cv2(np.ones((FACE_SIZE, FACE_SIZE), np.float32), inverse[i], (401, 333), 0)
        assert abs(area - (coverage > 0.5).sum()) < 0.01 * area


@pytest.mark.parametrize("frame_hw", [(333, 401), (720, 405)])
def test_fast_weights_match_reference(frame_hw: tuple[int, int]) -> None:
    frames, aligned, inverse = synthetic_batch(frame_hw)
    generated, mask = torch.rand_like(aligned), torch.rand(FACE_SIZE, FACE_SIZE)
    fast, w_fast = paste_back(frames, generated, aligned, mask, inverse, return_weight=True)
    ref, w_ref = paste_back(frames, generated, aligned, mask, inverse, weight_mode="frame", return_weight=True)
    # Same region; at its very edge the reference's truncated blur is exactly 0, the analytic one tiny.
    assert torch.all(w_fast[w_ref > 0] > 0) and float(w_fast[w_ref == 0].max()) < 0.05
    # They differ only in the edge band (the square erosion kernel is axis-aligned in the frame for the
    # reference, in the crop for the fast path; truncated vs analytic blur): ~0.03 mean there, < 0.2 max.
    band = (w_ref > 0) & (w_ref < 0.999)
    diff = (w_fast - w_ref).abs()
    assert float(diff[band].mean()) < 0.05 and float(diff.max()) < 0.2 and float(diff[~band].max()) < 0.05
    assert float((fast.float() - ref.float()).abs().mean()) < 0.5


@pytest.mark.parametrize("frame_hw", [(333, 401), (720, 405)])
def test_paste_back_leaves_outside_untouched(frame_hw: tuple[int, int]) -> None:
    frames, aligned, inverse = synthetic_batch(frame_hw)
    mask = torch.rand(FACE_SIZE, FACE_SIZE)
    generated = torch.rand_like(aligned)
    out, weight = paste_back(frames, generated, aligned, mask, inverse, return_weight=True)
    assert out.dtype == torch.uint8 and out.shape == frames.shape
    outside = weight == 0
    assert torch.equal(out[outside], frames[outside])
    # Everything outside the crop footprint (computed independently with cv2) is in `outside`.
    for i in range(len(frames)):
        footprint = warp_affine_cv2(np.ones((FACE_SIZE, FACE_SIZE), np.float32), inverse[i], frame_hw[::-1], 0)
        assert torch.all(outside[i][torch.from_numpy(footprint) == 0])
        assert 0.05 < float((~outside[i]).float().mean()) < 0.95
    assert not torch.equal(out, frames)


@pytest.mark.parametrize("frame_hw", [(333, 401), (720, 405)])
def test_paste_back_of_unchanged_face_reproduces_frame(frame_hw: tuple[int, int]) -> None:
    frames, aligned, inverse = synthetic_batch(frame_hw)
    out, weight = paste_back(frames, aligned, aligned, torch.rand(FACE_SIZE, FACE_SIZE), inverse, return_weight=True)
    inside = weight > 0
    assert psnr(out[inside], frames[inside]) >= 30
    # With the mask all ones the generated face is ignored.
    ones = torch.ones(FACE_SIZE, FACE_SIZE)
    keep = paste_back(frames, aligned, aligned, ones, inverse)
    assert torch.equal(paste_back(frames, torch.rand_like(aligned), aligned, ones, inverse), keep)


def test_paste_back_real_frame(clip_frames: list[np.ndarray]) -> None:
    pytest.importorskip("mediapipe")
    with FaceAligner() as aligner:
        faces = [aligner.align(f) for f in clip_frames[:3]]
    frames = torch.from_numpy(np.stack(clip_frames[:3]))
    aligned = faces_to_tensor([f.image for f in faces])
    inverse = np.stack([f.inverse for f in faces])
    out, weight = paste_back(frames, aligned, aligned, torch.rand(FACE_SIZE, FACE_SIZE), inverse, return_weight=True)
    inside = weight > 0
    assert psnr(out[inside], frames[inside]) >= 30
    assert torch.equal(out[~inside], frames[~inside])


def test_a_smaller_face_size_is_the_same_crop_at_a_lower_resolution(clip_frames: list[np.ndarray]) -> None:
    """``size`` 256 (the tiny model's crops): the 512 crop's geometry scaled by 1/2 about pixel centers, the same
    face downsampled, and a paste-back of the unchanged face that reproduces the frame."""
    pytest.importorskip("mediapipe")
    with FaceAligner() as big, FaceAligner(size=256) as small:
        full, half = big.align(clip_frames[0]), small.align(clip_frames[0])
    halve = np.array([[0.5, 0.0, -0.25], [0.0, 0.5, -0.25]])  # 512 -> 256 crop pixels (pixel centers)
    np.testing.assert_allclose(half.matrix, compose(halve, full.matrix), atol=1e-9)
    assert half.image.shape == (256, 256, 3)
    downsampled = cv2.resize(full.image, (256, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(downsampled.astype(int) - half.image).mean() < 3
    frames = torch.from_numpy(np.stack(clip_frames[:1]))
    regions = []
    for face in (half, full):
        aligned, side = faces_to_tensor([face.image]), face.image.shape[0]
        out, weight = paste_back(frames, aligned, aligned, torch.rand(side, side), face.inverse[None],
                                 return_weight=True)
        inside = weight > 0
        assert psnr(out[inside], frames[inside]) >= 30 and torch.equal(out[~inside], frames[~inside])
        regions.append(float(inside.sum()))
    assert abs(regions[0] / regions[1] - 1) < 0.02  # the same footprint in the frame


def test_paste_back_region_crossing_frame_border() -> None:
    frame = torch.from_numpy(smooth_image(200, 180))[None]
    to_crop = face_matrix((200, 180), 4.0, 0.0)  # a 128-pixel footprint ...
    to_crop[0, 2] -= 4.0 * 90  # ... centred 90 px right of the frame centre: it crosses the right edge
    aligned = warp_affine_torch(frame.permute(0, 3, 1, 2).float(), to_crop, (FACE_SIZE, FACE_SIZE)) / 255
    inverse = invert_affine(to_crop)[None]
    out, weight = paste_back(frame, torch.rand_like(aligned), aligned, torch.zeros(512, 512), inverse,
                             return_weight=True)
    assert torch.equal(out[weight == 0], frame[weight == 0])
    assert 0.2 < float((weight > 0).float().mean()) < 0.5
    assert float(weight[0, 100, -1]) > 0.99  # not feathered where the crop leaves the frame
    assert float(weight[0, 100, 117]) < 0.3  # feathered at its inner edge (x = 116, e = 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paste_back_cuda_matches_cpu() -> None:
    frames, aligned, inverse = synthetic_batch((333, 401))
    mask, generated = torch.rand(FACE_SIZE, FACE_SIZE), torch.rand_like(aligned)
    ref = paste_back(frames, generated, aligned, mask, inverse)
    out = paste_back(frames.cuda(), generated.cuda(), aligned.cuda(), mask.cuda(), inverse).cpu()
    assert (out.int() - ref.int()).abs().max() <= 1
    crops = warp_affine_torch(frames.cuda().permute(0, 3, 1, 2).float(), np.stack([invert_affine(m) for m in inverse]),
                              (FACE_SIZE, FACE_SIZE))
    assert (crops.cpu() - aligned * 255).abs().max() <= 0.51  # aligned is the rounded CPU warp


def test_broadcast_grid_matches_affine_grid() -> None:
    from lipforcing.engine.media.face import _affine_grid

    theta = torch.randn(3, 2, 3)
    ref = torch.nn.functional.affine_grid(theta, [3, 1, 37, 53], align_corners=False)
    torch.testing.assert_close(_affine_grid(theta, (37, 53)), ref, atol=1e-6, rtol=1e-5)
