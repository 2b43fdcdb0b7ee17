"""Random-weight twins of the paper's models: the same architecture classes, processors and loading paths as the
checkpoints `configs/paper.yaml` names, at sizes a CPU runs in seconds (`synthalign make-tiny --recipe paper`).

    sd3               StableDiffusion3Pipeline: SD3Transformer2DModel, 16-channel AutoencoderKL, two CLIP text
                      encoders with projection and a T5 encoder, their tokenizers (stabilityai/stable-diffusion-3-medium)
    llava-next-mistral-7b, llava-next-vicuna-13b, llava-next-vicuna-7b
                      LlavaNextForConditionalGeneration + LlavaNextProcessor with any-res tiling; Mistral and
                      Llama language models, as the paper's three LLaVA-1.6 samplers mix families
    imagereward       ImageReward's own files: ImageReward.pt with BLIP's key names, med_config.json, a BERT
                      vocab.txt; a ViT 32 wide with 32 px patches on 224 px input, a 2-layer cross-attention BERT
                      (THUDM/ImageReward)
    armorm            LlamaForRewardModelWithGating loaded with trust_remote_code: ArmoRM's modelling file
                      (RLHFlow/ArmoRM-Llama3-8B-v0.1) rewritten to behave as it does, gating network included
The policy, LLaVA-1.5, is the tiny `llava` of pipelines/models/tiny.py.
"""
from __future__ import annotations

import re
from pathlib import Path

from pipelines.models.tiny import (
    LLAVA_CHAT_TEMPLATE,
    build_clip_tokenizer,
    build_models,
    build_tokenizer,
)

# ArmoRM's custom code as RLHFlow/ArmoRM-Llama3-8B-v0.1's modeling_custom.py has it, rewritten by us (read, not
# copied: the hub file states no licence of its own, the model is under the Llama 3 licence): the same class,
# parameter names, config fields and imports (LLAMA_INPUTS_DOCSTRING, which transformers 5 removed: actors/rewards.py
# shims it), a gating network reading the prompt at the assistant header, 19 objectives mixed by it, and the
# pooling of the last token before the first pad_token_id. Only the header's token ids differ (Llama 3's there).
ARMORM_CODE = '''
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.models.llama.modeling_llama import LLAMA_INPUTS_DOCSTRING
from transformers.utils import ModelOutput, add_start_docstrings_to_model_forward

# The gating network reads the prompt where this id sequence last occurs (ArmoRM: Llama 3's
# "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n"; the twin: its tokenizer's " ASSISTANT:").
GATING_PATTERN = None


class GatingNetwork(nn.Module):
    """Prompt state -> ReLU MLP -> softmax over the objectives at a temperature, times a learned scale."""

    def __init__(self, in_features, out_features, temperature=10.0, hidden_dim=1024, n_hidden=3):
        super().__init__()
        self.temperature = temperature
        self.logit_scale = nn.Parameter(torch.ones(1))
        sizes = [in_features] + [hidden_dim] * n_hidden + [out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return torch.softmax(self.layers[-1](x) / self.temperature, dim=1) * self.logit_scale[0]


def gating_position(ids):
    n = len(GATING_PATTERN)
    for j in range(len(ids) - n, -1, -1):
        if ids[j:j + n] == GATING_PATTERN:
            return j
    raise ValueError("gating token pattern not found")


@dataclass
class CustomOutput(ModelOutput):
    rewards: torch.FloatTensor = None
    hidden_state: torch.FloatTensor = None
    prompt_embedding: torch.FloatTensor = None
    gating_output: torch.FloatTensor = None
    score: torch.FloatTensor = None
    logits: torch.FloatTensor = None


class LlamaForRewardModelWithGating(LlamaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        extra = config.to_dict()
        self.num_objectives = extra.get("num_objectives", 19)
        self.regression_layer = nn.Linear(config.hidden_size, self.num_objectives, bias=False)
        self.post_init()
        self.reward_transform_matrix = nn.Parameter(torch.zeros(self.num_objectives, self.num_objectives)
                                                    .fill_diagonal_(1.0), requires_grad=False)
        self.gating = GatingNetwork(config.hidden_size, self.num_objectives, extra.get("gating_temperature", 10),
                                    extra.get("gating_hidden_dim", 1024), extra.get("gating_n_hidden", 3))

    @add_start_docstrings_to_model_forward(LLAMA_INPUTS_DOCSTRING)
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        hidden = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)[0]
        rows = torch.arange(input_ids.shape[0], device=hidden.device)
        # The last token before the first pad_token_id; with none, -1 wraps round to the last token.
        ends = (torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1) - 1) % input_ids.shape[-1]
        last = hidden[rows, ends.to(hidden.device)]
        rewards = self.regression_layer(last)
        prompt = hidden[rows, [gating_position(ids.tolist()) for ids in input_ids]]
        gates = self.gating(prompt)
        score = (gates * (rewards @ self.reward_transform_matrix)).sum(dim=1)
        return CustomOutput(rewards=rewards, hidden_state=last, prompt_embedding=prompt, gating_output=gates,
                            score=score, logits=score)
'''


