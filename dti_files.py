"""Embedding files in every form, read, written and loaded into a pipeline in one place.

A learned concept is a token and a (num_vectors, dim) float32 tensor per text encoder (`ConceptEmbedding`). It is
written as diffusers' training outputs (learned_embeds.safetensors, {token: tensor}; SDXL adds learned_embeds_2),
as the single file AUTOMATIC1111, ComfyUI and kohya read (SD: {token: tensor} .safetensors or the string_to_param
.pt; SDXL: {"clip_l", "clip_g"}), and read back from any of these. Every file is written atomically (a temporary
file renamed when complete), so a reader never sees half a file. SANA (Gemma-2) and Wan (UMT5) concepts are the
{token: tensor} file with the family in its metadata; `load_textual_inversion(pipeline, path)` loads any of them
into an SD, SDXL, SANA or Wan pipeline.
"""

import json
import math
import os
import pickle
import re
import tempfile
import warnings

import torch

from dti_utils import DTIError, DTIWarning, __version__, add_placeholder_tokens, placeholder_token_list


__all__ = [
    "ENCODERS",
    "SINGLE_FILE_KEYS",
    "FILE_STEMS",
    "TOKENIZERS",
    "EMBEDDING_EXTENSIONS",
    "CONVERT_TARGETS",
    "ConceptEmbedding",
    "WriteError",
    "write_failure_types",
    "atomic_write",
    "write_text",
    "save_embedding_file",
    "embedding_slug",
    "check_targets",
    "diffusers_paths",
    "write_single_file",
    "write_diffusers",
    "write_concept",
    "save_training_embeddings",
    "read_embedding_file",
    "join_encoders",
    "read_concept",
    "stated_norm",
    "base_vocabulary",
    "FAMILIES",
    "family_of",
    "pipeline_family",
    "prompt_word",
    "load_textual_inversion",
    "load_concept",
]

FAMILIES = {  # model family: what the files and messages call it
    "sd": "SD (1 text encoder)",
    "sdxl": "SDXL",
    "sana": "SANA (Gemma-2 text encoder)",
    "wan": "Wan (UMT5 text encoder)",
}
ENCODERS = ("text_encoder", "text_encoder_2")  # diffusers' attribute names
SINGLE_FILE_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # the SDXL single file
FILE_STEMS = {"text_encoder": "learned_embeds", "text_encoder_2": "learned_embeds_2"}  # diffusers' training outputs
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}  # each encoder's tokenizer, as attributes
EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")
CONVERT_TARGETS = ("diffusers", "a1111", "comfyui")


class ConceptEmbedding:
    """One learned concept in any file form: its token and a (num_vectors, dim) tensor per text encoder.

    vectors: {"text_encoder": tensor} for SD 1.x/2.x, plus "text_encoder_2" for SDXL (clip_l / clip_g).
    metadata: {encoder name: {str: str}} as stored in the files. form: "diffusers", "diffusers-folder", "a1111",
    "sdxl-single-file" (or "checkpoint" for evaluate_dti's checkpoint-N folders)."""

    def __init__(self, token, vectors, metadata=None, source=None, form=None, files=()):
        self.token = token
        self.vectors = {name: vectors[name] for name in ENCODERS if name in vectors}
        self.metadata = {name: dict((metadata or {}).get(name, {})) for name in self.vectors}
        self.source, self.form = source, form
        self.files = tuple(files)  # the files it was read from: a writer never writes over them

    @property
    def sdxl(self):
        return "text_encoder_2" in self.vectors

    @property
    def num_vectors(self):
        return next(iter(self.vectors.values())).shape[0]

    @property
    def family(self):
        """ "sd", "sdxl", "sana" or "wan" as the metadata states (this project's training outputs say); else "sdxl" for
        two encoders' vectors, None for one encoder's (SD, or a file from elsewhere)."""
        stated = next(iter(self.metadata.values()), {}).get("family")
        return stated if stated in FAMILIES else "sdxl" if self.sdxl else None

    def describe(self):
        kind = "SDXL (2 text encoders)" if self.sdxl else FAMILIES.get(self.family, "SD (1 text encoder)")
        return f"{self.source or self.token}: {kind}, {self.num_vectors} vector(s)"

    def __repr__(self):
        dims = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.vectors.items())
        return f"ConceptEmbedding(token={self.token!r}, {dims}, form={self.form!r})"


