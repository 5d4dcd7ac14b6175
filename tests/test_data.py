"""The SD script's data and recipe: reading the image files (other files skipped, image modes, EXIF orientation, huge,
float and tiny images), aspect-preserving views (and diffusers' squash on request), the resolution read from the
model's configs, the velocity target of v-prediction models, and per-image captions (resume with captions included).
Offline, tiny models."""

import copy
import json
import logging
import os
import shutil
import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import dti_cli
import dti_data
import dti_utils

from conftest import (
    PLACEHOLDER,
    disk_state,
    one_error,
    read_embeds,
    row_norms,
    run_cli_inprocess,
    run_inprocess,
    sd_argv,
)


# Module fixtures train models: one worker runs this file's tests, so they are made once (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_data")


RES = 32


def vae_mean(vae, image):
    """The tiny VAE's latent mean of a PIL view, pixels scaled to [-1, 1] here by hand."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        return vae.encode(pixels).latent_dist.mean[0]


@pytest.fixture(scope="module")
def vae(tiny_sd):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """A landscape (2:1) and a portrait (1:2) image of random pixels, so that every crop is distinguishable."""
    folder = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(1)
    for name, (w, h) in (("a_wide.png", (96, 48)), ("b_tall.png", (40, 80))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return folder


def view_of(data, image, flip, crop):
    return data.latent_means[int(data.view_index[image, flip, crop])]


# ----------------------------------------------------------------------------------------------------
# Image files: other files skipped, image modes, EXIF, and huge, float and tiny images
# ----------------------------------------------------------------------------------------------------


def test_other_files_beside_images_are_skipped_with_a_warning(sd_args, tmp_path, example_images, caplog, base_vocab):
    data = tmp_path / "data"
    shutil.copytree(example_images, data)
    (data / "notes.txt").write_text("my cat toy")
    (data / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + os.urandom(64))
    (data / "sub").mkdir()
    caplog.set_level(logging.INFO)
    run_inprocess(sd_args(data=data, steps=1))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "dti"]
    assert any("notes.txt" in w for w in warnings), warnings
    assert any("Images = 4 x" in r.getMessage() for r in caplog.records)  # the four PNGs, nothing else
    vectors = read_embeds(tmp_path / "out" / "learned_embeds.safetensors")[0][PLACEHOLDER]
    np.testing.assert_allclose(row_norms(vectors), base_vocab["mean"], rtol=1e-5)


def _save(folder, name, image, **kwargs):
    os.makedirs(folder, exist_ok=True)
    image.save(os.path.join(folder, name), **kwargs)


def test_load_training_images_rgba_and_greyscale(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, 4:] = (200, 10, 10, 255)  # left half fully transparent, right half opaque red
    _save(tmp_path, "a_rgba.png", Image.fromarray(rgba, "RGBA"))
    _save(tmp_path, "b_grey.png", Image.fromarray(np.full((8, 8), 100, np.uint8), "L"))
    palette = Image.fromarray(np.full((8, 8, 3), (10, 20, 30), np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    _save(tmp_path, "c_palette.png", palette)
    _save(
        tmp_path,
        "d_grey_alpha.png",
        Image.fromarray(np.dstack([np.full((8, 8), 50, np.uint8), np.full((8, 8), 0, np.uint8)]), "LA"),
    )
    images = dti_data.load_training_images(str(tmp_path))
    assert [im.image.mode for im in images] == ["RGB"] * 4
    a, b, c, d = (np.asarray(im.image) for im in images)
    assert (a[:, :4] == 255).all()  # transparency composited on white
    assert (a[:, 4:] == (200, 10, 10)).all()
    assert (b == 100).all()
    assert (c == (10, 20, 30)).all()
    assert (d == 255).all()


def test_load_training_images_16_bit_greyscale_is_scaled(tmp_path):
    values = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000).astype(np.uint16)
    _save(tmp_path, "g16.png", Image.fromarray(values))
    image = np.asarray(dti_data.load_training_images(str(tmp_path))[0].image).astype(np.float64)
    np.testing.assert_allclose(image[..., 0], values / 257.0, atol=1.0)


def test_load_training_images_applies_exif_orientation(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    pixels[:4] = (0, 255, 0)  # a green top stripe makes the rotation's sense visible
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; display rotated 90 degrees clockwise
    _save(tmp_path, name="rotated.png", image=Image.fromarray(pixels), exif=exif)
    image = dti_data.load_training_images(str(tmp_path))[0].image
    assert image.size == (20, 40)  # width, height swapped
    np.testing.assert_array_equal(np.asarray(image), np.rot90(pixels, k=-1))


def _png_header_only(path, width, height):
    """A PNG whose header announces width x height (Pillow refuses or decodes lazily; nothing this big is
    allocated)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def test_huge_float_and_tiny_images(sd_args, tmp_path, capsys, caplog, example_images):
    """Before: a decompression-bomb traceback; a float TIFF became near-black silently; a 1x1 image was upscaled
    silently."""
    data = tmp_path / "data"
    shutil.copytree(example_images, data)
    _png_header_only(data / "huge.png", 30000, 30000)
    assert run_cli_inprocess(sd_args(data=data)) == 2
    one_error(capsys, "huge.png", "resize it")
    os.remove(data / "huge.png")

    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(values, "F").save(data / "float.tif")
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(data / "dot.png")
    images = {os.path.basename(im.name): im.image for im in dti_data.load_training_images(str(data))}
    np.testing.assert_allclose(
        np.asarray(images["float.tif"])[..., 0], np.round(values * 255), atol=0.5
    )  # scaled, not near-black
    caplog.set_level(logging.WARNING)
    run_inprocess(sd_args(data=data, steps=1, out=tmp_path / "ok"))
    small = [r.getMessage() for r in caplog.records if "far smaller than --resolution" in r.getMessage()]
    assert (
        len(small) == 1 and "dot.png (1x1)" in small[0] and "float.tif" not in small[0]
    )  # 8 px: a quarter of 32, kept

    Image.fromarray(values * 4 - 1, "F").save(data / "float.tif")  # outside [0, 1]: no meaning to assume
    assert run_cli_inprocess(sd_args(data=data)) == 2
    one_error(capsys, "float.tif", "outside [0, 1]")


