"""The files we write, read the way each consumer reads them: diffusers itself, and re-implementations (written
here, from their source) of AUTOMATIC1111's modules/safe.py + textual_inversion.py, ComfyUI's comfy/sd1_clip.py
load_embed and kohya's gen_img.py. Also: the single file's name rule, slerp writing a folder or a file, the SDXL fp16
validation decode, and the model card. Offline, on the CPU.
"""

import ast
import os
import pickle
import re
import zipfile
from types import SimpleNamespace

import pytest
import torch
import yaml

import dti_concepts
import dti_files
import dti_hub
from dti_files import ConceptEmbedding
from dti_utils import DTIWarning

from conftest import angle, sd_argv


# Module fixtures train models: one worker runs this file's tests, so they are made once (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_interop")


SD_DIM, SDXL_DIMS = 32, (32, 64)  # the tiny pipelines' text encoder widths


# ----------------------------------------------------------------------------------------------------
# The consumers' loading rules, re-implemented from their source
# ----------------------------------------------------------------------------------------------------

# AUTOMATIC1111 modules/safe.py: allowed_zip_names_re (current master adds byteorder and .data/serialization_id to the
# older 'data/N | version | data.pkl') and the globals RestrictedUnpickler.find_class allows.
A1111_ZIP_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
A1111_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("_codecs", "encode"),
    ("__builtin__", "set"),
} | {
    ("torch", name)
    for name in (
        "FloatStorage",
        "HalfStorage",
        "IntStorage",
        "LongStorage",
        "DoubleStorage",
        "ByteStorage",
        "float32",
        "BFloat16Storage",
    )
}


class A1111Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in A1111_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        return super().find_class(module, name)

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)


def a1111_check_pt(path):
    """safe.check_pt: a zip must hold only allowed entry names and its data.pkl unpickle with the allowed globals; a
    non-zip (torch's legacy format) is read as five pickles with the same unpickler. Raises when A1111 refuses."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = [n for n in z.namelist() if not A1111_ZIP_NAMES.match(n)]
            if bad:
                raise ValueError(f"bad file inside {path}: {bad[0]}")
            (pkl,) = [n for n in z.namelist() if re.match(r"^([^/]+)/data\.pkl$", n)]
            with z.open(pkl) as f:
                A1111Unpickler(f).load()
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            unpickler = A1111Unpickler(f)
            for _ in range(5):
                unpickler.load()


def _load_any(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def a1111_load(path, dims):
    """textual_inversion.py EmbeddingDatabase.load_from_file: (prompt word = file stem, vectors) or None where A1111
    refuses (safe.py) or skips the file (its width is not the model's: SDXL expects clip_l + clip_g)."""
    name, ext = os.path.splitext(os.path.basename(path))
    if ext.upper() in (".BIN", ".PT"):
        try:
            a1111_check_pt(path)  # safe.py replaces torch.load
        except Exception:
            return None
    data = _load_any(path)
    if "string_to_param" in data:
        assert len(data["string_to_param"]) == 1, "embedding file has multiple terms in it"
        vec = next(iter(data["string_to_param"].values()))
        width = vec.shape[-1]
    elif "clip_g" in data and "clip_l" in data:
        vec, width = {k: data[k] for k in ("clip_l", "clip_g")}, data["clip_l"].shape[-1] + data["clip_g"].shape[-1]
    elif isinstance(next(iter(data.values())), torch.Tensor):
        assert len(data) == 1, "embedding file has multiple terms in it"
        vec = next(iter(data.values()))
        width = vec.shape[-1]
    else:
        raise ValueError(f"Couldn't identify {path}")
    return (name, vec) if width == sum(dims) else None


def comfyui_load(path, dims):
    """sd1_clip.py load_embed + the encoders' width check: the prompt says `embedding:STEM`; each encoder (clip_l,
    then clip_g for SDXL) takes string_to_param's value, else its own key, else the first value, and ignores a wrong
    width."""
    data = _load_any(path)
    out = []
    for key, dim in zip(("clip_l", "clip_g"), dims):
        vec = (
            next(iter(data["string_to_param"].values()))
            if "string_to_param" in data
            else data[key]
            if key in data
            else next(iter(data.values()))
        )
        out.append(vec if vec.shape[-1] == dim else None)
    return (f"embedding:{os.path.splitext(os.path.basename(path))[0]}", out)


def kohya_load(path, sdxl):
    """gen_img.py --textual_inversion_embeddings: the file stem is the token; SD takes the first value (after
    string_to_param), SDXL data["clip_l"] and data["clip_g"] (a KeyError otherwise)."""
    data = _load_any(path)
    data = data.get("string_to_param", data)
    try:
        vecs = [data["clip_l"], data["clip_g"]] if sdxl else [next(iter(data.values()))]
    except KeyError:
        return None
    return os.path.splitext(os.path.basename(path))[0], vecs


def a1111_matches(tokenizer, name, prompt):
    """find_embedding_at_position: A1111 swaps in the embedding wherever the name's token ids occur in the prompt's."""
    ids, text = (
        tokenizer(name, add_special_tokens=False).input_ids,
        tokenizer(prompt, add_special_tokens=False).input_ids,
    )
    return any(text[i : i + len(ids)] == ids for i in range(len(text)))


# ----------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------


def unit_rows(n, dim, seed):
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).float()