# ----------------------------------------------------------------------------------------------------
# Writing: atomically, in every form
# ----------------------------------------------------------------------------------------------------


class WriteError(DTIError):
    """A file could not be written (full disk, no permission, a folder in the way): the previous file is intact."""


def write_failure_types():
    """What a failed write raises, whoever writes: the OS (OSError: full disk, permissions), safetensors
    (SafetensorError), torch.save (RuntimeError from its zip writer), PIL and matplotlib (OSError, ValueError)."""
    from safetensors import SafetensorError

    return (OSError, RuntimeError, ValueError, SafetensorError)


def why(error):
    """The reason of a failed write in a few words: 'No space left on device', not a traceback."""
    text = getattr(error, "strerror", None) or str(error).strip().splitlines()[-1:] or [type(error).__name__]
    return text if isinstance(text, str) else text[0]


def atomic_write(path, write):
    """Call write(tmp) on a temporary file in the same folder, then rename it to path: readers never see half a
    file, and a failed write leaves the previous file as it was. Every way a write fails (write_failure_types)
    becomes a WriteError naming the file and the reason."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
        os.close(fd)
        write(tmp)
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except write_failure_types() as e:
        raise WriteError(f"Could not write {path} ({why(e)}); the previous file, if any, is unchanged.") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text(path, text):
    """Write a UTF-8 text file atomically."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def _save_pickle(path, obj):
    # torch.save's legacy (non-zip) format: AUTOMATIC1111's safe unpickler refuses the zip entries torch.save writes
    # now (.format_version, .storage_alignment); torch.load(weights_only=True), diffusers, ComfyUI and kohya read both.
    return atomic_write(path, lambda tmp: torch.save(obj, tmp, _use_new_zipfile_serialization=False))


def save_embedding_file(path, tensors, metadata=None):
    """Save {key: float32 tensor} atomically: safetensors (with string metadata) or, for .bin/.pt, torch.save."""
    tensors = {k: v.detach().float().cpu().contiguous().clone() for k, v in tensors.items()}
    if not path.lower().endswith(".safetensors"):
        return _save_pickle(path, tensors)
    from safetensors.torch import save_file

    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


RESERVED_STEMS = ("learned_embeds", "learned_embeds_2", "training_curves", "model_index", "README")


def embedding_slug(token, file_stem=False):
    """'<cat-toy>' -> 'cat-toy'. file_stem=True: the single file's stem, which AUTOMATIC1111 and kohya make the prompt
    word (ComfyUI: `embedding:STEM`). A1111 swaps the embedding in wherever the stem's tokens occur, so the stem keeps
    a '-', '_' or '.' inside, which CLIP's tokenizer splits off: it is never one vocabulary word ('<toy>' -> 'toy-ti',
    not 'toy'); nor is it the name of another training output ('<learned_embeds_2>' -> 'learned_embeds_2-ti')."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "", token or "").strip("._-") or "embedding"
    if not file_stem:
        return slug
    reserved = slug.lower() in (stem.lower() for stem in RESERVED_STEMS) or re.fullmatch(
        r"(learned_embeds(_2)?-steps-\d+|checkpoint-\d+)", slug, flags=re.IGNORECASE
    )
    return slug if re.search(r"[._-]", slug) and not reserved else f"{slug}-ti"


def _encoder_metadata(concept, name):
    meta = {k: v for k, v in concept.metadata.get(name, {}).items() if k != "format"}
    tokens = placeholder_token_list(concept.token, concept.num_vectors)
    meta.update(text_encoder=name, placeholder_token=concept.token, tokens=json.dumps(tokens))
    return meta


def stated_norm(text):
    """The norm m a file's metadata states, as a float; None for "free", a list or anything else."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def check_targets(paths, *, overwrite=False, inputs=(), flag="--output"):
    """Before anything is written: no target may be one of the command's own input files (not even with overwrite),
    and none may exist unless overwrite. A folder the targets go into may hold other files: it is added to."""
    protected = {os.path.realpath(p) for p in inputs}
    for path in paths:
        if os.path.realpath(path) in protected:
            raise DTIError(
                f"{flag} would write {path}, which is an input of this command; choose another {flag} so that the "
                "input is kept."
            )
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise DTIError(f"{flag}: {shown} already exist; pass --overwrite to replace them, or choose another {flag}.")


