"""Concept tools: slerp (SD and SDXL, render), convert (never overwriting silently), safe reading, inspect
(non-finite vectors flagged), training curves. Offline."""

import json
import math
import os

import pytest
import torch
from PIL import Image

from dti_concepts import convert_embedding, inspect_embedding, main, read_concept, slerp_embeddings, strip_label_height
from dti_files import save_embedding_file
from dti_utils import DTIError, DTIWarning
from dti_utils import projx as retract
from dti_validation import plot_training_curves

from conftest import angle, disk_state, one_error, read_embeds


EMBEDDING_KEY = "embeddings.token_embedding.weight"


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def vocab_rows(model, encoder="text_encoder"):
    """(weight float64, tokenizer) of a tiny model, read without dti_utils."""
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    tensors = load_file(os.path.join(model, encoder, "model.safetensors"))
    (key,) = [k for k in tensors if k.endswith(EMBEDDING_KEY)]  # with or without the "text_model." prefix
    weight = tensors[key].double()
    tokenizer = CLIPTokenizer.from_pretrained(
        model, subfolder="tokenizer" if encoder == "text_encoder" else "tokenizer_2"
    )
    return weight, tokenizer


def row(weight, tokenizer, word):
    ids = tokenizer.encode(word, add_special_tokens=False)
    assert len(ids) == 1, word
    return weight[ids[0]]


def dti_meta(norm, encoder="text_encoder", initializer="toy", method="directional_textual_inversion"):
    return {
        "method": method,
        "base_model": "tiny",
        "text_encoder": encoder,
        "initializer_token": initializer,
        "norm": repr(norm) if norm is not None else "free",
        "token_scale": "mean",
        "kappa": "0.0001",
        "steps": "10",
    }


