"""Shared fixtures: tiny random SD, SDXL, SANA and Wan pipelines and example images built offline; helpers that run the
training script in-process (fast) or through its real entry point (a subprocess); the scripts' defaults read from
their own parsers (script_defaults), the one angle between vectors every test measures with (angle), and tiny random
scoring encoders with their features computed by hand from the models' layers (encoders, by_hand).

Nothing here may reach the Hugging Face Hub: the offline switches are set before any HF library is imported.
"""

import functools
import glob
import math
import os
import subprocess
import sys


# -- Offline and quiet, for this process and every subprocess it starts (set before any HF import). --
_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DIFFUSERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}
os.environ.update(_OFFLINE_ENV)
for _var in (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "ACCELERATE_MIXED_PRECISION",
    "ACCELERATE_USE_CPU",
    "LOCAL_RANK",
    "RANK",
    "WORLD_SIZE",
):
    os.environ.pop(_var, None)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS_DIR = os.path.join(REPO_ROOT, "tools")
SCRIPT = os.path.join(REPO_ROOT, "train_directional_textual_inversion.py")
for _path in (os.path.join(REPO_ROOT, "benchmarks"), TOOLS_DIR, REPO_ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


torch.set_num_threads(1)  # tiny models gain nothing from threads; pytest-xdist runs one worker per core

PLACEHOLDER = "<toy-dti>"


def angle(a, b):
    """The angle in radians between a and b, row by row (the last axis is the vector), in float64 numpy: the atan2
    form atan2(|b - (a.b) a|, a.b) of the unit vectors, exact down to tiny angles where arccos of a cosine is not.
    a and b may be torch tensors (any dtype or device) or arrays, of any norm; they broadcast against each other."""
    a, b = (_float64(x) for x in (a, b))
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    dot = (a * b).sum(-1)
    return np.arctan2(np.linalg.norm(b - dot[..., None] * a, axis=-1), dot)


def _float64(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def row_norms(t):
    """The norm of every row of a tensor, in float64 numpy."""
    return np.linalg.norm(t.double().numpy(), axis=-1)


def token_embedding_of(state):
    """The token embedding matrix in a CLIP text encoder state dict (the key's prefix varies by transformers
    version)."""
    keys = [k for k in state if k.endswith("embeddings.token_embedding.weight")]
    assert len(keys) == 1, sorted(state)
    return state[keys[0]]


# ----------------------------------------------------------------------------------------------------
# Session fixtures: the tiny pipeline and images
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def child_processes_write_temporary_files_under_pytest(tmp_path_factory):
    """Child processes (torchrun's torchelastic_* log folders, a script's rescue folder) put their temporary files
    under pytest's own folder, which pytest removes after a passing session (pytest.ini keeps only failed tests'
    folders), so a run leaves nothing behind in /tmp."""
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("child-tmp"))
    yield
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """Folder of a tiny random StableDiffusionPipeline (CLIP vocab of a few hundred tokens, dim 32)."""
    from make_tiny_pipeline import make_tiny_sd

    return make_tiny_sd(str(tmp_path_factory.mktemp("tiny") / "tiny-sd"))


@pytest.fixture(scope="session")
def example_images(tmp_path_factory):
    """Folder with four small RGB PNGs."""
    from make_tiny_pipeline import make_example_images

    folder = str(tmp_path_factory.mktemp("data") / "images")
    make_example_images(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """Folder of a tiny random StableDiffusionXLPipeline: encoder 1 of width 32, encoder 2 of width 64 with a
    projection, and encoder 2's eos_token_id 2 as in the real SDXL config (its pooled output at argmax(input_ids))."""
    from make_tiny_pipeline import make_tiny_sdxl

    return make_tiny_sdxl(str(tmp_path_factory.mktemp("tiny-sdxl") / "pipe"), seed=0, eos_token_id_2=2)


@pytest.fixture(scope="session")
def tiny_sana(tmp_path_factory):
    """Folder of a tiny random SanaPipeline: Gemma-2 of width 32 (a 925-token BPE tokenizer built in code, rows
    scaled by sqrt(32) inside the embedding module), SanaTransformer2DModel, an 8x DC-AE."""
    from make_tiny_pipeline import make_tiny_sana

    return make_tiny_sana(str(tmp_path_factory.mktemp("tiny-sana") / "pipe"))


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory):
    """Folder of a tiny random WanPipeline: UMT5 of width 32 whose table (320 rows) is larger than its tokenizer (300
    tokens), WanTransformer3DModel, a Wan VAE with per-channel latents_mean/std."""
    from make_tiny_pipeline import make_tiny_wan

    return make_tiny_wan(str(tmp_path_factory.mktemp("tiny-wan") / "pipe"))


def embedding_table(pipeline, subfolder="text_encoder"):
    """A text encoder's input embedding table read straight from its safetensors file (float64 numpy): CLIP's
    token_embedding, Gemma's embed_tokens, UMT5's shared."""
    from safetensors.numpy import load_file

    state = load_file(os.path.join(pipeline, subfolder, "model.safetensors"))
    keys = [k for k in state if k.endswith(("token_embedding.weight", "embed_tokens.weight", "shared.weight"))]
    assert len(keys) == 1, sorted(state)
    return state[keys[0]].astype(np.float64)


def mean_nonzero_norm(weight):
    """The mean L2 norm of the non-zero rows of a float64 numpy table (the norm m DTI takes, computed here)."""
    norms = np.sqrt((weight * weight).sum(axis=1))
    return float(norms[norms > 0].mean())


@pytest.fixture(scope="session")
def base_vocab(tiny_sd):
    """The base text encoder's token embedding, read straight from its safetensors file (float64 numpy),
    with the reference statistics computed independently of dti_utils."""
    from safetensors.numpy import load_file

    weight = token_embedding_of(load_file(os.path.join(tiny_sd, "text_encoder", "model.safetensors"))).astype(
        np.float64
    )
    norms = np.sqrt((weight * weight).sum(axis=1))
    nonzero = norms[norms > 0]
    return {
        "weight": weight,
        "vocab_size": weight.shape[0],
        "mean": float(nonzero.mean()),
        "min": float(nonzero.min()),
        "max": float(nonzero.max()),
    }


@pytest.fixture(scope="session")
def tokenizer(tiny_sd):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")


# ----------------------------------------------------------------------------------------------------
# Running the script
# ----------------------------------------------------------------------------------------------------


def sd_argv(pipeline, data, out, *extra, steps=4, seed=0):
    """Small, fast flags for the SD script; later flags in `extra` override these (argparse keeps the last).
    seed=None leaves --seed out (the script then draws one and stores it in checkpoints)."""
    argv = [
        "--pretrained_model_name_or_path",
        str(pipeline),
        "--train_data_dir",
        str(data),
        "--output_dir",
        str(out),
        "--placeholder_token",
        PLACEHOLDER,
        "--initializer_token",
        "toy",
        "--resolution",
        "32",
        "--train_batch_size",
        "1",
        "--repeats",
        "2",
        "--max_train_steps",
        str(steps),
        "--report_to",
        "none",
        "--num_validation_images",
        "1",
        "--num_validation_inference_steps",
        "2",
        "--validation_steps",
        "1000",
        "--checkpointing_steps",
        "1000",
        "--save_steps",
        "1000",
    ]
    if seed is not None:
        argv += ["--seed", str(seed)]
    return argv + [str(a) for a in extra]


def train_module():
    import train_directional_textual_inversion

    return train_directional_textual_inversion


@functools.lru_cache(maxsize=None)
def script_defaults(module=None):
    """What a training script's public parse_args gives for the minimum required flags: its defaults, read from the
    parser (with what its checks resolve, such as --learning_rate for the optimizer) instead of copied into tests."""
    module = module or train_module()
    return module.parse_args(["--placeholder_token", "<x>", "--initializer_token", "x", "--train_data_dir", "d"])


def reset_accelerate():
    """Release accelerate's process-wide singletons, so that the next main() in this process starts with its own
    flags (mixed precision, CPU): a command-line run has one main() per process, the tests many."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate has no public reset
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def run_inprocess(argv, callback=None, module=None):
    """main(parse_args(argv)) of a training script (the SD one by default) in this process, after resetting
    accelerate's singletons (no entry-point error handling); returns main's result."""
    module = module or train_module()
    reset_accelerate()
    return module.main(module.parse_args([str(a) for a in argv]), callback)


def run_cli_inprocess(argv, module=None):
    """What the real entry point does, `run_cli(main, parse_args)`, in this process: the exit code (argparse's
    own errors exit 2 through SystemExit, as they do from the command line)."""
    import dti_cli

    module = module or train_module()
    reset_accelerate()
    try:
        return dti_cli.run_cli(module.main, module.parse_args, [str(a) for a in argv])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


class StepRecorder:
    """A main() callback that records the optimizer steps a run takes (the public seam for counting them)."""

    def __init__(self):
        self.steps = []

    def __call__(self, step, **state):
        self.steps.append(step)


def subprocess_env(**extra):
    env = dict(os.environ)
    env.update(_OFFLINE_ENV)
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO_ROOT, TOOLS_DIR] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def run_script(argv, timeout=240, cwd=None, env=None):
    """`python train_directional_textual_inversion.py ARGV` through its real entry point: (returncode, stdout,
    stderr)."""
    proc = subprocess.run(
        [sys.executable, SCRIPT, *[str(a) for a in argv]],
        cwd=cwd or REPO_ROOT,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


def read_embeds(path):
    """(tensors, metadata) of a safetensors file, read with safetensors itself (not dti_utils)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def training_outputs(out):
    """The training outputs that must exist exactly once: embedding files, checkpoints, leftover temporary files
    (other artefacts such as plots, logs or validation images are left to the tests that check them)."""
    return sorted(n for n in os.listdir(out) if n.startswith(("learned_embeds", "checkpoint-", ".tmp-")))


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def one_error(capsys, *words):
    """The one `error:` line the run printed on stderr (no traceback), which must contain every word; returned."""
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def sd_args(tiny_sd, example_images, tmp_path):
    """sd_args(*extra, steps=4, out=None) -> argv for a small run writing to tmp_path/'out' by default."""

    def make(*extra, steps=4, out=None, data=None, seed=0):
        return sd_argv(tiny_sd, data or example_images, out or (tmp_path / "out"), *extra, steps=steps, seed=seed)

    return make


def disk_state(folder):
    """{path: (mtime, bytes)} of every file under folder (none if it does not exist): compare before and after to show
    that nothing on disk changed, by time and by content."""
    paths = [p for p in glob.glob(os.path.join(str(folder), "**"), recursive=True) if os.path.isfile(p)]
    return {p: (os.path.getmtime(p), open(p, "rb").read()) for p in sorted(paths)}


# ----------------------------------------------------------------------------------------------------
# Scoring encoders (tiny random CLIP, SigLIP, DINOv2) and their features computed by hand
# ----------------------------------------------------------------------------------------------------

CLIP_MEAN, CLIP_STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="session")
def encoders(tmp_path_factory):
    from make_tiny_pipeline import make_tiny_encoders

    return make_tiny_encoders(str(tmp_path_factory.mktemp("encoders")))