def diffusers_paths(concept, output, single_file=False, suffix="", ext=".safetensors"):
    """The files write_diffusers writes for `concept` at `output`."""
    if output.lower().endswith(EMBEDDING_EXTENSIONS):
        if concept.sdxl:
            raise DTIError(
                f"--output {output} is a file, but an SDXL embedding in diffusers form is two files; pass a folder."
            )
        return [output]
    paths = [os.path.join(output, FILE_STEMS[name] + suffix + ext) for name in concept.vectors]
    if single_file and concept.sdxl:
        paths.append(os.path.join(output, embedding_slug(concept.token, file_stem=True) + suffix + ext))
    return paths


def write_single_file(concept, path, overwrite=True, inputs=()):
    """The AUTOMATIC1111/ComfyUI/kohya single file: SDXL {"clip_l", "clip_g"}; SD {token: tensor} (.safetensors, the
    key diffusers takes as the token; the others take any single key) or {"string_to_param": {"*": ...}, "name",
    "step"} (.pt). Refuses to replace a file unless overwrite, and never writes over `inputs` (check_targets)."""
    check_targets([path], overwrite=overwrite, inputs=inputs)
    meta = _encoder_metadata(concept, "text_encoder")
    if concept.sdxl:
        meta["text_encoder"] = "both"
        norms = {SINGLE_FILE_KEYS[n]: stated_norm(concept.metadata.get(n, {}).get("norm")) for n in concept.vectors}
        meta["norm"] = json.dumps(norms)
        return save_embedding_file(path, {SINGLE_FILE_KEYS[n]: v for n, v in concept.vectors.items()}, meta)
    vectors = concept.vectors["text_encoder"]
    if path.lower().endswith(".safetensors"):
        return save_embedding_file(path, {concept.token: vectors}, meta)
    step = meta.get("steps", "")
    a1111 = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vectors.detach().float().cpu().contiguous().clone()},
        "name": concept.token,
        "step": int(step) if step.isdigit() else 0,
        "sd_checkpoint": None,
        "sd_checkpoint_name": meta.get("base_model"),
        "metadata": meta,
    }
    return _save_pickle(path, a1111)


def write_diffusers(concept, output, single_file=False, suffix="", ext=".safetensors", overwrite=True, inputs=()):
    """diffusers form: a {token: tensor} file (SD, OUTPUT ending in .safetensors/.bin) or a folder with
    learned_embeds{suffix}{ext} (+ learned_embeds_2 for SDXL; with single_file also the <slug> single file).
    Refuses to replace files unless overwrite, and never writes over `inputs` (check_targets)."""
    paths = diffusers_paths(concept, output, single_file=single_file, suffix=suffix, ext=ext)
    check_targets(paths, overwrite=overwrite, inputs=inputs)
    names = list(concept.vectors)
    written = [
        save_embedding_file(path, {concept.token: concept.vectors[name]}, _encoder_metadata(concept, name))
        for path, name in zip(paths, names)
    ]
    if len(paths) > len(names):  # the SDXL single file
        written.append(write_single_file(concept, paths[-1]))
    return written


def write_concept(concept, output, to="diffusers", single_file=False, overwrite=True, inputs=()):
    """Write a concept in the form `to` (diffusers, a1111, comfyui); returns the paths written. a1111 and comfyui
    write one single file: OUTPUT itself when it names a file, else OUTPUT/NAME.safetensors."""
    if to not in CONVERT_TARGETS:
        raise DTIError(f"--to must be one of {', '.join(CONVERT_TARGETS)}, not {to!r}.")
    if to == "diffusers":
        return write_diffusers(concept, output, single_file=single_file, overwrite=overwrite, inputs=inputs)
    if not output.lower().endswith(EMBEDDING_EXTENSIONS):
        output = os.path.join(output, embedding_slug(concept.token, file_stem=True) + ".safetensors")
    return [write_single_file(concept, output, overwrite=overwrite, inputs=inputs)]


