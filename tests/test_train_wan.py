"""Tests of the Wan script, train_directional_textual_inversion_wan.py, on a tiny random Wan 2.1 pipeline (conftest's
tiny_wan: UMT5 of width 32 whose table, 320 rows, is larger than its 300-token tokenizer; a Wan VAE with per-channel
latents_mean/std), offline on the CPU. Every run calls main() in this process.
"""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import dti_concepts
import dti_data
import dti_files
import train_directional_textual_inversion_sana as sana
import train_directional_textual_inversion_wan as wan

from conftest import (
    StepRecorder,
    embedding_table,
    mean_nonzero_norm,
    one_error,
    read_embeds,
    run_cli_inprocess,
    run_inprocess,
    sd_argv,
)


# Module fixtures train models: one worker runs this file's tests, so they are made once (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_train_wan")


TOKEN = "<toy>"
RES = 32
TOKENIZER_SIZE, TABLE_ROWS = 300, 320  # make_tiny_wan's


def wan_argv(pipeline, data, out, *extra, steps=4):
    """conftest's small, fast flags with the authors' batch 2 x accumulation 2 (the script's defaults), one repeat
    and a log line per step; later flags in `extra` override these."""
    recipe = ["--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--repeats", "1", "--log_steps", "1"]
    return sd_argv(pipeline, data, out, "--placeholder_token", TOKEN, *recipe, *extra, steps=steps)


def fresh_pipeline(folder):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_encode(pipe, prompt):
    """WanPipeline.encode_prompt with the 512 tokens its __call__ uses (encode_prompt's own default is 226)."""
    return pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=512)[0]


@pytest.fixture(scope="module")
def run(tiny_wan, example_images, tmp_path_factory):
    """The recipe's defaults, 4 steps, a checkpoint and a file at step 2, validation at the end with a 5-frame clip."""
    out = tmp_path_factory.mktemp("wan") / "out"
    argv = wan_argv(
        tiny_wan,
        example_images,
        out,
        "--checkpointing_steps",
        "2",
        "--save_steps",
        "2",
        "--validation_prompt",
        f"a {TOKEN} on a beach",
        "--validation_frames",
        "5",
    )
    recorder = StepRecorder()
    result = run_inprocess(argv, recorder, module=wan)
    return result, out, argv, recorder


@pytest.fixture(scope="module")
def table(tiny_wan):
    """UMT5's table read from its weight file, and the mean norm of the rows its tokenizer reaches, computed here."""
    weight = embedding_table(tiny_wan)
    assert weight.shape[0] == TABLE_ROWS
    return weight, mean_nonzero_norm(weight[:TOKENIZER_SIZE])


