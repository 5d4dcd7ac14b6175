"""SANA and Wan 2.1 for benchmark_training.py: the full-size architectures from configs (random weights: step time does
not depend on weight values) and the authors' training step reproduced in the same process.

The authors' step (kunheek/dti, scripts/train_sana.py and scripts/train_wan.py, run by exps/ours_sana.py and
exps/ours_wan.py): a PIL dataset resizes and randomly crops each photo and fills a prompt template; every micro-batch
goes through the VAE (SANA's DC-AE, Wan's video VAE on one-frame videos) in float32; the text encoder (bf16, the
learned rows in it) encodes the full sequence (SANA: 300 tokens with the mask; Wan: 512 tokens, each prompt cut to its
length and zero-padded, as WanPipeline.encode_prompt); the transformer (bf16) predicts eps - x0 at a uniform timestep;
two micro-batches of two images per optimizer step; the loss is read back every step. Left out, as they change no
cost: SANA's zero-pad tokens (the sequence is 300 long either way) and the directions kept in bf16.
"""

import os

import numpy as np
import torch
import torch.nn.functional as F


SANA_TRANSFORMER = {  # SANA1.5 1.6B 1024 px (diffusers' convert_sana_to_diffusers.py, SanaMS1.5_1600M_P1_D20)
    "in_channels": 32,
    "out_channels": 32,
    "num_attention_heads": 70,
    "attention_head_dim": 32,
    "num_layers": 20,
    "num_cross_attention_heads": 20,
    "cross_attention_head_dim": 112,
    "cross_attention_dim": 2240,
    "caption_channels": 2304,
    "mlp_ratio": 2.5,
    "attention_bias": False,
    "sample_size": 32,
    "patch_size": 1,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "qk_norm": "rms_norm_across_heads",
}
SANA_VAE = {  # mit-han-lab/dc-ae-f32c32-sana-1.1 (AutoencoderDC's defaults are the f32c32 layout)
    "latent_channels": 32,
    "downsample_block_type": "conv",
    "upsample_block_type": "interpolate",
    "scaling_factor": 0.41407,
}
GEMMA2_2B = {  # gemma-2-2b (Gemma2Config's defaults), SANA's text encoder
    "vocab_size": 256000,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}