def pixels(image, mean, std):
    """A 32 x 32 image as the processors should make it (no resize at this size): (1, 3, 32, 32) float32."""
    x = (np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0 - mean) / std
    return torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32))


def cos(a, b):
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


class ByHand:
    """Features straight from the tiny models' layers: projected CLIP image/text, SigLIP pooled image/text, DINOv2
    CLS."""

    def __init__(self, encoders):
        from transformers import AutoTokenizer, CLIPModel, Dinov2Model, SiglipModel

        self.clip, self.siglip, self.dino = (
            cls.from_pretrained(encoders[k]).eval()
            for cls, k in ((CLIPModel, "clip"), (SiglipModel, "siglip"), (Dinov2Model, "dino"))
        )
        self.clip_tok, self.siglip_tok = (
            AutoTokenizer.from_pretrained(encoders["clip"]),
            AutoTokenizer.from_pretrained(encoders["siglip"]),
        )

    @torch.no_grad()
    def clip_image(self, image):
        return self.clip.visual_projection(
            self.clip.vision_model(pixel_values=pixels(image, CLIP_MEAN, CLIP_STD)).pooler_output
        )

    @torch.no_grad()
    def clip_text(self, text):
        ids = self.clip_tok([text], padding="max_length", max_length=77, return_tensors="pt").input_ids
        return self.clip.text_projection(self.clip.text_model(input_ids=ids).pooler_output)

    @torch.no_grad()
    def siglip_image(self, image):
        return self.siglip.vision_model(pixel_values=pixels(image, 0.5, 0.5)).pooler_output

    @torch.no_grad()
    def siglip_text(self, text):
        ids = self.siglip_tok([text], padding="max_length", max_length=64, return_tensors="pt").input_ids
        assert ids[0, -1].item() == 1  # padded with </s>, as SigLIP was trained
        return self.siglip.text_model(input_ids=ids).pooler_output

    def siglip_probability(self, image, text):
        """SigLIP's own reading, in float64: sigmoid(exp(logit_scale) * cos + logit_bias)."""
        scale, bias = float(self.siglip.logit_scale.exp()), float(self.siglip.logit_bias)
        return 1.0 / (1.0 + math.exp(-(scale * cos(self.siglip_image(image), self.siglip_text(text)) + bias)))

    @torch.no_grad()
    def dino_image(self, image):
        return self.dino(pixel_values=pixels(image, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state[:, 0]


@pytest.fixture(scope="session")
def by_hand(encoders):
    return ByHand(encoders)


def noise_image(seed, size=32):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))
