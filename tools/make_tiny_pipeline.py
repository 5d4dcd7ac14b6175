"""Build tiny random Stable Diffusion pipelines and example images, fully offline.

The training scripts need a real diffusers pipeline folder. This helper writes one with a few thousand
parameters and a small CLIP tokenizer made from a generated vocabulary, so the smoke run and the tests
work on a CPU without the Hub.

    python tools/make_tiny_pipeline.py --output tiny-sd --images tiny-images
    python tools/make_tiny_pipeline.py --sdxl --output tiny-sdxl
    python tools/make_tiny_pipeline.py --output tiny-sd --encoders tiny-encoders   # + evaluate_dti.py's scoring models
"""

import argparse
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw


# Words that tokenize to a single token in the tiny vocabulary (initializers, template words).
WORDS = (
    "a an the of in on at with and by for photo picture rendering cropped dark bright clean dirty close-up "
    "good nice small large weird cool painting style art toy dog cat cake car city street japanese modern "
    "red blue green one two three sketch drawing"
).split()


def tiny_clip_tokenizer(model_max_length=77):
    """A CLIP tokenizer with byte-level characters and whole-word tokens for WORDS."""
    from transformers import CLIPTokenizer

    # The printable characters of byte-level BPE: CLIP's pre-tokenizer maps every byte to one of these.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = [chr(c) for c in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            merged = parts[0] + parts[1]
            if merged not in vocab_list:
                vocab_list.append(merged)
            parts = [merged] + parts[2:]
    merges = list(dict.fromkeys(merges))
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=model_max_length)


def tiny_text_encoder(vocab_size, hidden_size=32, projection=False, eos_token_id=None, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1 if eos_token_id is None else eos_token_id,
        pad_token_id=vocab_size - 1,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=vocab_size,
        projection_dim=hidden_size,
        hidden_act="gelu",
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config)


# The UNet layout both tiny pipelines share; SDXL adds its text-time conditioning on top.
TINY_UNET = {
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}


def tiny_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


def make_tiny_sd(output_dir, seed=0):
    """Write a tiny StableDiffusionPipeline (UNet, VAE, CLIP text encoder, tokenizer, scheduler)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = tiny_clip_tokenizer()
    text_encoder = tiny_text_encoder(len(tokenizer), seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **TINY_UNET,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    scheduler = DDPMScheduler(  # SD 1.5's own scheduler config (steps_offset 1, no clip_sample)
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        clip_sample=False,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=tiny_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(output_dir)
    return output_dir


def make_tiny_sdxl(output_dir, seed=0, eos_token_id_2=2):
    """Write a tiny StableDiffusionXLPipeline. Encoder 1 has width 32, encoder 2 width 64 with a projection.

    eos_token_id_2=2 reproduces SDXL's real text_encoder_2 config, whose pooling takes argmax(input_ids).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer()
    text_encoder = tiny_text_encoder(len(tokenizer), hidden_size=32, seed=seed)
    text_encoder_2 = tiny_text_encoder(
        len(tokenizer_2), hidden_size=64, projection=True, eos_token_id=eos_token_id_2, seed=seed + 1
    )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **TINY_UNET,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 64,
        cross_attention_dim=32 + 64,
        norm_num_groups=4,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=tiny_vae(seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
    )
    pipe.save_pretrained(output_dir)
    return output_dir


def make_tiny_clip(output_dir, seed=0, image_size=32):
    """A tiny random CLIPModel (text and vision towers, projection 16) with its processor: the --clip_model of
    evaluate_dti.py offline. The image processor is the PIL one (no torchvision)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = tiny_clip_tokenizer()
    vocab = len(tokenizer)
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config=dict(
            tower, vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1
        ),
        vision_config=dict(tower, image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(output_dir)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(output_dir)
    return output_dir


def tiny_unigram_tokenizer(model_max_length=64):
    """A Unigram tokenizer with SentencePiece's "▁" word marks, lower case, "</s>" at the end and as padding: the
    form of SigLIP's tokenizer, built with `tokenizers` alone (SigLIP's own needs sentencepiece and a trained model
    file)."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)] + [("▁" + w, -2.0) for w in WORDS]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def make_tiny_siglip(output_dir, seed=0, image_size=32):
    """A tiny random SiglipModel with a SiglipProcessor (PIL image processor, tiny_unigram_tokenizer): 64 text
    positions as google/siglip-base-patch16-512, and a logit scale and bias away from transformers' zero init
    (exp(scale) 10, bias -2: SigLIP's sigmoid score then depends on both)."""
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = tiny_unigram_tokenizer()
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = SiglipConfig(
        text_config=dict(
            tower,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            projection_size=32,
            bos_token_id=None,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(tower, image_size=image_size, patch_size=8),
    )
    torch.manual_seed(seed)
    model = SiglipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-2.0)
    model.save_pretrained(output_dir)
    SiglipProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": image_size, "width": image_size}), tokenizer=tokenizer
    ).save_pretrained(output_dir)
    return output_dir


def make_tiny_dinov2(output_dir, seed=0, image_size=32):
    """A tiny random Dinov2Model with DINOv2's image processor (BitImageProcessor, the PIL one, ImageNet
    statistics)."""
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=image_size,
        patch_size=8,
    )
    Dinov2Model(config).save_pretrained(output_dir)
    BitImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},  # ImageNet statistics, as facebook/dinov2-*
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(output_dir)
    return output_dir


def make_tiny_encoders(output_dir, seed=0):
    """The three scoring models of evaluate_dti.py, tiny and random: {"clip", "siglip", "dino": folder}."""
    makers = {"clip": make_tiny_clip, "siglip": make_tiny_siglip, "dino": make_tiny_dinov2}
    return {name: make(os.path.join(output_dir, name), seed=seed) for name, make in makers.items()}


def make_example_images(output_dir, count=4, size=64, seed=0):
    """Write a few PNGs of a coloured shape on a background: a stand-in for a user's photos."""
    os.makedirs(output_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        image = Image.new("RGB", (size + 8 * i, size), tuple(int(c) for c in rng.integers(150, 255, 3)))
        draw = ImageDraw.Draw(image)
        x, y = rng.integers(4, size // 3, 2)
        draw.ellipse([x, y, x + size // 2, y + size // 2], fill=tuple(int(c) for c in rng.integers(0, 120, 3)))
        path = os.path.join(output_dir, f"example_{i}.png")
        image.save(path)
        paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="Folder for the pipeline.")
    parser.add_argument("--sdxl", action="store_true", help="Build a tiny SDXL pipeline instead of SD.")
    parser.add_argument("--images", default=None, help="Also write example images to this folder.")
    parser.add_argument(
        "--encoders",
        default=None,
        help="Also write tiny CLIP, SigLIP and DINOv2 models (evaluate_dti.py's scorers) to this folder.",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # Quiet: transformers' notices about torchvision and about random configs, and its shard-writing progress bars.
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    if args.sdxl:
        make_tiny_sdxl(args.output, seed=args.seed)
    else:
        make_tiny_sd(args.output, seed=args.seed)
    print(f"Wrote a tiny {'SDXL' if args.sdxl else 'SD'} pipeline to {args.output}")
    if args.images:
        make_example_images(args.images, seed=args.seed)
        print(f"Wrote example images to {args.images}")
    if args.encoders:
        make_tiny_encoders(args.encoders, seed=args.seed)
        print(f"Wrote tiny CLIP, SigLIP and DINOv2 models to {args.encoders}/clip, siglip, dino")


if __name__ == "__main__":
    main()
