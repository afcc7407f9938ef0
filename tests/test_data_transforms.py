"""data/transforms.py and data/loader.py: boxes stay on their pixels, crops follow torchvision's rule,
clips share one crop, loaders shuffle deterministically per epoch and split ranks disjointly."""
import numpy as np
import pytest
import torch
from PIL import Image

from data import (CLIP_MEAN, CLIP_STD, ShapesDetection, ShapesText, build_dataset, collate, make_loader,
                  parse_spec)
from data.transforms import (DetectionTransform, VideoTransform, center_crop, denormalize, hflip, hflip_boxes,
                             image_transform, normalize, random_resized_crop_params, resize, resize_boxes,
                             to_normalized_tensor, to_tensor)


def test_clip_normalisation_constants_and_round_trip():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = to_normalized_tensor(img)
    assert torch.allclose(x, normalize(to_tensor(img)), atol=1e-5)
    assert torch.allclose(denormalize(x) * 255, torch.from_numpy(img).permute(2, 0, 1).float(), atol=1e-3)
    clip = torch.rand(3, 4, 5, 5)  # (3, T, H, W) broadcasts per channel too
    assert torch.allclose(denormalize(normalize(clip)), clip, atol=1e-6)


def test_flip_twice_is_identity_for_boxes_and_images():
    boxes = torch.tensor([[3.0, 4.0, 10.5, 9.0], [0.0, 0.0, 32.0, 20.0]])
    assert torch.equal(hflip_boxes(hflip_boxes(boxes, 32), 32), boxes)
    assert hflip_boxes(boxes, 32)[0].tolist() == [21.5, 4.0, 29.0, 9.0]
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 12, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(hflip(hflip(img))), np.asarray(img))
    assert resize_boxes(boxes, (32, 20), (64, 10))[0].tolist() == [6.0, 2.0, 21.0, 4.5]


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("size", [(40, 30), (23, 57)])  # (W, H): landscape and portrait, odd scales
def test_box_around_a_drawn_rectangle_still_encloses_it(flip, size):
    W, H = size
    arr = np.zeros((H, W, 3), np.uint8)
    x1, y1, x2, y2 = 5, 7, 17, 20  # filled pixels: columns 5..16, rows 7..19
    arr[y1:y2, x1:x2] = 255
    t = DetectionTransform(96, train=True, flip_p=1.0 if flip else 0.0)
    x, boxes, info = t(Image.fromarray(arr), torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32))
    assert info["flipped"] == flip
    white = denormalize(x).mean(0) > 0.5  # (96, 96)
    ys, xs = torch.nonzero(white, as_tuple=True)
    bx1, by1, bx2, by2 = boxes[0].tolist()
    # the rectangle's pixels lie inside the box (±1 px for interpolation at the edges) ...
    assert xs.min() >= bx1 - 1 and xs.max() + 1 <= bx2 + 1 and ys.min() >= by1 - 1 and ys.max() + 1 <= by2 + 1
    # ... and the box is tight around them
    assert abs(xs.min() - bx1) <= 1 and abs(xs.max() + 1 - bx2) <= 1
    assert abs(ys.min() - by1) <= 1 and abs(ys.max() + 1 - by2) <= 1
    # padding sits right/bottom, so the content keeps its aspect and boxes need no shift
    nh, nw = info["size"]
    assert max(nh, nw) == 96 and abs(nw / nh - W / H) < 0.05


def test_detection_transform_on_synthetic_boxes_flip_round_trip():
    ds = ShapesDetection(length=4, img_size=64)
    s = ds[0]
    img = Image.fromarray(np.moveaxis((denormalize(s["image"]).clamp(0, 1) * 255).round().byte().numpy(), 0, -1))
    _, once, _ = DetectionTransform(64, train=True, flip_p=1.0)(img, s["boxes"])
    assert torch.equal(hflip_boxes(once, 64), s["boxes"])


