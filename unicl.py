"""Unified image-text-label contrastive learning (UniCL) and the Florence two-tower model.

Paper: Florence (arXiv 2111.11432) §2.2 "Unified Image-Text Contrastive Learning", §2.3 (the towers) and
§2.7 (gradient cache). With an image encoder f_θ, a text encoder f_φ and a learnable temperature τ
(a multiplier, stored as log τ):

    u_i = f_θ(x_i) / ‖f_θ(x_i)‖,   v_j = f_φ(t_j) / ‖f_φ(t_j)‖,   y_i = key of caption t_i (or of a class)
    P(i) = {k ∈ B : y_k = y_i}
    L_i2t = − Σ_{i∈B} 1/|P(i)| Σ_{k∈P(i)} log( exp(τ u_iᵀ v_k) / Σ_{j∈B} exp(τ u_iᵀ v_j) )
    L_t2i = − Σ_{j∈B} 1/|Q(j)| Σ_{k∈Q(j)} log( exp(τ u_kᵀ v_j) / Σ_{i∈B} exp(τ u_iᵀ v_j) ),  Q(j) = {k : y_k = y_j}
    L = L_i2t + L_t2i      (each sum taken as a mean over the batch rows, as CLIP and UniCL do)

When every key is distinct this is CLIP's symmetric cross-entropy times 2 (CLIP averages the directions,
the paper adds them). Under data parallelism B is the global batch (see `unicl_loss`).

Contents, in data-flow order: hash keys (`caption_key`, `class_key`, `batch_labels`) → prompt templates
and short-caption augmentation (stage 1 wraps short texts; stage 2 drops them) → `unicl_loss` with its
autograd-aware all-gather → `Florence` (towers, projections, τ) and its presets (`FlorenceConfig`,
`build`, `from_model_args`: the arguments a checkpoint stores to rebuild the model) → gradient cache →
zero-shot / retrieval evaluation.

Followed (read, then written anew): microsoft/UniCL model/model.py and main.py (target matrix from
labels), openai/CLIP clip/model.py (projections, logit_scale, init), mlfoundations/open_clip
src/open_clip/loss.py (gathering with gradients), luyug/GradCache src/grad_cache/grad_cache.py and
context_managers.py (chunked re-forward, RandContext).
"""
from __future__ import annotations

import functools
import hashlib
import math
import re
import unicodedata
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# Hash-key labels y
# --------------------------------------------------------------------------------------------------
# A key is a non-negative int64, i.e. 63 bits. Bit 62 tags the space: 0 for captions (the low 62 bits are
# a BLAKE2b digest of the normalised caption), 1 for classes. The two spaces are therefore disjoint by
# construction. With 62-bit digests, n distinct captions hold at least one colliding pair with probability
# ≈ n²/2⁶³: 1.0e-5 for FLD-900M's 9.7M unique queries; even if all of its 900M − 350M/2 ≈ 725M
# pairs had distinct captions, 0.06. A collision matters only when both captions meet in one batch,
# where it merges two negatives into positives.
CLASS_TAG = 1 << 62
_DIGEST_MASK = CLASS_TAG - 1


def normalize_caption(text: str) -> str:
    """Unicode NFC, lower case, whitespace runs collapsed to one space, stripped."""
    if not isinstance(text, str):
        raise ValueError(f"a caption must be a str, got {type(text).__name__}")
    return " ".join(unicodedata.normalize("NFC", text).lower().split())


def _digest62(text: str, person: bytes) -> int:
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=person)
    return int.from_bytes(h.digest(), "big") & _DIGEST_MASK


@functools.lru_cache(maxsize=1 << 16)  # pure, and called for every caption of every step
def caption_key(text: str) -> int:
    """Stable key of a caption: equal for captions equal after `normalize_caption`, on every process and
    every run (never Python's salted `hash`). In [0, 2⁶²)."""
    norm = normalize_caption(text)
    if not norm:
        raise ValueError(f"caption {text!r} is empty after normalisation; drop or fix this sample")
    return _digest62(norm, b"florence-captn")


