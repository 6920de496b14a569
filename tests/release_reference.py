"""Forward computations of a released Sa2VA's parts written directly from its raw tensors (release
names, fused projections as stored), following the release's own module code: InternViT's block,
InternVL's projector, the Qwen2 / InternLM2 decoder, text_hidden_fcs and SAM2's mask decoder; and
the release's image inference (predict_forward) end to end: InternVL's dynamic tiling, the prompt,
the [SEG] state, the language-prompted SAM2 call and the mask at the image's size. The import tests
compare the imported hsft model against these."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


def _lin(x: Tensor, t: dict, name: str, bias: bool = True) -> Tensor:
    return F.linear(x, t[name + ".weight"], t.get(name + ".bias") if bias else None)


def _ln(x: Tensor, t: dict, name: str, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], t[name + ".weight"], t[name + ".bias"], eps)


def vision_block(x: Tensor, t: dict, layer: int, heads: int) -> Tensor:
    """InternViT encoder layer: x + ls1 * attn(norm1(x)); x + ls2 * mlp(norm2(x)); fused qkv."""
    p = f"vision_model.encoder.layers.{layer}."
    b, n, c = x.shape
    h = _ln(x, t, p + "norm1", 1e-6)
    qkv = _lin(h, t, p + "attn.qkv").reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = _lin((attn @ v).transpose(1, 2).reshape(b, n, c), t, p + "attn.proj")
    x = x + t[p + "ls1"] * out
    h = _ln(x, t, p + "norm2", 1e-6)
    return x + t[p + "ls2"] * _lin(F.gelu(_lin(h, t, p + "mlp.fc1")), t, p + "mlp.fc2")


def projector(x: Tensor, t: dict) -> Tensor:
    """mlp1: LayerNorm -> Linear -> GELU -> Linear."""
    return _lin(F.gelu(_lin(_ln(x, t, "mlp1.0", 1e-5), t, "mlp1.1")), t, "mlp1.3")


def _rms(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: Tensor, theta: float) -> Tensor:
    """Rotary embedding (rotate-half form) on (B, heads, L, d), positions 0..L-1."""
    d, length = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
    return x * emb.cos() + half * emb.sin()


def token_embeddings(ids: Tensor, t: dict, family: str) -> Tensor:
    m = "language_model.model."
    return t[m + ("embed_tokens.weight" if family == "qwen2" else "tok_embeddings.weight")][ids]


def llm_hidden(ids: Tensor, t: dict, family: str, *, layers: int, heads: int, kv_heads: int,
               theta: float = 10000.0) -> Tensor:
    """Last-layer hidden states after the final norm, causal, positions 0..L-1."""
    return llm_hidden_from_embeddings(token_embeddings(ids, t, family), t, family, layers=layers, heads=heads,
                                      kv_heads=kv_heads, theta=theta)


def llm_hidden_from_embeddings(x: Tensor, t: dict, family: str, *, layers: int, heads: int, kv_heads: int,
                               theta: float = 10000.0) -> Tensor:
    """llm_hidden on given input embeddings (B, L, hidden)."""
    m = "language_model.model."
    b, length, hidden = x.shape
    d = hidden // heads
    groups = heads // kv_heads
    causal = torch.full((length, length), float("-inf")).triu(1)
    for i in range(layers):
        p = f"{m}layers.{i}."
        if family == "qwen2":
            h = _rms(x, t[p + "input_layernorm.weight"])
            q = _lin(h, t, p + "self_attn.q_proj").view(b, length, heads, d)
            k = _lin(h, t, p + "self_attn.k_proj").view(b, length, kv_heads, d)
            v = _lin(h, t, p + "self_attn.v_proj").view(b, length, kv_heads, d)
        else:
            # InternLM2: wqkv rows grouped per key/value head: [groups query heads, key, value]
            h = _rms(x, t[p + "attention_norm.weight"])
            qkv = F.linear(h, t[p + "attention.wqkv.weight"]).view(b, length, kv_heads, groups + 2, d)
            q = qkv[..., :groups, :].reshape(b, length, heads, d)
            k, v = qkv[..., -2, :], qkv[..., -1, :]
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        q, k = _rope(q, theta), _rope(k, theta)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(d) + causal).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, length, hidden)
        wo = t[p + ("self_attn.o_proj.weight" if family == "qwen2" else "attention.wo.weight")]
        x = x + F.linear(out, wo)
        if family == "qwen2":
            h = _rms(x, t[p + "post_attention_layernorm.weight"])
            gate, up, down = (t[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        else:
            h = _rms(x, t[p + "ffn_norm.weight"])
            gate, up, down = (t[p + f"feed_forward.{n}.weight"] for n in ("w1", "w3", "w2"))
        x = x + F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), down)
    return _rms(x, t[m + "norm.weight"])


def text_hidden_fcs(x: Tensor, t: dict) -> Tensor:
    """The release's projection: Linear(h, h) -> ReLU -> Linear(h, 256) (-> Dropout(0))."""
    return _lin(F.relu(_lin(x, t, "text_hidden_fcs.0")), t, "text_hidden_fcs.2")