def t5_vocab() -> list[tuple[str, float]]:
    """A Unigram vocabulary in T5's layout (<pad>, </s>, <unk>, then pieces): the demo's words, then characters."""
    from pipelines.models.tiny import _corpus
    words = sorted({w for line in _corpus() for w in line.lower().split()})
    chars = sorted({c for w in words for c in w})
    return ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -5.0) for w in words]
            + [(c, -10.0) for c in chars])


def build_sd3(out: Path, seed: int) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )
    torch.manual_seed(seed)
    clip_tok = build_clip_tokenizer()

    def clip_encoder():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=1,
            pad_token_id=1))
    t5_tok = T5TokenizerFast(vocab=t5_vocab(), extra_ids=0, model_max_length=128)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id))
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
        pos_embed_max_size=32)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=32, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5305)
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=clip_encoder(), tokenizer=clip_tok, text_encoder_2=clip_encoder(), tokenizer_2=clip_tok,
        text_encoder_3=t5, tokenizer_3=t5_tok).save_pretrained(out)


def llava_next(out: Path, seed: int, family: str) -> None:
    """A LLaVA-1.6 layout: CLIP vision on 32 px tiles, any-res grid pinpoints, a Llama or Mistral decoder."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        MistralConfig,
    )
    torch.manual_seed(seed)
    tok = build_tokenizer()
    text_cls = MistralConfig if family == "mistral" else LlamaConfig
    text = text_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaNextForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=pinpoints)
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=LLAVA_CHAT_TEMPLATE).save_pretrained(out)


def build_armorm(out: Path, seed: int) -> None:
    import json

    import torch
    from transformers import LlamaConfig

    from actors.rewards import remote_code_shims
    torch.manual_seed(seed)
    tok = build_tokenizer()
    tok.chat_template = LLAVA_CHAT_TEMPLATE
    tok.padding_side = "right"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    pattern = tok.encode(" ASSISTANT:", add_special_tokens=False)   # what the chat template puts before an answer
    code = ARMORM_CODE.replace("GATING_PATTERN = None", f"GATING_PATTERN = {pattern}")
    (out / "modeling_custom.py").write_text(code)
    remote_code_shims()
    namespace: dict = {}
    exec(compile(code, str(out / "modeling_custom.py"), "exec"), namespace)   # the class the hub file defines
    cfg.num_objectives, cfg.gating_temperature, cfg.gating_hidden_dim, cfg.gating_n_hidden = 19, 10, 32, 3
    model = namespace["LlamaForRewardModelWithGating"](cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.update(architectures=["LlamaForRewardModelWithGating"],
                  auto_map={"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"})
    (out / "config.json").write_text(json.dumps(config, indent=2))


# transformers' BLIP vision names -> the names of BLIP's timm-style ViT that ImageReward.pt uses.
IR_VIT_NAMES = [(r"^embeddings\.class_embedding$", "cls_token"), (r"^embeddings\.position_embedding$", "pos_embed"),
                (r"^embeddings\.patch_embedding\.", "patch_embed.proj."), (r"^post_layernorm\.", "norm."),
                (r"^encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"blocks.\1.norm\2."),
                (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
                (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
                (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp.")]


def bert_vocab() -> list[str]:
    """A WordPiece vocab.txt in bert-base-uncased's layout ([PAD]=0, [UNK], [CLS], [SEP], [MASK]): the demo's
    words, then single characters and their ## continuations, so any lower-case ASCII prompt tokenises."""
    from pipelines.models.tiny import _corpus
    words = sorted({w.strip(".,!?") for line in _corpus() for w in line.lower().split()} - {""})
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *".,!?'-:;()\"/", *chars, *["##" + c for c in chars],
              *words]
    return list(dict.fromkeys(tokens))