@pytest.fixture(scope="module")
def concepts():
    """A 2-vector SD concept and a 2-vector SDXL concept, as read from any file."""
    sd = ConceptEmbedding(
        "<cat-toy>", {"text_encoder": 0.4 * unit_rows(2, SD_DIM, 0)}, {"text_encoder": {"steps": "7"}}
    )
    sdxl = ConceptEmbedding(
        "<dog>",
        {"text_encoder": 0.4 * unit_rows(2, SDXL_DIMS[0], 1), "text_encoder_2": 0.45 * unit_rows(2, SDXL_DIMS[1], 2)},
    )
    return SimpleNamespace(sd=sd, sdxl=sdxl)


class FakeHub:
    """huggingface_hub's network calls replaced: create_repo/upload_folder record, and README.md downloads (which
    ModelCard.load makes for the repository and the base model) find `cards` or raise EntryNotFoundError, as a new
    repo."""

    def __init__(self, monkeypatch, tmp_path, cards=None):
        import huggingface_hub
        import huggingface_hub.repocard
        from huggingface_hub.errors import EntryNotFoundError

        self.created, self.uploaded, self.cards = [], [], dict(cards or {})

        def hf_hub_download(repo_id, filename, **kwargs):
            if repo_id not in self.cards:
                raise EntryNotFoundError(f"{repo_id} has no {filename}")
            path = tmp_path / "hub" / repo_id / filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.cards[repo_id])
            return str(path)

        monkeypatch.setattr(
            huggingface_hub,
            "create_repo",
            lambda name, **kw: self.created.append(name) or SimpleNamespace(repo_id=f"tester/{name}"),
        )
        monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: self.uploaded.append(kw))
        monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", hf_hub_download)


@pytest.fixture(scope="module")
def fp16_run(tiny_sdxl, tmp_path_factory):
    """One SDXL run with --mixed_precision fp16 (the tiny VAE's config has force_upcast, as SDXL's does), validation,
    --no_safe_serialization and --push_to_hub to a fake Hub. A global forward pre-hook (torch's public hook API) finds
    the VAE decoder and records, at its first conv, the input and output dtypes and whether autocast was on."""
    from diffusers.models.autoencoders.vae import Decoder

    import train_directional_textual_inversion_sdxl as sdxl

    from make_tiny_pipeline import make_example_images

    tmp = tmp_path_factory.mktemp("fp16")
    make_example_images(str(tmp / "images"), count=2, size=64)
    decodes = []

    def find_decoder(module, args):
        if isinstance(module, Decoder) and not hasattr(module, "_seen"):
            module._seen = module.conv_in.register_forward_hook(
                lambda conv, inputs, output: decodes.append(
                    (inputs[0].dtype, output.dtype, torch.is_autocast_enabled("cpu"))
                )
            )

    argv = sd_argv(
        tiny_sdxl,
        tmp / "images",
        tmp / "out",
        "--placeholder_token",
        "<toy>",
        "--resolution",
        32,
        "--mixed_precision",
        "fp16",
        "--validation_prompt",
        'a "quoted" <toy> in a street',
        "--no_safe_serialization",
        "--push_to_hub",
        "--hub_model_id",
        "toy-sdxl",
        steps=1,
    )
    handle = torch.nn.modules.module.register_module_forward_pre_hook(find_decoder)
    with pytest.MonkeyPatch.context() as mp:
        hub = FakeHub(mp, tmp)
        try:
            result = sdxl.main(sdxl.parse_args([str(a) for a in argv]))
        finally:
            handle.remove()
    return SimpleNamespace(out=tmp / "out", base=tiny_sdxl, result=result, decodes=decodes, hub=hub)