def class_key(class_id: int | str) -> int:
    """Key of an image-label class, in [2⁶², 2⁶³), disjoint from every caption key.

    An int class id maps to CLASS_TAG | id (ids of different datasets must be offset by the caller);
    a str class name maps to a tagged digest of the normalised name (so "Dog" in two datasets agree).
    """
    if isinstance(class_id, bool):
        raise ValueError("class_id must be an int or a class name, not a bool")
    if isinstance(class_id, int):
        if not 0 <= class_id < CLASS_TAG:
            raise ValueError(f"class_id must be in [0, 2**62), got {class_id}")
        return CLASS_TAG | class_id
    norm = normalize_caption(class_id)
    if not norm:
        raise ValueError(f"class name {class_id!r} is empty after normalisation")
    return CLASS_TAG | _digest62(norm, b"florence-class")


def is_class_key(key: int) -> bool:
    return bool(key & CLASS_TAG)


@functools.lru_cache(maxsize=1 << 16)  # a pure function of the string; captions repeat across steps
def text_key(text: str) -> int:
    """The key y of a text in a batch (paper §2.2: identical texts share a key). A text that is one of the
    prompt TEMPLATES around a short caption ("a photo of a red circle.") takes the key of that short caption
    ("red circle"): stage 1 wraps short captions in random templates and keeps their key, so a natural
    caption that reads exactly like such a prompt must have the same key, or the two identical strings
    would be each other's negatives. Every other text: caption_key(text)."""
    core = template_core(text)
    return caption_key(core if core is not None else text)


def template_core(text: str) -> str | None:
    """"A photo of a Red circle." → "red circle" when the text is a TEMPLATES prompt (final period optional)
    around a short caption; None otherwise."""
    norm = normalize_caption(text).rstrip(".").rstrip()
    for pattern in _TEMPLATE_PATTERNS:
        m = pattern.fullmatch(norm)
        if m and is_short_caption(m.group(1)):
            return m.group(1)
    return None


def batch_labels(items, device=None) -> torch.Tensor:
    """Captions (str → text_key) and/or ready keys (int, e.g. from class_key) → LongTensor (B,)."""
    if isinstance(items, torch.Tensor):
        if items.dim() != 1 or items.numel() == 0:
            raise ValueError(f"keys must be a non-empty 1-D tensor, got shape {tuple(items.shape)}")
        return items.to(device=device, dtype=torch.long)
    items = list(items)
    if not items:
        raise ValueError("empty caption list: a batch needs at least one caption or key")
    keys = []
    for x in items:
        if isinstance(x, str):
            keys.append(text_key(x))
        elif isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2 ** 63:
            keys.append(x)
        else:
            raise ValueError(f"batch_labels takes captions (str) or keys (int in [0, 2**63)), got {x!r}")
    return torch.tensor(keys, dtype=torch.long, device=device)


# --------------------------------------------------------------------------------------------------
# Prompt templates and short-caption augmentation (paper §2.2: stage 1 wraps short texts; stage 2 drops them)
# --------------------------------------------------------------------------------------------------
TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "an image of the {}.",
    "a close-up photo of a {}.",
    "a blurry photo of the {}.",
    "a cropped photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of a {}.",
    "a drawing of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "there is a {} in the scene.",
)


_TEMPLATE_PATTERNS = [re.compile(re.escape(normalize_caption(t).rstrip(".")).replace(r"\{\}", "(.+)")) for t in TEMPLATES]


def is_short_caption(text: str, max_words: int = 2) -> bool:
    """The one rule for "short" (paper §2.2): one or two words. Stage 1 wraps these texts in a template;
    stage 2 drops them (`keep_in_stage2`), whatever the data source."""
    return 0 < len(text.split()) <= max_words


def keep_in_stage2(text: str) -> bool:
    """Stage 2 trains on natural captions only: every text stage 1 would have wrapped in a template goes."""
    return not is_short_caption(text)


def augment_short_caption(text: str, rng, templates=TEMPLATES, max_words: int = 2):
    """Stage 1: a text of one or two words becomes a random template around it.

    rng: a `random.Random` or a `numpy.random.Generator`. Returns (text, was_augmented).
    """
    if not is_short_caption(text, max_words):
        return text, False
    n = len(templates)
    i = int(rng.integers(n)) if hasattr(rng, "integers") else rng.randrange(n)
    return templates[i].format(" ".join(text.split())), True


# --------------------------------------------------------------------------------------------------
# The UniCL loss, with an autograd-aware all-gather
# --------------------------------------------------------------------------------------------------