def save_training_embeddings(output_dir, embeddings, *, token, run_info, step, suffix="", ext=".safetensors"):
    """The training outputs: learned_embeds[_2]{suffix}{ext} and, for SDXL, the single file, with metadata saying how
    they were made (`run_info`: {str: value}, plus each encoder's norm and the step).

    Never loses the embedding without saying so: vectors that are not finite are not written over the files on disk
    (the last good ones stay); if output_dir cannot be written (a full disk, a folder in the way), the files go to a
    new folder under the system's temporary folder, or under the current folder, named in the error; if neither can
    be written the error says the embedding is lost and why."""
    metadata = {
        e.name: {
            "method": "directional_textual_inversion" if e.norm is not None else "textual_inversion",
            "dti_version": __version__,
            **{k: str(v) for k, v in run_info.items()},
            "norm": repr(e.norm) if e.norm is not None else "free",
            "steps": str(step),
        }
        for e in embeddings
    }
    vectors = {e.name: e.vectors().detach() for e in embeddings}
    if not all(torch.isfinite(v).all() for v in vectors.values()):
        raise DTIError(
            f"The embedding at step {step} is not finite (NaN or infinite values); it was not written, and the files "
            f"in {output_dir} keep the last finite one. Lower --learning_rate or use --mixed_precision bf16 or no."
        )
    concept = ConceptEmbedding(token, vectors, metadata, form="diffusers-folder")
    try:
        return write_diffusers(concept, output_dir, single_file=True, suffix=suffix, ext=ext)
    except WriteError as failed:
        cause = why(failed.__cause__)
        for parent in (tempfile.gettempdir(), os.getcwd()):
            try:
                rescue = tempfile.mkdtemp(prefix="dti-rescue-", dir=parent)
                write_diffusers(concept, rescue, single_file=True, suffix=suffix, ext=ext)
            except (OSError, WriteError):
                continue
            raise DTIError(
                f"Could not write the embedding to {output_dir} ({cause}); it was saved to {rescue} instead."
            ) from failed
        raise DTIError(
            f"Could not write the embedding to {output_dir} ({cause}), nor to a new folder in "
            f"{tempfile.gettempdir()} or {os.getcwd()}: the embedding of step {step} is lost. Free some space and "
            "resume from the last checkpoint (--resume_from_checkpoint latest)."
        ) from failed


# ----------------------------------------------------------------------------------------------------
# Reading every form
# ----------------------------------------------------------------------------------------------------