def test_random_resized_crop_follows_torchvision_rule():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_params(120, 80, (0.3, 0.9), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 80 and 0 <= left and left + w <= 120
        assert 0.3 * 9600 * 0.9 <= h * w <= 0.9 * 9600 * 1.1  # rounding of h and w
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    a = [random_resized_crop_params(50, 50, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert a[0] == a[1]
    # impossible request (aspect far outside the image's): fall back to a centred crop, ratio clamped
    assert random_resized_crop_params(100, 10, (0.99, 1.0), (1.0, 1.0), g) == (0, 45, 10, 10)


def test_resize_shorter_side_and_centre_crop():
    img = Image.new("RGB", (40, 20))
    assert resize(img, 10).size == (20, 10) and resize(img, (8, 6)).size == (6, 8)
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[5:15, 15:25] = 255
    c = np.asarray(center_crop(Image.fromarray(arr), 10))
    assert c.shape == (10, 10, 3) and c.min() == 255
    x = image_transform(16, train=False)(Image.fromarray(arr))
    assert x.shape == (3, 16, 16)
    torch.manual_seed(0)
    xs = [image_transform(16, train=True, scale=(0.2, 0.5))(Image.fromarray(arr)) for _ in range(4)]
    assert len({t.numpy().tobytes() for t in xs}) > 1  # training crops are random


def test_video_transform_one_crop_for_all_frames():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    shifted = np.stack([np.roll(frame, k, axis=1) for k in range(4)])  # content moves right 1 px per frame
    torch.manual_seed(1)
    out = VideoTransform(16, train=True, scale=(0.3, 0.6), flip=True)(np.stack([frame] * 4))
    assert all(torch.equal(out[:, 0], out[:, t]) for t in range(4))
    # scale 1 forces the crop to the whole 40×30 frame; resizing to 40×40 keeps columns, so the 1 px
    # motion between frames survives exactly
    full = VideoTransform(40, train=True, scale=(1.0, 1.0))(shifted)
    assert torch.equal(full[:, 1, :, 1:], full[:, 0, :, :-1])


# ----------------------------------------------------------------------------- loaders

def _order(loader, epoch):
    loader.set_epoch(epoch)
    return [t for b in loader for t in b["text"]]


def test_make_loader_shuffles_deterministically_per_epoch():
    ds = ShapesText(length=40, img_size=16)
    a, b = make_loader(ds, 8, seed=3), make_loader(ds, 8, seed=3)
    assert _order(a, 2) == _order(b, 2)  # same seed and epoch -> same order (resumable)
    assert _order(a, 2) != _order(a, 3)  # new epoch -> new order
    assert sorted(_order(a, 3)) == sorted(ds[i]["text"] for i in range(40))  # a permutation
    assert _order(make_loader(ds, 8, seed=4), 2) != _order(a, 2)
    assert len(a) == 5 and not next(iter(a))["image"].is_pinned()  # no CUDA here -> no pinning


def test_distributed_sampler_gives_ranks_disjoint_shares():
    ds = ShapesText(length=30, img_size=16)
    shares = []
    for rank in range(3):
        loader = make_loader(ds, 4, distributed=True, rank=rank, world_size=3, seed=1, workers=2 if rank == 0 else 0)
        loader.set_epoch(5)
        shares.append([t for b in loader for t in b["text"]])
    assert sum(len(s) for s in shares) == 30
    assert sorted(t for s in shares for t in s) == sorted(ds[i]["text"] for i in range(30))
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        make_loader(ds, 4, distributed=True)


def test_collate_picks_the_task_and_drops_nones():
    det = ShapesDetection(length=3, img_size=32)
    b = collate([det[0], None, det[1]])
    assert b["image"].shape == (2, 3, 32, 32) and b["skipped"] == 1
    assert torch.equal(b["targets"][1]["boxes"], det[1]["boxes"]) and "image" not in b["targets"][0]
    vqa = build_dataset("synthetic:5", task="vqa", img_size=16)
    b = collate([vqa[i] for i in range(5)])
    assert b["target"].shape == (5, len(vqa.answers)) and len(b["answers"][0]) == 10
    txt = ShapesText(length=4, img_size=16)
    b = collate([txt[i] for i in range(4)])
    assert b["label"].dtype == torch.long and b["short"].tolist() == [txt[i]["short"] for i in range(4)]


def test_build_dataset_specs():
    assert parse_spec("csv:a/b.tsv?caption_key=text&sep=\\t&length=5") == (
        "csv", ["a/b.tsv"], {"caption_key": "text", "sep": "\\t", "length": 5})
    ds = build_dataset("synthetic:123", split="val", img_size=16)
    assert isinstance(ds, ShapesText) and len(ds) == 123 and ds.split == "val"
    assert len(build_dataset("synthetic?length=7", task="video", img_size=16, num_frames=4)) == 7
    with pytest.raises(ValueError, match="holds detect data but the task is pretrain"):
        build_dataset("coco:x.json")
    with pytest.raises(ValueError, match="unknown data spec 'hdf5:x'"):
        build_dataset("hdf5:x")
    with pytest.raises(ValueError, match="names no path"):
        build_dataset("csv:")


def test_resize_truncates_the_longer_side_as_torchvision():
    """torchvision's _compute_resized_output_size: long' = int(size · long / short), truncated. 640×427 →
    224 · 640 / 427 = 335.7 → 335 (rounding would give 336). Square images are untouched by the rule:
    size · w / w is exactly size, truncated or rounded."""
    assert resize(Image.new("RGB", (640, 427)), 224).size == (335, 224)
    assert resize(Image.new("RGB", (427, 640)), 224).size == (224, 335)
    for w, h, size in ((500, 333, 100), (333, 500, 100), (1000, 999, 7), (3, 200, 2)):
        short, long = min(w, h), max(w, h)
        want_long = int(size * long / short)
        assert resize(Image.new("RGB", (w, h)), size).size == ((want_long, size) if w > h else (size, want_long))
    for side in (1, 7, 32, 64, 96, 224, 427):
        for size in (1, 16, 64, 224, 384):
            assert resize(Image.new("RGB", (side, side)), size).size == (size, size)