# ----------------------------------------------------------------------------------------------------
# Every .pt/.bin form passes AUTOMATIC1111's safe unpickler, and still loads with weights_only and in diffusers
# ----------------------------------------------------------------------------------------------------


def test_every_pickle_form_passes_a1111_safe_unpickle(concepts, fp16_run, tmp_path, tiny_sd, tiny_sdxl):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sd, sdxl = concepts.sd, concepts.sdxl
    sd_bin = ConceptEmbedding("<cat-toy-bin>", {"text_encoder": 0.4 * unit_rows(2, SD_DIM, 3)})
    forms = {  # path -> what torch.load must give back
        dti_concepts.convert_embedding(_file(tmp_path, sd), "a1111", str(tmp_path / "cat-toy.pt"))[0]: sd.vectors[
            "text_encoder"
        ],
        dti_concepts.convert_embedding(_file(tmp_path, sd), "a1111", str(tmp_path / "cat-toy.bin"))[0]: sd.vectors[
            "text_encoder"
        ],
        dti_concepts.convert_embedding(_file(tmp_path, sd_bin), "diffusers", str(tmp_path / "diffusers.bin"))[
            0
        ]: sd_bin.vectors["text_encoder"],
        dti_concepts.convert_embedding(_folder(tmp_path, sdxl), "a1111", str(tmp_path / "dog-ti.pt"))[0]: sdxl.vectors,
    }
    trained = [e.vectors().detach() for e in fp16_run.result.embeddings]
    for name, expected in (
        ("learned_embeds.bin", trained[0]),
        ("learned_embeds_2.bin", trained[1]),
        ("toy-ti.bin", trained),
    ):
        forms[str(fp16_run.out / name)] = expected  # the training outputs of --no_safe_serialization

    for path, expected in forms.items():
        a1111_check_pt(path)
        assert not zipfile.is_zipfile(path)  # the legacy format: no archive, so no temporary file name inside either
        data = torch.load(path, map_location="cpu", weights_only=True)
        got = (
            data["string_to_param"]["*"]
            if "string_to_param" in data
            else next(iter(data.values()))
            if len(data) == 1
            else [data["clip_l"], data["clip_g"]]
        )
        if isinstance(expected, dict):
            expected = list(expected.values())
        for g, e in zip(
            got if isinstance(got, list) else [got], expected if isinstance(expected, list) else [expected]
        ):
            assert g.dtype == torch.float32 and torch.equal(g, e), path

    # the check is not vacuous: torch.save's default zip archive is refused (".format_version" is no allowed entry)
    torch.save({"<x>": torch.ones(1, 4)}, tmp_path / "zip.pt")
    with pytest.raises(ValueError, match=r"bad file inside .*\.format_version"):
        a1111_check_pt(str(tmp_path / "zip.pt"))
    torch.save(
        {"<x>": torch.ones(1, 4), "run": os.system}, tmp_path / "evil.bin", _use_new_zipfile_serialization=False
    )
    with pytest.raises(pickle.UnpicklingError, match="forbidden"):
        a1111_check_pt(str(tmp_path / "evil.bin"))

    # diffusers loads them: SD without token= (from "name" in the A1111 dict, or the key), SDXL's .bin training outputs
    # with the card's two calls
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    for path, concept in ((tmp_path / "cat-toy.pt", sd), (tmp_path / "diffusers.bin", sd_bin)):
        pipe.load_textual_inversion(str(path))
        ids = pipe.tokenizer.convert_tokens_to_ids([concept.token, f"{concept.token}_1"])
        assert torch.equal(
            pipe.text_encoder.get_input_embeddings().weight[ids].detach(), concept.vectors["text_encoder"]
        )
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    for stem, enc, tok, vecs in (
        ("learned_embeds", pipe.text_encoder, pipe.tokenizer, trained[0]),
        ("learned_embeds_2", pipe.text_encoder_2, pipe.tokenizer_2, trained[1]),
    ):
        pipe.load_textual_inversion(
            str(fp16_run.out), weight_name=f"{stem}.bin", token="<toy>", text_encoder=enc, tokenizer=tok
        )
        assert torch.equal(enc.get_input_embeddings().weight[tok.convert_tokens_to_ids(["<toy>"])].detach(), vecs)


