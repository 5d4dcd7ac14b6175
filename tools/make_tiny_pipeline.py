"""Build tiny random Stable Diffusion pipelines and example images, fully offline.

The training scripts need a real diffusers pipeline folder. This helper writes one with a few thousand
parameters and a small CLIP tokenizer made from a generated vocabulary, so the smoke run and the tests
work on a CPU without the Hub.

    python tools/make_tiny_pipeline.py --output tiny-sd --images tiny-images
    python tools/make_tiny_pipeline.py --sdxl --output tiny-sdxl
    python tools/make_tiny_pipeline.py --sana --output tiny-sana     # Gemma-2 + SANA transformer + DC-AE
    python tools/make_tiny_pipeline.py --wan --output tiny-wan       # UMT5 + Wan 2.1 transformer + Wan VAE
    python tools/make_tiny_pipeline.py --output tiny-sd --encoders tiny-encoders   # + evaluate_dti.py's scoring models
"""

import argparse
import json
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


# ----------------------------------------------------------------------------------------------------
# SANA (Gemma-2 text encoder, DC-AE) and Wan 2.1 (UMT5, Wan VAE): tokenizers built here, no download
# ----------------------------------------------------------------------------------------------------

# The family tokenizers know these as whole words (template words and initializers), besides WORDS.
FAMILY_WORDS = (
    WORDS
    + (
        "photo rendition cropped clean dirty my one cool close-up good nice small large weird bright the dark "
        "beach dog cat toy house tree sky sun grass park room table chair bed floor window door wall sks"
    ).split()
)
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # ids 0..4, as in Gemma and Gemma 2
_ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-_()[]<>/&+=*#@%")