def build_imagereward(out: Path, seed: int) -> None:
    """ImageReward's checkpoint layout, written from transformers' BLIP modules with the keys renamed back to the
    names ImageReward's BLIP code uses (the loader maps them forward; tests compare against the original code)."""
    import json

    import torch

    from actors.common.imagereward import build
    torch.manual_seed(seed)
    vocab = bert_vocab()
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    width, hidden = 32, 32
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": 64,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 2,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(vocab) + 2,
           "encoder_width": width, "add_cross_attention": True,
           "vision_heads": 2}   # ours: ImageReward's ViT-L has 16 heads, which the weights do not record
    (out / "med_config.json").write_text(json.dumps(med, indent=2))
    net = build(med, {"width": width, "patch": 32, "grid": 7, "depth": 2, "mlp_ratio": 4,   # 224 px / 32 = 7
                      "head": [(hidden, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]})   # ImageReward's MLP
    torch.manual_seed(seed)   # the weights depend on the seed and shapes only, not on transformers' own init
    ir = {}
    for name, p in net.state_dict().items():
        # Random weights at a scale where images and prompts move the score (BLIP's init is near zero here).
        if name.endswith("weight") and "norm" in name.lower():
            p = 1 + 0.1 * torch.randn_like(p)
        elif p.is_floating_point():   # fan-in scaled; the ViT's [CLS]/position embeddings and biases at 0.5
            p = torch.randn_like(p) * (p[0].numel() ** -0.5 if p.dim() >= 2 and p.shape[0] > 1 else 0.5)
        part, key = name.split(".", 1)
        if part == "vision":
            for pat, rep in IR_VIT_NAMES:
                key, n = re.subn(pat, rep, key)
                if n:
                    break
        ir[{"vision": "blip.visual_encoder.", "text": "blip.text_encoder.", "mlp": "mlp.layers."}[part] + key] = p
    ir["blip.text_encoder.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"])[None]
    ir["blip.vision_proj.weight"], ir["blip.vision_proj.bias"] = torch.randn(256, width), torch.zeros(256)
    ir["blip.text_proj.weight"], ir["blip.text_proj.bias"] = torch.randn(256, hidden), torch.zeros(256)
    torch.save(ir, out / "ImageReward.pt")


# name -> (builder, seed offset)
TWINS = {
    "sd3": (build_sd3, 10),
    "llava-next-mistral-7b": (lambda out, seed: llava_next(out, seed, "mistral"), 11),
    "llava-next-vicuna-13b": (lambda out, seed: llava_next(out, seed, "llama"), 12),
    "llava-next-vicuna-7b": (lambda out, seed: llava_next(out, seed, "llama"), 13),
    "armorm": (build_armorm, 14),
    "imagereward": (build_imagereward, 15),
}


def make_twins(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Build (or reuse) the twins and the tiny policy and CLIP under out_dir; returns name -> folder."""
    from pipelines.models.tiny import TINY_MODELS
    return build_models(out_dir, {**TWINS, "llava": TINY_MODELS["llava"], "clip": TINY_MODELS["clip"]}, seed)
