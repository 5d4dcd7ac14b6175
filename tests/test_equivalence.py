"""Each speed-up leaves the math unchanged: cached latents, prompts tokenized once, placeholder rows only."""

import pytest
import torch
import torch.nn.functional as F
from PIL import ImageOps

import dti_data
import dti_utils
from dti_data import (
    TrainingData,
    build_views,
    diffusion_loss,
    encode_views,
    prompt_templates,
    step_generator,
    tokenize_prompts,
)


# Module fixtures train models: one worker runs this file's tests, so they are made once (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_equivalence")


@pytest.fixture(scope="module")
def models(tiny_sd):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return {
        "tokenizer": CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer"),
        "text_encoder": CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").requires_grad_(False),
        "vae": AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae").requires_grad_(False),
        "unet": UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").requires_grad_(False),
        "scheduler": DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler"),
    }


@pytest.fixture(scope="module")
def data(models, example_images):
    images = [dti_data.square_view(im.image, 32) for im in dti_data.load_training_images(example_images)]
    keys, view_index = build_views(images, lambda image: [None], flip=True)
    means, stds = encode_views(
        models["vae"], keys, lambda i, crop: images[i], "cpu", batch_size=3
    )  # chunks that do not divide the views
    prompt_ids = tokenize_prompts([models["tokenizer"]], [t.format("toy") for t in prompt_templates("object")], "cpu")
    built = TrainingData(means, stds, view_index, prompt_ids, repeats=3, flip_p=0.5, seed=7)
    views = [
        dti_data.image_to_tensor(ImageOps.mirror(images[i]) if mirrored else images[i]) for i, mirrored, _ in keys
    ]
    return built, views, images


def test_cached_latents_equal_encoding_every_step(models, data):
    """A step's latent sampled from the cached distribution equals encoding the view anew and sampling."""
    built, views, _ = data
    vae = models["vae"]
    for step in range(3):
        batch = built.batch(step, batch_size=4, num_processes=1, rank=0)
        view_ids = [int(torch.nonzero((built.latent_means == m).flatten(1).all(1))[0]) for m in batch["mean"]]
        pixels = torch.stack([views[i] for i in view_ids])
        fresh = vae.encode(pixels).latent_dist.sample(generator=step_generator(7, step, 0, "cpu"))
        g = step_generator(7, step, 0, "cpu")
        cached = batch["mean"] + batch["std"] * torch.randn(batch["mean"].shape, generator=g)
        torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-6)


def test_flip_views_are_the_mirrored_images(data):
    built, views, images = data
    for i, image in enumerate(images):
        plain, mirrored = views[int(built.view_index[i, 0, 0])], views[int(built.view_index[i, 1, 0])]
        assert torch.equal(mirrored, plain.flip(-1))
        assert torch.equal(plain, dti_data.image_to_tensor(image))


def test_prompts_tokenized_once_equal_tokenizing_each_step(models, data):
    built, _, _ = data
    tokenizer = models["tokenizer"]
    for i, template in enumerate(prompt_templates("object")):
        ids = tokenizer(
            template.format("toy"),
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids[0]
        assert torch.equal(built.prompt_ids[0][i], ids)


def test_diffusion_loss_equals_the_encode_every_step_reference(models, data):
    """The loss from cached latents equals diffusers' per-step recipe (encode, sample, noise, timesteps, MSE)."""
    built, views, _ = data
    vae, unet, scheduler, text_encoder = models["vae"], models["unet"], models["scheduler"], models["text_encoder"]
    batch = built.batch(0, batch_size=2, num_processes=1, rank=0)
    hidden = text_encoder(batch["input_ids"][0])[0]
    generator = step_generator(7, 0, 0, "cpu")
    ours = diffusion_loss(
        unet, scheduler, batch, hidden, generator=generator, vae_config=vae.config, weight_dtype=torch.float32
    )

    view_ids = [int(torch.nonzero((built.latent_means == m).flatten(1).all(1))[0]) for m in batch["mean"]]
    g = step_generator(7, 0, 0, "cpu")
    latents = (
        vae.encode(torch.stack([views[i] for i in view_ids])).latent_dist.sample(generator=g)
        * vae.config.scaling_factor
    )
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g)
    pred = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
    reference = F.mse_loss(pred, noise)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-7)