def _distributed(gather: bool) -> bool:
    return gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_sizes(n: int, device) -> list[int]:
    local = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return [int(s) for s in sizes]


def _all_gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """(sizes[rank], ...) on each rank → (Σ sizes, ...) identical on every rank (no autograd)."""
    padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all-gather rows. Backward: every rank's loss depends on every rank's rows, so the
    gradient of a rank's own rows is the SUM over ranks of d loss_r / d rows: all-reduce, then slice."""

    @staticmethod
    def forward(ctx, x, sizes):
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return _all_gather_rows(x, sizes)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None


def _soft_cross_entropy(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Per row: − 1/|P(i)| Σ_{k∈P(i)} log softmax(logits_i)_k. logits, positive: (b, N) → (b,)."""
    target = positive.to(logits.dtype)
    target = target / target.sum(dim=1, keepdim=True)
    return -(target * logits.log_softmax(dim=1)).sum(dim=1)


def unicl_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, keys: torch.Tensor, logit_scale,
               *, gather: bool = True) -> torch.Tensor:
    """L = L_i2t + L_t2i (module docstring) on L2-normalised u = image_emb, v = text_emb: (b, D).

    keys: (b,) long; keys[i] == keys[j] means i, j are positives. logit_scale: τ itself (e.g. the third
    output of Florence.forward), a float or 0-d tensor, NOT its log. Computed in at least float32.

    Single process: returns the mean over the b rows of (l_i2t + l_t2i).
    Distributed (torch.distributed initialised, world size W > 1, gather=True): embeddings (with
    gradients) and keys are gathered from all ranks into the global batch of N rows; each rank computes
    its own b rows against all N columns, in both directions, and returns
        (sum of its rows' l_i2t + l_t2i) / (N / W)
    (= the mean over its rows when every rank has the same b). The mean of these values over ranks is the
    global-batch loss, and the gradient that reaches each rank's own embeddings is that of the SUM of all
    ranks' returned losses; DDP's gradient averaging (÷W) therefore yields exactly the gradients of one
    process holding the global batch. Without DDP, average the gradients over ranks yourself.
    All ranks must call this (and backward) together.
    """
    for name, e in (("image_emb", image_emb), ("text_emb", text_emb)):
        if e.dim() != 2:
            raise ValueError(f"{name} must be (B, D), got shape {tuple(e.shape)}")
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} "
                         f"must have the same shape (B, D)")
    if not isinstance(keys, torch.Tensor) or keys.dim() != 1:
        shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
        raise ValueError(f"keys must be a 1-D tensor of B labels (see batch_labels), got {shape}")
    if keys.shape[0] != image_emb.shape[0]:
        raise ValueError(f"{image_emb.shape[0]} embeddings but {keys.shape[0]} keys: one key per pair")
    if image_emb.shape[0] == 0:
        raise ValueError("empty batch: unicl_loss needs at least one image-text pair")

    dtype = torch.promote_types(image_emb.dtype, torch.float32)  # fp32 (or fp64) for the softmax
    u, v = image_emb.to(dtype), text_emb.to(dtype)
    keys = keys.to(device=u.device, dtype=torch.long)
    no_autocast = torch.autocast(u.device.type, enabled=False) if u.device.type in ("cpu", "cuda") \
        else nullcontext()
    with no_autocast:  # the logits and their softmax stay in fp32 under mixed precision (paper §2.7)
        distributed = _distributed(gather)
        if distributed:
            world = dist.get_world_size()
            sizes = _gather_sizes(u.shape[0], u.device)
            u_all = _GatherWithGrad.apply(u, sizes)  # (N, D)
            v_all = _GatherWithGrad.apply(v, sizes)
            keys_all = _all_gather_rows(keys, sizes)  # (N,)
            norm = sum(sizes) / world
        else:
            u_all, v_all, keys_all, norm = u, v, keys, u.shape[0]
        positive = keys[:, None] == keys_all[None, :]  # (b, N): P(i) for local rows i
        scale = torch.as_tensor(logit_scale, dtype=dtype, device=u.device)
        logits = scale * u @ v_all.T  # (b, N) rows: images, columns: texts
        l_i2t = _soft_cross_entropy(logits, positive)  # (b,)
        if distributed:  # rows: this rank's texts, columns: all images
            l_t2i = _soft_cross_entropy(scale * v @ u_all.T, positive)
        else:  # one process: τ v uᵀ is the transpose of τ u vᵀ, and P is symmetric (no second matmul)
            l_t2i = _soft_cross_entropy(logits.T, positive)
        return (l_i2t + l_t2i).sum() / norm


# --------------------------------------------------------------------------------------------------
# Florence: the two towers, projections into the joint space, temperature
# --------------------------------------------------------------------------------------------------


class Florence(nn.Module):
    """Two towers with bias-free linear projections into a D-dimensional joint space.

    image_encoder: (B, 3, H, W) → (B, num_features), e.g. coswin.CoSwin; text_encoder: tokens (B, L) →
    (B, num_features), e.g. text_encoder.TextEncoder. `logit_scale` is log τ, initialised at log(1/0.07)
    as CLIP; the τ used is exp(min(logit_scale, log 100)) (Florence/CLIP clamp; the public UniCL code does
    not). Call `clamp_logit_scale_()` after each optimiser step to keep the parameter itself in range.
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int = 512,
                 init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.embed_dim = embed_dim
        self.image_proj = nn.Linear(image_encoder.num_features, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_encoder.num_features, embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=image_encoder.num_features ** -0.5)  # CLIP's scale
        nn.init.normal_(self.text_proj.weight, std=text_encoder.num_features ** -0.5)
        self.max_logit_scale = math.log(max_scale)
        # shape (1,), not 0-d: FSDP2's fully_shard cannot shard scalar parameters
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) → u: (B, D), ‖u‖ = 1
        return F.normalize(self.image_proj(self.image_encoder(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, L) → v: (B, D), ‖v‖ = 1
        return F.normalize(self.text_proj(self.text_encoder(tokens)), dim=-1)

    def scale(self) -> torch.Tensor:
        """τ = exp(logit_scale) with the exponent clamped at log(100); 0-d, differentiable below it."""
        return self.logit_scale.clamp(max=self.max_logit_scale).exp().squeeze(0)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        self.logit_scale.clamp_(0.0, self.max_logit_scale)

    def forward(self, images, tokens):
        """→ (u: (B, D), v: (B, D), τ: 0-d) — pass them to unicl_loss(u, v, keys, τ)."""
        return self.encode_image(images), self.encode_text(tokens), self.scale()


@dataclass
class FlorenceConfig:
    """What rebuilds a Florence model: the two towers' presets with their overrides and the joint width.

    `asdict(cfg)` is the `model_args` a checkpoint stores (nanoGPT's pattern); `from_model_args` rebuilds
    the model from it, and every adapter builds on that model. `img_size` is the resolution the preset
    pretrains at (the data side; no weight depends on it)."""
    image: str = "tiny"  # coswin preset (the image tower f_θ)
    text: str = "clip_base"  # text_encoder preset (the text tower f_φ)
    embed_dim: int = 512  # D, the joint space both towers project into
    vocab_size: int = 49408  # rows of the text tower's token embedding (the tokenizer's size)
    img_size: int = 224
    image_overrides: dict = field(default_factory=dict)  # CoSwinConfig fields, e.g. window_size, drop_path_rate
    text_overrides: dict = field(default_factory=dict)  # TextConfig fields


PRESETS: dict[str, FlorenceConfig] = {
    # toy: CoSwin-nano + the 2-layer text tower at 64², the CPU pretraining of `python train.py`
    "toy": FlorenceConfig(image="nano", text="toy", embed_dim=128, vocab_size=1024, img_size=64),
    "tiny": FlorenceConfig(image="tiny", text="clip_base", embed_dim=512, vocab_size=49408),
    "base": FlorenceConfig(image="base", text="clip_base", embed_dim=512, vocab_size=49408),
    # the paper's 893M: CoSwin-H (637M) + the 256M text tower, joint dim 1024
    "florence": FlorenceConfig(image="huge", text="florence", embed_dim=1024, vocab_size=102400),
}


def config(name: str, **overrides) -> FlorenceConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown Florence preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def build_from_config(cfg: FlorenceConfig, grad_checkpointing: bool = False) -> Florence:
    """The towers in data-flow order (image, then text, then the projections: the order fixes the RNG draws
    of the initial weights). `grad_checkpointing` is a run setting, not part of the model's arguments."""
    import coswin
    import text_encoder

    image = coswin.build(cfg.image, grad_checkpointing=grad_checkpointing, **cfg.image_overrides)
    text = text_encoder.build(cfg.text, vocab_size=cfg.vocab_size, grad_checkpointing=grad_checkpointing,
                              **cfg.text_overrides)
    return Florence(image, text, embed_dim=cfg.embed_dim)


def build(name: str = "toy", **overrides) -> Florence:
    """`build("toy", vocab_size=tokenizer.vocab_size)` → a Florence model of that preset, fresh weights."""
    return build_from_config(config(name, **overrides))


def model_args(cfg: FlorenceConfig) -> dict:
    return asdict(cfg)


def from_model_args(args: dict, grad_checkpointing: bool = False) -> Florence:
    """A checkpoint's `model_args` → the Florence model it was trained as (fresh weights: load them next)."""
    names = {f for f in FlorenceConfig.__dataclass_fields__}
    unknown = sorted(set(args) - names)
    if unknown:
        raise ValueError(f"model_args hold unknown field(s) {unknown}; the fields are {sorted(names)}")
    return build_from_config(FlorenceConfig(**args), grad_checkpointing=grad_checkpointing)


# --------------------------------------------------------------------------------------------------
# Gradient cache (paper §2.7; Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
# Memory Limited Setup")
# --------------------------------------------------------------------------------------------------


class _RngState:
    """The CPU (and, for CUDA inputs, that device's) generator state before a chunk's first forward,
    so that its re-forward draws the same dropout / drop-path masks (luyug/GradCache's RandContext)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):  # the outer RNG stream is left untouched
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def gradcache_step(model, images: torch.Tensor, tokens: torch.Tensor, keys: torch.Tensor, chunk: int,
                   loss_fn=unicl_loss) -> torch.Tensor:
    """One contrastive forward/backward over a batch too large for memory; returns the loss (detached).

    1. Without grad, encode the images and the texts chunk by chunk (`chunk` rows each), saving each
       chunk's RNG state: u (B, D), v (B, D) are cached, no activations are kept.
    2. loss = loss_fn(u, v, keys, model.scale()) on the cached embeddings as leaves; backward gives
       ∂loss/∂u, ∂loss/∂v, and accumulates ∂loss/∂logit_scale into its .grad.
    3. For each chunk, replay its RNG state, re-encode it with grad and back-propagate the cached
       ∂loss/∂u (resp. ∂loss/∂v) slice into the towers.
    The parameter .grad then equals that of loss_fn(model(images, tokens)...).backward() on the whole
    batch (with the same dropout masks), while activation memory grows with `chunk`, not B.

    `model` needs `encode_image`, `encode_text` and `scale()` (Florence). Distributed: loss_fn gathers
    the cached embeddings, so every rank must run the same number of chunks; the caller wraps the towers
    for DDP/FSDP and handles gradient synchronisation (e.g. `no_sync()` for all but the last backward).
    Chunked forwards see chunk-sized batches, so BatchNorm statistics would differ (our towers use LN).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
    if images.shape[0] != tokens.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {tokens.shape[0]} token rows")
    image_chunks, token_chunks = images.split(chunk), tokens.split(chunk)

    # 1. no-grad forwards, remembering each chunk's RNG state
    image_rng, text_rng, u, v = [], [], [], []
    with torch.no_grad():
        for x in image_chunks:
            image_rng.append(_RngState(x.device))
            u.append(model.encode_image(x))
        for t in token_chunks:
            text_rng.append(_RngState(t.device))
            v.append(model.encode_text(t))
    u = torch.cat(u).detach().requires_grad_()  # (B, D)
    v = torch.cat(v).detach().requires_grad_()

    # 2. the loss on the cached embeddings
    loss = loss_fn(u, v, keys, model.scale())
    loss.backward()  # → u.grad, v.grad and logit_scale.grad

    # 3. re-forward each chunk with grad and push the cached embedding gradients through it
    for x, rng, g in zip(image_chunks, image_rng, u.grad.split(chunk)):
        with rng.replay():
            model.encode_image(x).backward(g)
    for t, rng, g in zip(token_chunks, text_rng, v.grad.split(chunk)):
        with rng.replay():
            model.encode_text(t).backward(g)
    return loss.detach()


# --------------------------------------------------------------------------------------------------
# Evaluation: zero-shot classification, top-k accuracy, retrieval recall
# --------------------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def zero_shot_classifier(model, tokenizer, class_names, templates=TEMPLATES, context_length: int | None = None,
                         batch_size: int = 256) -> torch.Tensor:
    """Class weights W: (D, K). Column k = normalise(mean over templates of v(template.format(name_k))).

    Logits of images are τ · u @ W (B, K). Runs in eval mode without grad and restores the mode.
    context_length defaults to the text encoder's (cfg.context_length), else 77.
    """
    class_names, templates = list(class_names), list(templates)
    if not class_names or not templates:
        raise ValueError("zero_shot_classifier needs at least one class name and one template")
    if context_length is None:
        cfg = getattr(getattr(model, "text_encoder", None), "cfg", None)
        context_length = getattr(cfg, "context_length", 77)
    device = next(model.parameters()).device
    texts = [t.format(name) for name in class_names for t in templates]  # class-major: (K·T,)
    with _eval_mode(model):
        v = torch.cat([model.encode_text(tokenizer(texts[i: i + batch_size], context_length).to(device))
                       for i in range(0, len(texts), batch_size)])  # (K·T, D), unit rows
        v = v.view(len(class_names), len(templates), -1).mean(dim=1)  # (K, D) template average
        return F.normalize(v, dim=-1).T.contiguous()  # (D, K)


def accuracy(logits: torch.Tensor, targets: torch.Tensor, topk=(1, 5)) -> list[float]:
    """Fraction of rows whose target is among the k largest logits, for each k (k is capped at K)."""
    if logits.dim() != 2 or targets.dim() != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"logits must be (B, K) and targets (B,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    top = logits.topk(min(max(topk), logits.shape[1]), dim=1).indices  # (B, kmax)
    hit = top == targets[:, None]
    return [hit[:, : min(k, logits.shape[1])].any(dim=1).float().mean().item() for k in topk]


def retrieval_recall(img_emb: torch.Tensor, txt_emb: torch.Tensor, txt_to_img: torch.Tensor,
                     ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k in both directions when an image may have several captions.

    img_emb (N_i, D), txt_emb (N_t, D), txt_to_img (N_t,) long: the image of each caption.
    text→image: a caption is a hit when its image is among its k most similar images.
    image→text: an image is a hit when ANY of its captions is among its k most similar captions.
    Ties count in the query's favour (rank = number of strictly better candidates). Every image needs
    at least one caption. Returns fractions {"i2t_r1": ..., "t2i_r1": ..., ...}.
    """
    n_img = img_emb.shape[0]
    if txt_to_img.dim() != 1 or txt_to_img.shape[0] != txt_emb.shape[0]:
        raise ValueError(f"txt_to_img must be (N_t,) = ({txt_emb.shape[0]},), got {tuple(txt_to_img.shape)}")
    txt_to_img = txt_to_img.to(img_emb.device).long()
    if len(txt_to_img) and (txt_to_img.min() < 0 or txt_to_img.max() >= n_img):
        raise ValueError(f"txt_to_img must index the {n_img} images")
    captioned = torch.zeros(n_img, dtype=torch.bool, device=img_emb.device)
    captioned[txt_to_img] = True
    if not bool(captioned.all()):
        raise ValueError(f"{int((~captioned).sum())} image(s) have no caption; drop them before retrieval")
    sim = img_emb.float() @ txt_emb.float().T  # (N_i, N_t)
    positive = txt_to_img[None, :] == torch.arange(n_img, device=sim.device)[:, None]  # (N_i, N_t)
    # image → text: rank of the best-scoring correct caption
    best = sim.masked_fill(~positive, -math.inf).max(dim=1, keepdim=True).values  # (N_i, 1)
    rank_i2t = (sim > best).sum(dim=1)  # (N_i,)
    # text → image: rank of the correct image
    own = sim.gather(0, txt_to_img[None, :])  # (1, N_t)
    rank_t2i = (sim > own).sum(dim=0)  # (N_t,)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = (rank_i2t < k).float().mean().item()
        out[f"t2i_r{k}"] = (rank_t2i < k).float().mean().item()
    return out


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor | None = None,
                 eval_y: torch.Tensor | None = None, l2=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1), val_frac: float = 0.2,
                 seed: int = 0, max_iter: int = 500, num_classes: int | None = None) -> dict:
    """Linear probe: multinomial logistic regression on frozen features (Florence §3.2. The
    protocol is CLIP's, Radford et al. 2021 appendix A.3: L-BFGS, the L2 strength swept on a validation
    split; theirs is scikit-learn's, this one is written in torch).

    train_x (N, C), train_y (N,) long in [0, K); eval_x (M, C), eval_y (M,) optional.
      1. Features are standardised with the training mean and std (L-BFGS converges in far fewer steps).
      2. For each λ in `l2`: W (C, K), b (K,) from zero, full-batch L-BFGS (strong Wolfe line search) on
         mean cross-entropy + λ/2 · ‖W‖² (b not penalised), fitted on the training rows outside a random
         `val_frac` share (seeded by `seed`), scored by top-1 on that share.
      3. The best λ (ties → the stronger λ) is refitted on every training row; top-1/5 on the evaluation set.
    Deterministic for a seed (zero init, full batch, float64). Returns {"weight": (K, C), "bias": (K,)
    acting on *raw* features (logits = x @ weight.T + bias), "l2": the λ chosen, "val_top1": {λ: top-1},
    "train_loss": the refitted objective, "top1", "top5" (when eval data is given)}."""
    if train_x.dim() != 2 or train_y.dim() != 1 or len(train_x) != len(train_y):
        raise ValueError(f"linear_probe needs train_x (N, C) and train_y (N,), got {tuple(train_x.shape)} and "
                         f"{tuple(train_y.shape)}")
    if (eval_x is None) != (eval_y is None) or (eval_x is not None and (eval_x.dim() != 2 or len(eval_x) != len(eval_y)
                                                                       or eval_x.shape[1] != train_x.shape[1])):
        raise ValueError("linear_probe needs eval_x (M, C) with the training feature width and eval_y (M,), or neither")
    l2 = sorted((float(v) for v in l2), reverse=True)  # strongest first: ties keep the stronger λ
    if not l2 or min(l2) < 0:
        raise ValueError(f"linear_probe needs at least one L2 strength ≥ 0, got {l2}")
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"val_frac must be in (0, 1), got {val_frac}")
    x = train_x.detach().double().cpu()
    y = train_y.detach().long().cpu()
    K = int(num_classes or int(y.max()) + 1)
    if y.min() < 0 or y.max() >= K:
        raise ValueError(f"train_y must hold class indices in [0, {K}), got [{int(y.min())}, {int(y.max())}]")
    n_val = int(round(len(x) * val_frac))
    if n_val < 1 or len(x) - n_val < 1:
        raise ValueError(f"linear_probe needs rows for both fitting and validation; {len(x)} training rows with "
                         f"val_frac {val_frac} leave none for one of them")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std

    def fit(zx, zy, lam):
        W = torch.zeros(zx.shape[1], K, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(K, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                                tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def objective():
            opt.zero_grad()
            loss = F.cross_entropy(zx @ W + b, zy) + 0.5 * lam * (W * W).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(objective)
            final = float(objective().detach())
        return W.detach(), b.detach(), final

    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))
    val, fit_rows = perm[:n_val], perm[n_val:]
    val_top1 = {}
    for lam in l2:
        W, b, _ = fit(z[fit_rows], y[fit_rows], lam)
        val_top1[lam] = ((z[val] @ W + b).argmax(1) == y[val]).double().mean().item()
    best = max(l2, key=lambda lam: val_top1[lam])  # max keeps the first (strongest) of equal scores
    W, b, final = fit(z, y, best)
    weight = (W / std[:, None]).T.contiguous()  # (K, C): fold the standardisation into raw-feature weights
    bias = b - (mean / std) @ W
    out = {"weight": weight.float(), "bias": bias.float(), "l2": best, "val_top1": val_top1, "train_loss": final}
    if eval_x is not None:
        logits = eval_x.detach().double().cpu() @ weight.T + bias
        out["top1"], out["top5"] = accuracy(logits, eval_y.detach().long().cpu(), topk=(1, 5))
    return out
