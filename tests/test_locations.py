"""Models by Hub id and from gs://, offline: a Hugging Face cache in the exact layout huggingface_hub
writes (blobs, snapshots, refs, the tree listing) read with HF_HUB_OFFLINE=1, and a gs:// bucket faked
at the fsspec layer etils.epath (orbax's filesystem layer) reads it through."""

import os
import subprocess
import sys

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from sail_jax.locations import LocationError, describe_problem, is_hub_id, local_folder
from conftest import COMMIT, hub_cache

def test_hub_id_loads_model_and_tokenizer_from_the_offline_cache(tiny_checkpoint, offline_hub):
    from sail_jax.models import load_pretrained
    from sail_jax.tokenization import Tokenizer

    snapshot = hub_cache(offline_hub, "someorg/tiny-chat", tiny_checkpoint)
    assert local_folder("someorg/tiny-chat") == snapshot
    assert local_folder(f"someorg/tiny-chat@{COMMIT}") == snapshot  # a pinned revision
    assert describe_problem("someorg/tiny-chat", "model.path") is None
    ours, local = load_pretrained("someorg/tiny-chat"), load_pretrained(tiny_checkpoint)
    np.testing.assert_array_equal(np.asarray(ours.model.embed_tokens.embedding[...]),
                                  np.asarray(local.model.embed_tokens.embedding[...]))
    assert Tokenizer.from_pretrained("someorg/tiny-chat").hf.encode("hello there") == \
        Tokenizer.from_pretrained(tiny_checkpoint).hf.encode("hello there")


def test_hub_problems_are_one_line_naming_the_key(tiny_checkpoint, offline_hub):
    hub_cache(offline_hub, "someorg/partial", tiny_checkpoint, skip=("model.safetensors",))
    problem = describe_problem("someorg/absent", "reward.path")
    assert problem.startswith("config.reward.path='someorg/absent': no local folder of that name") and \
        "HF_HUB_OFFLINE=1" in problem and "hf download someorg/absent" in problem
    with pytest.raises(LocationError, match=r"^'someorg/absent': no local folder"):
        local_folder("someorg/absent")
    with pytest.raises(LocationError, match=r"config.model.path='someorg/partial': the Hugging Face cache holds "
                                            r"only part of it .*model.safetensors"):
        local_folder("someorg/partial", key="model.path")
    with pytest.raises(LocationError, match="not in the Hugging Face cache"):
        local_folder("someorg/tiny@v2")  # a revision the cache has no ref for
    assert "\n" not in problem
    assert describe_problem("./not/here", "model.path").startswith("config.model.path='./not/here': no such folder")


def test_what_counts_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and is_hub_id("meta-llama/Meta-Llama-3-8B-Instruct@main")
    os.makedirs("runs/sft")
    assert not is_hub_id("runs/sft")  # an existing local folder is a folder
    assert not is_hub_id("/abs/path") and not is_hub_id("./rel/x") and not is_hub_id("a/b/c") \
        and not is_hub_id("gs://b/m")


class FakeGCS(MemoryFileSystem):
    """gs:// at the fsspec layer epath reads it through: an in-memory bucket, no credentials, no network."""

    protocol = ("gs", "gcs")
    store, pseudo_dirs = {}, [""]
    opened = []

    def _open(self, path, mode="rb", **kwargs):
        FakeGCS.opened.append(self._strip_protocol(path))
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    from etils.epath import backend

    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.setenv("SAIL_JAX_CACHE", str(tmp_path / "cache"))
    FakeGCS.store.clear()
    FakeGCS.opened.clear()
    yield FakeGCS()
    backend.fsspec_backend._get_filesystem.cache_clear()


def upload(fs, folder: str, url: str, extra=()):
    for name in list(os.listdir(folder)) + list(extra):
        data = open(os.path.join(folder, name), "rb").read() if name in os.listdir(folder) else b"x"
        fs.pipe(f"{url}/{name}", data)


def test_gs_folder_is_copied_once_and_again_when_it_changes(tiny_checkpoint, fake_gcs, tmp_path):
    from sail_jax.models import load_pretrained

    upload(fake_gcs, tiny_checkpoint, "gs://bucket/ckpt/sft", extra=("optimizer.msgpack",))
    FakeGCS.opened.clear()
    local = local_folder("gs://bucket/ckpt/sft", key="model.path")
    assert local == str(tmp_path / "cache" / "gs" / "bucket" / "ckpt" / "sft")
    assert sorted(f for f in os.listdir(local) if not f.startswith(".")) == sorted(os.listdir(tiny_checkpoint))
    assert not any(p.endswith("optimizer.msgpack") for p in FakeGCS.opened)  # only the files a model folder needs
    read = len(FakeGCS.opened)
    assert local_folder("gs://bucket/ckpt/sft") == local and len(FakeGCS.opened) == read  # once per machine
    load_pretrained("gs://bucket/ckpt/sft")
    fake_gcs.pipe("gs://bucket/ckpt/sft/config.json", b"{}")  # the checkpoint was overwritten: copied again
    assert local_folder("gs://bucket/ckpt/sft") == local and len(FakeGCS.opened) > read
    assert open(os.path.join(local, "config.json")).read() == "{}"
    with pytest.raises(LocationError, match=r"^config.lora.path='gs://bucket/none': no such folder$"):
        local_folder("gs://bucket/none", key="lora.path")


def test_cli_validates_a_hub_id_offline_before_any_work(tmp_path):
    """The real environment path: HF_HOME and HF_HUB_OFFLINE=1 read by a fresh process."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "sail_jax.cli", "--config=configs/dpo.py", f"--workdir={tmp_path}/w",
                          "--config.model.path=someorg/not-downloaded", "--config.data.train_path=x.jsonl"],
                         capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 2, out.stderr
    assert "config.model.path='someorg/not-downloaded': no local folder of that name, and as a Hub id it is not " \
           f"in the Hugging Face cache ({tmp_path}/hf/hub)" in out.stderr