def _file(tmp_path, concept):
    """The concept as a diffusers {token: tensor} file, an input for the tools (SD)."""
    path = str(tmp_path / f"src-{dti_files.embedding_slug(concept.token)}.safetensors")
    return path if os.path.exists(path) else dti_files.write_diffusers(concept, path)[0]


def _folder(tmp_path, concept):
    """The concept as a training output folder (SDXL: learned_embeds + learned_embeds_2)."""
    folder = str(tmp_path / f"src-{dti_files.embedding_slug(concept.token)}")
    if not os.path.isdir(folder):
        dti_files.write_diffusers(concept, folder)
    return folder


# ----------------------------------------------------------------------------------------------------
# Single-key safetensors forms: the token is the key, so diffusers needs no token= and two files do not collide
# ----------------------------------------------------------------------------------------------------


def test_single_key_safetensors_forms_register_their_token_in_diffusers(concepts, tmp_path, tiny_sd, tiny_sdxl):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sd, sdxl = concepts.sd, concepts.sdxl
    a1111, comfyui = (
        ConceptEmbedding(f"<cat-toy-{i}>", {"text_encoder": 0.4 * unit_rows(2, SD_DIM, 8 + i)}) for i in (1, 2)
    )
    # every SD single-key .safetensors form we write -> its concept (three tokens, all loaded into one pipeline)
    files = {
        dti_files.write_diffusers(sd, str(tmp_path / "run"))[0]: sd,  # run/learned_embeds.safetensors
        dti_concepts.convert_embedding(_file(tmp_path, a1111), "a1111", str(tmp_path / "ui"))[
            0
        ]: a1111,  # ui/cat-toy-1.safetensors
        dti_concepts.convert_embedding(_file(tmp_path, comfyui), "comfyui", str(tmp_path / "cat-toy-2.safetensors"))[
            0
        ]: comfyui,
    }
    assert [os.path.basename(p) for p in files] == [
        "learned_embeds.safetensors",
        "cat-toy-1.safetensors",
        "cat-toy-2.safetensors",
    ]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    for path, concept in files.items():
        assert list(_load_any(path)) == [concept.token]
        pipe.load_textual_inversion(
            path
        )  # no token=: diffusers takes the key (with {"emb_params": ...} both would be "emb_params")
        ids = pipe.tokenizer.convert_tokens_to_ids([concept.token, f"{concept.token}_1"])
        assert torch.equal(
            pipe.text_encoder.get_input_embeddings().weight[ids].detach(), concept.vectors["text_encoder"]
        ), path

    # SDXL: each per-encoder file is single-key too, loaded into its own encoder without token=
    folder = str(tmp_path / "sdxl")
    dti_files.write_diffusers(sdxl, folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    for stem, enc, tok, name in (
        ("learned_embeds", pipe.text_encoder, pipe.tokenizer, "text_encoder"),
        ("learned_embeds_2", pipe.text_encoder_2, pipe.tokenizer_2, "text_encoder_2"),
    ):
        pipe.load_textual_inversion(folder, weight_name=f"{stem}.safetensors", text_encoder=enc, tokenizer=tok)
        ids = tok.convert_tokens_to_ids(["<dog>", "<dog>_1"])
        assert torch.equal(enc.get_input_embeddings().weight[ids].detach(), sdxl.vectors[name])


def test_each_form_in_each_consumer(concepts, tmp_path):
    """What AUTOMATIC1111, ComfyUI and kohya do with each file form we write (the table in the README)."""
    sd, sdxl = concepts.sd, concepts.sdxl
    sd_files = dti_files.write_diffusers(sd, str(tmp_path / "sd")) + [
        dti_concepts.convert_embedding(_file(tmp_path, sd), "a1111", str(tmp_path / f"cat-toy{ext}"))[0]
        for ext in (".safetensors", ".pt")
    ]
    for path in sd_files:
        stem = os.path.splitext(os.path.basename(path))[0]
        expected = sd.vectors["text_encoder"]
        name, vec = a1111_load(path, [SD_DIM])
        assert name == stem and torch.equal(vec, expected)
        word, (vec,) = comfyui_load(path, [SD_DIM])
        assert word == f"embedding:{stem}" and torch.equal(vec, expected)
        assert kohya_load(path, sdxl=False)[0] == stem and torch.equal(kohya_load(path, sdxl=False)[1][0], expected)

    dims = list(SDXL_DIMS)
    folder = str(tmp_path / "sdxl")
    per_encoder = dti_files.write_diffusers(sdxl, folder, single_file=True)
    *per_encoder, single = per_encoder
    pt = dti_concepts.convert_embedding(folder, "a1111", str(tmp_path / "dog-ti.pt"))[0]
    for path in (single, pt):  # the one SDXL file every UI reads: both encoders
        stem = os.path.splitext(os.path.basename(path))[0]
        assert stem == "dog-ti"
        name, vec = a1111_load(path, dims)
        assert (
            name == stem
            and torch.equal(vec["clip_l"], sdxl.vectors["text_encoder"])
            and torch.equal(vec["clip_g"], sdxl.vectors["text_encoder_2"])
        )
        _, (l, g) = comfyui_load(path, dims)
        assert torch.equal(l, sdxl.vectors["text_encoder"]) and torch.equal(g, sdxl.vectors["text_encoder_2"])
        assert [torch.equal(a, b) for a, b in zip(kohya_load(path, sdxl=True)[1], sdxl.vectors.values())] == [
            True,
            True,
        ]
    for path, name in zip(per_encoder, ("text_encoder", "text_encoder_2")):  # the files NOT to copy into a UI
        assert a1111_load(path, dims) is None  # skipped: one encoder's width
        vecs = comfyui_load(path, dims)[1]
        assert sum(v is not None for v in vecs) == 1  # reaches one encoder only
        assert kohya_load(path, sdxl=True) is None  # KeyError 'clip_l'


# ----------------------------------------------------------------------------------------------------
# The single file's name: never one vocabulary word
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token, stem",
    [
        ("<toy>", "toy-ti"),
        ("<cat-toy>", "cat-toy"),
        ("<sks>", "sks-ti"),
        ("<2024>", "2024-ti"),
        ("<my_toy>", "my_toy"),
        ("<v1.5>", "v1.5"),
        ("<toy>>", "toy-ti"),
        ("<<>>", "embedding-ti"),
    ],
)
def test_file_stem_keeps_a_character_clip_splits_off(token, stem, tokenizer):
    assert dti_files.embedding_slug(token, file_stem=True) == stem
    # The tokenizer never makes the stem one token, so no ordinary word is the A1111 prompt word ...
    assert len(tokenizer(stem, add_special_tokens=False).input_ids) > 1
    words = re.findall(r"[A-Za-z0-9]+", stem)
    assert not a1111_matches(tokenizer, stem, "a photo of " + " ".join(words) + " in a street")
    # ... while the stem written in a prompt still calls the embedding
    assert a1111_matches(tokenizer, stem, f"a photo of {stem} in a street")