def read_embedding_file(path):
    """(data dict, metadata dict) of one embedding file; .pt/.bin only through torch.load(weights_only=True)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise DTIError(
            f"Embedding file {path} does not exist; pass a .safetensors, .pt or .bin file or a training output folder."
        )
    if not path.lower().endswith(EMBEDDING_EXTENSIONS):
        raise DTIError(
            f"{path} is not an embedding file; use a .safetensors, .pt or .bin file or a training output folder."
        )
    try:
        if path.lower().endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                data, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        else:
            data, metadata = torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as e:
        raise DTIError(
            f"{path} is not a plain tensor file; only weights-only .pt/.bin files are read, arbitrary pickles are "
            "refused."
        ) from e
    except Exception as e:  # damaged bytes make the readers raise almost anything (IndexError, KeyError, ...)
        raise DTIError(
            f"{path} cannot be read as an embedding file ({type(e).__name__}); check that the download is complete."
        ) from e
    if not isinstance(data, dict) or not data:
        what = f"{type(data).__name__}{' (empty)' if isinstance(data, dict) else ''}"
        raise DTIError(f"{path} holds {what}, not a dict of tensors; this is not a textual-inversion embedding file.")
    return data, {str(k): str(v) for k, v in metadata.items()}


def _as_matrix(value, path, key):
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise DTIError(
            f"{path}: entry {key!r} is not a float tensor ({type(value).__name__}); this is not a textual-inversion "
            "embedding file."
        )
    value = value.unsqueeze(0) if value.dim() == 1 else value
    if value.dim() != 2 or value.shape[0] < 1 or value.shape[1] < 1:
        raise DTIError(f"{path}: entry {key!r} has shape {tuple(value.shape)}; an embedding is (num_vectors, dim).")
    return value.detach().cpu()


def _a1111_concept(data, metadata, path, stem):
    params = data["string_to_param"]
    if not isinstance(params, dict) or not params:
        raise DTIError(f"{path}: 'string_to_param' is not a dict of tensors; the AUTOMATIC1111 file is damaged.")
    meta = dict(metadata)
    if isinstance(data.get("metadata"), dict):
        meta.update({str(k): str(v) for k, v in data["metadata"].items()})
    name = data.get("name")
    token = name if isinstance(name, str) and name.strip() else meta.get("placeholder_token", stem)
    if data.get("step") is not None and "steps" not in meta:
        meta["steps"] = str(data["step"])
    value = params["*"] if "*" in params else next(iter(params.values()))
    vectors = {"text_encoder": _as_matrix(value, path, "string_to_param")}
    return ConceptEmbedding(token, vectors, {"text_encoder": meta}, path, "a1111")


def _sdxl_single_file_concept(data, metadata, path, stem):
    missing = [k for k in ("clip_l", "clip_g") if k not in data]
    if missing:
        present = "clip_l" if "clip_l" in data else "clip_g"
        raise DTIError(f"{path} has {present} but no {missing[0]}; an SDXL embedding file holds both.")
    try:
        norms = json.loads(metadata["norm"]) if metadata.get("norm", "").startswith("{") else {}
    except ValueError:
        norms = {}
    vectors, metas = {}, {}
    for name, key in SINGLE_FILE_KEYS.items():
        vectors[name] = _as_matrix(data[key], path, key)
        metas[name] = {**metadata, "text_encoder": name}
        if isinstance(norms, dict) and key in norms:
            metas[name]["norm"] = repr(float(norms[key])) if norms[key] is not None else "free"
    counts = [vectors[name].shape[0] for name in ENCODERS]
    if counts[0] != counts[1]:
        raise DTIError(f"{path} holds {counts[0]} clip_l vectors but {counts[1]} clip_g vectors; the file is damaged.")
    return ConceptEmbedding(metadata.get("placeholder_token") or stem, vectors, metas, path, "sdxl-single-file")


def _concept_from_data(data, metadata, path):
    stem = os.path.splitext(os.path.basename(path))[0]
    if "string_to_param" in data:  # AUTOMATIC1111 .pt
        return _a1111_concept(data, metadata, path, stem)
    if "emb_params" in data:  # AUTOMATIC1111 / kohya .safetensors
        token = metadata.get("placeholder_token") or metadata.get("name") or stem
        vectors = {"text_encoder": _as_matrix(data["emb_params"], path, "emb_params")}
        return ConceptEmbedding(token, vectors, {"text_encoder": metadata}, path, "a1111")
    if "clip_l" in data or "clip_g" in data:  # SDXL single file
        return _sdxl_single_file_concept(data, metadata, path, stem)
    if len(data) == 1:  # diffusers {token: tensor}
        token, value = next(iter(data.items()))
        meta = {"text_encoder": "text_encoder", **metadata}
        return ConceptEmbedding(
            str(token), {"text_encoder": _as_matrix(value, path, token)}, {"text_encoder": meta}, path, "diffusers"
        )
    raise DTIError(
        f"{path} has keys {sorted(map(str, data))[:6]}, which is no embedding form this tool knows; expected "
        "{token: tensor}, 'string_to_param', 'emb_params' or 'clip_l'/'clip_g'."
    )


def _read_file(path):
    concept = _concept_from_data(*read_embedding_file(path), path)
    concept.files = (path,)
    return concept


def _find_file(folder, stem):
    candidates = (os.path.join(folder, stem + ext) for ext in EMBEDDING_EXTENSIONS)
    return next((path for path in candidates if os.path.isfile(path)), None)


def join_encoders(folder, concept, first, second):
    """An SDXL training output: learned_embeds[-steps-N] (text_encoder, read as `concept`) and
    learned_embeds_2[-steps-N] (text_encoder_2) as one concept, `folder` its source."""
    other = _read_file(second)
    if other.sdxl:
        raise DTIError(f"{second} holds both encoders' vectors; a learned_embeds_2 file holds text_encoder_2's only.")
    if other.num_vectors != concept.num_vectors:
        raise DTIError(
            f"{first} has {concept.num_vectors} vector(s) but {second} has {other.num_vectors}; the folder mixes two "
            "trainings."
        )
    if other.token != concept.token:
        warnings.warn(
            f"{first} names the token {concept.token!r} but {second} names {other.token!r}; using {concept.token!r}.",
            DTIWarning,
        )
    metadata = {
        "text_encoder": concept.metadata["text_encoder"],
        "text_encoder_2": {**other.metadata["text_encoder"], "text_encoder": "text_encoder_2"},
    }
    vectors = {"text_encoder": concept.vectors["text_encoder"], "text_encoder_2": other.vectors["text_encoder"]}
    return ConceptEmbedding(concept.token, vectors, metadata, folder, "diffusers-folder", files=(first, second))


def read_concept(path):
    """Read an embedding file or a training output folder (SD or SDXL) in any supported form."""
    if not os.path.isdir(path):
        return _read_file(path)
    first, second = _find_file(path, "learned_embeds"), _find_file(path, "learned_embeds_2")
    if first:
        concept = _read_file(first)
        if second and not concept.sdxl:
            return join_encoders(path, concept, first, second)
        if not concept.sdxl:
            concept.source, concept.form = path, "diffusers-folder"
        return concept
    if second:
        raise DTIError(f"{path} has learned_embeds_2 but no learned_embeds file; an SDXL output needs both.")
    candidates = sorted(
        n
        for n in os.listdir(path)
        if n.lower().endswith(EMBEDDING_EXTENSIONS)
        and not n.startswith(".")
        and "-steps-" not in n
        and os.path.isfile(os.path.join(path, n))
    )
    if len(candidates) == 1:
        return _read_file(os.path.join(path, candidates[0]))
    if not candidates:
        raise DTIError(
            f"{path} holds no learned_embeds.safetensors (or any embedding file); pass a training output folder or an "
            "embedding file."
        )
    raise DTIError(
        f"{path} holds several embedding files ({', '.join(candidates[:5])}) and no learned_embeds.safetensors; "
        "pass one file."
    )


# ----------------------------------------------------------------------------------------------------
# A base model's vocabulary: the rows learned vectors are compared with
# ----------------------------------------------------------------------------------------------------


# The input embedding's key in each family's text encoder weights: CLIP, Gemma-2, UMT5 (`shared`, tied to
# encoder.embed_tokens, which the file may leave out).
EMBEDDING_KEYS = ("token_embedding.weight", "embed_tokens.weight", "shared.weight")


def _input_embedding_weight(model, name):
    """The text encoder's token embedding matrix (V, dim), float32: read straight from the safetensors of a
    local pipeline folder when possible (CLIP, Gemma-2 and UMT5 tables, sharded files too), else through transformers
    (local folder or Hub id)."""
    folder = os.path.join(model, name)
    if os.path.isdir(folder):
        from safetensors import safe_open

        for file in sorted(os.listdir(folder)):
            if file.endswith(".safetensors"):
                with safe_open(os.path.join(folder, file), framework="pt") as f:
                    for key in f.keys():
                        if key.endswith(EMBEDDING_KEYS):
                            return f.get_tensor(key).float()
    elif os.path.isdir(model):
        raise DTIError(f"--model {model} has no {name} folder; pass a diffusers pipeline folder of the base model.")
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(model, subfolder=name)
        encoder_class = getattr(transformers, (config.architectures or ["CLIPTextModel"])[0], transformers.AutoModel)
        encoder = encoder_class.from_pretrained(model, subfolder=name)
    except (OSError, ValueError) as e:
        raise DTIError(
            f"--model {model}: its {name} could not be loaded ({type(e).__name__}: {e}); pass a diffusers pipeline "
            "folder or Hub id."
        ) from e
    return encoder.get_input_embeddings().weight.detach().float()


def _load_tokenizer(model, name):
    from transformers import AutoTokenizer

    sub = TOKENIZERS[name]
    try:
        return AutoTokenizer.from_pretrained(model, subfolder=sub)
    except (OSError, ValueError) as e:
        raise DTIError(
            f"--model {model}: its {sub} could not be loaded ({type(e).__name__}: {e}); pass a diffusers pipeline "
            "folder or Hub id."
        ) from e


def base_vocabulary(model, name):
    """(token embedding rows of the base vocabulary, float32 (V, dim); tokenizer) of one of the model's text encoders.
    Rows past the tokenizer's own vocabulary (tokens a full-pipeline save folded in, and UMT5's rows no token reaches)
    are left out: the rows training takes its norm from."""
    weight, tokenizer = _input_embedding_weight(model, name), _load_tokenizer(model, name)
    return weight[: min(weight.shape[0], tokenizer.vocab_size)], tokenizer


# ----------------------------------------------------------------------------------------------------
# Loading a concept into a pipeline of any family
# ----------------------------------------------------------------------------------------------------


def family_of(class_name, two_text_encoders):
    """ "sd", "sdxl", "sana" or "wan" from a pipeline's class name and whether it has a second text encoder."""
    if class_name.startswith("Sana"):
        return "sana"
    if class_name.startswith("Wan"):
        return "wan"
    return "sdxl" if two_text_encoders else "sd"


