"""Reference ImageReward scores for the golden fixture imagereward_golden.json, from image-reward 1.5's own code.

Not a test: run it in a separate venv where that code imports (transformers 4.x), on the twin checkpoint that
`pipelines.models.twins.build_imagereward` writes (seed 15, as make_twins(seed=0) builds it):
    pip install torch==2.14.1 torchvision==0.29.1    # timm needs torchvision; PyPI's did not import beside 2.13.0
    pip install transformers==4.46.3 timm==0.6.13 "numpy<2.3" pillow huggingface_hub
    pip install --no-build-isolation fairscale==0.4.13 && pip install --no-deps image-reward==1.5
    python imagereward_reference.py <twin folder> > imagereward_golden.json
ImageReward's code hard-codes ViT-L and MLP(768) and fetches bert-base-uncased; the script swaps only those sizes
(create_vit, MLP) and the tokenizer's source (the twin's vocab.txt), then runs ImageReward.score and inference_rank
unchanged. The package's __init__ (which imports openai-clip and ReFL's diffusers code) is skipped.
"""
import json
import sys
import types


def cases():
    """(image, prompt) pairs: several sizes and aspect ratios, so resize, crop and rounding are exercised."""
    import numpy as np
    from PIL import Image
    y, x = np.mgrid[0:300, 0:450]
    grad = np.stack([(x * 255 // 449), (y * 255 // 299), ((x + y) % 256)], -1).astype(np.uint8)
    checker = ((np.indices((97, 61)).sum(0) // 7) % 2 * 200 + 30).astype(np.uint8)
    stripes = np.stack([(np.arange(640) % 40 < 20) * 220] * 3, -1)[None].repeat(100, 0).astype(np.uint8)
    images = [Image.fromarray(grad), Image.fromarray(checker).convert("RGB"), Image.fromarray(stripes),
              Image.new("RGB", (224, 224), (200, 30, 30)), Image.fromarray(grad[:64, :64])]
    prompts = ["a red dog sitting on a table", "two blue cats in a park, realistic photo",
               "a striped painting", "a red image", "Describe the small yellow car next to the street!"]
    return list(zip(images, prompts))


def main(folder):
    import importlib
    import site

    import torch
    root = next(p for p in site.getsitepackages() if __import__("os").path.isdir(p + "/ImageReward")) + "/ImageReward"
    for name, path in (("ImageReward", root), ("ImageReward.models", root + "/models")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [path]
        sys.modules[name] = pkg
    blip = importlib.import_module("ImageReward.models.BLIP.blip_pretrain")
    vit = importlib.import_module("ImageReward.models.BLIP.vit")
    ir = importlib.import_module("ImageReward.ImageReward")
    from transformers import BertTokenizer
    med = json.load(open(folder + "/med_config.json"))

    def create_vit(*args, **kwargs):   # the twin's ViT: same class, small sizes
        return vit.VisionTransformer(img_size=224, patch_size=32, embed_dim=32, depth=2, num_heads=med["vision_heads"],
                                     drop_path_rate=0.1), 32

    def init_tokenizer():  # BLIP's init_tokenizer, from the twin's vocab instead of bert-base-uncased
        tok = BertTokenizer.from_pretrained(folder)
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tok.enc_token_id = tok.additional_special_tokens_ids[0]
        return tok
    blip.create_vit, blip.init_tokenizer = create_vit, init_tokenizer
    mlp = ir.MLP
    ir.MLP = lambda _: mlp(med["hidden_size"])
    model = ir.ImageReward(med_config=folder + "/med_config.json", device="cpu")
    msg = model.load_state_dict(torch.load(folder + "/ImageReward.pt", map_location="cpu"), strict=False)
    model.eval()
    pairs = cases()
    with torch.no_grad():
        single = [model.score(p, im) for im, p in pairs]
        _, ranked = model.inference_rank(pairs[0][1], [im for im, _ in pairs])
    print(json.dumps({"produced_by": "tests/actors/common/data/imagereward_reference.py", "versions": {
        "torch": torch.__version__, "transformers": __import__("transformers").__version__, "image-reward": "1.5"},
        "missing_keys": msg.missing_keys, "unexpected_keys": msg.unexpected_keys,
        "prompts": [p for _, p in pairs], "scores": single, "first_prompt_all_images": ranked}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