def test_file_name_rule_in_training_and_tools(fp16_run, concepts, tmp_path, tokenizer):
    # the SDXL trainer named the single file of "<toy>" toy-ti, not toy ("toy" is a word of the vocabulary)
    assert (fp16_run.out / "toy-ti.bin").is_file() and not (fp16_run.out / "toy.bin").exists()
    assert "toy</w>" in tokenizer.get_vocab() and a1111_matches(tokenizer, "toy", "a photo of a toy")
    # convert into a folder picks the same name; a file the user names is kept, with a warning when it has no - _ .
    toy = ConceptEmbedding("<toy>", concepts.sd.vectors)
    assert (
        os.path.basename(dti_concepts.convert_embedding(_file(tmp_path, toy), "a1111", str(tmp_path / "ui"))[0])
        == "toy-ti.safetensors"
    )
    with pytest.warns(DTIWarning, match=r"'toy' the prompt word.*toy-ti\.safetensors avoids that"):
        (named,) = dti_concepts.convert_embedding(_file(tmp_path, toy), "comfyui", str(tmp_path / "toy.safetensors"))
    assert os.path.basename(named) == "toy.safetensors"


# ----------------------------------------------------------------------------------------------------
# slerp writes a folder or one file
# ----------------------------------------------------------------------------------------------------