def pipeline_family(pipeline):
    """ "sd", "sdxl", "sana" or "wan" of a diffusers pipeline object."""
    return family_of(type(pipeline).__name__, getattr(pipeline, "text_encoder_2", None) is not None)


def prompt_word(tokens, family):
    """What to write in a prompt for a concept's tokens: SD and SDXL the first token (diffusers' loader expands it to
    all of them); SANA and Wan all of them joined without spaces (their tokenizers make a space a token of its own,
    which training never saw)."""
    return tokens[0] if family in ("sd", "sdxl") else "".join(tokens)


def _write_rows(tokenizer, text_encoder, tokens, vectors, path):
    """Add the tokens and write their raw rows into the encoder's own table. The table grows only when a new id falls
    past its end (Gemma's), with resize_token_embeddings(mean_resizing=False); UMT5's table is larger than its
    tokenizer and keeps its shape, its tied `shared` and `encoder.embed_tokens` both see the rows. The embedding
    module stays the encoder's own, so Gemma's sqrt(hidden) scale applies to these rows as to every other."""
    vocab = tokenizer.get_vocab()
    known = [t for t in tokens if t in vocab]
    if known:
        raise DTIError(f"The pipeline's tokenizer already has {known[0]!r}; {path} may be loaded already.")
    ids = add_placeholder_tokens(tokenizer, text_encoder, tokens)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = vectors.to(weight.device, weight.dtype)


