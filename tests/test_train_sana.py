"""Tests of the SANA script, train_directional_textual_inversion_sana.py, on a tiny random SANA pipeline (conftest's
tiny_sana: Gemma-2 of width 32 whose embedding module scales its rows by sqrt(32), an 8x DC-AE), offline on the CPU.

One in-process run with the authors' recipe (batch 2 x accumulation 2, zero pad on) feeds the file, loading and
encoding tests; the others run main() in this process too, but for one run under torchrun.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import dti_concepts
import dti_data
import dti_files
import train_directional_textual_inversion as sd_script
import train_directional_textual_inversion_sana as sana

from conftest import (
    REPO_ROOT,
    StepRecorder,
    embedding_table,
    mean_nonzero_norm,
    one_error,
    read_embeds,
    run_cli_inprocess,
    run_inprocess,
    sd_argv,
    subprocess_env,
)


# Module fixtures train models: one worker runs this file's tests, so they are made once (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_train_sana")


TOKEN = "<toy>"
RES = 32


def sana_argv(pipeline, data, out, *extra, steps=4):
    """conftest's small, fast flags with the authors' batch 2 x accumulation 2 (the script's defaults), zero pad on
    (its default), one repeat and a log line per step; later flags in `extra` override these."""
    recipe = ["--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--repeats", "1", "--log_steps", "1"]
    return sd_argv(pipeline, data, out, "--placeholder_token", TOKEN, *recipe, *extra, steps=steps)


def fresh_pipeline(folder):
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_encode(pipe, prompt):
    """SanaPipeline.encode_prompt as training encodes: no complex human instruction."""
    embeds, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, complex_human_instruction=None)
    return embeds, mask


@pytest.fixture(scope="module")
def run(tiny_sana, example_images, tmp_path_factory):
    """The recipe's defaults, 4 steps, a checkpoint and a file at step 2, validation at the end."""
    out = tmp_path_factory.mktemp("sana") / "out"
    argv = sana_argv(
        tiny_sana,
        example_images,
        out,
        "--checkpointing_steps",
        "2",
        "--save_steps",
        "2",
        "--validation_prompt",
        f"a {TOKEN} on a beach",
    )
    recorder = StepRecorder()
    result = run_inprocess(argv, recorder, module=sana)
    return result, out, argv, recorder


@pytest.fixture(scope="module")
def table(tiny_sana):
    """Gemma's raw table, read from the weight file, and its mean non-zero-row norm computed here."""
    weight = embedding_table(tiny_sana)
    return weight, mean_nonzero_norm(weight)


def test_recipe_defaults_and_saved_rows_at_the_tables_mean_raw_norm(run, table):
    result, out, _, recorder = run
    args = sana.parse_args(["--placeholder_token", "<x>", "--initializer_token", "x", "--train_data_dir", "d"])
    assert (args.train_batch_size, args.gradient_accumulation_steps, args.kappa) == (2, 2, 5e-5)
    assert (args.resolution, args.flip_p, args.zero_pad, args.learning_rate) == (1024, 0.0, True, 0.01)
    assert recorder.steps == [1, 2, 3, 4]
    tensors, meta = read_embeds(out / "learned_embeds.safetensors")
    assert list(tensors) == [TOKEN] and tensors[TOKEN].dtype == torch.float32 and tensors[TOKEN].shape == (1, 32)
    # m is the raw table's mean norm (Gemma's sqrt(32) scale is applied inside its embedding module, not here)
    np.testing.assert_allclose(np.linalg.norm(tensors[TOKEN].double().numpy(), axis=-1), table[1], rtol=1e-5)
    assert meta["family"] == "sana" and meta["steps"] == "4"
    step2 = read_embeds(out / "learned_embeds-steps-2.safetensors")[0][TOKEN]
    np.testing.assert_allclose(np.linalg.norm(step2.double().numpy(), axis=-1), table[1], rtol=1e-5)
    assert not torch.equal(step2, tensors[TOKEN])  # steps 3 and 4 moved it
    assert Image.open(out / "validation" / "step-000004-0.png").size == (RES, RES)


def test_loaded_into_a_fresh_pipeline_prompts_without_the_token_are_bit_identical(run, tiny_sana, table):
    _, out, _, _ = run
    pipe = fresh_pipeline(tiny_sana)
    rows = pipe.text_encoder.get_input_embeddings().weight.shape[0]
    before = pipeline_encode(pipe, "a photo of a dog on the beach")
    word = dti_files.load_textual_inversion(pipe, str(out))
    assert word == TOKEN
    embedding = pipe.text_encoder.get_input_embeddings()
    assert type(embedding).__name__ == "Gemma2TextScaledWordEmbedding"  # Gemma's own module, its scale kept
    assert embedding.weight.shape[0] == rows + 1  # Gemma's table grows by the new token
    token_id = pipe.tokenizer.convert_tokens_to_ids(TOKEN)
    assert torch.equal(embedding.weight[token_id], read_embeds(out / "learned_embeds.safetensors")[0][TOKEN][0])
    after = pipeline_encode(pipe, "a photo of a dog on the beach")
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    image = pipe(f"a {word} on a beach", num_inference_steps=2, height=RES, width=RES, use_resolution_binning=False)
    assert image.images[0].size == (RES, RES)


def test_training_time_embedding_and_the_loaded_one_encode_bit_identically(run, tiny_sana):
    """The trained text encoder (its directional embedding installed) and a fresh pipeline's after
    load_textual_inversion give SanaPipeline.encode_prompt bit-identical hidden states, with the token or without it;
    without it, both equal the untouched encoder's."""
    from diffusers import SanaPipeline

    result, out, _, _ = run
    pipe = fresh_pipeline(tiny_sana)
    plain = "a photo of a dog on the beach"
    untouched = pipeline_encode(pipe, plain)[0]
    word = dti_files.load_textual_inversion(pipe, str(out))
    training = SanaPipeline(**{**pipe.components, "text_encoder": result.text_encoder})
    with torch.no_grad():
        for prompt in (f"a photo of a {word}", plain):
            assert torch.equal(pipeline_encode(training, prompt)[0], pipeline_encode(pipe, prompt)[0])
        assert torch.equal(pipeline_encode(training, plain)[0], untouched)


def test_training_encodes_only_as_far_as_the_longest_prompt_with_the_pipelines_result(run, tiny_sana):
    """Gemma is causal: run to the longest prompt of the batch, the real tokens' rows are the pipeline's 300-token
    ones (to float32 rounding: the attention's sums run over other lengths), the rows after them zeros, which the mask
    hides from the transformer as it hides the pipeline's."""
    result, out, _, _ = run
    pipe = fresh_pipeline(tiny_sana)
    word = dti_files.load_textual_inversion(pipe, str(out))
    latents, timestep = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0] * 2)
    prompts = [f"a photo of a {word}", "a close-up photo of a dog on the beach in the city"]
    tokens = pipe.tokenizer(prompts, padding="max_length", max_length=300, truncation=True, return_tensors="pt")
    lengths = tokens.attention_mask.sum(1)
    batch = {"input_ids": [tokens.input_ids], "lengths": lengths, "max_length": int(lengths.max())}
    with torch.no_grad():
        hidden, mask = sana.encode_prompt(result.text_encoder, batch)
        embeds, pipe_mask = pipeline_encode(pipe, prompts)
        assert torch.equal(mask, pipe_mask) and hidden.shape == embeds.shape == (2, 300, 32)
        real = mask.bool()
        torch.testing.assert_close(hidden[real], embeds[real], rtol=0, atol=1e-5)
        assert not hidden[:, int(lengths.max()) :].any()
        predictions = [
            result.transformer(latents, encoder_hidden_states=h, encoder_attention_mask=mask, timestep=timestep)[0]
            for h in (hidden, embeds)
        ]
    torch.testing.assert_close(*predictions, rtol=0, atol=1e-5)