# ----------------------------------------------------------------------------------------------------
# Views: shorter side to the resolution, square crops along the longer side; --resize_mode squash is diffusers'
# ----------------------------------------------------------------------------------------------------


def test_views_keep_the_aspect_ratio_each_one_its_crop_or_mirrored_crop(tiny_sd, odd_images, vae, tmp_path):
    result = run_inprocess(sd_argv(tiny_sd, odd_images, tmp_path / "out", "--crop_positions", "3", steps=1))
    data = result.data
    assert tuple(data.view_index.shape) == (2, 2, 3)  # 2 images x (plain, mirrored) x 3 positions
    for i, name in enumerate(sorted(os.listdir(odd_images))):
        image = Image.open(odd_images / name).convert("RGB")
        w, h = image.size
        scale = RES / min(w, h)  # the shorter side becomes RES, the longer keeps the aspect ratio
        resized = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
        free_x, free_y = resized.width - RES, resized.height - RES
        assert (free_x, free_y) in ((32, 0), (0, 32))
        for c in range(3):
            left, top = free_x * c // 2, free_y * c // 2  # first, middle, last position along the longer side
            crop = resized.crop((left, top, left + RES, top + RES))
            torch.testing.assert_close(
                view_of(data, image=i, flip=0, crop=c), vae_mean(vae, crop), rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(
                view_of(data, image=i, flip=1, crop=c), vae_mean(vae, ImageOps.mirror(crop)), rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize("center_crop", [False, True])
def test_resize_mode_squash_is_diffusers_view(tiny_sd, odd_images, vae, tmp_path, center_crop):
    """diffusers' TextualInversionDataset: (with --center_crop, the central square first, sliced as it slices it),
    then the whole image resized bicubic to a square: one view per image and its mirror."""
    flags = ["--resize_mode", "squash"] + (["--center_crop"] if center_crop else [])
    data = run_inprocess(sd_argv(tiny_sd, odd_images, tmp_path / "out", *flags, steps=1)).data
    assert tuple(data.view_index.shape) == (2, 2, 1)
    for i, name in enumerate(sorted(os.listdir(odd_images))):
        img = np.array(Image.open(odd_images / name).convert("RGB")).astype(np.uint8)
        if center_crop:
            crop, h, w = min(img.shape[0], img.shape[1]), img.shape[0], img.shape[1]
            img = img[(h - crop) // 2 : (h + crop) // 2, (w - crop) // 2 : (w + crop) // 2]
        square = Image.fromarray(img).resize((RES, RES), resample=Image.Resampling.BICUBIC)
        torch.testing.assert_close(view_of(data, image=i, flip=0, crop=0), vae_mean(vae, square), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            view_of(data, image=i, flip=1, crop=0), vae_mean(vae, ImageOps.mirror(square)), rtol=1e-5, atol=1e-5
        )


# ----------------------------------------------------------------------------------------------------
# The default resolution comes from the model's configs; a v-prediction model trains against the velocity
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd2(tiny_sd, tmp_path_factory):
    """The tiny pipeline made SD 2.x-like: v-prediction, and a UNet sample_size of 24 (x VAE factor 2 = 48 px)."""
    folder = tmp_path_factory.mktemp("sd2") / "tiny-sd2"
    shutil.copytree(tiny_sd, folder)
    for path, key, value in (
        ("unet/config.json", "sample_size", 24),
        ("scheduler/scheduler_config.json", "prediction_type", "v_prediction"),
    ):
        config = json.loads((folder / path).read_text())
        config[key] = value
        (folder / path).write_text(json.dumps(config))
    return folder


def test_the_readme_views_figure_shows_the_scripts_crops():
    """tools/make_views_figure.py (docs/views_squash_vs_crops.png) draws the crops the SD script trains on: the last
    tile is the right-most square of the photo resized to a shorter side of `resolution`, computed here with PIL."""
    from make_views_figure import example_photo, figure

    photo, resolution, tile, pad, label = example_photo(120, 80), 64, 16, 16, 30
    canvas = figure(photo, resolution=resolution, positions=3, tile=tile)
    assert canvas.size == (pad + 3 * (tile + 8) + pad, pad + label + 2 * tile + pad + label + tile + pad)
    resized = photo.resize((96, 64), resample=Image.Resampling.BICUBIC)  # shorter side 80 -> 64
    expected = resized.crop((96 - 64, 0, 96, 64)).resize((tile, tile))
    y = pad + label + 2 * tile + pad + label
    shown = canvas.crop((pad + 2 * (tile + 8), y, pad + 2 * (tile + 8) + tile, y + tile))
    assert np.array_equal(np.asarray(shown), np.asarray(expected))


def test_default_resolution_is_read_from_the_configs_alone(tiny_sd2, tmp_path, monkeypatch):
    import diffusers.configuration_utils

    import train_directional_textual_inversion_sdxl as sdxl

    # Only the configs: every weight file is replaced by garbage, which any attempt to load weights would choke on.
    configs_only = tmp_path / "configs-only"
    shutil.copytree(tiny_sd2, configs_only)
    weights = [p for p in configs_only.rglob("*") if p.suffix in (".safetensors", ".bin")]
    assert len(weights) >= 3
    for path in weights:
        path.write_bytes(b"not weights")
    assert dti_cli.model_resolution(str(configs_only)) == 24 * 2  # sample_size x 2 ** (len([8, 16]) - 1)

    # A Hub id: only the two config files are fetched (diffusers' load_config downloads with huggingface_hub).
    fetched = []

    def fake_download(repo_id, filename, subfolder=None, **kwargs):
        fetched.append(f"{repo_id}/{subfolder}/{filename}")
        return str(configs_only / subfolder / filename)

    monkeypatch.setattr(diffusers.configuration_utils, "hf_hub_download", fake_download)
    assert dti_cli.model_resolution("someone/sd2-like", revision="main") == 48
    assert sorted(fetched) == ["someone/sd2-like/unet/config.json", "someone/sd2-like/vae/config.json"]
    (tmp_path / "no-configs").mkdir()
    with pytest.raises(dti_utils.DTIError, match="pass --resolution"):
        dti_cli.model_resolution(str(tmp_path / "no-configs"))
    # SD 1.5 and SD 2.x 768-v configs: 64 x 8 and 96 x 8.
    for sample_size, expected in ((64, 512), (96, 768)):
        (configs_only / "unet" / "config.json").write_text(json.dumps({"sample_size": sample_size}))
        (configs_only / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
        assert dti_cli.model_resolution(str(configs_only)) == expected
    assert (
        sdxl.parse_args(
            ["--train_data_dir", "x", "--placeholder_token", "<t>", "--initializer_token", "toy"]
        ).resolution
        == 768
    )


@pytest.fixture(scope="module")
def sd2_run(tiny_sd2, example_images, tmp_path_factory):
    argv = sd_argv(
        tiny_sd2, example_images, tmp_path_factory.mktemp("sd2-run") / "out", "--crop_positions", "2", steps=1
    )
    del argv[argv.index("--resolution") : argv.index("--resolution") + 2]  # no --resolution: the model's own
    root, messages = logging.getLogger(), []
    handler, level = logging.Handler(logging.INFO), root.level
    handler.emit = lambda record: messages.append(record.getMessage())
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        return run_inprocess(argv), messages
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_run_without_resolution_trains_at_the_models_size(sd2_run):
    result, messages = sd2_run
    assert tuple(result.data.latent_means.shape[1:]) == (4, 24, 24)  # 48 px through the tiny VAE's factor 2
    assert any("--resolution 48 (the model" in m for m in messages), messages  # the chosen value is printed


def test_v_prediction_loss_is_against_the_velocity(sd2_run, tiny_sd2):
    """The loss of a v-prediction model equals the MSE against alpha_t * noise - sigma_t * x0, with alpha_t and sigma_t
    computed here from the scheduler's betas (scaled_linear from 0.00085 to 0.012 over 1000 steps)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    scheduler = DDPMScheduler.from_pretrained(tiny_sd2, subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    unet = UNet2DConditionModel.from_pretrained(tiny_sd2, subfolder="unet").requires_grad_(False)
    vae_config = AutoencoderKL.load_config(tiny_sd2, subfolder="vae")
    batch = sd2_run[0].data.batch(0, 2, 1, 0)
    hidden = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(0))
    ours = dti_data.diffusion_loss(
        unet,
        scheduler,
        batch,
        hidden,
        generator=dti_data.step_generator(5, 0, 0, "cpu"),
        vae_config=SimpleNamespace(**vae_config),
        weight_dtype=torch.float32,
    )

    g = dti_data.step_generator(5, 0, 0, "cpu")  # the same stream: latent sample, noise, timesteps
    x0 = (batch["mean"] + batch["std"] * torch.randn(batch["mean"].shape, generator=g)) * vae_config["scaling_factor"]
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    alpha_t = alphas_cumprod[t].sqrt().float().view(-1, 1, 1, 1)
    sigma_t = (1 - alphas_cumprod[t]).sqrt().float().view(-1, 1, 1, 1)
    with torch.no_grad():
        pred = unet(alpha_t * x0 + sigma_t * noise, t, hidden).sample
    expected = F.mse_loss(pred, alpha_t * noise - sigma_t * x0)
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-4, atol=1e-6)
    assert not torch.isclose(
        expected, F.mse_loss(pred, noise), rtol=1e-2
    )  # the epsilon target would give another loss


# ----------------------------------------------------------------------------------------------------
# Captions: NAME.txt beside NAME.png; {} / --caption_token / prefix; templates for the rest; --caption_dropout
# ----------------------------------------------------------------------------------------------------

LONG = " ".join(["a cat"] * 50)  # 100 tokens: past the 77 of the text encoder
CAPTIONS = {  # image -> (caption file, the prompt it must give with --caption_token toy)
    "example_0": ("a photo of {} on a table", f"a photo of {PLACEHOLDER} on a table"),
    "example_1": ("a red Toy next to a toy car", f"a red {PLACEHOLDER} next to a {PLACEHOLDER} car"),
    "example_2": ("on a beach", f"{PLACEHOLDER}, on a beach"),
    "example_4": (LONG, f"{PLACEHOLDER}, {LONG}"),
}  # example_3 has none: the templates


@pytest.fixture(scope="module")
def captioned_images(example_images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("captioned") / "images"
    shutil.copytree(example_images, folder)
    Image.open(folder / "example_0.png").transpose(Image.Transpose.ROTATE_90).save(folder / "example_4.png")
    for stem, (caption, _) in CAPTIONS.items():
        (folder / f"{stem}.txt").write_text(caption + "\n")
    return folder


@pytest.fixture(scope="module")
def ids_of(tiny_sd):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    tokenizer.add_tokens([PLACEHOLDER])
    return lambda text: (
        tokenizer(text, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        .input_ids[0]
        .tolist()
    )


def epoch_prompts(data):
    """(image index, token ids) of every sample of epoch 0, the image found from its cached latent."""
    image_of_view = {int(v): i for i in range(data.num_images) for v in data.view_index[i].flatten()}
    out = []
    for step in range(data.steps_per_epoch(1, 1)):
        batch = data.batch(step, 1, 1, 0)
        view = int(torch.nonzero((data.latent_means == batch["mean"][0]).flatten(1).all(1))[0])
        out.append((image_of_view[view], batch["input_ids"][0][0].tolist()))
    return out


@pytest.mark.parametrize("dropout", ["0", "1"])
def test_captions_give_the_expected_prompts(tiny_sd, captioned_images, ids_of, tmp_path, caplog, dropout):
    caplog.set_level(logging.INFO)
    argv = sd_argv(
        tiny_sd,
        captioned_images,
        tmp_path / "out",
        "--caption_token",
        "toy",
        "--caption_dropout",
        dropout,
        "--repeats",
        "4",
        "--crop_positions",
        "1",
        steps=1,
    )
    data = run_inprocess(argv).data
    templates = [ids_of(t.format(PLACEHOLDER)) for t in dti_data.OBJECT_TEMPLATES]
    names = sorted(n[:-4] for n in os.listdir(captioned_images) if n.endswith(".png"))
    samples = epoch_prompts(data)
    assert sorted({i for i, _ in samples}) == list(range(5)) and len(samples) == 20
    for i, ids in samples:
        if names[i] in CAPTIONS and dropout == "0":
            assert ids == ids_of(CAPTIONS[names[i]][1]), names[i]
        else:
            assert ids in templates, names[i]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("not images" in w for w in warnings), warnings  # the caption files are not "other files"
    assert len([w for w in warnings if "have a caption" in w]) == 1  # a run mixing captions and templates says so once
    cut = [w for w in warnings if "are cut" in w]
    assert len(cut) == 1 and cut[0].endswith(
        f"1 caption(s) run past the text encoder's 77 tokens and are cut there: {captioned_images / 'example_4.png'}"
    )


def test_caption_naming_the_placeholder_gets_all_its_tokens():
    """A caption that writes the placeholder itself keeps it, each vector's token in place (a multi-vector token)."""
    assert (
        dti_data.caption_prompt("a <T> toy by the sea", "<t> <t>_1", "toy") == "a <t> <t>_1 toy by the sea"
    )  # before the class word
    assert (
        dti_data.caption_prompt("a <t>_1 and a toy", "<t> <t>_1", "toy") == "a <t>_1 and a <t> <t>_1"
    )  # <t>_1 is not <t>
    assert dti_data.caption_prompt("{} and {}", "<t>", "toy") == "<t> and <t>"


def test_resume_is_exact_with_captions(tiny_sd, captioned_images, tmp_path):
    flags = (
        "--caption_token",
        "toy",
        "--caption_dropout",
        "0.5",
        "--repeats",
        "1",
        "--train_batch_size",
        "2",
        "--checkpointing_steps",
        "2",
        "--crop_positions",
        "2",
    )
    out = tmp_path / "out"
    run_inprocess(
        sd_argv(tiny_sd, captioned_images, out, *flags, steps=4)
    )  # 5 samples, batch 2: 3 steps an epoch, so step 4 is epoch 1
    uninterrupted = read_embeds(out / "learned_embeds.safetensors")[0][PLACEHOLDER]
    os.remove(out / "learned_embeds.safetensors")
    shutil.rmtree(out / "checkpoint-4")
    run_inprocess(sd_argv(tiny_sd, captioned_images, out, *flags, "--resume_from_checkpoint", "latest", steps=4))
    resumed = read_embeds(out / "learned_embeds.safetensors")[0][PLACEHOLDER]
    np.testing.assert_allclose(resumed.numpy(), uninterrupted.numpy(), rtol=0, atol=1e-6)


def test_caption_column_of_a_dataset(tmp_path):
    """A local `datasets` image folder with captions in metadata.jsonl, read through --caption_column."""
    folder = tmp_path / "ds"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 32), (40 * i, 80, 120)).save(folder / f"{i}.jpeg")
    rows = [{"file_name": "0.jpeg", "text": "a {} on a  table"}, {"file_name": "1.jpeg", "text": ""}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    images = dti_data.load_training_images(
        dataset_name=str(folder), cache_dir=str(tmp_path / "cache"), caption_column="text"
    )
    assert [im.caption for im in images] == ["a {} on a table", None]
    with pytest.raises(dti_utils.DTIError, match="--caption_column 'caption'"):
        dti_data.load_training_images(
            dataset_name=str(folder), cache_dir=str(tmp_path / "cache"), caption_column="caption"
        )


def test_caption_column_needs_a_dataset(tiny_sd, example_images, tmp_path, capsys):
    assert run_cli_inprocess(sd_argv(tiny_sd, example_images, tmp_path / "out", "--caption_column", "text")) == 2
    assert "--caption_column goes with --dataset_name" in capsys.readouterr().err


def test_help_says_how_captions_and_views_work(capsys):
    import train_directional_textual_inversion as sd

    with pytest.raises(SystemExit):
        sd.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in (
        "NAME.txt beside NAME.jpg",
        "placeholder written at '{}', else in place of this word",
        "else prefixed",
        "Images without a caption use the templates",
        "aspect ratio is kept",
        "squash: diffusers' example",
        "the model's own, unet sample_size x VAE scale factor",
    ):
        assert words in text, words


# ----------------------------------------------------------------------------------------------------
# Nothing silently wrong: a placeholder cut off, vectors past the context, files passed over, a byte-order mark
# ----------------------------------------------------------------------------------------------------


def test_a_caption_that_puts_the_placeholder_past_the_context_is_refused(
    sd_args, tmp_path, example_images, capsys, tokenizer
):
    """Before: the caption was cut at 77 tokens and the image trained without the token (one warning: 'cut')."""
    data = tmp_path / "data"
    shutil.copytree(example_images, data)
    (data / "example_1.txt").write_text(" ".join(["a photo of a toy on a table"] * 12) + " with {}")
    before = disk_state(tmp_path)
    assert run_cli_inprocess(sd_args(data=data, out=tmp_path / "out")) == 2
    line = one_error(capsys, "example_1.png", "puts the placeholder at token", "past the text encoder's 77 tokens")
    reader = copy.deepcopy(tokenizer)  # the session's tokenizer stays as it is
    reader.add_tokens([PLACEHOLDER])
    ids = reader((data / "example_1.txt").read_text().replace("{}", PLACEHOLDER)).input_ids
    assert int(line.split("at token ")[1].split(",")[0]) == ids.index(reader.convert_tokens_to_ids(PLACEHOLDER)) + 1
    assert disk_state(tmp_path) == before


def test_more_vectors_than_the_context_holds_are_refused(sd_args, tmp_path, capsys, tokenizer):
    """Before: --num_vectors 80 trained; the vectors past token 77 never received a gradient."""
    assert run_cli_inprocess(sd_args("--num_vectors", "80", out=tmp_path / "out")) == 2
    line = one_error(capsys, "--num_vectors 80", "past the text encoder's 77", "use at most")
    longest = max(len(tokenizer(t.format("")).input_ids) for t in dti_data.OBJECT_TEMPLATES)
    assert line.rstrip(".").endswith(f"use at most {77 - longest} vectors")
    assert not (tmp_path / "out").exists()
    assert run_inprocess(sd_args("--num_vectors", str(77 - longest), steps=1, out=tmp_path / "ok")).global_step == 1


def test_subfolders_and_hidden_files_are_named_in_warnings_and_a_bom_is_no_prompt_word(
    tmp_path, example_images, caplog
):
    data = tmp_path / "data"
    shutil.copytree(example_images, data)
    (data / "more").mkdir()
    shutil.copy(data / "example_0.png", data / "more" / "example_9.png")
    (data / ".DS_Store").write_bytes(b"\0")
    (data / ".hidden.png").write_bytes(b"\0")
    (data / "example_2.txt").write_bytes("\ufeffa toy on a table".encode("utf-8"))  # a BOM, as Notepad writes it
    caplog.set_level(logging.WARNING)
    images = dti_data.load_training_images(str(data))
    messages = [r.getMessage() for r in caplog.records]
    assert len(images) == 4
    assert [m for m in messages if "subfolder(s) of" in m] == [
        f"Skipping 1 subfolder(s) of {data}: more/ (only the images at its top level are read, as in diffusers' "
        "example; move them up to train on them)"
    ]
    hidden = [m for m in messages if "hidden file(s) in" in m]
    assert len(hidden) == 1 and "Skipping 2 hidden file(s)" in hidden[0]
    captions = {os.path.basename(im.name): im.caption for im in images}
    assert captions["example_2.png"] == "a toy on a table"


def test_a_14000_pixel_square_image_is_told_its_real_size_and_limit(sd_args, tmp_path, example_images, capsys):
    """Before: 'resize it below 16384x16384', which it already was."""
    data = tmp_path / "data"
    shutil.copytree(example_images, data)
    _png_header_only(data / "big.png", 14000, 14000)
    assert run_cli_inprocess(sd_args(data=data)) == 2
    limit = 2 * Image.MAX_IMAGE_PIXELS / 1e6
    line = one_error(capsys, "big.png has 196 megapixels", f"at most {limit:.0f} megapixels", "resize it")
    assert "16384" not in line