def test_placeholder_rows_only_equal_training_the_whole_matrix(tiny_sd):
    """The directional embedding's loss and gradient equal diffusers' way: the whole embedding matrix trainable,
    rows read back."""
    from transformers import CLIPTextModel, CLIPTokenizer

    def setup():
        tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
        encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").requires_grad_(False)
        tokens, init_ids = dti_utils.resolve_tokens(tokenizer, "<t>", "toy", 2)
        return tokenizer, encoder, tokens, init_ids

    def prompt_ids(tokenizer):
        text = "a photo of <t> <t>_1 with a dog"
        return tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids

    target = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))

    tokenizer, encoder, tokens, init_ids = setup()
    original = encoder.get_input_embeddings().weight.detach().clone()
    concept = dti_utils.add_directional_embedding(tokenizer, encoder, tokens, init_ids, classic=True)  # classic TI
    loss_module = F.mse_loss(encoder(prompt_ids(tokenizer))[0], target)
    loss_module.backward()
    table = encoder.get_input_embeddings().weight
    assert torch.equal(table[: len(original)], original)  # the vocabulary's rows are untouched
    assert table.grad is None  # and get no gradient

    tokenizer2, encoder2, _, init_ids2 = setup()
    tokenizer2.add_tokens(tokens)  # diffusers' way: new rows in the table, initialized from the initializer
    encoder2.resize_token_embeddings(len(tokenizer2))
    ids2 = tokenizer2.convert_tokens_to_ids(tokens)
    weight = encoder2.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids2] = weight[init_ids2]
    weight.requires_grad_(True)
    loss_full = F.mse_loss(encoder2(prompt_ids(tokenizer2))[0], target)
    loss_full.backward()

    torch.testing.assert_close(loss_module, loss_full, rtol=0, atol=0)
    torch.testing.assert_close(concept.param.grad, weight.grad[ids2], rtol=1e-6, atol=1e-9)
    assert weight.grad[: len(original)].abs().sum() > 0  # the dense path computes 600+ rows of gradient for nothing


def test_compile_flag_trains_through_the_compiled_unet_with_the_same_result(sd_args, tmp_path, monkeypatch):
    """--compile routes the training forward through torch.compile and leaves the embedding unchanged.

    The graph is compiled with the aot_eager backend here (inductor needs minutes on 2 CPU cores); it traces
    and runs the same forward and backward graphs, so what this checks is the script's wiring."""
    from conftest import read_embeds, run_inprocess

    compiled = []
    real_compile = torch.compile

    def compile_aot_eager(model, **kwargs):
        compiled.append((type(model).__name__, kwargs))
        return real_compile(model, backend="aot_eager", dynamic=kwargs.get("dynamic"))

    run_inprocess(sd_args(steps=3, out=tmp_path / "eager"))
    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    run_inprocess(sd_args("--compile", steps=3, out=tmp_path / "compiled"))
    assert compiled == [("UNet2DConditionModel", {"mode": None, "dynamic": False})]
    eager = read_embeds(tmp_path / "eager" / "learned_embeds.safetensors")[0]
    fast = read_embeds(tmp_path / "compiled" / "learned_embeds.safetensors")[0]
    assert eager.keys() == fast.keys()
    for key in eager:
        torch.testing.assert_close(fast[key], eager[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "family, encoder_name", [("sd", "text_encoder"), ("sdxl", "text_encoder"), ("sdxl", "text_encoder_2")]
)
def test_the_directional_embedding_changes_nothing_but_the_placeholder_rows(request, family, encoder_name):
    """Installed with set_input_embeddings (it shows in print(encoder)): prompts without the placeholder give
    bit-identical hidden states and pooled outputs to the untouched encoder; with it, the same outputs as an encoder
    whose table holds m * v in the new rows, as after load_textual_inversion (the table's own module)."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    folder = request.getfixturevalue("tiny_sd" if family == "sd" else "tiny_sdxl")
    cls = CLIPTextModelWithProjection if encoder_name == "text_encoder_2" else CLIPTextModel
    tokenizer_name = encoder_name.replace("text_encoder", "tokenizer")

    def load():
        tokenizer = AutoTokenizer.from_pretrained(folder, subfolder=tokenizer_name)
        return tokenizer, cls.from_pretrained(folder, subfolder=encoder_name).eval()

    def encode(tokenizer, encoder, prompts):
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        return [*out.hidden_states, out[1]]  # every layer and the pooled output (projected for encoder 2)

    prompts = [t.format("toy") for t in prompt_templates("object")[:6]]
    tokenizer, encoder = load()
    untouched = encode(tokenizer, encoder, prompts)
    tokens, init_ids = dti_utils.resolve_tokens(tokenizer, "<t>", "toy dog")
    embedding = dti_utils.add_directional_embedding(tokenizer, encoder, tokens, init_ids, name=encoder_name)
    with torch.no_grad():  # a trained-looking direction
        embedding.param.copy_(dti_utils.projx(embedding.param + 0.3 * torch.randn(embedding.param.shape)))
    shown = repr(encoder)
    assert "(token_embedding): DirectionalEmbedding(" in shown and "tokens=['<t>', '<t>_1']" in shown
    for a, b in zip(untouched, encode(tokenizer, encoder, prompts)):
        assert torch.equal(a, b)

    with_token = [p.replace("toy", "<t> <t>_1") for p in prompts]
    trained = encode(tokenizer, encoder, with_token)
    loaded_tokenizer, loaded = load()  # the rows written into a grown table, as diffusers' loader does
    loaded_tokenizer.add_tokens(tokens)
    loaded.resize_token_embeddings(len(loaded_tokenizer))
    with torch.no_grad():
        loaded.get_input_embeddings().weight[loaded_tokenizer.convert_tokens_to_ids(tokens)] = embedding.vectors()
    for a, b in zip(trained, encode(loaded_tokenizer, loaded, with_token)):
        assert torch.equal(a, b)
    # folded back into a plain table (--save_as_full_pipeline), the encoder gives the same outputs again
    encoder.set_input_embeddings(embedding.fold())
    assert "DirectionalEmbedding" not in repr(encoder)
    for a, b in zip(trained, encode(tokenizer, encoder, with_token)):
        assert torch.equal(a, b)