def test_resume_from_a_checkpoint_continues_exactly(run, tmp_path):
    """Zero pad on: the pad counts come from the (seed, epoch) stream, so a resumed run draws the same ones."""
    result, out, argv, _ = run
    resumed_out = tmp_path / "resumed"
    resumed_out.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed_out / "checkpoint-2")
    at = argv.index("--output_dir")
    argv = argv[:at] + ["--output_dir", str(resumed_out)] + argv[at + 2 :] + ["--resume_from_checkpoint", "latest"]
    recorder = StepRecorder()
    resumed = run_inprocess(argv + ["--validation_prompt", ""], recorder, module=sana)
    assert recorder.steps == [3, 4]
    assert torch.equal(resumed.embeddings[0].param, result.embeddings[0].param)


def test_loss_is_the_flow_matching_loss_against_a_hand_computed_target(tiny_sana, example_images, tmp_path, table):
    """Step 1 of a run (batch 1, no zero pad, centre crops) recomputed by hand: the DC-AE latent of the view times its
    scaling factor, Gemma on the 300-token prompt with the row m * v0 written in, the noise and u from the step's
    generator, sigma = t / 1000 for t = 1000 - floor(1000 u), the transformer against eps - x0."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import AutoTokenizer, Gemma2Model

    losses = {}
    argv = sana_argv(
        tiny_sana,
        example_images,
        tmp_path / "out",
        "--train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "1",
        "--no-zero_pad",
        "--center_crop",
        steps=1,
    )
    result = run_inprocess(argv, lambda step, loss, **_: losses.update({step: loss.item()}), module=sana)

    vae = AutoencoderDC.from_pretrained(tiny_sana, subfolder="vae")
    names = sorted(n for n in os.listdir(example_images) if n.endswith(".png"))
    with torch.no_grad():
        for i, name in enumerate(names):  # (64 + 8i) x 64 photos: shorter side to 32, the centre square
            image = Image.open(os.path.join(example_images, name)).convert("RGB")
            image = image.resize((image.width * RES // image.height, RES), Image.Resampling.BICUBIC)
            left = (image.width - RES) // 2
            pixels = dti_data.image_to_tensor(image.crop((left, 0, left + RES, RES)))[None]
            expected = vae.encode(pixels).latent * vae.config.scaling_factor
            torch.testing.assert_close(result.data.latent_means[i : i + 1], expected, rtol=1e-5, atol=1e-5)  # batched

    weight, m = table
    tokenizer = AutoTokenizer.from_pretrained(tiny_sana, subfolder="tokenizer")
    tokenizer.add_tokens([TOKEN])
    encoder = Gemma2Model.from_pretrained(tiny_sana, subfolder="text_encoder")
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    init = weight[tokenizer.convert_tokens_to_ids("toy")]
    with torch.no_grad():
        encoder.get_input_embeddings().weight[-1] = torch.from_numpy(m * init / np.linalg.norm(init)).float()
    batch = result.data.batch(0, 1, 1, 0)
    ids = batch["input_ids"][0]
    assert tokenizer.convert_tokens_to_ids(TOKEN) in ids[0].tolist()
    mask = (ids != tokenizer.pad_token_id).long()
    transformer = SanaTransformer2DModel.from_pretrained(tiny_sana, subfolder="transformer")
    generator = dti_data.step_generator(0, 0, 0, "cpu")
    x0 = batch["mean"]
    noise = torch.randn(x0.shape, generator=generator)
    t = 1000 - torch.floor(1000 * torch.rand((1,), generator=generator))
    sigma = (t / 1000).view(-1, 1, 1, 1)
    with torch.no_grad():
        hidden = encoder(ids, attention_mask=mask).last_hidden_state
        pred = transformer((1 - sigma) * x0 + sigma * noise, hidden, encoder_attention_mask=mask, timestep=t)[0]
    expected = ((pred - (noise - x0)) ** 2).mean().item()
    assert losses[1] == pytest.approx(expected, rel=1e-5)


def test_zero_pad_puts_zero_tokens_after_bos_drawn_per_sample_from_the_authors_law(tiny_sana):
    ids = torch.tensor([[2, 10, 11, 12, 0, 0], [2, 20, 21, 0, 0, 0]])
    padded, zero = dti_data.insert_zero_pad(ids, torch.tensor([2, 0]), 5)
    assert padded[0].tolist()[:1] + padded[0].tolist()[3:] == [2, 10, 11] and zero[0].tolist() == [0, 1, 1, 0, 0]
    assert padded[1].tolist() == [2, 20, 21, 0, 0] and not zero[1].any()
    # the counts of a long epoch: floor(min(Exponential(mean 2), 15)), as the authors draw them
    means = torch.zeros(1, 4, 2, 2)
    data = dti_data.TrainingData(
        means,
        None,
        torch.zeros(1, 1, 1, dtype=torch.long),
        [torch.zeros(1, 32, dtype=torch.long)],
        repeats=20000,
        flip_p=0.0,
        seed=0,
        prompt_lengths=torch.tensor([7]),
        zero_pad=True,
    )
    batch = data.batch(0, 20000, 1, 0)
    pads = batch["pad"].double()
    assert 0 <= pads.min() and pads.max() <= 15 and torch.equal(batch["lengths"], 7 + batch["pad"])
    assert batch["max_length"] == 7 + int(pads.max())
    assert pads.mean().item() == pytest.approx(sum(np.exp(-0.5 * k) for k in range(1, 16)), abs=0.05)  # 1.54
    assert (pads == 0).double().mean().item() == pytest.approx(1 - np.exp(-0.5), abs=0.02)
    assert torch.equal(data.batch(0, 20000, 1, 0)["pad"], batch["pad"])  # a function of (seed, epoch)


def test_two_vectors_are_joined_without_a_space_in_training_and_loading(tiny_sana, example_images, tmp_path):
    out = tmp_path / "out"
    result = run_inprocess(
        sana_argv(tiny_sana, example_images, out, "--initializer_token", "toy dog", steps=1), module=sana
    )
    assert read_embeds(out / "learned_embeds.safetensors")[0][TOKEN].shape == (2, 32)
    first, second = result.embeddings[0].token_ids
    assert any(row.tolist()[i : i + 2] == [first, second] for row in result.data.prompt_ids[0] for i in range(299))
    pipe = fresh_pipeline(tiny_sana)
    word = dti_files.load_textual_inversion(pipe, str(out))
    assert word == f"{TOKEN}{TOKEN}_1"
    ids = pipe.tokenizer(f"a photo of a {word}").input_ids
    assert ids[-2:] == pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])


def test_concept_tools_read_sana_embeddings_with_the_gemma_vocabulary(run, tiny_sana, table, tmp_path, capsys):
    _, out, _, _ = run
    weight, m = table
    report = dti_concepts.inspect_embedding(str(out), model=tiny_sana, k=3)
    entry = report["encoders"]["text_encoder"]
    assert report["family"] == "sana" and entry["vocabulary"]["size"] == weight.shape[0]
    assert entry["vocabulary"]["mean"] == pytest.approx(m, rel=1e-6)
    assert entry["vectors"][0]["norm_to_vocab_mean"] == pytest.approx(1.0, rel=1e-5)
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(tiny_sana, subfolder="tokenizer").get_vocab()
    assert all(n["token"] in vocab for n in entry["vectors"][0]["nearest"])
    blend = dti_concepts.slerp_embeddings(
        str(out), str(out / "learned_embeds-steps-2.safetensors"), [0.5], str(tmp_path / "mix"), token="<mix>"
    )
    mixed, meta = read_embeds(os.path.join(blend["outputs"][0], "learned_embeds.safetensors"))
    np.testing.assert_allclose(np.linalg.norm(mixed["<mix>"].double().numpy(), axis=-1), m, rtol=1e-5)
    assert meta["family"] == "sana"
    norms = np.sqrt((weight * weight).sum(1))
    dti_concepts.rescale_embedding(str(out), tiny_sana, "max", str(tmp_path / "max"))
    rescaled = read_embeds(tmp_path / "max" / "learned_embeds.safetensors")[0][TOKEN]
    np.testing.assert_allclose(np.linalg.norm(rescaled.double().numpy(), axis=-1), norms.max(), rtol=1e-5)
    dti_concepts.convert_embedding(str(out), "diffusers", str(tmp_path / "one.safetensors"))
    assert torch.equal(
        read_embeds(tmp_path / "one.safetensors")[0][TOKEN], read_embeds(out / "learned_embeds.safetensors")[0][TOKEN]
    )
    assert dti_concepts.main(["convert", str(out), "--to", "a1111", "--output", str(tmp_path / "a.pt")]) == 2
    one_error(capsys, "SANA", "AUTOMATIC1111", "--to diffusers")


def test_bad_inputs_stop_with_one_sentence_before_loading(tiny_sana, tiny_sd, example_images, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli_inprocess(sana_argv(tiny_sana, example_images, out, "--placeholder_token", "<Toy>"), sana) == 2
    one_error(capsys, "--placeholder_token '<Toy>'", "SanaPipeline lowercases", "'<toy>'")
    argv = sana_argv(tiny_sd, example_images, out)
    assert run_cli_inprocess(argv, sana) == 2
    one_error(capsys, "Stable Diffusion 1.x/2.x model", "train_directional_textual_inversion.py")
    assert run_cli_inprocess(sd_argv(tiny_sana, example_images, out), sd_script) == 2
    one_error(capsys, "is a SANA model", "train_directional_textual_inversion_sana.py")
    assert run_cli_inprocess(sana_argv(tiny_sana, example_images, out, "--cuda_graphs", "on"), sana) == 2
    one_error(capsys, "--cuda_graphs", "UNets")
    assert not out.exists()


_RANK_WRAPPER = textwrap.dedent("""
    import os, sys
    import torch
    import train_directional_textual_inversion_sana as m

    result = m.main(m.parse_args())
    out = sys.argv[sys.argv.index("--output_dir") + 1]
    torch.save(result.embeddings[0].param.detach().clone(), os.path.join(out, f"param-rank{os.environ['RANK']}.pt"))
""")


@pytest.mark.subprocess
def test_torchrun_two_processes_one_set_of_files_same_vectors(tiny_sana, example_images, tmp_path, table):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(_RANK_WRAPPER)
    out = tmp_path / "out"
    argv = sana_argv(
        tiny_sana, example_images, out, "--train_batch_size", "1", "--gradient_accumulation_steps", "1", steps=2
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper)]
    proc = subprocess.run(
        cmd + argv,
        cwd=REPO_ROOT,
        env=subprocess_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "x 2 processes" in proc.stderr
    assert sorted(n for n in os.listdir(out) if n.endswith((".safetensors", ".pt"))) == [
        "learned_embeds.safetensors",
        "param-rank0.pt",
        "param-rank1.pt",
    ]
    ranks = [torch.load(out / f"param-rank{r}.pt") for r in (0, 1)]
    assert torch.equal(*ranks)
    saved = read_embeds(out / "learned_embeds.safetensors")[0][TOKEN]
    torch.testing.assert_close(saved, table[1] * ranks[0], rtol=1e-6, atol=0)