def _complex_human_instruction():
    """SanaPipeline's default complex human instruction: the tiny BPE learns its words, so that a default pipeline
    call (which prepends it) stays a few hundred tokens long instead of a thousand characters."""
    import inspect

    from diffusers import SanaPipeline

    return " ".join(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


def tiny_gemma_tokenizer(vocab_size=700):
    """A GemmaTokenizer (byte-fallback BPE, BOS added, right padding) trained here on a fixed corpus: the 5 Gemma
    special tokens at their ids, 256 byte tokens, then the learned pieces. tokenizers' BPE trainer is deterministic."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    words = list(dict.fromkeys(FAMILY_WORDS))
    corpus = [" ".join(words[i : i + 6]) for i in range(len(words))]
    corpus += ["a photo of a dog", "a photo of a cat", "a photo of a toy", "a toy dog", "a toy cat"] * 4
    chi = _complex_human_instruction()
    corpus += [chi, chi.lower()]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # Gemma's normalizer (" " -> "\u2581"); splitting before each "\u2581" while training keeps merges inside words,
    # as sentencepiece does (GemmaTokenizer itself does no such split at run time).
    bpe.normalizer = normalizers.Replace(" ", "\u2581")
    bpe.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[], initial_alphabet=_ALPHABET + ["\u2581"], show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = {token: i for i, token in enumerate(GEMMA_SPECIALS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token, _ in sorted(model["vocab"].items(), key=lambda item: (item[1], item[0])):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, (list, tuple)) else tuple(m.split(" ")) for m in model["merges"]]
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, padding_side="right")


def tiny_gemma2(vocab_size, hidden_size=32, seed=0):
    """A 2-layer Gemma2Model: transformers 5 scales its rows by sqrt(hidden_size) inside its embedding module."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=2048,
        sliding_window=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(seed)
    return Gemma2Model(config).eval()


def make_tiny_sana(output_dir, seed=0):
    """Write a tiny SanaPipeline: Gemma-2 (width 32) and its tokenizer, SanaTransformer2DModel, AutoencoderDC (4
    latent channels, 8x down, the real DC-AE's scaling factor) and the flow DPM-Solver scheduler of SANA's
    conversion script (flow_shift 3)."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    tokenizer = tiny_gemma_tokenizer()
    text_encoder = tiny_gemma2(len(tokenizer), seed=seed)
    torch.manual_seed(seed + 1)
    transformer = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=text_encoder.config.hidden_size,
        mlp_ratio=2.5,
        sample_size=16,  # 16/32/64/128 only (SanaPipeline's resolution bins); 16 selects the 512 px bins
        patch_size=1,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    torch.manual_seed(seed + 2)
    blocks = ("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock")
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=4,
        encoder_block_types=blocks,
        decoder_block_types=blocks,
        encoder_block_out_channels=(8, 8, 16, 16),  # 4 stages: 8x down
        decoder_block_out_channels=(8, 8, 16, 16),
        encoder_layers_per_block=(1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        encoder_qkv_multiscales=((), (), (), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,)),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,  # the real SANA DC-AE's
    )
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    pipe = SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.save_pretrained(output_dir)
    return output_dir


WAN_TOKENIZER_SIZE, WAN_EMBED_ROWS, WAN_EXTRA_IDS = 300, 320, 20  # the UMT5 table is larger than the tokenizer
WAN_SCHEDULER = {  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json
    "flow_shift": 3.0,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "predict_x0": True,
    "solver_type": "bh2",
    "solver_order": 2,
    "final_sigmas_type": "zero",
    "lower_order_final": True,
    "timestep_spacing": "linspace",
    "num_train_timesteps": 1000,
}


def tiny_t5_tokenizer(size=WAN_TOKENIZER_SIZE, extra_ids=WAN_EXTRA_IDS):
    """A T5Tokenizer (Unigram) from a vocabulary written here, laid out like umT5's: <pad> 0, </s> 1, <unk> 2, the
    pieces ("\u2581word" scores above any split into characters), then <extra_id_{n-1}> .. <extra_id_0>. Written, not
    trained: tokenizers' Unigram trainer differs from run to run."""
    from transformers import T5Tokenizer

    count = size - 3 - extra_ids
    pieces = [("\u2581", -2.0)] + [("\u2581" + w, -3.0 - 0.01 * i) for i, w in enumerate(dict.fromkeys(FAMILY_WORDS))]
    pieces += [(s, -6.0 - 0.01 * i) for i, s in enumerate(["s", "ing", "ed", "er", "ly", "y", "es", "en"])]
    pieces += [(c, -8.0 - 0.01 * i) for i, c in enumerate(_ALPHABET)]
    fill = 0
    while len(pieces) < count:  # "\u2581x" fillers up to the size
        pieces.append(("\u2581" + _ALPHABET[fill % len(_ALPHABET)] + str(fill // len(_ALPHABET) or ""), -9.0))
        fill += 1
    pieces = list({piece: (piece, score) for piece, score in pieces[::-1]}.values())[::-1]  # the first of each wins
    while len(pieces) < count:  # fillers that repeated a piece
        pieces.append((f"\u2581{fill}", -9.0))
        fill += 1
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + pieces[:count]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
    return T5Tokenizer(vocab=vocab, extra_ids=extra_ids)


def tiny_umt5(rows=WAN_EMBED_ROWS, d_model=32, seed=0):
    """A 2-layer UMT5EncoderModel whose table has more rows than the tokenizer has tokens, as umt5-xxl's."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=rows,
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return UMT5EncoderModel(config).eval()


def make_tiny_wan(output_dir, seed=0):
    """Write a tiny WanPipeline (Wan 2.1 T2V layout): UMT5 (width 32, 320 rows for 300 tokens) and its tokenizer,
    WanTransformer3DModel, AutoencoderKLWan (4 latent channels with per-channel latents_mean/std, 8x down in space,
    4x in time) and the UniPC flow scheduler of the real model."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    text_encoder = tiny_umt5(seed=seed)
    torch.manual_seed(seed + 1)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=text_encoder.config.d_model,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[-0.15, -0.05, 0.05, 0.15],
        latents_std=[1.0, 1.25, 1.5, 1.75],
    )
    pipe = WanPipeline(
        tokenizer=tiny_t5_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER),
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
    family = parser.add_mutually_exclusive_group()
    family.add_argument("--sdxl", action="store_true", help="Build a tiny SDXL pipeline instead of SD.")
    family.add_argument("--sana", action="store_true", help="Build a tiny SANA pipeline instead of SD.")
    family.add_argument("--wan", action="store_true", help="Build a tiny Wan 2.1 pipeline instead of SD.")
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
    kind = "SDXL" if args.sdxl else "SANA" if args.sana else "Wan" if args.wan else "SD"
    make = {"SDXL": make_tiny_sdxl, "SANA": make_tiny_sana, "Wan": make_tiny_wan, "SD": make_tiny_sd}[kind]
    make(args.output, seed=args.seed)
    print(f"Wrote a tiny {kind} pipeline to {args.output}")
    if args.images:
        make_example_images(args.images, seed=args.seed)
        print(f"Wrote example images to {args.images}")
    if args.encoders:
        make_tiny_encoders(args.encoders, seed=args.seed)
        print(f"Wrote tiny CLIP, SigLIP and DINOv2 models to {args.encoders}/clip, siglip, dino")


if __name__ == "__main__":
    main()