def test_slerp_writes_a_folder_or_a_safetensors_file(concepts, tmp_path, capsys):
    a, b = concepts.sd, ConceptEmbedding("<b>", {"text_encoder": 0.4 * unit_rows(2, SD_DIM, 5)})
    pa, pb = (
        dti_files.write_diffusers(a, str(tmp_path / "a.safetensors"))[0],
        dti_files.write_diffusers(b, str(tmp_path / "b.safetensors"))[0],
    )
    assert (
        dti_concepts.main(["slerp", pa, pb, "--alpha", "0.3", "--token", "<mix>", "--output", str(tmp_path / "mix")])
        == 0
    )
    assert (
        dti_concepts.main(
            ["slerp", pa, pb, "--alpha", "0.3", "--token", "<mix>", "--output", str(tmp_path / "mix-ab.safetensors")]
        )
        == 0
    )
    in_folder, from_file = (
        _load_any(str(tmp_path / "mix" / "learned_embeds.safetensors")),
        _load_any(str(tmp_path / "mix-ab.safetensors")),
    )
    assert list(from_file) == ["<mix>"] and torch.equal(from_file["<mix>"], in_folder["<mix>"])
    # the blend itself, computed here: direction by slerp (angle 0.3 of the way), norm 0.4 kept
    va, vb = a.vectors["text_encoder"].double(), b.vectors["text_encoder"].double()
    torch.testing.assert_close(angle(from_file["<mix>"], va), 0.3 * angle(va, vb), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        from_file["<mix>"].double().norm(dim=-1), torch.full((2,), 0.4, dtype=torch.float64), rtol=1e-6, atol=0
    )

    # SDXL into a file: the clip_l/clip_g single file; several alphas need a folder
    sdxl_b = ConceptEmbedding(
        "<cat>",
        {n: m * unit_rows(2, d, 7 + i) for i, (n, d, m) in enumerate(zip(dti_files.ENCODERS, SDXL_DIMS, (0.4, 0.45)))},
    )
    x_a, x_b = _folder(tmp_path, concepts.sdxl), dti_files.write_diffusers(sdxl_b, str(tmp_path / "x-b"))[0]
    out = dti_concepts.slerp_embeddings(
        x_a, os.path.dirname(x_b), [0.5], str(tmp_path / "dog-cat.safetensors"), token="<dog-cat>"
    )
    assert out["outputs"] == [str(tmp_path / "dog-cat.safetensors")] and set(_load_any(out["outputs"][0])) == {
        "clip_l",
        "clip_g",
    }
    capsys.readouterr()
    assert (
        dti_concepts.main(["slerp", pa, pb, "--alpha", "0.2", "0.8", "--output", str(tmp_path / "two.safetensors")])
        == 2
    )
    assert "gives 2 blends; pass a folder" in capsys.readouterr().err and not (tmp_path / "two.safetensors").exists()


