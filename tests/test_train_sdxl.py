"""Tests of the SDXL script, train_directional_textual_inversion_sdxl.py, on a tiny random SDXL pipeline.

The tiny pipeline (conftest's tiny_sdxl, made by tools/make_tiny_pipeline.make_tiny_sdxl) has encoder 1 of width 32,
encoder 2 of width 64 with a projection, and encoder 2's eos_token_id is 2 as in the real SDXL config, so its pooled
output is taken at argmax(input_ids): the added placeholder token. Everything runs offline on the CPU.

Runs are shared through module-scoped fixtures: one real entry-point run (subprocess) feeds the file, loading
and pooled-output tests; the other runs call main() in this process.
"""

import glob
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import dti_data
import dti_utils
import train_directional_textual_inversion_sdxl as sdxl

from conftest import REPO_ROOT, StepRecorder, angle, read_embeds, sd_argv, subprocess_env

# conftest.py (loaded first) sets the offline environment and puts the repo root and tools/ on sys.path.
from conftest import run_inprocess as run_script_inprocess


# Module fixtures train models: one worker runs this file's tests, so they are made once (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_train_sdxl")


SDXL_SCRIPT = os.path.join(REPO_ROOT, "train_directional_textual_inversion_sdxl.py")

TOKEN = "<toy>"
# single-file name for "<toy>": not "toy", an ordinary word that AUTOMATIC1111 would replace in every prompt
STEM = "toy-ti"
PROMPT = "a photo of a <toy> in a city street"
RES = 32
IMAGE_SIZES = [(64 + 8 * i, 64) for i in range(4)]  # (width, height) written by make_example_images(count=4, size=64)


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def sdxl_argv(pipeline, data, out, *extra, steps=4):
    """conftest's small, fast flags with this file's token, resolution, one repeat and a log line per step;
    later flags in `extra` override these (argparse keeps the last)."""
    return sd_argv(
        pipeline,
        data,
        out,
        "--placeholder_token",
        TOKEN,
        "--resolution",
        RES,
        "--repeats",
        "1",
        "--log_steps",
        "1",
        *extra,
        steps=steps,
        seed=0,
    )


def run_inprocess(argv, callback=None):
    """sdxl.main(sdxl.parse_args(argv)) in this process; returns main's result (step, embeddings, optimizer, data)."""
    return run_script_inprocess(argv, callback, module=sdxl)


def token_embedding(pipeline_dir, subfolder):
    """The base encoder's token embedding matrix, read straight from its weight file (float64)."""
    from safetensors.numpy import load_file

    weights = load_file(os.path.join(pipeline_dir, subfolder, "model.safetensors"))
    keys = [k for k in weights if k.endswith("embeddings.token_embedding.weight")]
    assert len(keys) == 1, keys
    return weights[keys[0]].astype(np.float64)


def mean_row_norm(weight):
    norms = np.sqrt((weight * weight).sum(axis=1))
    return float(norms[norms > 0].mean())


