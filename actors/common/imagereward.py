"""ImageReward (THUDM/ImageReward, Xu et al. 2023) on transformers 5, from its own checkpoint files.

The image-reward 1.5 package does not import on transformers 5 (its BLIP `med.py` imports helpers that
transformers 5 removed from `transformers.modeling_utils`), so this loads `ImageReward.pt` + `med_config.json`
into transformers' BLIP classes instead. The mapping is exact, so no module of our own is needed:
  blip.visual_encoder (BLIP's timm-style ViT: pre-norm blocks, fused qkv with bias, GELU, LayerNorm eps 1e-6)
      -> BlipVisionModel, keys renamed as transformers' BLIP conversion script renames them;
  blip.text_encoder (BLIP's med.py BertModel: no token types, cross-attention in every layer, no pooler)
      -> BlipTextModel(add_pooling_layer=False), same key names (BlipTextModel is a port of med.py);
  mlp.layers (768 -> 1024 -> 128 -> 64 -> 16 -> 1, linear, dropouts between) -> the same nn.Sequential.
`score` as ImageReward.score: the prompt tokenised by BERT (bert-base-uncased + [DEC] as bos and [ENC] as an
additional special token, padded to 35 tokens; the [CLS] token is kept, `score` does not swap in [ENC]), the image
resized (shorter side 224, bicubic), centre-cropped to 224, CLIP-normalised; the text encoder cross-attends to
all image tokens; the first token's state goes through the MLP, then (x - 0.16717...) / 1.03333....
"""
from __future__ import annotations

import json
import re
from pathlib import Path