def test_recipe_defaults_rows_at_the_reachable_rows_mean_norm_and_a_validation_clip(run, table):
    result, out, _, recorder = run
    args = wan.parse_args(["--placeholder_token", "<x>", "--initializer_token", "x", "--train_data_dir", "d"])
    assert (args.train_batch_size, args.gradient_accumulation_steps, args.kappa) == (2, 2, 5e-5)
    assert (args.resolution, args.flip_p, args.validation_frames, args.max_train_steps) == (512, 0.0, 1, None)
    assert recorder.steps == [1, 2, 3, 4]
    tensors, meta = read_embeds(out / "learned_embeds.safetensors")
    assert list(tensors) == [TOKEN] and tensors[TOKEN].dtype == torch.float32 and tensors[TOKEN].shape == (1, 32)
    np.testing.assert_allclose(np.linalg.norm(tensors[TOKEN].double().numpy(), axis=-1), table[1], rtol=1e-5)
    assert meta["family"] == "wan" and meta["steps"] == "4"
    assert result.data.latent_means.shape[1:] == (4, 1, RES // 8, RES // 8)  # one-frame videos
    # one frame as the image, the 5 frames as a clip (WebP here: imageio is not installed)
    assert Image.open(out / "validation" / "step-000004-0.png").size == (RES, RES)
    with Image.open(out / "validation" / "step-000004-0.webp") as clip:
        assert (clip.n_frames, clip.size) == (5, (RES, RES))


def test_loaded_into_a_fresh_pipeline_the_table_keeps_its_shape_and_other_prompts_are_bit_identical(run, tiny_wan):
    result, out, _, _ = run
    pipe = fresh_pipeline(tiny_wan)
    before = pipeline_encode(pipe, "a photo of a dog on the beach")
    word = dti_files.load_textual_inversion(pipe, str(out))
    assert word == TOKEN
    encoder = pipe.text_encoder
    assert encoder.shared.weight.shape == (TABLE_ROWS, 32)  # the new id took an unused row: no resize
    assert encoder.shared.weight is encoder.encoder.embed_tokens.weight  # both tied modules see the row
    token_id = pipe.tokenizer.convert_tokens_to_ids(TOKEN)
    assert TOKENIZER_SIZE <= token_id < TABLE_ROWS
    assert torch.equal(encoder.shared.weight[token_id], read_embeds(out / "learned_embeds.safetensors")[0][TOKEN][0])
    assert torch.equal(pipeline_encode(pipe, "a photo of a dog on the beach"), before)
    # the training-time encoder (its directional embedding in both tied modules) encodes as the loaded one
    assert result.text_encoder.shared is result.text_encoder.encoder.embed_tokens
    from diffusers import WanPipeline

    training = WanPipeline(**{**pipe.components, "text_encoder": result.text_encoder})
    with torch.no_grad():
        for prompt in (f"a photo of a {word}", "a photo of a dog on the beach"):
            assert torch.equal(pipeline_encode(training, prompt), pipeline_encode(pipe, prompt))
    frames = pipe(f"a {word} on a beach", num_inference_steps=2, height=RES, width=RES, num_frames=1).frames
    assert frames.shape == (1, 1, RES, RES, 3) and np.isfinite(frames).all()


def test_encoding_to_the_longest_prompt_equals_the_512_token_encoding(run, tiny_wan):
    """UMT5 run only as far as the batch's longest prompt, each prompt cut to its length and zero-padded to 512:
    WanPipeline's 512-token encoding, to float32 rounding (the attention's sums run over another length)."""
    result, out, _, _ = run
    pipe = fresh_pipeline(tiny_wan)
    word = dti_files.load_textual_inversion(pipe, str(out))
    prompts = [f"a photo of a {word}", "a close-up photo of a dog on the beach in the city"]
    tokens = pipe.tokenizer(prompts, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    lengths = tokens.attention_mask.sum(1)
    batch = {"input_ids": [tokens.input_ids], "lengths": lengths, "max_length": int(lengths.max())}
    with torch.no_grad():
        ours, theirs = wan.encode_prompt(result.text_encoder, batch), pipeline_encode(pipe, prompts)
    assert ours.shape == theirs.shape == (2, 512, 32)
    for row, length in enumerate(lengths.tolist()):
        assert not ours[row, length:].any() and not theirs[row, length:].any()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_resume_from_a_checkpoint_continues_exactly(run, tmp_path):
    result, out, argv, _ = run
    resumed_out = tmp_path / "resumed"
    resumed_out.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed_out / "checkpoint-2")
    at = argv.index("--output_dir")
    argv = argv[:at] + ["--output_dir", str(resumed_out)] + argv[at + 2 :]
    recorder = StepRecorder()
    resumed = run_inprocess(argv + ["--resume_from_checkpoint", "latest", "--validation_prompt", ""], recorder, wan)
    assert recorder.steps == [3, 4]
    assert torch.equal(resumed.embeddings[0].param, result.embeddings[0].param)


def test_loss_is_the_flow_matching_loss_against_a_hand_computed_target(tiny_wan, example_images, tmp_path, table):
    """Step 1 of a run (batch 1, centre crops) recomputed by hand: the VAE's posterior mode of the one-frame video,
    (z - latents_mean) / latents_std; UMT5 on the 512-token prompt with the row m * v0 written in, cut to its length
    and zero-padded; the noise and u from the step's generator, sigma = t / 1000 for t = 1000 - floor(1000 u); the
    transformer against eps - x0."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    losses = {}
    argv = wan_argv(
        tiny_wan,
        example_images,
        tmp_path / "out",
        "--train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "1",
        "--center_crop",
        steps=1,
    )
    result = run_inprocess(argv, lambda step, loss, **_: losses.update({step: loss.item()}), module=wan)

    vae = AutoencoderKLWan.from_pretrained(tiny_wan, subfolder="vae")
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    image = Image.open(os.path.join(example_images, sorted(os.listdir(example_images))[0])).convert("RGB")
    image = image.resize((RES, RES), Image.Resampling.BICUBIC)  # the first photo is square
    with torch.no_grad():
        z = vae.encode(dti_data.image_to_tensor(image)[None, :, None]).latent_dist.mode()
    torch.testing.assert_close(result.data.latent_means[:1], (z - mean) / std, rtol=1e-5, atol=1e-5)

    weight, m = table
    tokenizer = AutoTokenizer.from_pretrained(tiny_wan, subfolder="tokenizer")
    tokenizer.add_tokens([TOKEN])
    encoder = UMT5EncoderModel.from_pretrained(tiny_wan, subfolder="text_encoder")
    init = weight[tokenizer.convert_tokens_to_ids("▁toy")]
    with torch.no_grad():
        encoder.shared.weight[TOKENIZER_SIZE] = torch.from_numpy(m * init / np.linalg.norm(init)).float()
    batch = result.data.batch(0, 1, 1, 0)
    ids = batch["input_ids"][0]
    assert TOKENIZER_SIZE in ids[0].tolist()
    mask = (ids != tokenizer.pad_token_id).long()
    transformer = WanTransformer3DModel.from_pretrained(tiny_wan, subfolder="transformer")
    generator = dti_data.step_generator(0, 0, 0, "cpu")
    x0 = batch["mean"]
    noise = torch.randn(x0.shape, generator=generator)
    t = 1000 - torch.floor(1000 * torch.rand((1,), generator=generator))
    sigma = (t / 1000).view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        hidden = encoder(ids, attention_mask=mask).last_hidden_state * mask.unsqueeze(-1)
        pred = transformer((1 - sigma) * x0 + sigma * noise, t, hidden)[0]
    expected = ((pred - (noise - x0)) ** 2).mean().item()
    assert losses[1] == pytest.approx(expected, rel=1e-5)


def test_concept_tools_read_wan_embeddings_with_the_reachable_rows(run, tiny_wan, table):
    _, out, _, _ = run
    report = dti_concepts.inspect_embedding(str(out), model=tiny_wan, k=3)
    entry = report["encoders"]["text_encoder"]
    assert report["family"] == "wan" and entry["vocabulary"]["size"] == TOKENIZER_SIZE
    assert entry["vocabulary"]["mean"] == pytest.approx(table[1], rel=1e-6)
    assert entry["vectors"][0]["norm_to_vocab_mean"] == pytest.approx(1.0, rel=1e-5)
    assert entry["vectors"][0]["nearest"][0]["token"].startswith("▁")  # the T5 tokenizer's pieces


def test_bad_inputs_stop_with_one_sentence_before_loading(tiny_wan, tiny_sana, example_images, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli_inprocess(wan_argv(tiny_sana, example_images, out), wan) == 2
    one_error(capsys, "is a SANA model", "train_directional_textual_inversion_sana.py")
    assert run_cli_inprocess(wan_argv(tiny_wan, example_images, out), sana) == 2
    one_error(capsys, "is a Wan model", "train_directional_textual_inversion_wan.py")
    assert run_cli_inprocess(wan_argv(tiny_wan, example_images, out, "--resolution", "24"), wan) == 2
    one_error(capsys, "--resolution 24", "multiple of 16", "try 16")
    assert run_cli_inprocess(wan_argv(tiny_wan, example_images, out, "--validation_frames", "4"), wan) == 2
    one_error(capsys, "--validation_frames 4", "4k + 1", "use 5")
    assert not out.exists()