WAN_TRANSFORMER = {  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
UMT5_XXL = {  # google/umt5-xxl's encoder, Wan's text encoder
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
MAX_LENGTHS = {"sana": 300, "wan": 512}


def build_family_pipeline(model, tiny, folder):
    """Write a random-weight SANA1.5 1.6B or Wan 2.1 1.3B pipeline (or a tiny one) to `folder`. The tokenizers are the
    tiny ones of tools/make_tiny_pipeline.py (no download) with the real tables: a new token falls inside them."""
    import make_tiny_pipeline as tiny_tools

    if tiny:
        (tiny_tools.make_tiny_sana if model == "sana" else tiny_tools.make_tiny_wan)(folder)
        return folder
    from diffusers import (
        AutoencoderDC,
        AutoencoderKLWan,
        DPMSolverMultistepScheduler,
        SanaPipeline,
        SanaTransformer2DModel,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import Gemma2Config, Gemma2Model, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init on the GPU: seconds
        if model == "sana":
            parts = {
                "transformer": SanaTransformer2DModel(**SANA_TRANSFORMER),
                "vae": AutoencoderDC(**SANA_VAE),
                "text_encoder": Gemma2Model(Gemma2Config(**GEMMA2_2B)),
            }
        else:
            parts = {
                "transformer": WanTransformer3DModel(**WAN_TRANSFORMER),
                "vae": AutoencoderKLWan(),  # its defaults are Wan 2.1's VAE, latents_mean/std included
                "text_encoder": UMT5EncoderModel(UMT5Config(**UMT5_XXL)),
            }
    parts = {k: v.to(torch.bfloat16) for k, v in parts.items()}  # halves the write; the scripts cast what they load
    if model == "sana":
        scheduler = DPMSolverMultistepScheduler(
            flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction"
        )
        pipe = SanaPipeline(**parts, tokenizer=tiny_tools.tiny_gemma_tokenizer(), scheduler=scheduler)
    else:
        scheduler = UniPCMultistepScheduler(**tiny_tools.WAN_SCHEDULER)
        pipe = WanPipeline(**parts, tokenizer=tiny_tools.tiny_t5_tokenizer(), scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder


class _PhotoDataset(torch.utils.data.Dataset):
    """The authors' SanaDataset (also Wan's): shorter side resized (bicubic), a random square crop, no flip, [-1, 1];
    a random object template with the placeholder; repeats 100."""

    def __init__(self, images_dir, resolution, word):
        from dti_data import OBJECT_TEMPLATES

        self.paths = sorted(os.path.join(images_dir, n) for n in os.listdir(images_dir))
        self.resolution, self.word, self.templates = resolution, word, OBJECT_TEMPLATES

    def __len__(self):
        return len(self.paths) * 100

    def __getitem__(self, i):
        from PIL import Image

        res = self.resolution
        image = Image.open(self.paths[i % len(self.paths)]).convert("RGB")
        scale = res / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        left = int(torch.randint(image.width - res + 1, ()))
        top = int(torch.randint(image.height - res + 1, ()))
        image = image.crop((left, top, left + res, top + res))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        template = self.templates[int(torch.randint(len(self.templates), ()))]
        return {"pixel_values": pixels, "prompt": template.format(self.word)}


def family_reference_run(args, folder, images_dir, steps, warmup, timer, measure):
    """The authors' SANA or Wan step for warmup + steps optimizer steps (2 micro-batches of args.batch each); the
    timer marks each step, `measure()` resets the peak memory once warm."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer

    from dti_utils import RiemannianSGD, add_directional_embedding, initializer_ids

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    sana = args.model == "sana"
    classes = (
        ("Gemma2Model", "AutoencoderDC", "SanaTransformer2DModel")
        if sana
        else ("UMT5EncoderModel", "AutoencoderKLWan", "WanTransformer3DModel")
    )
    import transformers

    tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = getattr(transformers, classes[0]).from_pretrained(folder, subfolder="text_encoder", dtype=dtype)
    vae = getattr(diffusers, classes[1]).from_pretrained(folder, subfolder="vae", dtype=torch.float32)
    transformer = getattr(diffusers, classes[2]).from_pretrained(folder, subfolder="transformer", dtype=dtype)
    for module in (text_encoder, vae, transformer):
        module.requires_grad_(False).eval().to(device)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    # the learned row inside the bf16 encoder, as the authors' DtiTokenEmbedding (its cost: one lookup)
    embedding = add_directional_embedding(tokenizer, text_encoder, ["<ref>"], initializer_ids(tokenizer, "toy", 1))
    optimizer = RiemannianSGD([embedding.param], lr=0.04, kappa=5e-5)
    loader = torch.utils.data.DataLoader(
        _PhotoDataset(images_dir, args.resolution, "<ref>"), batch_size=args.batch, shuffle=True, num_workers=0
    )
    batches = (batch for _ in iter(int, 1) for batch in loader)
    max_length = MAX_LENGTHS[args.model]
    latents_mean = latents_std = None
    if not sana:
        latents_mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
        latents_std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    step = 0
    for step in range(warmup + steps + 1):
        if step == warmup:
            measure()
        if step >= warmup:
            timer.mark()
        if step == warmup + steps:
            break
        for _ in range(2):  # accumulation 2
            batch = next(batches)
            pixels = batch["pixel_values"].to(device)
            with torch.no_grad():  # the VAE on every micro-batch
                if sana:
                    x0 = vae.encode(pixels).latent * vae.config.scaling_factor
                else:
                    z = vae.encode(pixels.unsqueeze(2)).latent_dist.mode()
                    x0 = (z - latents_mean) * (1.0 / latents_std)
            prompts = [p.lower() for p in batch["prompt"]] if sana else batch["prompt"]
            tokens = tokenizer(
                prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
            ).to(device)
            hidden = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
            if not sana:  # each prompt cut to its length, zero-padded
                hidden = hidden * tokens.attention_mask.unsqueeze(-1).to(hidden.dtype)
            noise = torch.randn_like(x0)
            index = (torch.rand(x0.shape[0], device=device) * 1000).long()
            sigma = scheduler.sigmas.to(device)[index].view(-1, *[1] * (x0.dim() - 1))
            timestep = scheduler.timesteps.to(device)[index]
            noisy = ((1 - sigma) * x0 + sigma * noise).to(dtype)
            extra = {"encoder_attention_mask": tokens.attention_mask} if sana else {}
            pred = transformer(
                hidden_states=noisy,
                encoder_hidden_states=hidden.to(dtype),
                timestep=timestep,
                return_dict=False,
                **extra,
            )[0]
            loss = F.mse_loss(pred.float(), (noise - x0).float()) / 2
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss.item()  # logged every step: a device->host sync
    return step