S = "grounding_encoder.sam2_model."


def _sam_attention(q: Tensor, k: Tensor, v: Tensor, t: dict, name: str, heads: int) -> Tensor:
    q, k, v = _lin(q, t, name + ".q_proj"), _lin(k, t, name + ".k_proj"), _lin(v, t, name + ".v_proj")
    b, nq, inner = q.shape

    def split(z):
        return z.reshape(b, z.shape[1], heads, inner // heads).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    attn = (q @ k.transpose(-2, -1) / math.sqrt(inner // heads)).softmax(dim=-1)
    return _lin((attn @ v).transpose(1, 2).reshape(b, nq, inner), t, name + ".out_proj")


def _mlp(x: Tensor, t: dict, name: str, layers: int) -> Tensor:
    for i in range(layers):
        x = _lin(x, t, f"{name}.layers.{i}")
        if i < layers - 1:
            x = F.relu(x)
    return x


def _ln2d(x: Tensor, t: dict, name: str) -> Tensor:
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + 1e-6)
    return t[name + ".weight"][:, None, None] * x + t[name + ".bias"][:, None, None]


def dense_positional(t: dict, h: int, w: int) -> Tensor:
    """SAM's random-Fourier positional encoding of the (h, w) grid: (C, h, w)."""
    gaussian = t[S + "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    coords = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
    coords = (2 * coords - 1) @ gaussian * (2 * math.pi)
    return torch.cat([coords.sin(), coords.cos()], dim=-1).permute(2, 0, 1)


def sam2_masks(image_embedding: Tensor, feat_s0: Tensor, feat_s1: Tensor, prompt: Tensor, t: dict, heads: int
               ) -> tuple[Tensor, Tensor]:
    """(B, h, w) low-res mask of the release's language-prompted SAM2 call: no points (two
    not-a-point tokens) + the prompt appended, multimask output, best predicted IoU. No object-score
    gate: Sa2VA's SAM2 (its _forward_sam_heads) leaves SAM2's masking of object-less images
    commented out, so the object score only feeds the object pointer. image_embedding already holds
    the no-memory embedding; feat_s0/s1 are conv_s0/s1 outputs. Returns the masks and the (B,)
    object scores."""
    dec = S + "sam_mask_decoder."
    b, c, h, w = image_embedding.shape
    no_point = t[S + "sam_prompt_encoder.not_a_point_embed.weight"]
    sparse = torch.cat([no_point.expand(b, 2, c), prompt[:, None, :]], dim=1)
    output_tokens = torch.cat([t[dec + "obj_score_token.weight"], t[dec + "iou_token.weight"],
                               t[dec + "mask_tokens.weight"]], dim=0)
    tokens = torch.cat([output_tokens[None].expand(b, -1, -1), sparse], dim=1)
    src = image_embedding + t[S + "sam_prompt_encoder.no_mask_embed.weight"].reshape(1, c, 1, 1)
    pos = dense_positional(t, h, w)[None].expand(b, -1, -1, -1)
    keys = src.flatten(2).transpose(1, 2)
    key_pe = pos.flatten(2).transpose(1, 2)
    queries = tokens
    for i in range(2):
        p = f"{dec}transformer.layers.{i}."
        if i == 0:  # the first layer skips the query positional encoding in self-attention
            queries = _sam_attention(queries, queries, queries, t, p + "self_attn", heads)
        else:
            q = queries + tokens
            queries = queries + _sam_attention(q, q, queries, t, p + "self_attn", heads)
        queries = _ln(queries, t, p + "norm1", 1e-5)
        queries = queries + _sam_attention(queries + tokens, keys + key_pe, keys, t, p + "cross_attn_token_to_image",
                                           heads)
        queries = _ln(queries, t, p + "norm2", 1e-5)
        queries = _ln(queries + _mlp(queries, t, p + "mlp", 2), t, p + "norm3", 1e-5)
        keys = keys + _sam_attention(keys + key_pe, queries + tokens, queries, t, p + "cross_attn_image_to_token",
                                     heads)
        keys = _ln(keys, t, p + "norm4", 1e-5)
    queries = queries + _sam_attention(queries + tokens, keys + key_pe, keys, t,
                                       dec + "transformer.final_attn_token_to_image", heads)
    queries = _ln(queries, t, dec + "transformer.norm_final_attn", 1e-5)
    src = keys.transpose(1, 2).reshape(b, c, h, w)
    up = F.conv_transpose2d(src, t[dec + "output_upscaling.0.weight"], t[dec + "output_upscaling.0.bias"], stride=2)
    up = F.gelu(_ln2d(up + feat_s1, t, dec + "output_upscaling.1"))
    up = F.conv_transpose2d(up, t[dec + "output_upscaling.3.weight"], t[dec + "output_upscaling.3.bias"], stride=2)
    up = F.gelu(up + feat_s0)
    hyper = torch.stack([_mlp(queries[:, 2 + i], t, f"{dec}output_hypernetworks_mlps.{i}", 3) for i in range(4)], 1)
    masks = (hyper @ up.flatten(2)).reshape(b, 4, up.shape[-2], up.shape[-1])
    iou = _mlp(queries[:, 1], t, dec + "iou_prediction_head", 3)
    object_score = _mlp(queries[:, 0], t, dec + "pred_obj_score_head", 3)
    best = iou[:, 1:].argmax(dim=-1)
    return masks[:, 1:][torch.arange(b), best], object_score[:, 0]


def video_resolution(low_res: Tensor, size: int) -> Tensor:
    """(B, size, size): the low-res masks as the release's SAM2 video predictor returns them, at its
    input size (its video_height / video_width), bilinear, align_corners=False."""
    return F.interpolate(low_res[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]


# ---------------------------------------------------------------- the release's image inference

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# SAM2's input: the release's SAM2.preprocess_image makes its mean / std tensors in its dtype
# argument's default, bfloat16, which predict_forward keeps.
SAM2_MEAN = tuple(float(torch.tensor(v, dtype=torch.bfloat16)) for v in IMAGENET_MEAN)
SAM2_STD = tuple(float(torch.tensor(v, dtype=torch.bfloat16)) for v in IMAGENET_STD)


def release_grid(width: int, height: int, min_num: int, max_num: int, size: int) -> tuple[int, int]:
    """(columns, rows) as InternVL's dynamic_preprocess picks them: one pass over the grids i x j with
    min_num <= i * j <= max_num in order of tile count, keeping the closest aspect ratio seen so far
    and moving to an equally close later grid when the image's area exceeds half that grid's area."""
    grids = sorted(((i, j) for i in range(1, max_num + 1) for j in range(1, max_num + 1)
                    if min_num <= i * j <= max_num), key=lambda g: (g[0] * g[1], g[0]))
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for i, j in grids:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * size * size * i * j:
            best = (i, j)
    return best


def release_tiles(image: Image.Image, min_num: int, max_num: int, size: int, thumbnail: bool) -> list[Image.Image]:
    """The tiles of dynamic_preprocess: the image resized (PIL's default, bicubic) to the grid, cropped
    left to right, top to bottom, then the whole image as one more tile when there are several."""
    columns, rows = release_grid(image.width, image.height, min_num, max_num, size)
    resized = image.resize((columns * size, rows * size))
    tiles = []
    for k in range(columns * rows):
        left, top = (k % columns) * size, (k // columns) * size
        tiles.append(resized.crop((left, top, left + size, top + size)))
    if thumbnail and len(tiles) > 1:
        tiles.append(image.resize((size, size)))
    return tiles


def to_normalised(image: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Tensor:
    """ToTensor + Normalize (ImageNet by default): (3, H, W) float32."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def vision_features(pixels: Tensor, t: dict, *, layers: int, heads: int, patch: int) -> Tensor:
    """(tiles, tokens, llm width): InternViT's last layer without its class token, InternVL's pixel
    shuffle (each 2 x 2 block of patches -> one token, channels ordered (0,0), (0,1), (1,0), (1,1) by
    (row, column) offset), then mlp1."""
    e = "vision_model.embeddings."
    x = F.conv2d(pixels, t[e + "patch_embedding.weight"], t[e + "patch_embedding.bias"], stride=patch)
    n, c, rows, columns = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([t[e + "class_embedding"].expand(n, 1, c), x], dim=1) + t[e + "position_embedding"]
    for layer in range(layers):
        x = vision_block(x, t, layer, heads)
    grid = x[:, 1:].reshape(n, rows, columns, c)
    shuffled = torch.cat([grid[:, 0::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 0::2], grid[:, 1::2, 1::2]], dim=-1)
    return projector(shuffled.reshape(n, -1, 4 * c), t)


@dataclass
class ReleasePrediction:
    num_tiles: int
    seg_hidden: Tensor  # (llm width,) last-layer state where [SEG] is the input token
    prompt_embedding: Tensor  # (sam width,) text_hidden_fcs of it
    low_res: Tensor  # (h, w) SAM2 mask logits
    video_res: Tensor  # (S, S) the same at SAM2's input size, as its video predictor returns them
    mask: Tensor  # (H, W) bool at the image's size


def predict_forward(image: np.ndarray, instruction: str, answer_ids: list[int], t: dict, tokenizer, *, family: str,
                    sizes, theta: float, tiling: tuple[int, int, bool], sam_features, bos: bool = False
                    ) -> ReleasePrediction:
    """The release's predict_forward for one (H, W, 3) uint8 image, in float32, with the answer it
    generated given as `answer_ids` (generation is greedy, and the state at the [SEG] step is the
    state of the whole sequence up to [SEG]).

    The text: <image> in the instruction replaced by <img> + tiles x tokens-per-tile <IMG_CONTEXT> +
    </img>, in the chat template's user turn. SAM2 reads the image resized (PIL bicubic) to its input
    size and normalised with the ImageNet constants rounded to bfloat16 (SAM2_MEAN / SAM2_STD);
    `sam_features(pixels)` stands in for SAM2's Hiera image encoder and FPN neck (the levels,
    highest resolution first), which tiling does not touch. The [SEG]
    state goes through text_hidden_fcs and prompts the mask decoder with no points; the mask is
    sigmoid > 0.5 of the low-res logits bilinearly resized to SAM2's input size (the video
    predictor's output) and from there to (H, W)."""
    picture = Image.fromarray(image)
    min_num, max_num, thumbnail = tiling
    tiles = release_tiles(picture, min_num, max_num, sizes.image, thumbnail)
    pixels = torch.stack([to_normalised(tile) for tile in tiles])
    features = vision_features(pixels, t, layers=sizes.vision_layers, heads=sizes.vision_heads, patch=sizes.patch)
    per_tile = features.shape[1]
    image_text = "<img>" + "<IMG_CONTEXT>" * (per_tile * len(tiles)) + "</img>"
    text = instruction.replace("<image>", image_text)
    prompt = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    seg_id = tokenizer.convert_tokens_to_ids("[SEG]")
    answer = answer_ids[: answer_ids.index(seg_id) + 1]
    start = [tokenizer.bos_token_id] if bos else []  # the InternLM2 tokenizer's encode adds BOS
    ids = torch.tensor(start + tokenizer.encode(prompt, add_special_tokens=False) + answer)
    x = token_embeddings(ids[None], t, family)
    image_rows = (ids == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")).nonzero().flatten()
    assert image_rows.numel() == features.shape[0] * per_tile
    x[0, image_rows] = features.reshape(-1, features.shape[-1])
    hidden = llm_hidden_from_embeddings(x, t, family, layers=sizes.llm_layers, heads=sizes.heads,
                                        kv_heads=sizes.kv_heads, theta=theta)[0, -1]
    prompt_embedding = text_hidden_fcs(hidden, t)

    sam_input = to_normalised(picture.resize((sizes.sam_image, sizes.sam_image)), SAM2_MEAN, SAM2_STD)[None]
    levels = list(sam_features(sam_input))
    dec = S + "sam_mask_decoder."
    feat_s0 = F.conv2d(levels[0], t[dec + "conv_s0.weight"], t[dec + "conv_s0.bias"])
    feat_s1 = F.conv2d(levels[1], t[dec + "conv_s1.weight"], t[dec + "conv_s1.bias"])
    embedding = levels[2] + t[S + "no_mem_embed"].reshape(1, -1, 1, 1)
    low_res, _ = sam2_masks(embedding, feat_s0, feat_s1, prompt_embedding[None], t, sizes.decoder_heads)
    video_res = video_resolution(low_res, sizes.sam_image)
    height, width = image.shape[:2]
    full = F.interpolate(video_res[:, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    return ReleasePrediction(len(tiles), hidden, prompt_embedding, low_res[0], video_res[0], full.sigmoid() > 0.5)