def unit_rows(n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return retract(torch.randn(n, dim, generator=g))


def make_sd_file(path, token, vectors, meta):
    save_embedding_file(str(path), {token: vectors}, meta)
    return str(path)


def make_sdxl_folder(folder, token, n, seed, m_l=0.4, m_g=0.45):
    """A fake SDXL training output: learned_embeds (dim 32) and learned_embeds_2 (dim 64)."""
    v_l, v_g = m_l * unit_rows(n, 32, seed), m_g * unit_rows(n, 64, seed + 100)
    save_embedding_file(
        os.path.join(folder, "learned_embeds.safetensors"), {token: v_l}, dti_meta(m_l, "text_encoder")
    )
    save_embedding_file(
        os.path.join(folder, "learned_embeds_2.safetensors"), {token: v_g}, dti_meta(m_g, "text_encoder_2")
    )
    return str(folder), v_l, v_g


# ----------------------------------------------------------------------------------------------------
# slerp
# ----------------------------------------------------------------------------------------------------


def test_slerp_endpoints_midpoint_and_metadata(tmp_path, capsys):
    m = 0.3871
    a_vecs, b_vecs = m * unit_rows(2, 32, 0), m * unit_rows(2, 32, 1)
    a = make_sd_file(tmp_path / "a.safetensors", token="<a>", vectors=a_vecs, meta=dti_meta(m))
    b = make_sd_file(tmp_path / "b.safetensors", token="<b>", vectors=b_vecs, meta=dti_meta(m))
    out = tmp_path / "out"
    assert main(["slerp", a, b, "--alpha", "0", "0.5", "1", "--token", "<mix>", "--output", str(out)]) == 0
    assert "alpha 0.5" in capsys.readouterr().out

    t0, _ = read_embeds(out / "alpha-0" / "learned_embeds.safetensors")
    t1, _ = read_embeds(out / "alpha-1" / "learned_embeds.safetensors")
    mid, meta = read_embeds(out / "alpha-0.5" / "learned_embeds.safetensors")
    assert set(t0) == set(t1) == set(mid) == {"<mix>"}
    assert torch.equal(t0["<mix>"], a_vecs) and torch.equal(t1["<mix>"], b_vecs)

    mid = mid["<mix>"].double()
    torch.testing.assert_close(mid.norm(dim=-1), torch.full((2,), m, dtype=torch.float64), rtol=1e-6, atol=0)
    full = angle(a_vecs, b_vecs)
    assert (full > 0.5).all()  # random directions in 32 dims: far apart
    torch.testing.assert_close(angle(mid, a_vecs), full / 2, rtol=0, atol=1e-5)
    torch.testing.assert_close(angle(mid, b_vecs), full / 2, rtol=0, atol=1e-5)
    # on the great circle: the two half angles add up to the whole
    torch.testing.assert_close(angle(mid, a_vecs) + angle(mid, b_vecs), full, rtol=0, atol=1e-5)

    assert meta["method"] == "slerp" and meta["format"] == "pt"
    assert float(meta["alpha"]) == 0.5
    assert json.loads(meta["sources"]) == [a, b]
    assert meta["placeholder_token"] == "<mix>" and json.loads(meta["tokens"]) == ["<mix>", "<mix>_1"]
    assert meta["norm"] == repr(m)


def test_slerp_sdxl_pairs_per_encoder(tmp_path):
    a, a_l, a_g = make_sdxl_folder(tmp_path / "a", token="<a>", n=2, seed=0)
    b_folder, b_l, b_g = make_sdxl_folder(tmp_path / "b", token="<b>", n=2, seed=1)
    # B in the single-file form: inputs of different forms blend all the same
    (b_single,) = convert_embedding(b_folder, "comfyui", str(tmp_path / "b-single"))
    assert set(read_embeds(b_single)[0]) == {"clip_l", "clip_g"}

    out = tmp_path / "mix"
    assert main(["slerp", a, b_single, "--alpha", "0.5", "--token", "<mix>", "--output", str(out)]) == 0
    assert sorted(os.listdir(out)) == [
        "learned_embeds.safetensors",
        "learned_embeds_2.safetensors",
        "mix-ti.safetensors",
    ]  # not "mix": a word
    l_t, l_meta = read_embeds(out / "learned_embeds.safetensors")
    g_t, g_meta = read_embeds(out / "learned_embeds_2.safetensors")
    single, single_meta = read_embeds(out / "mix-ti.safetensors")
    assert l_t["<mix>"].shape == (2, 32) and g_t["<mix>"].shape == (2, 64)
    assert torch.equal(single["clip_l"], l_t["<mix>"]) and torch.equal(single["clip_g"], g_t["<mix>"])
    assert (l_meta["text_encoder"], g_meta["text_encoder"], single_meta["text_encoder"]) == (
        "text_encoder",
        "text_encoder_2",
        "both",
    )
    assert json.loads(single_meta["norm"]) == {"clip_l": 0.4, "clip_g": 0.45}
    for vecs, va, vb, m in ((l_t["<mix>"], a_l, b_l, 0.4), (g_t["<mix>"], a_g, b_g, 0.45)):
        torch.testing.assert_close(
            vecs.double().norm(dim=-1), torch.full((2,), m, dtype=torch.float64), rtol=1e-6, atol=0
        )
        torch.testing.assert_close(angle(vecs, va), angle(va, vb) / 2, rtol=0, atol=1e-5)
        torch.testing.assert_close(angle(vecs, vb), angle(va, vb) / 2, rtol=0, atol=1e-5)


def test_slerp_vector_count_mismatch_names_both_counts(tmp_path, capsys):
    a = make_sd_file(tmp_path / "a.safetensors", token="<a>", vectors=0.4 * unit_rows(2, 32, 0), meta=dti_meta(0.4))
    b = make_sd_file(tmp_path / "b.safetensors", token="<b>", vectors=0.4 * unit_rows(1, 32, 1), meta=dti_meta(0.4))
    with pytest.raises(DTIError, match=r"has 2 vector\(s\) but .* has 1 vector"):
        slerp_embeddings(a, b, [0.5], str(tmp_path / "out"), token="<mix>")
    assert main(["slerp", a, b, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "2 vector" in err[-1] and "1 vector" in err[-1]
    assert not os.path.exists(tmp_path / "out")

    sdxl, _, _ = make_sdxl_folder(tmp_path / "x", token="<x>", n=2, seed=3)
    with pytest.raises(DTIError, match=r"SDXL .* SD \(1 text encoder\)"):
        slerp_embeddings(sdxl, a, [0.5], str(tmp_path / "out2"), token="<mix>")
    with pytest.raises(DTIError, match=r"--alpha 1.5 is outside \[0, 1\]"):
        slerp_embeddings(a, a, [1.5], str(tmp_path / "out3"), token="<mix>")


def test_slerp_classic_ti_norms_warn_and_interpolate_linearly(tmp_path, capsys):
    dti = 0.4 * unit_rows(1, 32, 0)
    classic = 3.0 * unit_rows(1, 32, 1)
    a = make_sd_file(tmp_path / "dti.safetensors", token="<a>", vectors=dti, meta=dti_meta(0.4))
    b = str(tmp_path / "classic.bin")  # classic TI may be a torch.save'd .bin
    torch.save({"<b>": classic.clone()}, b)
    with pytest.warns(DTIWarning, match="different norms"):
        result = slerp_embeddings(a, b, [0.25, 0.5], str(tmp_path / "out"), token="<mix>")
    for alpha, folder in zip(result["alphas"], result["outputs"]):
        vecs = read_embeds(os.path.join(folder, "learned_embeds.safetensors"))[0]["<mix>"].double()
        assert vecs.norm().item() == pytest.approx((1 - alpha) * 0.4 + alpha * 3.0, rel=1e-6)
        torch.testing.assert_close(angle(vecs, dti), alpha * angle(dti, classic), rtol=0, atol=1e-5)
    # the CLI prints the warning as one line on stderr
    assert main(["slerp", a, b, "--output", str(tmp_path / "cli")]) == 0
    assert any(
        line.startswith("warning: ") and "different norms" in line for line in capsys.readouterr().err.splitlines()
    )


def test_slerp_render_writes_labelled_strip(tmp_path, tiny_sd):
    m = 0.12
    a = make_sd_file(tmp_path / "a.safetensors", token="<a>", vectors=m * unit_rows(2, 32, 0), meta=dti_meta(m))
    b = make_sd_file(tmp_path / "b.safetensors", token="<b>", vectors=m * unit_rows(2, 32, 1), meta=dti_meta(m))
    out = tmp_path / "out"
    rc = main(
        [
            "slerp",
            a,
            b,
            "--alpha",
            "0",
            "0.5",
            "1",
            "--token",
            "<mix>",
            "--output",
            str(out),
            "--render",
            tiny_sd,
            "--prompt",
            "a photo of {}",
            "--seed",
            "0",
            "--steps",
            "2",
        ]
    )
    assert rc == 0
    strip = Image.open(out / "interpolation.png")
    assert strip.format == "PNG"
    assert strip.size == (3 * 32, 32 + strip_label_height(32))  # tiny SD renders 32x32
    pixels = torch.tensor(list(strip.convert("L").getdata()), dtype=torch.float32).reshape(strip.height, strip.width)
    band = pixels[32:]
    assert (band < 128).any() and (band == 255).any()  # dark label text on the white band
    assert pixels[:32].std() > 0  # rendered images, not blank


def test_slerp_sdxl_render(tmp_path, tiny_sdxl):
    a, _, _ = make_sdxl_folder(tmp_path / "a", token="<a>", n=1, seed=0, m_l=0.1, m_g=0.15)
    b, _, _ = make_sdxl_folder(tmp_path / "b", token="<b>", n=1, seed=1, m_l=0.1, m_g=0.15)
    result = slerp_embeddings(a, b, [0.0, 1.0], str(tmp_path / "out"), token="<mix>", render=tiny_sdxl, steps=2)
    assert Image.open(result["strip"]).size == (2 * 32, 32 + strip_label_height(32))


def test_slerp_output_loads_in_diffusers_and_generates(tmp_path, tiny_sd):
    from diffusers import StableDiffusionPipeline

    m = 0.12
    a = make_sd_file(tmp_path / "a.safetensors", token="<a>", vectors=m * unit_rows(2, 32, 0), meta=dti_meta(m))
    b = make_sd_file(tmp_path / "b.safetensors", token="<b>", vectors=m * unit_rows(2, 32, 1), meta=dti_meta(m))
    out = str(tmp_path / "out")
    slerp_embeddings(a, b, [0.3], out, token="<mix>")
    saved = read_embeds(os.path.join(out, "learned_embeds.safetensors"))[0]["<mix>"]

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(out)
    ids = pipe.tokenizer.convert_tokens_to_ids(["<mix>", "<mix>_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), saved)
    # an AUTOMATIC1111 .pt made by convert loads too (its token comes from "name")
    (a1111,) = convert_embedding(a, "a1111", str(tmp_path / "a.pt"))
    pipe.load_textual_inversion(a1111)
    ids_a = pipe.tokenizer.convert_tokens_to_ids(["<a>", "<a>_1"])
    assert torch.equal(
        pipe.text_encoder.get_input_embeddings().weight[ids_a].detach(), read_concept(a).vectors["text_encoder"]
    )
    image = pipe(
        "a photo of <mix> with <a>",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()


# ----------------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------------


def test_convert_sd_round_trips_bit_exact(tmp_path):
    vecs = 0.3 * unit_rows(3, 32, 7)
    vecs[0, 0] = 1e-38  # a subnormal-ish value survives too
    src = make_sd_file(tmp_path / "src.safetensors", token="<cat-toy>", vectors=vecs, meta=dti_meta(0.3))

    (pt,) = convert_embedding(src, "a1111", str(tmp_path / "cat.pt"))
    raw = torch.load(pt, weights_only=True)
    assert raw["name"] == "<cat-toy>" and set(raw["string_to_param"]) == {"*"} and raw["step"] == 10
    assert read_concept(pt).form == "a1111"
    (back,) = convert_embedding(pt, "diffusers", str(tmp_path / "back"))
    assert back.endswith(os.path.join("back", "learned_embeds.safetensors"))
    tensors, meta = read_embeds(back)
    assert list(tensors) == ["<cat-toy>"] and torch.equal(tensors["<cat-toy>"], vecs)
    assert (
        meta["method"] == "directional_textual_inversion"
        and meta["initializer_token"] == "toy"
        and meta["norm"] == "0.3"
    )

    (st,) = convert_embedding(src, "comfyui", str(tmp_path / "folder"))
    assert os.path.basename(st) == "cat-toy.safetensors"
    emb, emb_meta = read_embeds(st)
    assert list(emb) == ["<cat-toy>"] and torch.equal(
        emb["<cat-toy>"], vecs
    )  # the token is the key, as diffusers reads it
    assert read_concept(st).token == "<cat-toy>"
    (back2,) = convert_embedding(st, "diffusers", str(tmp_path / "back2.safetensors"))
    assert torch.equal(read_embeds(back2)[0]["<cat-toy>"], vecs)


def test_convert_sdxl_folder_single_file_round_trip(tmp_path):
    folder, v_l, v_g = make_sdxl_folder(tmp_path / "run", token="<dog>", n=2, seed=5)
    (single,) = convert_embedding(folder, "comfyui", str(tmp_path / "dog.safetensors"))
    tensors, meta = read_embeds(single)
    assert set(tensors) == {"clip_l", "clip_g"}
    assert torch.equal(tensors["clip_l"], v_l) and torch.equal(tensors["clip_g"], v_g)
    assert json.loads(meta["norm"]) == {"clip_l": 0.4, "clip_g": 0.45} and meta["placeholder_token"] == "<dog>"

    written = convert_embedding(single, "diffusers", str(tmp_path / "back"))
    assert [os.path.basename(p) for p in written] == ["learned_embeds.safetensors", "learned_embeds_2.safetensors"]
    l_t, l_meta = read_embeds(written[0])
    g_t, g_meta = read_embeds(written[1])
    assert torch.equal(l_t["<dog>"], v_l) and torch.equal(g_t["<dog>"], v_g)
    assert (l_meta["norm"], g_meta["norm"]) == ("0.4", "0.45")
    assert (l_meta["text_encoder"], g_meta["text_encoder"]) == ("text_encoder", "text_encoder_2")
    with pytest.raises(DTIError, match="two files; pass a folder"):
        convert_embedding(single, "diffusers", str(tmp_path / "x.safetensors"))


_MARKER = []


def _side_effect(path):
    with open(path, "w") as f:
        f.write("unpickled")
    return torch.zeros(1, 4)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_side_effect, (self.marker,))


def test_refuses_pickles_with_arbitrary_objects(tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"<x>": _Evil(str(marker))}, evil)
    with pytest.raises(DTIError, match="arbitrary pickles are refused"):
        read_concept(str(evil))
    assert main(["convert", str(evil), "--to", "diffusers", "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert main(["inspect", str(evil), "--json"]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()

    other = tmp_path / "emb.ckpt"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(DTIError, match="not an embedding file"):
        read_concept(str(other))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(DTIError, match="cannot be read"):
        read_concept(str(junk))


def test_convert_refuses_to_overwrite_and_unknown_extensions(tmp_path, capsys):
    source = tmp_path / "emb.safetensors"
    save_embedding_file(str(source), {"<x>": torch.randn(1, 32)})
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"precious")
    assert main(["convert", str(source), "--to", "comfyui", "--output", str(target)]) == 2
    one_error(capsys, str(target), "--overwrite")
    assert target.read_bytes() == b"precious"
    assert main(["convert", str(source), "--to", "comfyui", "--output", str(target), "--overwrite"]) == 0
    assert read_embeds(target)[0]
    assert main(["convert", str(source), "--to", "a1111", "--output", str(tmp_path / "x.ckpt")]) == 2
    one_error(capsys, ".ckpt", ".safetensors")
    assert not (tmp_path / "x.ckpt").exists()


def test_slerp_never_writes_over_its_inputs_or_an_existing_output(tmp_path, capsys):
    """Before: slerp A B --output B replaced B's trained embedding (exit 0); an existing output was overwritten."""
    a = make_sd_file(tmp_path / "a.safetensors", "<a>", 0.4 * unit_rows(1, 32, 1), dti_meta(0.4))
    folder_b, _, _ = make_sdxl_folder(tmp_path / "b", "<b>", 1, seed=2)
    folder_c, _, _ = make_sdxl_folder(tmp_path / "c", "<c>", 1, seed=3)
    b = make_sd_file(tmp_path / "b.safetensors", "<b>", 0.4 * unit_rows(1, 32, 4), dti_meta(0.4))
    before = disk_state(tmp_path)
    for output, extra in ((b, []), (b, ["--overwrite"])):  # its own input, even with --overwrite
        assert main(["slerp", a, b, "--output", output, *extra]) == 2
        one_error(capsys, f"--output would write {b}, which is an input of this command")
    assert main(["slerp", folder_b, folder_c, "--output", folder_c, "--overwrite"]) == 2
    one_error(capsys, "learned_embeds.safetensors, which is an input")
    assert disk_state(tmp_path) == before
    existing = tmp_path / "mix.safetensors"
    existing.write_bytes(b"precious")
    before = disk_state(tmp_path)
    assert main(["slerp", a, b, "--output", str(existing)]) == 2
    one_error(capsys, f"--output: {existing} already exist", "--overwrite")
    assert disk_state(tmp_path) == before
    assert main(["slerp", a, b, "--output", str(existing), "--overwrite"]) == 0
    assert list(read_embeds(existing)[0]) == ["<a-b>"]


def test_slerp_checks_render_before_writing(tmp_path, capsys):
    """Before: a --render that could not work failed after the blends were written."""
    a = make_sd_file(tmp_path / "a.safetensors", "<a>", 0.4 * unit_rows(1, 32, 1), dti_meta(0.4))
    b = make_sd_file(tmp_path / "b.safetensors", "<b>", 0.4 * unit_rows(1, 32, 2), dti_meta(0.4))
    for flags, words in (
        (["--render", str(tmp_path / "nowhere")], ["--render", "is not a folder"]),
        (["--render", str(tmp_path), "--steps", "0"], ["--steps must be at least 1"]),
    ):
        assert main(["slerp", a, b, "--output", str(tmp_path / "mix"), *flags]) == 2
        one_error(capsys, *words)
        assert not (tmp_path / "mix").exists()


def test_convert_adds_to_a_ui_folder_that_holds_other_embeddings(tmp_path, capsys):
    """Before: --output embeddings/ (the README's own example) was refused because the folder held other files."""
    source = make_sd_file(tmp_path / "cat-toy.safetensors", "<cat-toy>", 0.4 * unit_rows(1, 32, 1), dti_meta(0.4))
    ui = tmp_path / "embeddings"
    ui.mkdir()
    (ui / "someone-else.safetensors").write_bytes(b"theirs")
    assert main(["convert", source, "--to", "comfyui", "--output", str(ui)]) == 0
    assert sorted(os.listdir(ui)) == ["cat-toy.safetensors", "someone-else.safetensors"]
    assert (ui / "someone-else.safetensors").read_bytes() == b"theirs"
    assert main(["convert", source, "--to", "comfyui", "--output", str(ui)]) == 2  # the same name: refused
    one_error(capsys, str(ui / "cat-toy.safetensors"), "already exist", "--overwrite")


def test_the_single_file_never_takes_another_outputs_name(tmp_path):
    """Before: an SDXL placeholder <learned_embeds_2> named the single file learned_embeds_2.safetensors, over the
    diffusers pair's second file."""
    from dti_files import ConceptEmbedding, embedding_slug, write_diffusers

    vectors = {"text_encoder": unit_rows(1, 32, 1), "text_encoder_2": unit_rows(1, 64, 2)}
    written = write_diffusers(ConceptEmbedding("<learned_embeds_2>", vectors), str(tmp_path), single_file=True)
    assert [os.path.basename(p) for p in written] == [
        "learned_embeds.safetensors",
        "learned_embeds_2.safetensors",
        "learned_embeds_2-ti.safetensors",
    ]
    assert list(read_embeds(tmp_path / "learned_embeds_2.safetensors")[0]) == ["<learned_embeds_2>"]
    assert sorted(read_embeds(tmp_path / "learned_embeds_2-ti.safetensors")[0]) == ["clip_g", "clip_l"]
    assert [embedding_slug(t, file_stem=True) for t in ("<training_curves>", "<checkpoint-4>", "<cat-toy>")] == [
        "training_curves-ti",
        "checkpoint-4-ti",
        "cat-toy",
    ]


# ----------------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------------


def test_inspect_json_with_model(tmp_path, tiny_sd, capsys):
    weight, tokenizer = vocab_rows(tiny_sd)
    norms = weight.norm(dim=-1)
    norms = norms[norms > 0]
    m = norms.mean().item()
    toy, dog = retract(row(weight, tokenizer, "toy")), retract(row(weight, tokenizer, "dog"))
    half = retract(toy + dog)  # halfway between toy and dog on the sphere
    vecs = (m * torch.stack([toy, half])).float()
    emb = make_sd_file(
        tmp_path / "e.safetensors", token="<toy-dti>", vectors=vecs, meta=dti_meta(m, initializer="toy")
    )

    assert main(["inspect", emb, "--model", tiny_sd, "--k", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # JSON only on stdout
    assert {"path", "form", "token", "tokens", "num_vectors", "sdxl", "model", "encoders"} <= set(report)
    assert (
        report["token"] == "<toy-dti>" and report["tokens"] == ["<toy-dti>", "<toy-dti>_1"] and report["sdxl"] is False
    )
    entry = report["encoders"]["text_encoder"]
    assert entry["dim"] == 32 and entry["metadata"]["initializer_token"] == "toy"
    vocab = entry["vocabulary"]
    assert vocab["size"] == weight.shape[0]
    assert vocab["mean"] == pytest.approx(m, rel=1e-5)
    assert (vocab["min"], vocab["max"]) == (
        pytest.approx(norms.min().item(), rel=1e-5),
        pytest.approx(norms.max().item(), rel=1e-5),
    )
    v0, v1 = entry["vectors"]
    assert (v0["index"], v0["token"], v1["token"]) == (0, "<toy-dti>", "<toy-dti>_1")
    assert v0["norm"] == pytest.approx(m, rel=1e-6) and v0["norm_to_vocab_mean"] == pytest.approx(1.0, rel=1e-5)
    assert (
        len(v0["nearest"]) == 3
        and v0["nearest"][0]["token"] == "toy"
        and v0["nearest"][0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    )
    assert {n["token"] for n in v1["nearest"][:2]} == {"toy", "dog"}
    assert v1["nearest"][0]["cosine"] == pytest.approx(v1["nearest"][1]["cosine"], abs=1e-5)
    assert v0["angle_to_initializer_deg"] == pytest.approx(0.0, abs=0.1)
    expected = math.degrees(angle(toy, dog).item()) / 2
    assert v1["angle_to_initializer_deg"] == pytest.approx(expected, abs=0.05)

    # a two-token initializer pairs vector i with token i
    emb2 = make_sd_file(
        tmp_path / "e2.safetensors",
        token="<tc>",
        vectors=(m * torch.stack([toy, dog])).float(),
        meta=dti_meta(m, initializer="toy dog"),
    )
    report2 = inspect_embedding(emb2, model=tiny_sd, k=1)
    angles = [v["angle_to_initializer_deg"] for v in report2["encoders"]["text_encoder"]["vectors"]]
    assert angles == [pytest.approx(0.0, abs=0.1), pytest.approx(0.0, abs=0.1)]
    assert [v["nearest"][0]["token"] for v in report2["encoders"]["text_encoder"]["vectors"]] == ["toy", "dog"]


def test_inspect_without_model_and_text_output(tmp_path, capsys):
    vecs = torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    emb = make_sd_file(
        tmp_path / "e.safetensors", token="<x>", vectors=vecs, meta=dti_meta(None, method="textual_inversion")
    )
    report = inspect_embedding(emb)
    entry = report["encoders"]["text_encoder"]
    assert "vocabulary" not in entry and entry["vectors"][0]["norm"] == pytest.approx(5.0)
    assert entry["metadata"]["method"] == "textual_inversion" and entry["metadata"]["norm"] == "free"
    assert main(["inspect", emb]) == 0
    text = capsys.readouterr().out
    assert "<x>" in text and "norm 5.0000" in text and "--model tiny" in text


def test_inspect_sdxl_both_encoders(tmp_path, tiny_sdxl, tiny_sd):
    w_l, tok_l = vocab_rows(tiny_sdxl, "text_encoder")
    w_g, tok_g = vocab_rows(tiny_sdxl, "text_encoder_2")
    folder = tmp_path / "run"
    save_embedding_file(
        str(folder / "learned_embeds.safetensors"),
        {"<d>": (0.2 * retract(row(w_l, tok_l, "dog"))).float()[None]},
        dti_meta(0.2, initializer="dog"),
    )
    save_embedding_file(
        str(folder / "learned_embeds_2.safetensors"),
        {"<d>": (0.3 * retract(row(w_g, tok_g, "dog"))).float()[None]},
        dti_meta(0.3, "text_encoder_2", initializer="dog"),
    )
    report = inspect_embedding(str(folder), model=tiny_sdxl, k=2)
    assert report["sdxl"] is True and list(report["encoders"]) == ["text_encoder", "text_encoder_2"]
    for name, weight in (("text_encoder", w_l), ("text_encoder_2", w_g)):
        entry = report["encoders"][name]
        assert entry["dim"] == weight.shape[1]
        assert entry["vocabulary"]["mean"] == pytest.approx(weight.norm(dim=-1).mean().item(), rel=1e-5)
        assert entry["vectors"][0]["nearest"][0]["token"] == "dog"
        assert entry["vectors"][0]["angle_to_initializer_deg"] == pytest.approx(0.0, abs=0.1)
    with pytest.raises(DTIError, match="has no text_encoder_2 folder"):
        inspect_embedding(str(folder), model=tiny_sd)  # an SD model has one encoder


def test_inspect_flags_non_finite_vectors(tmp_path, capsys):
    path = tmp_path / "broken.safetensors"
    save_embedding_file(str(path), {"<x>": torch.tensor([[float("nan")] * 4, [1.0, 0, 0, 0]])})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip().startswith("[")]
    assert "NOT FINITE" in lines[0] and "NOT FINITE" not in lines[1]
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [v["finite"] for v in report["encoders"]["text_encoder"]["vectors"]] == [False, True]


# ----------------------------------------------------------------------------------------------------
# training curves
# ----------------------------------------------------------------------------------------------------


def test_plot_training_curves_writes_png(tmp_path):
    history = [(s, 0.5 / (1 + s) if s != 20 else float("nan"), 0.39, 0.5 * s) for s in range(0, 100, 10)]
    path = plot_training_curves(history, str(tmp_path / "curves" / "training_curves.png"))
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (1200, 360)
    pixels = list(image.convert("L").getdata())
    assert min(pixels) < 100 and max(pixels) == 255  # drawn lines and axes on a white figure
    assert plot_training_curves([], str(tmp_path / "empty.png")) is None and not (tmp_path / "empty.png").exists()
