"""The walkthrough's pictures (docs/WALKTHROUGH.md): Florence's mechanisms drawn from the real modules.

    python figures.py                         # every figure from the default runs' checkpoints → docs/figures/
    python figures.py --runs runs --out docs/figures

Each figure is one `fig_*` function: it takes real modules (built from a checkpoint here, toy ones in
tests/test_figures.py) and plain tensors, and returns a PIL image whose size its docstring gives. Nothing is
re-implemented: masks come from `coswin.shifted_window_mask`, window layouts from `coswin.window_partition`
and `video_coswin.window_partition3d`, bias tables from the modules' parameters and
`coswin.resize_bias_table`, positives from `unicl.batch_labels`, attention from the blocks themselves —
the window attention's plain path keeps its probabilities (`WindowAttention.keep_attn` / `last_attn`),
METER's attention likewise (`meter.Attention.keep_attn`), and the Dynamic Head is read with forward hooks on
its existing submodules (`dyhead_trace`). The figures are deterministic (models in eval mode, no sampling).

Text in the pictures is ASCII: the default font of older Pillows has no other glyphs. Colour means a value
wherever it is used, with its scale drawn beside it.
"""
from __future__ import annotations

import argparse
import colorsys
import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import coswin
import dynamic_head as dh
import meter
import unicl
import video_coswin
from tasks.base import eval_mode
from tasks.draw import font, to_pil

BLACK, GREY, LIGHT, WHITE = (0, 0, 0), (110, 110, 110), (200, 200, 200), (255, 255, 255)
GREEN, RED = (0, 140, 0), (200, 0, 0)
# sequential (viridis-like: dark violet → yellow) and diverging (blue → white → red) colour scales
SEQUENTIAL = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=float)
DIVERGING = np.array([(33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130), (178, 24, 43)], dtype=float)
REGIONS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]  # mask regions


# ----------------------------------------------------------------------------------------------------
# Drawing helpers: colour scales, heat maps, colour bars, text