HUB_REPO = "THUDM/ImageReward"
HUB_NAMES = {"ImageReward-v1.0": HUB_REPO}     # ImageReward.load's names -> hub repo
CHECKPOINT, MED_CONFIG = "ImageReward.pt", "med_config.json"
TOKENIZER = "bert-base-uncased"                # ImageReward's BLIP builds its tokenizer from this at run time
MEAN, STD = 0.16717362830052426, 1.0333394966054072   # ImageReward's reward normalisation
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE, TEXT_LENGTH = 224, 35
VIT_LARGE_HEADS = 16       # ImageReward builds BLIP with vit='large'; heads are not recorded in the weights
# Saved by BLIP_Pretrain but not used by `score` (contrastive projections; a buffer older transformers saved).
UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")
_VIT = [(r"cls_token$", "embeddings.class_embedding"), (r"pos_embed$", "embeddings.position_embedding"),
        (r"patch_embed\.proj\.", "embeddings.patch_embedding."),
        (r"blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
        (r"blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
        (r"blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
        (r"blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
        (r"blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."), (r"^norm\.", "post_layernorm.")]


def resolve(model: str) -> tuple[Path, Path, str]:
    """(checkpoint, med_config, tokenizer) for a folder, a checkpoint file with med_config.json beside it, or a hub
    name/repo ("ImageReward-v1.0", "THUDM/ImageReward", fetched with huggingface_hub: real clusters only)."""
    path = Path(model)
    if path.is_dir() or path.is_file():
        folder = path if path.is_dir() else path.parent
        ckpt = path if path.is_file() else folder / CHECKPOINT
        for f in (ckpt, folder / MED_CONFIG):
            if not f.is_file():
                raise FileNotFoundError(f"ImageReward model {model}: {f.name} not found in {folder}")
        has_tok = any((folder / f).is_file() for f in ("vocab.txt", "tokenizer.json"))
        return ckpt, folder / MED_CONFIG, str(folder) if has_tok else TOKENIZER
    repo = HUB_NAMES.get(model, model)
    if repo != HUB_REPO:
        raise FileNotFoundError(f"ImageReward model {model!r}: not a folder, nor one of "
                                f"{', '.join([*HUB_NAMES, HUB_REPO])}")
    from huggingface_hub import hf_hub_download
    return (Path(hf_hub_download(repo, CHECKPOINT)), Path(hf_hub_download(repo, MED_CONFIG)), TOKENIZER)


def map_keys(state: dict) -> dict:
    """ImageReward's state-dict keys -> ours (vision.*, text.*, mlp.*); unknown keys are an error, not dropped."""
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith(UNUSED):
            continue
        if key.startswith("blip.visual_encoder."):
            new = key[len("blip.visual_encoder."):]
            for pat, rep in _VIT:
                new, n = re.subn(pat, rep, new)
                if n:
                    out["vision." + new] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            out["text." + key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp.layers."):
            out["mlp." + key[len("mlp.layers."):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"ImageReward checkpoint: unexpected keys {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    return out


def preprocess(image):
    """ImageReward's torchvision transform in PIL: Resize(224, bicubic) on the shorter side, CenterCrop(224),
    RGB, to [0, 1], CLIP mean/std. Same arithmetic as torchvision on PIL images (size rounding included)."""
    import numpy as np
    import torch
    from PIL import Image
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(IMAGE_SIZE * long / short)
    size = (IMAGE_SIZE, new_long) if w <= h else (new_long, IMAGE_SIZE)
    if (w, h) != size:
        image = image.resize(size, Image.BICUBIC)
    w, h = image.size
    top, left = int(round((h - IMAGE_SIZE) / 2.0)), int(round((w - IMAGE_SIZE) / 2.0))
    image = image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE)).convert("RGB")
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    return (x - torch.tensor(PIXEL_MEAN)[:, None, None]) / torch.tensor(PIXEL_STD)[:, None, None]


def sizes(state: dict) -> dict:
    """The ViT's and the MLP's sizes, read off mapped weights (med_config.json only describes the text encoder)."""
    patch = state["vision.embeddings.patch_embedding.weight"]
    return {"width": patch.shape[0], "patch": patch.shape[-1],
            "grid": round((state["vision.embeddings.position_embedding"].shape[1] - 1) ** 0.5),
            "depth": 1 + max(int(k.split(".")[3]) for k in state if k.startswith("vision.encoder.layers.")),
            "mlp_ratio": state["vision.encoder.layers.0.mlp.fc1.weight"].shape[0] // patch.shape[0],
            "head": [tuple(state[f"mlp.{i}.weight"].shape[::-1]) for i in (0, 2, 4, 6, 7)]}


def build(med: dict, size: dict):
    """Randomly initialised modules of ImageReward's shape; `size` as `sizes` returns."""
    from torch import nn
    from transformers import (
        BlipTextConfig,
        BlipTextModel,
        BlipVisionConfig,
        BlipVisionModel,
    )
    if not med.get("add_cross_attention", False):
        raise ValueError("ImageReward med_config.json: add_cross_attention must be true")
    width = size["width"]
    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=width, intermediate_size=size["mlp_ratio"] * width, num_hidden_layers=size["depth"],
        num_attention_heads=med.get("vision_heads", VIT_LARGE_HEADS), image_size=size["grid"] * size["patch"],
        patch_size=size["patch"], hidden_act="gelu", layer_norm_eps=1e-6))
    text = BlipTextModel(BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        pad_token_id=med.get("pad_token_id", 0), bos_token_id=None, eos_token_id=None, sep_token_id=None,
        is_decoder=True),  # is_decoder builds the cross-attention layers (the forward runs bidirectionally)
        add_pooling_layer=False)
    (a, b), (c, d), (e, f), (g, h), (i, j) = size["head"]
    mlp = nn.Sequential(nn.Linear(a, b), nn.Dropout(0.2), nn.Linear(c, d), nn.Dropout(0.2), nn.Linear(e, f),
                        nn.Dropout(0.1), nn.Linear(g, h), nn.Linear(i, j))
    return nn.ModuleDict({"vision": vision, "text": text, "mlp": mlp})


class ImageRewardModel:
    """ImageReward's `score(prompt, image)`, batched over (image, prompt) pairs."""

    def __init__(self, model: str, device: str = "cpu", dtype=None):
        """`dtype`: a torch dtype for every weight (default float32, as the checkpoint holds them)."""
        import torch
        from transformers import BertTokenizer
        self.torch, self.device, self.dtype = torch, device, dtype or torch.float32
        ckpt, med_file, tok = resolve(model)
        med = json.loads(Path(med_file).read_text())
        state = map_keys(torch.load(ckpt, map_location="cpu", weights_only=True))
        self.net = build(med, sizes(state))
        self.net.load_state_dict(state, strict=True)   # every weight the scorer uses, and nothing else
        self.net.to(device=device, dtype=self.dtype).eval()
        self.tokenizer = BertTokenizer.from_pretrained(tok)
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})   # as BLIP's init_tokenizer
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})

    def score(self, images, prompts) -> list[float]:
        """Pairwise: the reward of images[i] for prompts[i]."""
        torch = self.torch
        with torch.inference_mode():
            text = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=TEXT_LENGTH,
                                  return_tensors="pt").to(self.device)
            pixels = torch.stack([preprocess(im) for im in images]).to(self.device, self.dtype)
            img = self.net["vision"](pixel_values=pixels).last_hidden_state
            out = self.net["text"](input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                                   encoder_hidden_states=img,
                                   encoder_attention_mask=torch.ones(img.shape[:-1], dtype=torch.long,
                                                                     device=img.device))
            rewards = self.net["mlp"](out.last_hidden_state[:, 0, :]).float()
            return ((rewards[:, 0] - MEAN) / STD).tolist()