# ----------------------------------------------------------------------------------------------------
# SDXL validation with fp16: the VAE decodes in float32, outside autocast
# ----------------------------------------------------------------------------------------------------


def test_fp16_validation_decodes_in_the_vae_dtype_outside_autocast(fp16_run):
    assert fp16_run.result.weight_dtype == torch.float16 and fp16_run.result.unet.dtype == torch.float16
    # one decode (the final validation image), its first conv fed and run in float32, with autocast off
    assert fp16_run.decodes == [(torch.float32, torch.float32, False)]
    (png,) = sorted((fp16_run.out / "validation").glob("*.png"))
    assert png.stat().st_size > 0

    # the hook does see the fault it guards against: the same conv under fp16 autocast runs in fp16
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(fp16_run.base, subfolder="vae")
    seen = []
    vae.decoder.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.float16):
        vae.decode(torch.zeros(1, 4, 4, 4))
    assert vae.dtype == torch.float32 and seen == [torch.float16]


# ----------------------------------------------------------------------------------------------------
# The model card: diffusers' load_or_create_model_card + populate_model_card
# ----------------------------------------------------------------------------------------------------


def _front_and_snippets(text):
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    return front, re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _check_snippet(code):
    """Compiles, and every name it imports is used."""
    tree = ast.parse(compile(code, "snippet", "exec", flags=ast.PyCF_ONLY_AST))
    imported = {
        alias.asname or alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert imported <= used, imported - used
    assert "torch_dtype" not in code


TAGS_SDXL = [
    "text-to-image",
    "diffusers",
    "diffusers-training",
    "stable-diffusion-xl",
    "stable-diffusion-xl-diffusers",
    "textual_inversion",
    "directional-textual-inversion",
]


def test_sdxl_card_from_the_training_run(fp16_run):
    hub = fp16_run.hub
    assert hub.created == ["toy-sdxl"] and len(hub.uploaded) == 1
    text = (fp16_run.out / "README.md").read_text()
    front, snippets = _front_and_snippets(text)
    # a local base: no base_model (not a Hub id), its license unknown: `other` and a sentence saying so
    assert front == {"license": "other", "library_name": "diffusers", "inference": True, "tags": TAGS_SDXL}
    assert "could not be read, so this card says `other`" in text
    assert (
        text.count("\n# `<toy>`: Directional Textual Inversion (DTI) on ") == 1
    )  # the token in backticks, not a raw <toy> tag
    norms = [e.norm for e in fp16_run.result.embeddings]
    assert f"text_encoder: {norms[0]:.4f}, text_encoder_2: {norms[1]:.4f}" in text
    assert "![validation image 0](validation/step-000001-0.png)" in text
    # the two-call snippet and the single-file snippet (plus the template's placeholder block), for the .bin files
    # written
    real = [s for s in snippets if "load_textual_inversion" in s]
    assert len(real) == 2
    for code in snippets:
        _check_snippet(code)
    two_calls, single = real
    assert (
        two_calls.count('"tester/toy-sdxl", weight_name="learned_embeds') == 2 and "learned_embeds_2.bin" in two_calls
    )
    assert 'hf_hub_download("tester/toy-sdxl", "toy-ti.bin")' in single and 'state["clip_g"]' in single
    assert 'pipe("a \\"quoted\\" <toy> in a street")' in single  # the prompt's quotes stay valid Python
    assert "`embedding:toy-ti`" in text and "Not `learned_embeds.bin` or `learned_embeds_2.bin`" in text
    # Before: the template's TODO lines stayed, and the local base's absolute path was in the title and snippets.
    base = os.path.basename(os.path.normpath(fp16_run.base))
    assert "TODO" not in text and os.path.dirname(os.path.abspath(fp16_run.base)) not in text
    assert f"Directional Textual Inversion (DTI) on {base}\n" in text and f'from_pretrained("{base}"' in two_calls
    assert f"`{base}` is the base model's folder on the machine that trained this embedding" in text
    assert "## Training details" in text and "| steps | 1 |" in text and "| mixed precision | fp16 |" in text
    assert "#### Limitations and bias" in text


def test_sd_card_for_a_hub_base_and_an_existing_card(monkeypatch, tmp_path):
    base = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    embeddings = [SimpleNamespace(name="text_encoder", norm=0.3871, tokens=["<cat-toy>"])]
    card = {
        "base_model": base,
        "token": "<cat-toy>",
        "initializer_token": "toy",
        "embeddings": embeddings,
        "image_paths": [],
        "steps": 400,
        "kappa": 1e-4,
    }
    # neither the base's card nor the repo's can be read: the license comes from the table
    FakeHub(monkeypatch, tmp_path)
    license = dti_hub.base_model_license(base)
    assert license == {"license": "creativeml-openrail-m"}
    text = open(dti_hub.write_model_card(str(tmp_path), "tester/cat", license=license, **card)).read()
    front, snippets = _front_and_snippets(text)
    assert front == {
        "license": "creativeml-openrail-m",
        "library_name": "diffusers",
        "inference": True,
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "tags": [t.replace("-xl", "") for t in TAGS_SDXL],
    }
    for code in snippets:
        _check_snippet(code)
    assert 'pipe.load_textual_inversion("tester/cat")' in text and "dtype=torch.float16" in text
    assert "Save `learned_embeds.safetensors` as `cat-toy.safetensors`" in text and "could not be read" not in text

    # a repository that already has a card keeps it; the tags it lacks are added once
    FakeHub(monkeypatch, tmp_path, cards={"tester/cat": "---\nlicense: mit\ntags:\n- diffusers\n---\n# My own card\n"})
    text = open(dti_hub.write_model_card(str(tmp_path), "tester/cat", license=license, **card)).read()
    front, _ = _front_and_snippets(text)
    assert front["license"] == "mit" and "# My own card" in text and "load_textual_inversion" not in text
    assert front["tags"] == ["diffusers"] + [t.replace("-xl", "") for t in TAGS_SDXL if t != "diffusers"]


# ----------------------------------------------------------------------------------------------------
# dti_files.load_textual_inversion: one loader for every family (SANA and Wan: tests/test_train_sana.py, _wan.py)
# ----------------------------------------------------------------------------------------------------


def test_one_loader_puts_sd_and_sdxl_files_of_every_form_into_their_encoders(tiny_sd, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from dti_utils import DTIError

    gen = torch.Generator().manual_seed(0)
    sd = ConceptEmbedding("<sd-toy>", {"text_encoder": torch.randn(2, SD_DIM, generator=gen)})
    dti_files.write_diffusers(sd, str(tmp_path / "sd"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    assert dti_files.load_textual_inversion(pipe, str(tmp_path / "sd")) == "<sd-toy>"  # diffusers expands it
    ids = pipe.tokenizer.convert_tokens_to_ids(["<sd-toy>", "<sd-toy>_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], sd.vectors["text_encoder"])

    vectors = {name: torch.randn(1, dim, generator=gen) for name, dim in zip(dti_files.ENCODERS, SDXL_DIMS)}
    xl = ConceptEmbedding("<xl-toy>", vectors)
    dti_files.write_diffusers(xl, str(tmp_path / "xl"), single_file=True)  # the pair and the clip_l/clip_g file
    for path in (tmp_path / "xl", tmp_path / "xl" / "xl-toy.safetensors"):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        assert dti_files.load_textual_inversion(pipe, str(path)) == "<xl-toy>"
        for name, tok in (("text_encoder", pipe.tokenizer), ("text_encoder_2", pipe.tokenizer_2)):
            row = getattr(pipe, name).get_input_embeddings().weight[tok.convert_tokens_to_ids("<xl-toy>")]
            assert torch.equal(row, vectors[name][0])

    sana = ConceptEmbedding("<s>", {"text_encoder": torch.randn(1, SD_DIM)}, {"text_encoder": {"family": "sana"}})
    dti_files.write_diffusers(sana, str(tmp_path / "sana.safetensors"))
    with pytest.raises(DTIError, match=r"is an embedding for SANA .* but the pipeline is SDXL"):
        dti_files.load_textual_inversion(pipe, str(tmp_path / "sana.safetensors"))