def fresh_pipeline(pipeline_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_both_files(pipe, out_dir):
    """The documented SDXL loading: one call per encoder, same token."""
    pipe.load_textual_inversion(
        str(out_dir),
        weight_name="learned_embeds.safetensors",
        token=TOKEN,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
    )
    pipe.load_textual_inversion(
        str(out_dir),
        weight_name="learned_embeds_2.safetensors",
        token=TOKEN,
        text_encoder=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer_2,
    )
    return pipe


def token_rows(pipe):
    rows = []
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        token_id = tok.convert_tokens_to_ids(TOKEN)
        assert token_id != tok.unk_token_id
        rows.append(enc.get_input_embeddings().weight[token_id].detach().float())
    return rows


def generate(pipe, prompt=PROMPT):
    image = pipe(
        prompt,
        num_inference_steps=2,
        height=RES,
        width=RES,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, RES, RES, 3)
    assert np.isfinite(image).all()
    return image


def tokenize(tokenizer, prompt):
    return tokenizer(
        [prompt], padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


def pipeline_encode(pipe, prompt):
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        prompt, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return prompt_embeds, pooled


def assert_close(actual, expected, atol=1e-6):
    actual, expected = actual.detach().float(), expected.detach().float()
    assert actual.shape == expected.shape
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max abs difference {diff} > {atol}"


# ----------------------------------------------------------------------------------------------------
# Module fixtures
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_images(tmp_path_factory):
    from make_tiny_pipeline import make_example_images

    folder = str(tmp_path_factory.mktemp("sdxl-data") / "images")
    make_example_images(folder, count=4, size=64)
    return folder


@pytest.fixture(scope="module")
def vocab_means(tiny_sdxl):
    """Each encoder's reference norm, computed here from the base weight files (non-zero rows)."""
    return [mean_row_norm(token_embedding(tiny_sdxl, sub)) for sub in ("text_encoder", "text_encoder_2")]


@pytest.fixture(scope="module")
def e2e_run(tiny_sdxl, sdxl_images, tmp_path_factory):
    """One run through the real entry point: `python train_directional_textual_inversion_sdxl.py ...`."""
    out = tmp_path_factory.mktemp("sdxl-e2e") / "out"
    argv = sdxl_argv(
        tiny_sdxl, sdxl_images, out, "--save_steps", "2", "--train_batch_size", "2", "--repeats", "2", steps=4
    )
    proc = subprocess.run(
        [sys.executable, SDXL_SCRIPT, *argv],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.fixture(scope="module")
def trained(e2e_run):
    """The final vectors of the entry-point run: [encoder 1 (n, 32), encoder 2 (n, 64)]."""
    out, _ = e2e_run
    return [read_embeds(out / f"{stem}.safetensors")[0][TOKEN] for stem in ("learned_embeds", "learned_embeds_2")]


# ----------------------------------------------------------------------------------------------------
# The entry point: files, norms, snapshots
# ----------------------------------------------------------------------------------------------------


def test_entry_point_writes_three_files_with_each_encoders_norm(e2e_run, vocab_means, tiny_sdxl):
    out, proc = e2e_run
    files = sorted(os.path.basename(p) for p in glob.glob(str(out / "*.safetensors")))
    assert files == sorted(
        [
            "learned_embeds.safetensors",
            "learned_embeds_2.safetensors",
            f"{STEM}.safetensors",
            "learned_embeds-steps-2.safetensors",
            "learned_embeds_2-steps-2.safetensors",
            f"{STEM}-steps-2.safetensors",
            "learned_embeds-steps-4.safetensors",
            "learned_embeds_2-steps-4.safetensors",
            f"{STEM}-steps-4.safetensors",
        ]
    )
    assert not glob.glob(str(out / ".tmp-*"))

    one, meta_1 = read_embeds(out / "learned_embeds.safetensors")
    two, meta_2 = read_embeds(out / "learned_embeds_2.safetensors")
    single, meta_s = read_embeds(out / f"{STEM}.safetensors")
    assert list(one) == [TOKEN] and list(two) == [TOKEN]
    assert sorted(single) == ["clip_g", "clip_l"]
    assert meta_1["format"] == meta_2["format"] == meta_s["format"] == "pt"
    e1, e2 = one[TOKEN], two[TOKEN]
    assert e1.dtype == e2.dtype == torch.float32
    assert e1.shape == (1, 32) and e2.shape == (1, 64)
    assert single["clip_l"].dtype == single["clip_g"].dtype == torch.float32
    assert torch.equal(single["clip_l"], e1) and torch.equal(single["clip_g"], e2)

    m1, m2 = vocab_means
    assert abs(m1 - m2) / m2 > 0.05, "the two tiny encoders should have clearly different vocabulary norms"
    for vecs, m in ((e1, m1), (e2, m2)):
        norms = vecs.double().norm(dim=-1)
        assert torch.allclose(norms, torch.full_like(norms, m), rtol=1e-5, atol=0), (norms, m)
    assert abs(e1.norm().item() - e2.norm().item()) > 1e-3

    # the learned vector moved away from the initializer's direction (training happened) but kept its norm
    from transformers import CLIPTokenizer

    for sub, tok_sub, vecs in (("text_encoder", "tokenizer", e1), ("text_encoder_2", "tokenizer_2", e2)):
        init_id = CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder=tok_sub).convert_tokens_to_ids("toy</w>")
        init = torch.from_numpy(token_embedding(tiny_sdxl, sub)[init_id]).float()
        cos = torch.nn.functional.cosine_similarity(vecs[0], init, dim=0).item()
        assert 0.5 < cos < 1 - 1e-6, cos

    # the snapshots: every file exists for each save step, the last equals the final file, norms are kept
    for stem in ("learned_embeds", "learned_embeds_2"):
        final = read_embeds(out / f"{stem}.safetensors")[0][TOKEN]
        snap_2, snap_meta = read_embeds(out / f"{stem}-steps-2.safetensors")
        snap_4 = read_embeds(out / f"{stem}-steps-4.safetensors")[0][TOKEN]
        assert snap_meta["steps"] == "2"
        assert torch.equal(snap_4, final)
        assert not torch.equal(snap_2[TOKEN], final)
        assert torch.allclose(snap_2[TOKEN].norm(dim=-1), final.norm(dim=-1), rtol=1e-5)
    snap_single = read_embeds(out / f"{STEM}-steps-2.safetensors")[0]
    assert torch.equal(snap_single["clip_l"], read_embeds(out / "learned_embeds-steps-2.safetensors")[0][TOKEN])
    assert torch.equal(snap_single["clip_g"], read_embeds(out / "learned_embeds_2-steps-2.safetensors")[0][TOKEN])


# ----------------------------------------------------------------------------------------------------
# Loading in diffusers: the two-file pattern and the clip_l/clip_g single file
# ----------------------------------------------------------------------------------------------------


def test_two_files_load_with_documented_calls_and_generate(e2e_run, trained, tiny_sdxl):
    out, _ = e2e_run
    pipe = load_both_files(fresh_pipeline(tiny_sdxl), out)
    row_1, row_2 = token_rows(pipe)
    assert torch.equal(row_1, trained[0][0]) and torch.equal(row_2, trained[1][0])
    image = pipe(
        PROMPT, num_inference_steps=2, height=RES, width=RES, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (RES, RES)
    generate(pipe)


def test_single_file_loads_through_clip_l_clip_g_pattern(e2e_run, trained, tiny_sdxl):
    from safetensors.torch import load_file

    out, _ = e2e_run
    state = load_file(str(out / f"{STEM}.safetensors"))
    pipe = fresh_pipeline(tiny_sdxl)
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(
        state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    row_1, row_2 = token_rows(pipe)
    assert torch.equal(row_1, trained[0][0]) and torch.equal(row_2, trained[1][0])
    image = generate(pipe)
    # the token is used: the same seed without the learned token gives another image
    other = generate(pipe, PROMPT.replace(TOKEN, "toy"))
    assert np.abs(image - other).max() > 1e-4


# ----------------------------------------------------------------------------------------------------
# Training-time conditioning equals inference-time conditioning (pooled output included)
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inference_pipe(e2e_run, tiny_sdxl):
    out, _ = e2e_run
    return load_both_files(fresh_pipeline(tiny_sdxl), out)


@torch.no_grad()
def test_training_encode_prompt_equals_pipeline_encode_prompt(inference_pipe):
    pipe = inference_pipe
    ids = [tokenize(pipe.tokenizer, PROMPT), tokenize(pipe.tokenizer_2, PROMPT)]
    hidden, pooled = sdxl.encode_prompt([pipe.text_encoder, pipe.text_encoder_2], ids)
    ref_hidden, ref_pooled = pipeline_encode(pipe, PROMPT)
    assert hidden.shape == (1, 77, 32 + 64) and pooled.shape == (1, 64)
    assert_close(hidden, ref_hidden)
    assert_close(pooled, ref_pooled)


@torch.no_grad()
def test_pooled_output_is_taken_at_the_placeholder_and_depends_on_it(inference_pipe, trained):
    pipe = inference_pipe
    enc = pipe.text_encoder_2
    assert enc.config.eos_token_id == 2
    ids_2 = tokenize(pipe.tokenizer_2, PROMPT)
    token_id = pipe.tokenizer_2.convert_tokens_to_ids(TOKEN)
    eos_id = pipe.tokenizer_2.eos_token_id
    placeholder_pos = (ids_2[0] == token_id).nonzero().flatten().tolist()
    first_eos_pos = (ids_2[0] == eos_id).nonzero().flatten()[0].item()
    assert len(placeholder_pos) == 1
    assert ids_2[0].argmax().item() == placeholder_pos[0]  # the added token has the largest id
    assert placeholder_pos[0] < first_eos_pos

    out = enc(ids_2, output_hidden_states=True)
    last = out.last_hidden_state[0]
    at_placeholder = enc.text_projection(last[placeholder_pos[0]])
    at_eos = enc.text_projection(last[first_eos_pos])
    assert_close(out.text_embeds[0], at_placeholder)
    assert (out.text_embeds[0] - at_eos).abs().max().item() > 1e-3

    # the pooled output follows the learned vector: swap in the initializer's row and it changes
    _, pooled = sdxl.encode_prompt([pipe.text_encoder, enc], [tokenize(pipe.tokenizer, PROMPT), ids_2])
    weight = enc.get_input_embeddings().weight
    saved = weight[token_id].clone()
    assert torch.equal(saved, trained[1][0])
    try:
        weight[token_id] = weight[pipe.tokenizer_2.convert_tokens_to_ids("toy</w>")]
        _, pooled_init = sdxl.encode_prompt([pipe.text_encoder, enc], [tokenize(pipe.tokenizer, PROMPT), ids_2])
    finally:
        weight[token_id] = saved
    assert (pooled - pooled_init).abs().max().item() > 1e-4


@torch.no_grad()
def test_hooked_training_path_equals_inference_after_load(inference_pipe, trained, tiny_sdxl):
    """DirectionalEmbedding (forward hook, frozen matrix) on freshly loaded encoders, param = the trained direction,
    gives the conditioning the pipeline computes after load_textual_inversion."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizers = [CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    encoders = [
        CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder"),
        CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2"),
    ]
    concepts = []
    for i, (tok, enc) in enumerate(zip(tokenizers, encoders)):
        enc.eval()
        tokens, init_ids = dti_utils.resolve_tokens(tok, TOKEN, "toy")
        c = dti_utils.add_directional_embedding(tok, enc, tokens, init_ids, "mean", name=f"enc{i}")
        c.param.data.copy_(trained[i] / trained[i].norm(dim=-1, keepdim=True))
        # the matrix row itself is not the trained vector: only the hook makes the encoder see it
        assert not torch.allclose(enc.get_input_embeddings().weight[c.token_ids[0]], trained[i][0], atol=1e-4)
        concepts.append(c)
    for c, vec in zip(concepts, trained):
        assert_close(c.vectors(), vec, atol=1e-7)

    ids = [tokenize(tokenizers[0], PROMPT), tokenize(tokenizers[1], PROMPT)]
    assert torch.equal(ids[0], tokenize(inference_pipe.tokenizer, PROMPT))
    assert torch.equal(ids[1], tokenize(inference_pipe.tokenizer_2, PROMPT))
    hidden, pooled = sdxl.encode_prompt(encoders, ids)
    ref_hidden, ref_pooled = pipeline_encode(inference_pipe, PROMPT)
    assert_close(hidden, ref_hidden)
    assert_close(pooled, ref_pooled)


# ----------------------------------------------------------------------------------------------------
# A batch size that does not divide the data: the last batch wraps around, every view keeps its own time ids
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_batch_run(tiny_sdxl, sdxl_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl-batch3") / "out"
    return out, run_inprocess(
        sdxl_argv(tiny_sdxl, sdxl_images, out, "--train_batch_size", "3", "--repeats", "1", steps=2)
    )


def expected_views(image_dir, center_crop=False, positions=8):
    """(original (h, w), crop (top, left)) of every distinct view, built independently of the script's data code."""
    from PIL import Image

    names = sorted(n for n in os.listdir(image_dir) if n.endswith(".png"))
    out = []
    for name in names:
        with Image.open(os.path.join(image_dir, name)) as im:
            w, h = im.size
        scale = RES / min(w, h)
        rw, rh = max(RES, round(w * scale)), max(RES, round(h * scale))
        fy, fx = rh - RES, rw - RES
        if center_crop or (fx == 0 and fy == 0):
            crops = [(fy // 2, fx // 2)]
        else:
            crops = list(
                dict.fromkeys(
                    (round(fy * i / (positions - 1)), round(fx * i / (positions - 1))) for i in range(positions)
                )
            )
        out += [((h, w), crop) for crop in crops]
    return out


def test_batch_size_not_dividing_the_data_wraps_the_last_batch(short_batch_run, sdxl_images, vocab_means):
    out, result = short_batch_run
    assert result.global_step == 2
    for stem, m in (("learned_embeds", vocab_means[0]), ("learned_embeds_2", vocab_means[1])):
        vec = read_embeds(out / f"{stem}.safetensors")[0][TOKEN]
        assert torch.isfinite(vec).all()
        assert abs(vec.double().norm().item() - m) / m < 1e-5

    data = result.data
    views = expected_views(sdxl_images)
    assert data.latent_means.shape[0] == len(views) == data.extra["time_ids"].shape[0]
    expected_rows = torch.tensor([[h, w, top, left, RES, RES] for (h, w), (top, left) in views], dtype=torch.float32)
    assert torch.equal(data.extra["time_ids"].cpu(), expected_rows)

    assert data.steps_per_epoch(3, 1) == 2
    first, second = data.batch(0, 3, 1, 0), data.batch(1, 3, 1, 0)
    assert first["mean"].shape[0] == second["mean"].shape[0] == 3  # one input shape for the whole run (one CUDA graph)
    images_seen = []
    for batch in (first, second):
        assert batch["time_ids"].shape == (3, 6) and batch["time_ids"].dtype == torch.float32
        assert [ids.shape for ids in batch["input_ids"]] == [(3, 77), (3, 77)]
        for j in range(3):
            # which cached view is this sample? its latent mean says; its time ids must be that view's
            match = [
                v for v in range(data.latent_means.shape[0]) if torch.equal(data.latent_means[v], batch["mean"][j])
            ]
            assert len(match) == 1
            (h, w), (top, left) = views[match[0]]
            assert batch["time_ids"][j].tolist() == [h, w, top, left, RES, RES]
            resized_w = round(w * RES / min(w, h))
            assert top == 0 and 0 <= left <= resized_w - RES
            images_seen.append((h, w))
    # one epoch (repeats 1) visits every image once; the last two places wrap around to the epoch's first two images
    assert set(images_seen[:4]) == {(h, w) for w, h in IMAGE_SIZES}
    assert images_seen[4:] == images_seen[:2]


def test_every_cached_view_is_its_crop_or_mirrored_crop_with_matching_time_ids(tiny_sdxl, sdxl_images, tmp_path):
    """Each cached latent is the VAE's encoding of the crop computed here independently (mirrored for flipped views),
    and a mirrored view's time ids carry the crop-left of the mirrored crop."""
    from diffusers import AutoencoderKL
    from PIL import Image, ImageOps

    result = run_inprocess(
        sdxl_argv(tiny_sdxl, sdxl_images, tmp_path / "out", "--flip_p", "0.5", "--crop_positions", "3", steps=1)
    )
    data = result.data
    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    names = sorted(n for n in os.listdir(sdxl_images) if n.endswith(".png"))
    assert tuple(data.view_index.shape) == (4, 2, 3)
    for i, name in enumerate(names):
        image = Image.open(os.path.join(sdxl_images, name)).convert("RGB")
        w, h = image.size
        resized = image.resize(
            (max(RES, round(w * RES / min(w, h))), max(RES, round(h * RES / min(w, h)))), Image.Resampling.BICUBIC
        )
        free = resized.width - RES
        corners = list(
            dict.fromkeys(round(free * k / 2) for k in range(3))
        )  # 3 positions along the width (height is the short side)
        for c in range(3):
            left = corners[c % len(corners)]
            crop = resized.crop((left, 0, left + RES, RES))
            for flip, view_image, time_left in ((0, crop, left), (1, ImageOps.mirror(crop), free - left)):
                v = int(data.view_index[i, flip, c])
                with torch.no_grad():
                    want = vae.encode(dti_data.image_to_tensor(view_image)[None]).latent_dist.mean[0]
                torch.testing.assert_close(data.latent_means[v], want, rtol=1e-5, atol=1e-5)
                assert data.extra["time_ids"][v].tolist() == [h, w, 0, time_left, RES, RES]


# ----------------------------------------------------------------------------------------------------
# bf16 on the CPU: directions and optimizer state stay float32; --center_crop gives one view per image
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_run(tiny_sdxl, sdxl_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl-bf16") / "out"
    return out, run_inprocess(
        sdxl_argv(
            tiny_sdxl,
            sdxl_images,
            out,
            "--mixed_precision",
            "bf16",
            "--center_crop",
            "--train_batch_size",
            "2",
            steps=2,
        )
    )


def test_bf16_keeps_directions_and_optimizer_state_float32(bf16_run, vocab_means):
    out, result = bf16_run
    assert result.weight_dtype == torch.bfloat16
    assert result.global_step == 2
    assert next(result.unet.parameters()).dtype == torch.bfloat16
    optimizer = result.optimizer.optimizer  # accelerate's wrapper around it
    assert isinstance(optimizer, dti_utils.RiemannianSGD)
    for c in result.embeddings:
        assert c.param.dtype == torch.float32
        assert c.vectors().dtype == torch.float32
        assert torch.allclose(c.param.norm(dim=-1), torch.ones(c.param.shape[0]), atol=1e-6)
        state = optimizer.state[c.param]
        assert state["prior"].dtype == state["exp_avg_sq"].dtype == state["step"].dtype == torch.float32
        assert state["step"].item() == 2
        assert angle(c.param, state["prior"]).max() > 1e-5  # it trained
    for stem, m in (("learned_embeds", vocab_means[0]), ("learned_embeds_2", vocab_means[1])):
        vec = read_embeds(out / f"{stem}.safetensors")[0][TOKEN]
        assert vec.dtype == torch.float32
        assert abs(vec.double().norm().item() - m) / m < 1e-5
    single = read_embeds(out / f"{STEM}.safetensors")[0]
    assert single["clip_l"].dtype == single["clip_g"].dtype == torch.float32


def test_center_crop_run_caches_one_view_per_image(bf16_run):
    _, result = bf16_run
    data = result.data
    assert tuple(data.view_index.shape) == (4, 1, 1)
    assert data.latent_means.shape[0] == 4
    rows = data.extra["time_ids"].cpu().tolist()
    # centre crop of the resized image: top 0 (height is the short side), left = (resized width - RES) // 2
    assert rows == [[h, w, 0, (round(w * RES / h) - RES) // 2, RES, RES] for w, h in IMAGE_SIZES]


# ----------------------------------------------------------------------------------------------------
# Exact resume
# ----------------------------------------------------------------------------------------------------


def test_resume_from_checkpoint_continues_exactly(tiny_sdxl, sdxl_images, tmp_path):
    # uninterrupted 6 steps (4 steps per epoch, so step 4 crosses an epoch), checkpoint at 3 and 6
    full = tmp_path / "full"
    run_inprocess(sdxl_argv(tiny_sdxl, sdxl_images, full, "--checkpointing_steps", "3", "--save_steps", "3", steps=6))
    assert (full / "checkpoint-3").is_dir() and (full / "checkpoint-6").is_dir()

    # the interrupted run: only checkpoint-3 in its folder, no outputs; continue with "latest"
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    recorder = StepRecorder()
    result = run_inprocess(
        sdxl_argv(
            tiny_sdxl,
            sdxl_images,
            resumed,
            "--checkpointing_steps",
            "3",
            "--resume_from_checkpoint",
            "latest",
            steps=6,
        ),
        recorder,
    )
    assert recorder.steps == [4, 5, 6]  # only the remaining steps ran
    assert result.global_step == 6

    for stem in ("learned_embeds", "learned_embeds_2"):
        a = read_embeds(full / f"{stem}.safetensors")[0][TOKEN]
        b = read_embeds(resumed / f"{stem}.safetensors")[0][TOKEN]
        mid = read_embeds(full / f"{stem}-steps-3.safetensors")[0][TOKEN]
        assert (a - b).abs().max().item() <= 1e-6
        assert (a - mid).abs().max().item() > 1e-5  # the last three steps did move the vector
    a = read_embeds(full / f"{STEM}.safetensors")[0]
    b = read_embeds(resumed / f"{STEM}.safetensors")[0]
    for key in ("clip_l", "clip_g"):
        assert (a[key] - b[key]).abs().max().item() <= 1e-6


# ----------------------------------------------------------------------------------------------------
# Two CPU processes with torchrun
# ----------------------------------------------------------------------------------------------------

_RANK_WRAPPER = textwrap.dedent("""
    import os, sys
    import torch
    import train_directional_textual_inversion_sdxl as m

    result = m.main(m.parse_args())  # the script's own main; its return value carries every rank's vectors
    world = int(os.environ["WORLD_SIZE"])
    out = sys.argv[sys.argv.index("--output_dir") + 1]
    params = [e.param.detach().float().cpu().clone() for e in result.embeddings]
    torch.save(params, os.path.join(out, f"params-rank{os.environ['RANK']}-of-{world}.pt"))
""")


def test_torchrun_two_processes_one_set_of_files_same_result(tiny_sdxl, sdxl_images, tmp_path, vocab_means):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun not installed next to the interpreter")
    wrapper = tmp_path / "rank_wrapper.py"
    wrapper.write_text(_RANK_WRAPPER)
    out = tmp_path / "out"
    argv = sdxl_argv(tiny_sdxl, sdxl_images, out, "--train_batch_size", "1", steps=3)
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(wrapper), *argv],
        cwd=REPO_ROOT,
        env=subprocess_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    files = sorted(os.listdir(out))
    # both processes must have joined one process group (world size 2): otherwise each trains alone, on
    # half the intended batch, and both write the output files
    rank_files = sorted(f for f in files if f.startswith("params-rank"))
    assert rank_files == ["params-rank0-of-2.pt", "params-rank1-of-2.pt"], (
        f"torchrun --nproc_per_node 2 on the CPU did not form a 2-process group: {rank_files}"
    )
    assert "x 2 processes" in proc.stderr
    embedding_files = [f for f in files if f.endswith((".safetensors", ".bin"))]
    assert embedding_files == sorted(
        ["learned_embeds.safetensors", "learned_embeds_2.safetensors", f"{STEM}.safetensors"]
    )
    assert not [f for f in files if f.startswith(".tmp-")]
    rank0 = torch.load(out / "params-rank0-of-2.pt")
    rank1 = torch.load(out / "params-rank1-of-2.pt")
    assert len(rank0) == len(rank1) == 2
    for p0, p1 in zip(rank0, rank1):
        assert torch.equal(p0, p1)
    for stem, p, m in (("learned_embeds", rank0[0], vocab_means[0]), ("learned_embeds_2", rank0[1], vocab_means[1])):
        vec = read_embeds(out / f"{stem}.safetensors")[0][TOKEN]
        assert abs(vec.double().norm().item() - m) / m < 1e-5
        assert_close(vec, m * p, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Crop views: --center_crop one per image, the default --crop_positions distinct crops
# ----------------------------------------------------------------------------------------------------


def _resized_images(image_dir):
    from PIL import Image

    names = sorted(n for n in os.listdir(image_dir) if n.endswith(".png"))
    images = [Image.open(os.path.join(image_dir, n)).convert("RGB") for n in names]
    return images, [dti_data.resized_shorter_side(im, RES) for im in images]


def _crop(image, corner):
    top, left = corner
    return image.crop((left, top, left + RES, top + RES))


def test_center_crop_gives_one_view_per_image(sdxl_images):
    _, resized = _resized_images(sdxl_images)
    assert [im.size for im in resized] == [(round(w * RES / h), RES) for w, h in IMAGE_SIZES]
    keys, view_index = dti_data.build_views(resized, lambda im: dti_data.crop_positions(im, RES, True, 8), flip=False)
    assert len(keys) == 4 and tuple(view_index.shape) == (4, 1, 1)
    for i, (im, (_, _, (top, left))) in enumerate(zip(resized, keys)):
        assert (top, left) == (0, (im.width - RES) // 2)


@pytest.mark.parametrize("positions", [8, 3])
def test_default_random_crop_gives_distinct_positions(sdxl_images, positions):
    _, resized = _resized_images(sdxl_images)
    # the crop helper: `positions` evenly spaced corners along the long side, ends included
    big = resized[3]  # 44 x 32: 12 free pixels, room for 8 distinct positions
    corners = dti_data.crop_positions(big, RES, False, positions)
    assert len(corners) == positions == len(set(corners))
    assert corners[0] == (0, 0) and corners[-1] == (0, big.width - RES)
    assert all(t == 0 and 0 <= left <= big.width - RES for t, left in corners)
    assert dti_data.crop_positions(resized[0], RES, False, positions) == [(0, 0)]  # square: one view

    keys, view_index = dti_data.build_views(
        resized, lambda im: dti_data.crop_positions(im, RES, False, positions), flip=False
    )
    expected = expected_views(sdxl_images, positions=positions)
    sizes = [(h, w) for w, h in IMAGE_SIZES]
    assert [(sizes[i], crop) for i, _, crop in keys] == expected
    assert len(keys) == len(expected)
    assert tuple(view_index.shape) == (4, 1, positions)
    per_image = [len(set(view_index[i, 0].tolist())) for i in range(4)]
    distinct = [len({c for (hw, c) in expected if hw == (h, w)}) for w, h in IMAGE_SIZES]
    assert per_image == distinct
    assert per_image[0] == 1
    if positions == 3:
        assert per_image == [1, 3, 3, 3]  # every non-square image: --crop_positions distinct crops
    else:
        assert per_image[2:] == [8, 8]  # enough free pixels: 8 distinct crops
    assert not any(mirrored for _, mirrored, _ in keys)


# ----------------------------------------------------------------------------------------------------
# The concept tools on a real SDXL training output
# ----------------------------------------------------------------------------------------------------


def test_concept_tools_on_sdxl_training_output(e2e_run, trained, vocab_means, tiny_sdxl, tmp_path, capsys):
    import json

    import dti_concepts

    out, _ = e2e_run
    # slerp between the final single file and the step-2 snapshot: per-encoder norms stay at each encoder's m
    assert (
        dti_concepts.main(
            [
                "slerp",
                str(out / f"{STEM}.safetensors"),
                str(out / f"{STEM}-steps-2.safetensors"),
                "--alpha",
                "0.5",
                "--token",
                "<mix>",
                "--output",
                str(tmp_path / "mix"),
            ]
        )
        == 0
    )
    blended = [
        read_embeds(tmp_path / "mix" / f"{stem}.safetensors")[0]["<mix>"]
        for stem in ("learned_embeds", "learned_embeds_2")
    ]
    for vectors, expected in zip(blended, vocab_means):
        assert torch.allclose(vectors.norm(dim=-1).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5)
    pipe = fresh_pipeline(tiny_sdxl)
    for stem, encoder, tokenizer in (
        ("learned_embeds", pipe.text_encoder, pipe.tokenizer),
        ("learned_embeds_2", pipe.text_encoder_2, pipe.tokenizer_2),
    ):
        pipe.load_textual_inversion(
            str(tmp_path / "mix"),
            weight_name=f"{stem}.safetensors",
            token="<mix>",
            text_encoder=encoder,
            tokenizer=tokenizer,
        )
    assert pipe("a photo of <mix>", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)

    # inspect: both encoders, each at 1.0x its own vocabulary mean
    capsys.readouterr()
    assert dti_concepts.main(["inspect", str(out), "--model", str(tiny_sdxl), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sdxl"] is True and set(report["encoders"]) == {"text_encoder", "text_encoder_2"}
    for name in ("text_encoder", "text_encoder_2"):
        assert abs(report["encoders"][name]["vectors"][0]["norm_to_vocab_mean"] - 1.0) < 1e-5

    # convert: folder -> single clip_l/clip_g file -> folder is bit-exact
    assert (
        dti_concepts.main(["convert", str(out), "--to", "comfyui", "--output", str(tmp_path / f"{STEM}.safetensors")])
        == 0
    )
    assert (
        dti_concepts.main(
            ["convert", str(tmp_path / f"{STEM}.safetensors"), "--to", "diffusers", "--output", str(tmp_path / "back")]
        )
        == 0
    )
    back = [
        read_embeds(tmp_path / "back" / f"{stem}.safetensors")[0][TOKEN]
        for stem in ("learned_embeds", "learned_embeds_2")
    ]
    assert all(torch.equal(a, b) for a, b in zip(back, trained))