def colours(values, lo: float, hi: float, scale: np.ndarray = SEQUENTIAL) -> np.ndarray:
    """Values → uint8 RGB (..., 3) by linear interpolation along `scale` from lo to hi (clipped)."""
    v = np.asarray(values, dtype=float)
    t = np.clip((v - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    xs = np.linspace(0.0, 1.0, len(scale))
    return np.stack([np.interp(t, xs, scale[:, c]) for c in range(3)], -1).round().astype(np.uint8)


def heat(values: torch.Tensor, size: tuple[int, int], lo: float, hi: float, scale=SEQUENTIAL) -> Image.Image:
    """A 2-D tensor (h, w) → an RGB picture of `size` (width, height), one flat cell per entry (nearest)."""
    rgb = colours(values.detach().float().cpu().numpy(), lo, hi, scale)
    return Image.fromarray(rgb).resize(size, Image.NEAREST)


def overlay(tile: Image.Image, values: torch.Tensor, lo: float, hi: float, alpha: float = 0.6) -> Image.Image:
    """`values` (h, w) as a heat map blended over a picture (token cells stay sharp: nearest upsampling)."""
    return Image.blend(tile.convert("RGB"), heat(values, tile.size, lo, hi), alpha)


def colour_bar(canvas: Image.Image, x: int, y: int, h: int, lo: float, hi: float, label: str, scale=SEQUENTIAL,
               w: int = 12, fmt: str = "{:.2g}"):
    """A vertical colour bar at (x, y), h pixels tall (hi at the top), ticks at lo, middle and hi, and its
    label above it. Occupies about w + 40 pixels of width."""
    draw = ImageDraw.Draw(canvas)
    ramp = torch.linspace(hi, lo, h)[:, None].expand(h, w)
    canvas.paste(heat(ramp, (w, h), lo, hi, scale), (x, y))
    draw.rectangle([x, y, x + w - 1, y + h - 1], outline=BLACK)
    for frac in (0.0, 0.5, 1.0):
        yy = int(y + (1 - frac) * (h - 1))
        draw.line([x + w, yy, x + w + 3, yy], fill=BLACK)
        draw.text((x + w + 5, yy - 6), fmt.format(lo + frac * (hi - lo)), fill=BLACK, font=font(10))
    draw.text((x - 4, y - 16), label, fill=BLACK, font=font(10))


def text(canvas: Image.Image, xy, s: str, size: int = 12, fill=BLACK):
    ImageDraw.Draw(canvas).text(xy, s, fill=fill, font=font(size))


def distinct(n: int) -> list[tuple[int, int, int]]:
    """n well-separated hues (windows of a partition)."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.55, 0.95)) for i in range(n)]


def save_png(img: Image.Image, path: str) -> str:
    """Write atomically (temporary file, then rename), PNG with zlib optimisation; a picture that would pass
    190 KB (photographic tiles) is stored with an adaptive 256-colour palette instead, so figures stay small."""
    tmp = f"{path}.tmp.{os.getpid()}"
    img.save(tmp, format="PNG", optimize=True)
    if os.path.getsize(tmp) > 190_000:
        img.convert("RGB").quantize(256).save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)
    return path


def _grid_lines(draw, x0, y0, size, n, every=1, fill=LIGHT, width=1, offset=0):
    """Lines of an n × n token grid over a size × size square at (x0, y0): every `every`-th token, shifted by
    `offset` tokens (wrapping round)."""
    cell = size / n
    for k in range(n + 1):
        if (k - offset) % every:
            continue
        p = round(k * cell)
        draw.line([x0 + p, y0, x0 + p, y0 + size], fill=fill, width=width)
        draw.line([x0, y0 + p, x0 + size, y0 + p], fill=fill, width=width)


# ----------------------------------------------------------------------------------------------------
# Reading attention out of the real blocks


@contextlib.contextmanager
def kept_window_attention(encoder: torch.nn.Module, blocks):
    """Inside the `with`: every WindowAttention of `encoder` (CoSwin or VideoCoSwin) on its plain path
    (`fused = False`: the same function, written out), the attention of each block in `blocks` keeping its
    probabilities (`keep_attn`), and each block's input shape recorded. Yields {block: record}; after a
    forward, record["attn"] is that block's `last_attn` (B, nW·heads, N, N) and record["shape"] its input
    shape. Afterwards every flag is as it was."""
    attns = [m for m in encoder.modules() if isinstance(m, coswin.WindowAttention)]
    saved = [(m.fused, m.keep_attn) for m in attns]
    records = {b: {} for b in blocks}

    def pre(block, inputs):
        records[block]["shape"] = tuple(inputs[0].shape)

    def post(block, inputs, output):
        records[block]["attn"] = block.attn.last_attn

    hooks = [h for b in blocks for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
    try:
        for m in attns:
            m.fused = False
        for b in blocks:
            b.attn.keep_attn = True
        yield records
    finally:
        for h in hooks:
            h.remove()
        for m, (fused, keep) in zip(attns, saved):
            m.fused, m.keep_attn, m.last_attn = fused, keep, None


def window_token_index(block: coswin.SwinBlock, H: int, W: int) -> torch.Tensor:
    """(nW, M²) long: for each window slot of `block` on an H × W map, the row-major index h·W + w of the
    image token sitting there (−1 for padding), through the block's own steps: pad to window multiples,
    cyclic roll by −shift, `coswin.window_partition`."""
    M, s = block.window_and_shift(H, W)
    idx = torch.arange(H * W, dtype=torch.float32).view(1, H, W, 1)
    idx = F.pad(idx, (0, 0, 0, -W % M, 0, -H % M), value=-1.0)
    if s:
        idx = torch.roll(idx, shifts=(-s, -s), dims=(1, 2))
    return coswin.window_partition(idx, M)[..., 0].long()


def window_token_index3d(block: video_coswin.SwinBlock3D, T: int, H: int, W: int) -> torch.Tensor:
    """(nW, N) long, as `window_token_index` for a 3D block: the index (t·H + h)·W + w of the token in
    each window slot (−1 for padding), via `video_coswin.window_partition3d`."""
    ws, shift = block.window_and_shift(T, H, W)
    idx = torch.arange(T * H * W, dtype=torch.float32).view(1, T, H, W, 1)
    idx = F.pad(idx, (0, 0, 0, -W % ws[2], 0, -H % ws[1], 0, -T % ws[0]), value=-1.0)
    if any(shift):
        idx = torch.roll(idx, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
    return video_coswin.window_partition3d(idx, ws)[..., 0].long()


def attention_received(record: dict, block) -> torch.Tensor:
    """Σ over queries of p(query → key), averaged over heads, for every token of the block's input map →
    (B, *spatial). In every window the probabilities of N queries sum to N, so the average token receives 1;
    more means the token is looked at more than its share."""
    B, *spatial, _ = record["shape"]
    index = window_token_index(block, *spatial) if len(spatial) == 2 else window_token_index3d(block, *spatial)
    nW, N = index.shape
    attn = record["attn"].float().view(B, nW, -1, N, N).mean(2)  # (B, nW, N queries, N keys)
    got = attn.sum(2)  # (B, nW, N keys)
    valid = index >= 0
    out = torch.zeros(B, math.prod(spatial))
    out.scatter_add_(1, index.clamp(min=0).flatten()[None].expand(B, -1), (got * valid).flatten(1))
    return out.view(B, *spatial)


def frame_attention(record: dict, block: video_coswin.SwinBlock3D) -> torch.Tensor:
    """(T, T): row t = the mean over query tokens at time step t (and heads, and clips) of the attention mass
    they give to the keys at each time step t'. Rows sum to 1."""
    B, T, H, W, _ = record["shape"]
    index = window_token_index3d(block, T, H, W)
    nW, N = index.shape
    time = torch.where(index >= 0, index // (H * W), torch.full_like(index, -1))  # (nW, N)
    attn = record["attn"].float().view(B, nW, -1, N, N).mean((0, 2))  # (nW, N, N)
    onehot = F.one_hot(time.clamp(min=0), T).float() * (time >= 0)[..., None]  # (nW, N, T)
    mass = torch.einsum("wqk,wqt,wks->ts", attn, onehot, onehot)  # queries at t → keys at s
    return mass / mass.sum(1, keepdim=True).clamp(min=1e-12)


# ----------------------------------------------------------------------------------------------------
# §2.3 CoSwin: windows, the shifted-window mask, the relative position bias


def fig_window_partition(image: torch.Tensor, M: int = 4, stride: int = 4, tile: int = 256) -> Image.Image:
    """The window partition and the cyclic shift on an image (paper §2.3, Swin's W-MSA / SW-MSA).

    image: (3, S, S) normalised (as the datasets give it); tokens are stride × stride pixels (stage 1 of
    CoSwin: stride 4), windows M × M tokens, shift s = M // 2. Three panels: (a) the regular windows of W-MSA;
    (b) the windows of SW-MSA, displaced by s tokens: each token is tinted with its window's colour and
    numbered at the corner of each piece, so the pieces that wrap round the borders show the cyclic shift;
    (c) the image rolled by −s tokens (what `SwinBlock` does), where those windows are regular again, each
    token tinted by its region in `coswin.shifted_window_mask`: tokens of different regions never attend.
    → RGB image of (3·(tile + 16) + 16) × (tile + 86) pixels.
    """
    n = image.shape[-1] // stride  # tokens per side
    s = M // 2
    if n % M:
        raise ValueError(f"fig_window_partition: {n} tokens per side is not a multiple of the window {M}")
    nw = n // M
    cell = tile / n
    W_img, H_img = 3 * (tile + 16) + 16, tile + 86
    canvas = Image.new("RGB", (W_img, H_img), WHITE)
    draw = ImageDraw.Draw(canvas)
    base = to_pil(image, tile)
    rolled = to_pil(torch.roll(image, shifts=(-s * stride, -s * stride), dims=(1, 2)), tile)
    # (b) window id of every image token under the shift: regular ids in rolled coordinates, rolled back
    rid = (torch.arange(n)[:, None] // M) * nw + torch.arange(n)[None, :] // M
    wid = torch.roll(rid, shifts=(s, s), dims=(0, 1))
    palette = distinct(nw * nw)
    # (c) region of each token in its window, from the mask: token i's region = first key it may attend
    mask = coswin.shifted_window_mask(n, n, M, s)  # (nW, M², M²)
    first = (mask == 0).float().argmax(-1)  # (nW, M²)
    regions = torch.zeros(nw * nw, M * M, dtype=torch.long)
    for w in range(nw * nw):
        seen: dict[int, int] = {}
        for i in range(M * M):
            regions[w, i] = seen.setdefault(int(first[w, i]), len(seen))
    region_map = coswin.window_reverse(regions[..., None], M, n, n)[0, ..., 0]  # (n, n) in rolled coordinates

    def tint(pic, colour_of):
        over = Image.new("RGB", pic.size)
        od = ImageDraw.Draw(over)
        for h in range(n):
            for w in range(n):
                od.rectangle([round(w * cell), round(h * cell), round((w + 1) * cell) - 1, round((h + 1) * cell) - 1],
                             fill=colour_of(h, w))
        return Image.blend(pic.convert("RGB"), over, 0.45)

    panels = [
        (base, 0, "(a) W-MSA: windows of M x M tokens", f"M = {M}, tokens of {stride}x{stride} px"),
        (tint(base, lambda h, w: palette[int(wid[h, w])]), s, "(b) SW-MSA: windows moved by M/2",
         "colour and number = window; pieces wrap round"),
        (tint(rolled, lambda h, w: REGIONS[int(region_map[h, w]) % len(REGIONS)]), 0,
         "(c) rolled by -M/2: regular windows again", "colour = region of the mask in its window"),
    ]
    for k, (pic, offset, title, sub) in enumerate(panels):
        x0, y0 = 16 + k * (tile + 16), 40
        canvas.paste(pic, (x0, y0))
        _grid_lines(draw, x0, y0, tile, n, fill=LIGHT)
        _grid_lines(draw, x0, y0, tile, n, every=M, fill=BLACK, width=2, offset=offset)
        text(canvas, (x0, 6), title, 12)
        text(canvas, (x0, 22), sub, 10, GREY)
        if k == 1:  # window numbers at the top-left token of each piece
            for h in range(n):
                for w in range(n):
                    if (h == 0 or (h - s) % M == 0) and (w == 0 or (w - s) % M == 0):
                        text(canvas, (x0 + w * cell + 2, y0 + h * cell + 1), str(int(wid[h, w])), 9)
        if k == 2:
            for w in range(nw * nw):
                text(canvas, (x0 + (w % nw) * M * cell + 2, y0 + (w // nw) * M * cell + 1), str(w), 9)
    text(canvas, (16, tile + 48), "Swin alternates (a) and (b). (b) is computed as (c): roll the map, attend inside "
                                  "regular windows with the mask, roll back.", 11)
    text(canvas, (16, tile + 64), "coswin.SwinBlock.forward, coswin.window_partition, coswin.shifted_window_mask",
         10, GREY)
    return canvas


def mask_layout(M: int, n_panels: int) -> tuple[list[tuple[int, int]], int]:
    """Where `fig_shift_mask` draws each window's N × N mask grid (N = M²): the top-left corners and the
    cell size in pixels (cell (i, j) of panel k spans x0 + j·cell … x0 + (j+1)·cell − 1)."""
    N = M * M
    cell = max(3, 192 // N)
    side = N * cell
    return [(40 + k * (side + 60), 70 + M * 20 + 24) for k in range(n_panels)], cell


def fig_shift_mask(H: int = 16, W: int = 16, M: int = 4, shift: int = 2, windows=None) -> Image.Image:
    """The attention mask of shifted windows as token grids (paper §2.3; `coswin.shifted_window_mask`).

    For each window index in `windows` (default: an inner window, the last of the first window row, and the
    bottom-right corner window), above: the window's M × M tokens in the rolled map, each coloured by its region
    and labelled with its (row, column) in the unrolled H × W map; below: the N × N grid (N = M²) of the mask,
    row = query token, column = key token, white where the query may attend the key (mask 0) and dark where it may
    not (−inf). Grid positions: `mask_layout(M, len(windows))`.
    → RGB image of (40 + k·(N·cell + 60)) × (70 + 20·M + 24 + N·cell + 40) pixels, k windows, cell from mask_layout.
    """
    mask = coswin.shifted_window_mask(H, W, M, shift)
    if mask is None:
        raise ValueError("fig_shift_mask: nothing is masked (shift 0 on a map of window multiples)")
    nW = mask.shape[0]
    nw = math.ceil(W / M)
    windows = list(windows) if windows is not None else [nw + 1 if nW > nw + 1 else 0, nw - 1, nW - 1]
    origins, cell = mask_layout(M, len(windows))
    N = M * M
    side = N * cell
    canvas = Image.new("RGB", (40 + len(windows) * (side + 60), origins[0][1] + side + 40), WHITE)
    draw = ImageDraw.Draw(canvas)
    text(canvas, (10, 6), f"Shifted-window attention mask: {H}x{W} tokens, window M = {M}, shift {shift} "
                          "(coswin.shifted_window_mask)", 13)
    text(canvas, (10, 24), "top: the window's tokens after the roll, (row, col) in the image, colour = region;  "
                           "bottom: query (row) x key (column), white = may attend, dark = masked (-inf)", 10, GREY)
    Hp, Wp = math.ceil(H / M) * M, math.ceil(W / M) * M
    coords = torch.stack(torch.meshgrid(torch.arange(Hp), torch.arange(Wp), indexing="ij"), -1)  # (Hp, Wp, 2)
    coords = coswin.window_partition(torch.roll(coords, shifts=(-shift, -shift), dims=(0, 1))[None], M)
    for k, w in enumerate(windows):
        x0, y0 = origins[k]
        allowed = mask[w] == 0  # (N, N)
        first = allowed.float().argmax(-1)
        region = {}
        rid = [region.setdefault(int(first[i]), len(region)) for i in range(N)]
        text(canvas, (x0, 44), f"window {w}: {len(region)} region(s)", 12)
        for i in range(N):  # the window's tokens
            r, c = divmod(i, M)
            bx, by = x0 + c * 34, 62 + r * 20
            draw.rectangle([bx, by, bx + 32, by + 18], fill=REGIONS[rid[i] % len(REGIONS)])
            text(canvas, (bx + 2, by + 4), f"{int(coords[w, i, 0])},{int(coords[w, i, 1])}", 9, WHITE)
        grid = Image.fromarray(np.where(allowed.numpy()[..., None], 255, 40).astype(np.uint8).repeat(3, -1))
        canvas.paste(grid.resize((side, side), Image.NEAREST), (x0, y0))
        for i in range(N):  # region strips beside the rows and above the columns
            colour = REGIONS[rid[i] % len(REGIONS)]
            draw.rectangle([x0 - 8, y0 + i * cell, x0 - 3, y0 + (i + 1) * cell - 1], fill=colour)
            draw.rectangle([x0 + i * cell, y0 - 8, x0 + (i + 1) * cell - 1, y0 - 3], fill=colour)
        draw.rectangle([x0 - 1, y0 - 1, x0 + side, y0 + side], outline=GREY)
        text(canvas, (x0, y0 + side + 4), "key token j ->", 10, GREY)
        text(canvas, (x0 - 36, y0 + side // 2), "query", 10, GREY)
    return canvas


def _stage_blocks(encoder) -> list[tuple[str, torch.nn.Module]]:
    """(name, block) of every Swin block, stage by stage: "stage 1 block 1", …"""
    return [(f"stage {i + 1} block {j + 1}", b) for i, layer in enumerate(encoder.layers)
            for j, b in enumerate(layer.blocks)]


def fig_bias_tables(encoder: coswin.CoSwin, new_window: int | None = None, size: int = 84) -> Image.Image:
    """The learned relative position bias of every head of every block (paper §2.3) and the same tables
    bicubically resized for a larger window (`coswin.resize_bias_table`, what the 224 → 384 phase does).

    Each table B[Δh, Δw] is drawn as a (2M−1) × (2M−1) heat map, Δh down, Δw across, from −(M−1) to M−1 (the
    centre cell is a token attending itself); one diverging scale for the whole figure. `new_window` defaults
    to round(M·12/7), the paper's 7 → 12 ratio. One row per block: its heads before (left) and after (right).
    → RGB image of (130 + 2·h·(size + 8) + 30 + 70) × (70 + blocks·(size + 22)) pixels, h = the most heads of
    any block.
    """
    M = encoder.cfg.window_size
    new_window = new_window or round(M * 12 / 7)
    blocks = _stage_blocks(encoder)
    tables = [(name, b.attn.relative_position_bias_table.detach().float()) for name, b in blocks]
    resized = [coswin.resize_bias_table(t, new_window) for _, t in tables]
    heads = max(t.shape[1] for _, t in tables)
    lim = max(float(t.abs().max()) for _, t in tables + [(None, r) for r in resized]) or 1.0
    left, group = 130, heads * (size + 8)
    W_img, H_img = left + 2 * group + 30 + 70, 70 + len(blocks) * (size + 22)
    canvas = Image.new("RGB", (W_img, H_img), WHITE)
    text(canvas, (10, 6), f"Relative position bias B[dh, dw] of each head: window M = {M} (left), bicubically "
                          f"resized to M = {new_window} (right)", 13)
    text(canvas, (10, 24), "coswin.WindowAttention.relative_position_bias_table, coswin.resize_bias_table;  "
                           "centre = a token and itself, dh down, dw across", 10, GREY)
    text(canvas, (left, 46), f"trained, (2M-1)^2 = {(2 * M - 1) ** 2} rows", 11)
    text(canvas, (left + group + 30, 46), f"resized, (2M-1)^2 = {(2 * new_window - 1) ** 2} rows", 11)
    for r, ((name, t), t2) in enumerate(zip(tables, resized)):
        y = 70 + r * (size + 22)
        text(canvas, (10, y + size // 2 - 6), name, 11)
        for h in range(t.shape[1]):
            for g, (tab, m) in enumerate(((t, M), (t2, new_window))):
                x = left + g * (group + 30) + h * (size + 8)
                canvas.paste(heat(tab[:, h].view(2 * m - 1, 2 * m - 1), (size, size), -lim, lim, DIVERGING), (x, y))
                text(canvas, (x, y + size + 2), f"head {h + 1}", 9, GREY)
    colour_bar(canvas, W_img - 60, 90, min(240, H_img - 120), -lim, lim, "bias", DIVERGING)
    return canvas


# ----------------------------------------------------------------------------------------------------
# §2.2 UniCL: the target matrix and the temperature


def fig_unicl_targets(texts: list[str], cell: int = 22) -> Image.Image:
    """The targets of UniCL's image-to-text loss for one batch (paper §2.2) next to CLIP's.

    Keys y come from `unicl.batch_labels` (identical texts, and a template prompt around a short text and
    that text, share a key); UniCL's target of row i is 1/|P(i)| on every k with y_k = y_i, CLIP's is the
    identity (each image's own caption only). Rows are images, columns texts; the row labels are the batch's
    texts, coloured by key when the key repeats. → RGB image of (L + 2·B·cell + 150) × (B·cell + 110)
    pixels, B = len(texts), L = 260 (the label column).
    """
    keys = unicl.batch_labels(texts)
    B = len(texts)
    pos = (keys[:, None] == keys[None, :]).float()
    unicl_t = pos / pos.sum(1, keepdim=True)
    clip_t = torch.eye(B)
    L, side = 260, B * cell
    W_img, H_img = L + 2 * side + 150, side + 110
    canvas = Image.new("RGB", (W_img, H_img), WHITE)
    draw = ImageDraw.Draw(canvas)
    text(canvas, (10, 6), "Targets of the image-to-text loss: UniCL (hash-key positives) vs CLIP (identity)", 13)
    text(canvas, (10, 24), "unicl.batch_labels -> P(i) = {k : y_k = y_i};  target(i, k) = 1/|P(i)| for k in P(i)",
         10, GREY)
    repeated = {int(k) for k in keys if int((keys == k).sum()) > 1}
    palette = distinct(max(1, len(repeated)))
    colour_of = {k: palette[i] for i, k in enumerate(sorted(repeated, key=lambda k: int((keys == k).nonzero()[0])))}
    y0 = 70
    for i, t in enumerate(texts):
        k = int(keys[i])
        label = t if len(t) <= 38 else t[:36] + ".."
        if k in colour_of:
            draw.rectangle([4, y0 + i * cell + 3, 12, y0 + (i + 1) * cell - 4], fill=colour_of[k])
        text(canvas, (16, y0 + i * cell + cell // 2 - 6), label, 10)
    for g, (mat, title) in enumerate(((unicl_t, "UniCL: 1/|P(i)| on the positives"), (clip_t, "CLIP: the identity"))):
        x0 = L + g * (side + 30)
        canvas.paste(heat(mat, (side, side), 0.0, 1.0), (x0, y0))
        draw.rectangle([x0 - 1, y0 - 1, x0 + side, y0 + side], outline=GREY)
        text(canvas, (x0, y0 - 30), title, 11)
        text(canvas, (x0, y0 - 16), "columns: the same texts", 9, GREY)
        for i in range(B):
            for j in range(B):
                v = float(mat[i, j])
                if 0 < v < 1:
                    text(canvas, (x0 + j * cell + 2, y0 + i * cell + cell // 2 - 6), f"{v:.2f}"[1:], 9,
                         WHITE if v < 0.6 else BLACK)
    text(canvas, (10, y0 + side + 10), f"{B} pairs, {len(set(keys.tolist()))} distinct keys: rows with a coloured "
                                       "mark share their key (a template prompt keeps its short text's key).", 10)
    colour_bar(canvas, W_img - 60, y0 + 10, min(160, side - 10), 0.0, 1.0, "target")
    return canvas


def fig_temperature(rows: list[dict], init: float = 1 / 0.07, clamp: float = 100.0) -> Image.Image:
    """The learned temperature τ = exp(logit_scale) over training (paper §2.2): the `tau` the training loop
    logs at each step (metrics.jsonl of a pretraining run), with CLIP's start 1/0.07 and Florence's clamp at
    100 as dashed lines. rows: dicts with "step" and "tau" (others are ignored). → RGB image of 720 × 360.
    """
    pts = [(r["step"], r["tau"]) for r in rows if "tau" in r and "step" in r]
    W_img, H_img = 720, 360
    canvas = Image.new("RGB", (W_img, H_img), WHITE)
    draw = ImageDraw.Draw(canvas)
    x0, x1, y0, y1 = 70, W_img - 30, 50, H_img - 50
    text(canvas, (10, 6), "Learned temperature tau = exp(logit_scale) during UniCL pretraining", 13)
    text(canvas, (10, 24), "unicl.Florence.scale(): starts at 1/0.07 (CLIP), clamped at 100 (Florence)", 10, GREY)
    if not pts:
        text(canvas, (x0, (y0 + y1) // 2), "no 'tau' in these metrics", 12, RED)
        return canvas
    steps, taus = zip(*pts)
    hi_step = max(max(steps), 1)
    lo_t, hi_t = min(min(taus), init), max(max(taus), init)  # the axis spans the run (and the start value)
    pad = max(0.1 * (hi_t - lo_t), 0.5)
    lo_t, hi_t = max(0.0, lo_t - pad), hi_t + pad
    draw.rectangle([x0, y0, x1, y1], outline=BLACK)

    def xy(s, t):
        return x0 + s / hi_step * (x1 - x0), y1 - (t - lo_t) / (hi_t - lo_t) * (y1 - y0)

    for ref, label in ((init, f"start 1/0.07 = {init:.1f}"), (clamp, f"clamp {clamp:.0f}")):
        if not lo_t <= ref <= hi_t:
            text(canvas, (x1 - 230, y0 - 14), f"({label}: {'above' if ref > hi_t else 'below'} this axis)", 10, GREY)
            continue
        yy = xy(0, ref)[1]
        for xx in range(x0, x1, 10):
            draw.line([xx, yy, xx + 5, yy], fill=GREY)
        text(canvas, (x1 - 110, yy - 14), label, 10, GREY)
    for frac in (0, 0.25, 0.5, 0.75, 1):
        tv, sv = lo_t + frac * (hi_t - lo_t), int(frac * hi_step)
        draw.line([x0 - 4, xy(0, tv)[1], x0, xy(0, tv)[1]], fill=BLACK)
        text(canvas, (x0 - 40, xy(0, tv)[1] - 6), f"{tv:.3g}", 10)
        text(canvas, (xy(sv, 0)[0] - 10, y1 + 6), str(sv), 10)
    text(canvas, ((x0 + x1) // 2 - 14, y1 + 24), "step", 11)
    text(canvas, (8, (y0 + y1) // 2), "tau", 11)
    line = [xy(s, t) for s, t in pts]
    if len(line) > 1:
        draw.line(line, fill=(31, 119, 180), width=2)
    draw.ellipse([line[-1][0] - 3, line[-1][1] - 3, line[-1][0] + 3, line[-1][1] + 3], fill=(31, 119, 180))
    text(canvas, (x0 + 8, y0 + 6), f"last: tau = {taus[-1]:.1f} at step {steps[-1]}", 11, (31, 119, 180))
    return canvas


# ----------------------------------------------------------------------------------------------------
# Zero-shot: where the trained image tower looks


def fig_zero_shot_attention(florence: unicl.Florence, tokenizer, images: torch.Tensor, class_names: list[str],
                            labels: torch.Tensor | None = None, tile: int = 128) -> Image.Image:
    """Held-out images, their zero-shot prediction (`unicl.zero_shot_classifier`, paper §3.1) and the attention
    of the last block of CoSwin's stages 1–3 (§2.3): each token's attention received (`attention_received`:
    Σ over the queries of its window of p(query → token), mean over heads; 1 = the average token), drawn over
    the image on one scale. Stage 1 and 2 windows are local; at 64² stage 3's 4 × 4 map is one window.
    images: (n, 3, S, S) normalised. → RGB image of (4·(tile + 8) + 80) × (50 + n·(tile + 34)) pixels.
    """
    enc = florence.image_encoder
    stages = [enc.layers[i].blocks[-1] for i in range(min(3, len(enc.layers)))]
    with eval_mode(florence), torch.no_grad():
        W = unicl.zero_shot_classifier(florence, tokenizer, class_names,
                                       context_length=florence.text_encoder.cfg.context_length).float()
        with kept_window_attention(enc, stages) as rec:
            u = florence.encode_image(images).float()
        maps = [attention_received(rec[b], b) for b in stages]
        probs = (float(florence.scale()) * u @ W).softmax(-1)
    hi = max(float(m.max()) for m in maps)
    n = len(images)
    W_img, H_img = (len(stages) + 1) * (tile + 8) + 80, 50 + n * (tile + 34)
    canvas = Image.new("RGB", (W_img, H_img), WHITE)
    text(canvas, (10, 6), "Zero-shot: held-out images, the top class, and the attention each token receives", 13)
    text(canvas, (10, 22), "last block of each stage; colour = sum over queries of p(query -> token), "
                           "mean over heads (1 = average)", 10, GREY)
    for j, b in enumerate(stages):
        Mw, s = b.window_and_shift(*rec[b]["shape"][1:3])
        text(canvas, (8 + (j + 1) * (tile + 8), 36), f"stage {j + 1}: {maps[j].shape[1]}x{maps[j].shape[2]}, "
                                                    f"M = {Mw}{', shifted' if s else ''}", 9)
    for i in range(n):
        y = 50 + i * (tile + 34)
        pic = to_pil(images[i], tile)
        canvas.paste(pic, (8, y))
        p, k = probs[i].max(-1)
        ok = labels is None or int(labels[i]) == int(k)
        text(canvas, (8, y + tile + 2), f"{class_names[int(k)]} {float(p):.0%}", 10, GREEN if ok else RED)
        if labels is not None and not ok:
            text(canvas, (8, y + tile + 16), f"true: {class_names[int(labels[i])]}", 9, GREY)
        for j, m in enumerate(maps):
            canvas.paste(overlay(pic, m[i], 0.0, hi), (8 + (j + 1) * (tile + 8), y))
    colour_bar(canvas, W_img - 64, 70, 200, 0.0, hi, "received")
    return canvas


# ----------------------------------------------------------------------------------------------------
# §2.4 Dynamic Head: hooks on the real submodules


def dyhead_trace(detector: dh.Detector, images: torch.Tensor) -> list[dict]:
    """One forward of the detector (eval, no grad) with forward hooks on each DyHeadBlock's existing
    submodules → one record per block:
        sizes   [(H_l, W_l)] of the pyramid levels (from the block's input),
        feats   [(B, C, H_l, W_l)] the block's input maps,
        offset  {l: (B, 18, H_l, W_l)} Δp of level l (torchvision layout: channel 2k = Δy, 2k+1 = Δx, k = i·3 + j),
        mask    {l: (B, 9, H_l, W_l)} Δm = sigmoid of the last 9 outputs of the 27-channel `offset` conv,
        scale   {(l, src): (B,)} the scale-attention weight π_L given to the branch of level src inside level l's
                sum (src = l−1 finer, l, l+1 coarser), matched to `conv_finer` / `conv_same` / `conv_coarser`,
        dyrelu  {l: (α¹, β¹, α², β²)} each (B, C): `DynamicReLU.coefficients` of level l's input.
    The split of the 27 channels (18 offsets, then 9 mask logits) is DyHeadBlock.spatial's."""
    blocks = [b for b in detector.modules() if isinstance(b, dh.DyHeadBlock)]
    records = [dict(sizes=[], feats=[], offset={}, mask={}, scale={}, dyrelu={}, _branch=[]) for _ in blocks]
    hooks = []

    def add(module, fn, pre=False):
        hooks.append(module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn))

    for rec, blk in zip(records, blocks):
        def inputs(m, args, rec=rec):
            rec["feats"] = [f.detach() for f in args[0]]
            rec["sizes"] = [tuple(f.shape[-2:]) for f in args[0]]

        def offset(m, args, out, rec=rec):
            lvl = rec["sizes"].index(tuple(out.shape[-2:]))
            rec["offset"][lvl], rec["mask"][lvl] = out[:, :18].detach(), out[:, 18:].sigmoid().detach()

        def branch(delta):
            def hook(m, args, out, rec=rec):
                rec["_branch"].append((out, delta))
            return hook

        def scale(m, args, out, rec=rec):
            x = args[0]
            delta = next(d for o, d in rec["_branch"] if o is x)
            lvl = rec["sizes"].index(tuple(x.shape[-2:]))
            rec["scale"][(lvl, lvl + delta)] = out.detach().flatten()

        def dyrelu(m, args, out, rec=rec):
            lvl = rec["sizes"].index(tuple(args[0].shape[-2:]))
            rec["dyrelu"][lvl] = tuple(c.detach().flatten(1) for c in m.coefficients(args[0]))

        add(blk, inputs, pre=True)
        add(blk.offset, offset)
        add(blk.conv_same, branch(0))
        add(blk.conv_finer, branch(-1))
        add(blk.conv_coarser, branch(+1))
        add(blk.scale_attn, scale)
        add(blk.task_attn, dyrelu)
    try:
        with eval_mode(detector), torch.no_grad():
            detector(images)
    finally:
        for h in hooks:
            h.remove()
    for rec in records:
        del rec["_branch"]
    return records


def sampling_points(record: dict, level: int, b: int, i: int, j: int):
    """The 3 × 3 deformable conv of `level` at output location (i, j) of image b (stride 1, padding 1, as
    `DeformConvNorm` on its own level): → (regular (9, 2), deformed (9, 2), mask (9,)), positions as (y, x) in
    that level's pixels: regular p + p_k = (i − 1 + k // 3, j − 1 + k % 3), deformed = regular + Δp_k."""
    k = torch.arange(9)
    regular = torch.stack([i - 1 + k // 3, j - 1 + k % 3], -1).float()
    off = record["offset"][level][b, :, i, j].view(9, 2).float()  # (Δy, Δx) per kernel position
    return regular, regular + off, record["mask"][level][b, :, i, j].float()


def _level_names(detector) -> list[str]:
    return [f"stride {s}" for s in detector.strides]


def fig_scale_attention(detector: dh.Detector, images: torch.Tensor, tile: int = 96) -> Image.Image:
    """Scale-aware attention π_L (DyHead eq. 3, paper §2.4) for a few images: in each block, level l's output
    is the mean of the deformable conv of levels l−1, l and l+1 (aligned to l), each weighted by
    π_L = hard_sigmoid(ReLU(f(GAP))) ∈ [0.5, 1] (the colour scale runs from 0.5 to the largest weight drawn);
    the grid shows those weights,
    row = output level l, column = source level (finer, same, coarser; grey: no such level).
    images: (n, 3, S, S). → RGB image of
    (tile + 24 + blocks·(3·34 + 70) + 60) × (76 + n·(max(tile, L·34 + 14) + 24)) pixels, L levels.
    """
    records = dyhead_trace(detector, images)
    L = len(records[0]["sizes"])
    names = _level_names(detector)
    hi = max([float(v.max()) for rec in records for v in rec["scale"].values()] + [0.5 + 1e-3])  # top of the scale
    c = 34
    n = len(images)
    row_h = max(tile, L * c + 14) + 24
    W_img = tile + 24 + len(records) * (3 * c + 70) + 60
    canvas = Image.new("RGB", (W_img, 76 + n * row_h), WHITE)
    draw = ImageDraw.Draw(canvas)
    text(canvas, (10, 6), "DyHead scale-aware attention pi_L (dynamic_head.ScaleAttention)", 13)
    text(canvas, (10, 24), "rows: output level l; columns: source l-1 (finer), l, l+1 (coarser);", 10, GREY)
    text(canvas, (10, 38), "pi_L = hard_sigmoid(relu(conv(GAP(branch)))), in [0.5, 1] after the ReLU", 10, GREY)
    for i in range(n):
        y = 76 + i * row_h
        canvas.paste(to_pil(images[i], tile), (8, y))
        for bi, rec in enumerate(records):
            x0 = tile + 24 + bi * (3 * c + 70) + 50
            if i == 0:
                text(canvas, (x0, y - 16), f"block {bi + 1}", 11)
            for col, lab in enumerate(("finer", "same", "coarser")):
                text(canvas, (x0 + col * c + 2, y), lab, 8, GREY)
            for lvl in range(L):
                text(canvas, (x0 - 48, y + 14 + lvl * c + c // 2 - 6), names[lvl], 9)
                for col, delta in enumerate((-1, 0, 1)):
                    bx, by = x0 + col * c, y + 14 + lvl * c
                    v = rec["scale"].get((lvl, lvl + delta))
                    if v is None:
                        draw.rectangle([bx, by, bx + c - 2, by + c - 2], fill=(235, 235, 235))
                        continue
                    draw.rectangle([bx, by, bx + c - 2, by + c - 2], fill=tuple(colours(float(v[i]), 0.5, hi)))
                    text(canvas, (bx + 4, by + c // 2 - 7), f"{float(v[i]):.2f}", 9,
                         WHITE if float(v[i]) < 0.5 + 0.6 * (hi - 0.5) else BLACK)
    colour_bar(canvas, W_img - 56, 80, 160, 0.5, hi, "pi_L")
    return canvas


def fig_deformable_points(detector: dh.Detector, image: torch.Tensor, point: tuple[float, float] | None = None,
                          tile: int = 192) -> Image.Image:
    """Where the spatial-aware attention samples (DyHead eq. 4, paper §2.4): for one image and one point
    (x, y) in image pixels (default: the centre), at each pyramid level (columns) and block (rows), the 3 × 3
    regular grid of a plain conv around the level's cell under the point (white rings), the deformed sampling
    positions p + p_k + Δp_k (dots, colour = modulation Δm_k ∈ [0, 1]) and a line from each regular point to
    its deformed one. Positions are the level's pixel centres ((y + ½)·stride in image pixels).
    image: (3, S, S). → RGB image of (L·(tile + 12) + 90) × (60 + blocks·(tile + 24)) pixels, L levels.
    """
    records = dyhead_trace(detector, image[None])
    S = image.shape[-1]
    px, py = point if point is not None else (S / 2, S / 2)
    L = len(records[0]["sizes"])
    W_img, H_img = L * (tile + 12) + 90, 60 + len(records) * (tile + 24)
    canvas = Image.new("RGB", (W_img, H_img), WHITE)
    text(canvas, (10, 6), "DyHead spatial-aware attention: the 9 sampling points of a modulated deformable 3x3 conv",
         13)
    text(canvas, (10, 24), "rings: regular grid p + p_k;  dots: p + p_k + dp_k (block's `offset` conv), "
                           "colour = modulation dm_k;  cross: the location", 10, GREY)
    scale = tile / S
    pic = to_pil(image, tile)
    for bi, rec in enumerate(records):
        for lvl in range(L):
            stride = detector.strides[lvl]
            Hl, Wl = rec["sizes"][lvl]
            i, j = min(int(py // stride), Hl - 1), min(int(px // stride), Wl - 1)
            regular, deformed, m = sampling_points(rec, lvl, 0, i, j)
            x0, y0 = 8 + lvl * (tile + 12), 60 + bi * (tile + 24)
            panel = pic.copy()  # drawn on its own, so points beyond the image are clipped at its border
            pd = ImageDraw.Draw(panel)
            _grid_lines(pd, 0, 0, tile, Wl, fill=(150, 150, 150))

            def at(yx):  # a level position (y, x) → panel pixels
                return (float(yx[1]) + 0.5) * stride * scale, (float(yx[0]) + 0.5) * stride * scale

            for k in range(9):
                (rx, ry), (dx, dy) = at(regular[k]), at(deformed[k])
                pd.line([rx, ry, dx, dy], fill=WHITE, width=1)
                pd.ellipse([rx - 4, ry - 4, rx + 4, ry + 4], outline=WHITE, width=1)
                pd.ellipse([dx - 4, dy - 4, dx + 4, dy + 4], fill=tuple(colours(float(m[k]), 0.0, 1.0)),
                           outline=BLACK)
            cx, cy = at(torch.tensor([i, j]))
            pd.line([cx - 6, cy, cx + 6, cy], fill=RED, width=2)
            pd.line([cx, cy - 6, cx, cy + 6], fill=RED, width=2)
            canvas.paste(panel, (x0, y0))
            shift = float((deformed - regular).norm(dim=1).mean())
            text(canvas, (x0, y0 + tile + 2), f"block {bi + 1}, stride {stride}: mean |dp| = {shift:.2f} "
                                              f"level px", 9)
    colour_bar(canvas, W_img - 64, 80, 160, 0.0, 1.0, "dm_k")
    return canvas


def names_short(detector, lvl: int) -> str:
    return f"{lvl} (stride {detector.strides[lvl]})"


def fig_dyrelu(detector: dh.Detector, images: torch.Tensor, channels: int = 4) -> Image.Image:
    """Task-aware attention (DyHead eq. 5, paper §2.4): the dynamic ReLU y_c = max(α¹_c x + β¹_c, α²_c x + β²_c)
    whose slopes a hyper-network reads off the pooled features (`DynamicReLU.coefficients`, ReLU = (1, 0)).
    Top: for image 0, every block and level, the slopes' departure from ReLU, α¹ − 1 and α², per channel (one
    column each). Bottom: the functions of the `channels` channels whose slopes depart most, one curve per
    level, x ∈ [−3, 3], ReLU dashed. images: (n, 3, S, S). → RGB image of max(220 + 6·C, 40 + 170·channels) ×
    (250 + blocks·(16·L + 30)) pixels, C channels, L levels.
    """
    records = dyhead_trace(detector, images[:1])
    L = len(records[0]["sizes"])
    C = records[0]["dyrelu"][0][0].shape[1]
    cw, rh = 6, 8
    block_h = L * 2 * rh + 30
    W_img = max(150 + cw * C + 70, 40 + channels * 170)
    H_img = 60 + len(records) * block_h + 190
    canvas = Image.new("RGB", (W_img, H_img), WHITE)
    draw = ImageDraw.Draw(canvas)
    text(canvas, (10, 6), "DyHead task-aware attention: dynamic ReLU max(a1 x + b1, a2 x + b2) per channel "
                          "(dynamic_head.DynamicReLU)", 13)
    text(canvas, (10, 24), "slopes' departure from ReLU (a1 = 1, a2 = 0), image 0; one column per channel", 10, GREY)
    dev = []
    lim = max(max(float((rec["dyrelu"][lvl][0][0] - 1).abs().max()), float(rec["dyrelu"][lvl][2][0].abs().max()))
              for rec in records for lvl in range(L))
    lim = max(lim, 1e-3)  # one symmetric scale for every row: the largest departure drawn
    for bi, rec in enumerate(records):
        y = 50 + bi * block_h
        text(canvas, (10, y), f"block {bi + 1}", 11)
        for lvl in range(L):
            a1, b1, a2, b2 = (t[0] for t in rec["dyrelu"][lvl])
            for r, (vals, lab) in enumerate(((a1 - 1, "a1 - 1"), (a2, "a2"))):
                yy = y + 16 + (2 * lvl + r) * rh
                text(canvas, (20, yy - 3), f"{names_short(detector, lvl)} {lab}", 8, GREY)
                canvas.paste(heat(vals[None], (cw * C, rh - 1), -lim, lim, DIVERGING), (150, yy))
            dev.append(((a1 - 1).abs() + a2.abs()))
    colour_bar(canvas, W_img - 56, 70, 120, -lim, lim, "slope", DIVERGING, fmt="{:.2g}")
    text(canvas, (150, 50 + len(records) * block_h - 12), f"channel 0 .. {C - 1} ->", 9, GREY)
    # curves of the last block for the channels that depart most from ReLU
    top = torch.stack(dev[-L:]).sum(0).topk(min(channels, C)).indices.tolist()
    last = records[-1]["dyrelu"]
    xs = torch.linspace(-3, 3, 61)
    y0 = 60 + len(records) * block_h
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for n_, ch in enumerate(top):
        x0, w, h = 40 + n_ * 170, 150, 130
        draw.rectangle([x0, y0 + 20, x0 + w, y0 + 20 + h], outline=BLACK)
        text(canvas, (x0, y0 + 4), f"last block, channel {ch}", 10)

        def to_xy(x, yv):
            return x0 + (x + 3) / 6 * w, y0 + 20 + h / 2 - yv / 6 * h

        draw.line([to_xy(-3, 0), to_xy(3, 0)], fill=LIGHT)
        draw.line([to_xy(0, -3), to_xy(0, 3)], fill=LIGHT)
        relu = [to_xy(float(x), max(float(x), 0.0)) for x in xs]
        for a, bpt in zip(relu[::2], relu[1::2]):
            draw.line([a, bpt], fill=GREY)
        for lvl in range(L):
            a1, b1, a2, b2 = (t[0, ch] for t in last[lvl])
            ys = torch.maximum(a1 * xs + b1, a2 * xs + b2).clamp(-3, 3)
            draw.line([to_xy(float(x), float(v)) for x, v in zip(xs, ys)], fill=palette[lvl % len(palette)], width=2)
            text(canvas, (x0 + 4, y0 + 24 + 12 * lvl), f"level {lvl}", 9, palette[lvl % len(palette)])
        text(canvas, (x0 + w - 58, y0 + 24 + h - 14), "x in [-3, 3]", 8, GREY)
    return canvas


# ----------------------------------------------------------------------------------------------------
# §2.5 METER: what a question word looks at


def question_words(tokenizer, ids: list[int]) -> list[tuple[str, list[int]]]:
    """Token positions of a tokenised text grouped into its words: a word starts at a token that begins with a
    space (the BPE keeps a word's leading space, `text_encoder._SPLIT`), or after punctuation; special tokens and
    punctuation-only tokens are left out. → [(word, [positions])]."""
    specials = {tokenizer.pad_id, tokenizer.sot_id, tokenizer.eot_id}
    words: list[tuple[str, list[int]]] = []
    new_word = True
    for p, t in enumerate(ids):
        if t in specials:
            new_word = True
            continue
        piece = tokenizer.decode([t])
        if not any(ch.isalnum() for ch in piece):
            new_word = True  # punctuation (or a bare space) ends a word and is not drawn
            continue
        if new_word or piece[:1].isspace() or not words:
            words.append((piece.strip(), [p]))
        else:
            words[-1] = (words[-1][0] + piece, words[-1][1] + [p])
        new_word = False
    return words


def fig_meter_cross_attention(model: meter.METER, tokenizer, images: torch.Tensor, questions: list[str],
                              answers: list[str] | None = None, truths: list[str] | None = None, layer: int = -1,
                              words: int = 10, tile: int = 88) -> Image.Image:
    """Text-to-image cross-attention of METER's co-attention (paper §2.5): for each held-out question (rows),
    the image, then for each of its first `words` words the attention of that word (queries of the text stream
    in co-attention layer `layer`) over the image tokens (keys), mean over heads, drawn over the image
    (`meter.Attention.keep_attn`). A word the tokenizer splits into several tokens is drawn as the mean of its
    tokens' maps (`question_words`). One colour scale, from the smallest to the largest probability drawn
    (uniform attention would be 1/N everywhere). With several image levels the last level's tokens are drawn.
    With `answers` (the VQA vocabulary) the model's answer follows the question, green when it equals
    `truths[i]`. images: (n, 3, S, S). → RGB image of ((words + 1)·(tile + 6) + 80) × (50 + n·(tile + 34)).
    """
    attn_mod = model.text_layers[layer].cross_attn
    ctx = model.text_encoder.cfg.context_length
    tokens = tokenizer(questions, ctx, trim=True)
    with eval_mode(model), torch.no_grad():
        sizes = [tuple(m.shape[-2:]) for m in model.image_encoder.forward_features(images[:1])]
        attn_mod.keep_attn = True
        try:
            out = model(images, tokens)
            attn = attn_mod.last_attn.float().mean(1)  # (n, L text, N image tokens)
        finally:
            attn_mod.keep_attn, attn_mod.last_attn = False, None
    level_sizes = [sizes[i] for i in model.levels]
    h, w = level_sizes[-1]
    start = sum(a * b for a, b in level_sizes[:-1])
    attn = attn[..., start:start + h * w]
    n = len(images)
    rows = [[(word, attn[i, pos].mean(0).view(h, w)) for word, pos in question_words(tokenizer, tokens[i].tolist())]
            [:words] for i in range(n)]
    maps = [m for r in rows for _, m in r]
    lo = min((float(m.min()) for m in maps), default=0.0)
    hi = max(max((float(m.max()) for m in maps), default=1.0), lo + 1e-6)
    W_img, H_img = (words + 1) * (tile + 6) + 80, 50 + n * (tile + 34)
    canvas = Image.new("RGB", (W_img, H_img), WHITE)
    text(canvas, (10, 6), f"METER cross-attention: each question word (query) over the {h}x{w} image tokens "
                          "(keys)", 13)
    text(canvas, (10, 22), f"text stream, co-attention layer {layer % len(model.text_layers) + 1} of "
                           f"{len(model.text_layers)}, mean over heads; colour = attention probability "
                           f"(uniform = 1/{h * w} = {1 / (h * w):.3f})", 10, GREY)
    for i in range(n):
        y = 40 + i * (tile + 34)
        pic = to_pil(images[i], tile)
        canvas.paste(pic, (6, y + 12))
        q = questions[i] if len(questions[i]) < 90 else questions[i][:88] + ".."
        text(canvas, (6, y), q, 10)
        if answers is not None and "vqa" in out:
            said = answers[int(out["vqa"][i].argmax())]
            ok = truths is None or said == truths[i]
            x_ans = 16 + int(ImageDraw.Draw(canvas).textlength(q, font=font(10)))
            text(canvas, (x_ans, y), f"model: {said}" + ("" if ok else f" (true: {truths[i]})"), 10,
                 GREEN if ok else RED)
        for k, (word, m) in enumerate(rows[i]):
            x = 6 + (k + 1) * (tile + 6)
            canvas.paste(overlay(pic, m, lo, hi), (x, y + 12))
            text(canvas, (x, y + tile + 14), f"'{word}'", 10)
    colour_bar(canvas, W_img - 62, 70, 180, lo, hi, "p", fmt="{:.3f}")
    return canvas


# ----------------------------------------------------------------------------------------------------
# §2.6 Video CoSwin: static clips and attention across frames


def fig_static_clip(image_encoder: coswin.CoSwin, image: torch.Tensor, num_frames: int = 8, temporal_kernel: int = 2,
                    tile: int = 80) -> Image.Image:
    """Inflation (paper §2.6): the image CoSwin and `VideoCoSwin.from_image_model` of it on a static clip
    (`num_frames` copies of `image`). For each stage (rows): the image model's map, then the video model's map at
    each of its time steps (at most 4 drawn), as the per-token feature norm ‖f‖ on the row's scale, and the
    largest |video − image| over every time step and channel. image: (3, S, S).
    → RGB image of (5·(tile + 8) + 300) × (60 + stages·(tile + 20)) pixels.
    """
    video = video_coswin.VideoCoSwin.from_image_model(image_encoder, temporal_kernel)
    clip = image[None, :, None].expand(1, -1, num_frames, -1, -1).contiguous()
    with eval_mode(image_encoder), eval_mode(video), torch.no_grad():
        maps2d = image_encoder.forward_features(image[None])
        maps3d = video.forward_features(clip)
    n = len(maps2d)
    W_img, H_img = 5 * (tile + 8) + 300, 60 + n * (tile + 20)
    canvas = Image.new("RGB", (W_img, H_img), WHITE)
    text(canvas, (10, 6), f"Inflation: a static clip ({num_frames} copies of one image) through Video CoSwin = the "
                          "image model", 13)
    text(canvas, (10, 22), "video_coswin.VideoCoSwin.from_image_model: W_3D = W_2D / K_t, bias tables repeated in "
                           "time; colour = feature norm per token", 10, GREY)
    text(canvas, (8, 40), "image CoSwin", 10)
    for t in range(4):
        text(canvas, (8 + (t + 1) * (tile + 8), 40), f"video, t = {t}", 10)
    for i, (m2, m3) in enumerate(zip(maps2d, maps3d)):
        y = 56 + i * (tile + 20)
        norm2 = m2[0].norm(dim=0)
        norm3 = m3[0].norm(dim=0)  # (T_i, H_i, W_i)
        lo, hi = float(min(norm2.min(), norm3.min())), float(max(norm2.max(), norm3.max()))
        canvas.paste(heat(norm2, (tile, tile), lo, hi), (8, y))
        for t in range(min(4, norm3.shape[0])):
            canvas.paste(heat(norm3[t], (tile, tile), lo, hi), (8 + (t + 1) * (tile + 8), y))
        diff = float((m3 - m2[:, :, None]).abs().max())
        text(canvas, (5 * (tile + 8) + 10, y + 8), f"stage {i + 1}: {m3.shape[2]} time step(s), "
                                                 f"{m2.shape[-2]}x{m2.shape[-1]} tokens", 10)
        text(canvas, (5 * (tile + 8) + 10, y + 24), f"max |video - image| = {diff:.1e}", 10,
             GREEN if diff < 1e-4 else RED)
        text(canvas, (5 * (tile + 8) + 10, y + 40), f"norm from {lo:.2g} to {hi:.2g}", 9, GREY)
    colour_bar(canvas, W_img - 70, 76, 120, 0.0, 1.0, "norm: row min..max")
    return canvas


def _temporal_kernel_spread(encoder: video_coswin.VideoCoSwin) -> float:
    """max over the 3D convs with K_t > 1 of ‖W[:, :, t] − mean_t W‖ / ‖W‖: 0 while every temporal offset of
    every kernel is the same (W_2D / K_t), the state that makes the model blind to frame order."""
    out = 0.0
    for m in encoder.modules():
        if isinstance(m, torch.nn.Conv3d) and m.weight.shape[2] > 1:
            w = m.weight.detach()
            out = max(out, float((w - w.mean(2, keepdim=True)).norm() / w.norm().clamp(min=1e-12)))
    return out


def _order_gap(encoder, clip: torch.Tensor) -> float:
    """‖f(clip) − f(reversed clip)‖ / ‖f(clip)‖ of the pooled features."""
    with eval_mode(encoder), torch.no_grad():
        a, b = encoder(clip), encoder(clip.flip(2))
    return float((a - b).norm() / a.norm().clamp(min=1e-12))


def fig_frame_attention(before: video_coswin.VideoCoSwin, after: video_coswin.VideoCoSwin, clip: torch.Tensor,
                        cell: int = 44, before_label: str = "before: freshly inflated",
                        after_label: str = "after: trained on clips") -> Image.Image:
    """Attention across frames (paper §2.6) before and after training the video model: for every block of the
    stages whose map still has more than one time step, the T × T matrix of `frame_attention` (row t: where the
    queries at time step t send their attention, over the key time steps; rows sum to 1) of the clip(s)
    `clip` (B, 3, T, H, W). Beside each model: how different the temporal offsets of its 3D kernels are
    (`_temporal_kernel_spread`, 0 after inflation) and how different its pooled features are for the clip and
    the clip played backwards (0: blind to frame order).
    → RGB image of (220 + k·(T1·cell + 24) + 70) × (80 + 2·(T1·cell + 70)) pixels, k blocks drawn, T1 the most
    time steps of any of them.
    """
    models = [(before_label, before), (after_label, after)]
    mats = []
    for _, enc in models:
        blocks = _stage_blocks(enc)
        with eval_mode(enc), torch.no_grad(), kept_window_attention(enc, [b for _, b in blocks]) as rec:
            enc.forward_features(clip)
        mats.append([(name, frame_attention(rec[b], b), b.window_and_shift(*rec[b]["shape"][1:4]))
                     for name, b in blocks if rec[b]["shape"][1] > 1])  # blocks whose map has > 1 time step
    k = max(len(m) for m in mats)
    T1 = max(mat.shape[0] for m in mats for _, mat, _ in m)
    side = T1 * cell
    W_img, H_img = 220 + k * (side + 24) + 70, 80 + 2 * (side + 70)
    canvas = Image.new("RGB", (W_img, H_img), WHITE)
    draw = ImageDraw.Draw(canvas)
    text(canvas, (10, 6), "Video CoSwin: attention across frames (time steps of the token map), before and after "
                          "training", 13)
    text(canvas, (10, 22), "row t = queries at time step t; column = key time step; value = share of their attention "
                           "(mean over tokens, heads, clips)", 10, GREY)
    for r, ((label, enc), rows) in enumerate(zip(models, mats)):
        y = 60 + r * (side + 70)
        text(canvas, (10, y + 14), label, 11)
        text(canvas, (10, y + 34), f"temporal kernels differ: {_temporal_kernel_spread(enc):.3f}", 10)
        text(canvas, (10, y + 50), f"f(clip) vs f(reversed): {_order_gap(enc, clip):.3f}", 10)
        text(canvas, (10, y + 66), "(0 = blind to frame order)", 9, GREY)
        for c, (name, mat, (ws, shift)) in enumerate(rows):
            x = 220 + c * (side + 24)
            T = mat.shape[0]
            canvas.paste(heat(mat, (T * cell, T * cell), 0.0, 1.0), (x, y + 14))
            draw.rectangle([x - 1, y + 13, x + T * cell, y + 14 + T * cell], outline=GREY)
            for a in range(T):
                for b in range(T):
                    v = float(mat[a, b])
                    text(canvas, (x + b * cell + 3, y + 14 + a * cell + cell // 2 - 6), f"{v:.3f}", 9,
                         WHITE if v < 0.6 else BLACK)
            text(canvas, (x, y), name, 10)
            text(canvas, (x, y + 16 + T * cell), f"window {ws[0]}x{ws[1]}x{ws[2]}, shift {shift[0]}", 9, GREY)
    colour_bar(canvas, W_img - 58, 90, 160, 0.0, 1.0, "share")
    return canvas


# ----------------------------------------------------------------------------------------------------
# The command: every figure from the default runs' checkpoints

DEFAULT_RUNS = {  # run folder (train.py's default name <task>-toy) → the command that makes it
    "pretrain": ("pretrain-toy", "python train.py"),
    "detect": ("detect-toy", "python train.py --task detect --init_from runs/pretrain-toy/ckpt.pt"),
    "vqa": ("vqa-toy", "python train.py --task vqa --init_from runs/pretrain-toy/ckpt.pt"),
    "video": ("video-toy", "python train.py --task video --init_from runs/pretrain-toy/ckpt.pt"),
}


def load_run(runs: str, task: str):
    """(model with its weights, checkpoint dict, run config dict) of a default run, or None (with one sentence
    naming the command to run first) when its checkpoint is missing."""
    from tasks import TASKS
    from tasks.base import load_checkpoint

    folder, command = DEFAULT_RUNS[task]
    path = os.path.join(runs, folder, "ckpt.pt")
    if not os.path.isfile(path):
        print(f"figures.py: {path} is missing; run `{command}` first to draw its figures.")
        return None
    ckpt = load_checkpoint(path)
    model = TASKS[task].rebuild(ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt, json.loads(ckpt.get("config", "{}"))


def _held_out(task: str, cfg: dict, n: int, **kw):
    import data

    size = cfg.get("img_size") or 64
    ds = data.build_dataset("synthetic", split="val", img_size=size, task=task, seed=cfg.get("seed", 0), **kw)
    return [ds[i] for i in range(n)]


def _unicl_batch(n: int = 12, seed: int = 0) -> list[str]:
    """A stage-1 training batch of ShapesText with repeated keys: the first n texts of the training set after
    the prompt augmentation of tasks/pretrain.py, keeping the samples whose key repeats first."""
    import random

    import data

    ds = data.ShapesText("train", img_size=64, seed=seed)
    texts = [ds.scene(i)["text"] for i in range(64)]
    texts = [unicl.augment_short_caption(t, random.Random(hash((seed, 0, unicl.caption_key(t)))))[0] for t in texts]
    keys = unicl.batch_labels(texts).tolist()
    rep = [i for i in range(len(texts)) if keys.count(keys[i]) > 1]
    chosen = sorted((rep[: n * 2 // 3] + [i for i in range(len(texts)) if i not in rep])[:n])
    return [texts[i] for i in chosen]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Draw the walkthrough's figures from the default runs' checkpoints.")
    ap.add_argument("--runs", default="runs", help="the folder of pretrain-toy/, detect-toy/, vqa-toy/, video-toy/")
    ap.add_argument("--out", default=os.path.join("docs", "figures"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    torch.manual_seed(0)
    written = []

    def put(name, img):
        written.append(save_png(img, os.path.join(args.out, name)))

    import data

    # no checkpoint needed: the mask, the windows on a held-out image, the UniCL targets
    shapes = data.ShapesText("val", img_size=64, seed=0)
    put("coswin_shift_mask.png", fig_shift_mask(16, 16, 4, 2))
    put("coswin_windows.png", fig_window_partition(shapes[0]["image"], M=4, stride=4))
    put("unicl_targets.png", fig_unicl_targets(_unicl_batch()))

    pre = load_run(args.runs, "pretrain")
    if pre is not None:
        florence, ckpt, cfg = pre
        from tasks.base import tokenizer_from_state

        tok = tokenizer_from_state(ckpt["task"])
        put("coswin_bias_tables.png", fig_bias_tables(florence.image_encoder))
        with open(os.path.join(args.runs, DEFAULT_RUNS["pretrain"][0], "metrics.jsonl")) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        put("unicl_temperature.png", fig_temperature(rows))
        held = _held_out("pretrain", cfg, 6)
        put("zeroshot_attention.png", fig_zero_shot_attention(florence, tok, torch.stack([s["image"] for s in held]),
                                                              list(shapes.classes),
                                                              torch.tensor([s["label"] for s in held])))
        put("video_static_clip.png", fig_static_clip(florence.image_encoder, held[0]["image"]))

    det = load_run(args.runs, "detect")
    if det is not None:
        detector, _, cfg = det
        held = _held_out("detect", cfg, 4)
        images = torch.stack([s["image"] for s in held])
        put("dyhead_scale_attention.png", fig_scale_attention(detector, images))
        boxes = held[0]["boxes"]
        big = int(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).argmax())
        centre = (float(boxes[big, 0] + boxes[big, 2]) / 2, float(boxes[big, 1] + boxes[big, 3]) / 2)
        put("dyhead_deformable_points.png", fig_deformable_points(detector, images[0], centre))
        put("dyhead_dyrelu.png", fig_dyrelu(detector, images))

    vqa = load_run(args.runs, "vqa")
    if vqa is not None:
        model, ckpt, cfg = vqa
        from tasks.base import tokenizer_from_state

        tok = tokenizer_from_state(ckpt["task"])
        cfg = dict(cfg, img_size=cfg.get("img_size") or 128)
        held = _held_out("vqa", cfg, 4)
        put("meter_cross_attention.png", fig_meter_cross_attention(
            model, tok, torch.stack([s["image"] for s in held]), [s["question"] for s in held],
            ckpt["task"].get("answers"), [s.get("answer") for s in held]))

    vid = load_run(args.runs, "video")
    if vid is not None and pre is not None:
        classifier, ckpt, cfg = vid
        a = ckpt["model_args"]
        clips = torch.stack([s["video"] for s in _held_out("video", cfg, 8, num_frames=cfg.get("num_frames", 8))])
        before = video_coswin.VideoCoSwin.from_image_model(pre[0].image_encoder, a["temporal_kernel"])
        label = ("before: inflated from pretrain-toy" if a.get("inflated") else
                 "before: pretrain-toy inflated (the run started from scratch)")
        put("video_frame_attention.png", fig_frame_attention(before, classifier.encoder, clips, before_label=label))
    elif vid is not None:
        print("figures.py: the frame-attention figure starts from the pretraining tower; run `python train.py` first.")

    for p in written:
        print(f"  {p}  ({os.path.getsize(p) // 1024} KB)")
    print(f"figures.py: {len(written)} figures in {args.out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