def load_textual_inversion(pipeline, path, token=None):
    """Load an embedding of this project (a training output folder or any file form the concept tools read) into an
    SD, SDXL, SANA or Wan pipeline, under its own token or `token`, and return the word to write in prompts.

    SD and SDXL go through diffusers' own `load_textual_inversion` (SDXL: each encoder's vectors into its encoder).
    SANA and Wan, whose pipelines have no loader, get the tokens added to their tokenizer and the raw rows written into
    the text encoder's table (see _write_rows). SANA lowercases prompts, so its tokens must be lowercase; its
    `clean_caption=True` would strip a `<token>` from the prompt."""
    return load_concept(pipeline, read_concept(path), token=token, source=path)


def load_concept(pipeline, concept, token=None, source=None):
    """load_textual_inversion for a concept already read (ConceptEmbedding); `source` names it in errors."""
    path = source or concept.source or concept.token
    family = pipeline_family(pipeline)
    if concept.family not in (None, family) or concept.sdxl != (family == "sdxl"):
        raise DTIError(
            f"{path} is an embedding for {FAMILIES[concept.family or 'sd']} but the pipeline is "
            f"{FAMILIES[family]}; load it into the base model it was trained on."
        )
    token = token or concept.token
    tokens = placeholder_token_list(token, concept.num_vectors)
    for name, vectors in concept.vectors.items():
        width = getattr(pipeline, name).get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != width:
            raise DTIError(
                f"{path} holds {vectors.shape[1]}-dim vectors but the pipeline's {name} has {width}-dim rows; load it "
                f"into the base model it was trained on{_trained_on(concept, name)}."
            )
    if family in ("sd", "sdxl"):
        for name, vectors in concept.vectors.items():
            tokenizer = getattr(pipeline, TOKENIZERS[name])
            pipeline.load_textual_inversion(
                vectors, token=token, text_encoder=getattr(pipeline, name), tokenizer=tokenizer
            )
        return prompt_word(tokens, family)
    if family == "sana" and token != token.lower():
        raise DTIError(
            f"{path} names the token {token!r}, but SanaPipeline lowercases every prompt, so it could never be "
            "matched; pass token= in lower case."
        )
    _write_rows(pipeline.tokenizer, pipeline.text_encoder, tokens, concept.vectors["text_encoder"], path)
    return prompt_word(tokens, family)


def _trained_on(concept, name):
    base = concept.metadata.get(name, {}).get("base_model")
    return f" ({base})" if base else ""
