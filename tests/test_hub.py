"""--push_to_hub of the SD script, with huggingface_hub's network calls replaced: the repository created at the start
(a bad token fails before training), only the embeddings, validation images and model card uploaded, and a failed
upload that exits 2 with the embedding kept. The model card's content is tested in test_interop.py.
"""

import glob
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

import dti_cli

from conftest import (
    PLACEHOLDER,
    StepRecorder,
    error_lines,
    one_error,
    read_embeds,
    row_norms,
    run_cli_inprocess,
    run_inprocess,
    train_module,
)


# ----------------------------------------------------------------------------------------------------
# Fixtures: a base model whose card declares a license, and a fake Hub
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def licensed_base(tiny_sd, tmp_path):
    """A copy of the tiny pipeline with a model card that declares a license."""
    base = tmp_path / "base"
    shutil.copytree(tiny_sd, base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    return base


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub
    import huggingface_hub.repocard
    from huggingface_hub.utils import filter_repo_objects

    calls = SimpleNamespace(create=[], upload=[], uploaded=None, readme=None, fail=None)

    def create_repo(repo_id, exist_ok=False, token=None, private=False, **kwargs):
        calls.create.append(dict(repo_id=repo_id, exist_ok=exist_ok, token=token, private=private, **kwargs))
        return SimpleNamespace(repo_id=f"tester/{repo_id}")

    def upload_folder(*, repo_id, folder_path, ignore_patterns=None, allow_patterns=None, **kwargs):
        calls.upload.append(dict(repo_id=repo_id, folder_path=folder_path, ignore_patterns=ignore_patterns, **kwargs))
        if calls.fail:
            raise calls.fail
        files = sorted(
            os.path.relpath(os.path.join(root, f), folder_path).replace(os.sep, "/")
            for root, _, names in os.walk(folder_path)
            for f in names
        )
        calls.uploaded = sorted(
            filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        )
        calls.readme = open(os.path.join(folder_path, "README.md")).read()
        return SimpleNamespace(commit_url="https://example.invalid/commit")

    def no_network(*args, **kwargs):
        raise AssertionError("the test tried to reach the Hub")

    def no_card(repo_id, filename, **kwargs):  # ModelCard.load of a new repository (or a Hub base model): no README.md
        raise huggingface_hub.errors.EntryNotFoundError(f"{repo_id} has no {filename}")

    monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", no_card)
    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", no_network)
    return calls


# ----------------------------------------------------------------------------------------------------
# The repository is created at the start
# ----------------------------------------------------------------------------------------------------


def test_a_bad_hub_token_fails_before_training(sd_args, tmp_path, capsys, monkeypatch):
    """The repository is created at the start: a bad token costs seconds, not a training."""
    import huggingface_hub

    def create_repo(*args, **kwargs):
        raise PermissionError("401 Unauthorized: invalid token")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    recorder = StepRecorder()
    module = train_module()
    argv = [str(a) for a in sd_args("--push_to_hub", "--hub_model_id", "me/dti", out=tmp_path / "out")]
    assert dti_cli.run_cli(lambda args: module.main(args, recorder), module.parse_args, argv) == 2
    one_error(capsys, "me/dti", "401", "hf auth login")
    assert recorder.steps == [] and not glob.glob(str(tmp_path / "out" / "learned_embeds*"))


# ----------------------------------------------------------------------------------------------------
# The upload: what goes up, and a failed upload
# ----------------------------------------------------------------------------------------------------


def test_push_to_hub_uploads_embeddings_images_and_card_only(sd_args, tmp_path, fake_hub, licensed_base, base_vocab):
    import yaml

    out = tmp_path / "out"
    # Leftovers that must not be uploaded: tracker logs and a half-written temporary file.
    (out / "logs" / "directional_textual_inversion").mkdir(parents=True)
    (out / "logs" / "directional_textual_inversion" / "events.out.tfevents.1.host").write_bytes(b"x")
    (out / ".tmp-abc-learned_embeds.safetensors").write_bytes(b"x")
    argv = sd_args(
        "--pretrained_model_name_or_path",
        str(licensed_base),
        "--push_to_hub",
        "--hub_model_id",
        "my-dti",
        "--validation_prompt",
        f"a {PLACEHOLDER} on a street",
        "--checkpointing_steps",
        "2",
    )
    run_inprocess(argv)

    assert [c["repo_id"] for c in fake_hub.create] == ["my-dti"]
    assert fake_hub.create[0]["exist_ok"] is True and fake_hub.create[0]["private"] is False
    assert len(fake_hub.upload) == 1
    upload = fake_hub.upload[0]
    assert upload["repo_id"] == "tester/my-dti"
    assert os.path.abspath(upload["folder_path"]) == str(out)
    uploaded = fake_hub.uploaded
    assert {"README.md", "learned_embeds.safetensors", "validation/step-000004-0.png"} <= set(uploaded), uploaded
    # Nothing else than the card, top-level embeddings and pictures; no checkpoints, logs or temporary files.
    for name in uploaded:
        top_level = "/" not in name
        assert (
            name == "README.md"
            or (top_level and name.endswith((".safetensors", ".png")))
            or (name.startswith("validation/") and name.endswith(".png"))
        ), name
        assert not name.startswith((".tmp-", "checkpoint-", "logs/")), name
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()  # present locally, not uploaded

    readme = fake_hub.readme
    assert readme.startswith("---\n")
    front = yaml.safe_load(readme.split("---\n")[1])
    assert "base_model" not in front  # a local folder is no Hub id
    assert front["license"] == "mit"
    assert {"textual_inversion", "directional-textual-inversion", "diffusers"} <= set(front["tags"])
    assert "![validation image 0](validation/step-000004-0.png)" in readme
    assert 'pipe.load_textual_inversion("tester/my-dti")' in readme
    assert PLACEHOLDER in readme
    assert f"{base_vocab['mean']:.4f}" in readme  # the fixed norm is reported


def test_failed_upload_exits_2_and_keeps_the_embedding(sd_args, tmp_path, fake_hub, licensed_base, base_vocab, capsys):
    fake_hub.fail = RuntimeError("503 Service Unavailable")
    argv = sd_args("--pretrained_model_name_or_path", str(licensed_base), "--push_to_hub", "--hub_model_id", "my-dti")
    capsys.readouterr()
    code = run_cli_inprocess(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "hf upload" in lines[0] and "tester/my-dti" in lines[0] and "503" in lines[0]
    tensors, meta = read_embeds(tmp_path / "out" / "learned_embeds.safetensors")
    assert meta["steps"] == "4"
    np.testing.assert_allclose(row_norms(tensors[PLACEHOLDER]), base_vocab["mean"], rtol=1e-5)
