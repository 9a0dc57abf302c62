"""Where a model, reward model or adapter folder comes from: a local folder, a Hub id, or ``gs://``.

Researchers name models by Hugging Face Hub id (``Qwen/Qwen2.5-1.5B-Instruct``, pinned with
``@revision``) and keep checkpoints in buckets; every loader here takes all three and reads a local
folder in the end:

- a local folder is used as it is;
- a Hub id goes through ``huggingface_hub.snapshot_download`` (its cache, ``HF_HOME``,
  ``HF_HUB_OFFLINE`` and the token from ``HF_TOKEN`` are honoured), fetching only the files we read;
- ``gs://`` (and the other schemes of ``etils.epath``, the layer orbax writes checkpoints with) is
  copied once per machine into ``$SAIL_JAX_CACHE`` (default ``~/.cache/sail_jax``) and copied again
  only when the remote files' names, sizes or times change.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import uuid

from sail_jax.errors import UserError

# The files a model, reward model or PEFT adapter folder is read from (weights, configs, tokenizer,
# chat template): nothing else of a Hub repo or bucket is fetched.
FOLDER_FILES = ("*.json", "*.safetensors", "*.jinja")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_MANIFEST = ".sail_jax_manifest.json"


class LocationError(UserError, ValueError):
    """A model or checkpoint name that names nothing we can read."""


def is_remote(name: str) -> bool:
    return "://" in name


def is_hub_id(name: str) -> bool:
    """``org/name`` or ``org/name@revision`` that is not a local path."""
    return bool(_HUB_ID.match(name)) and not os.path.exists(name) and not name.startswith(".")


def _subject(name: str, key: str | None) -> str:
    return f"config.{key}={name!r}" if key else repr(name)


def describe_problem(name: str, key: str | None = None, *, repo_type: str = "model") -> str | None:
    """Why ``name`` (the value of config ``key``) cannot be a folder, checked without a download; None if it can.

    A local folder must exist; a Hub id must be in the local cache when ``HF_HUB_OFFLINE=1``; ``gs://``
    is only checked when it is read (that needs credentials and the network)."""
    if not name or is_remote(name) or os.path.isdir(name):
        return None
    if not is_hub_id(name):
        return (f"{_subject(name, key)}: no such folder (a local folder, a Hugging Face Hub id 'org/name' "
                "or 'org/name@revision', or gs://bucket/path)")
    if _offline() and not _cached(name, repo_type):
        repo = _split_revision(name)[0]
        flag = " --repo-type dataset" if repo_type == "dataset" else ""
        return (f"{_subject(name, key)}: no local folder of that name, and as a Hub id it is not in the "
                f"Hugging Face cache ({_hub_cache()}) while HF_HUB_OFFLINE=1: download it once with "
                f"network access (hf download {repo}{flag}), or use a local folder")
    return None


def local_folder(name: str, *, key: str | None = None, patterns: tuple[str, ...] = FOLDER_FILES,
                 repo_type: str = "model") -> str:
    """A local folder holding ``name``'s files that match ``patterns`` (downloaded or copied if needed)."""
    if os.path.isdir(name):
        return name
    if is_remote(name):
        return _copy_remote(name, key, tuple(patterns), recursive=repo_type == "dataset")
    if is_hub_id(name):
        return _from_hub(name, key, tuple(patterns), repo_type)
    raise LocationError(describe_problem(name, key, repo_type=repo_type))


def _cached(name: str, repo_type: str) -> bool:
    """Whether the Hub cache has a snapshot of ``name``'s revision (a branch/tag through its ref)."""
    from huggingface_hub.file_download import repo_folder_name

    repo, revision = _split_revision(name)
    storage = os.path.join(_hub_cache(), repo_folder_name(repo_id=repo, repo_type=repo_type))
    ref = os.path.join(storage, "refs", revision or "main")
    commit = open(ref, encoding="utf-8").read().strip() if os.path.isfile(ref) else revision
    return bool(commit) and os.path.isdir(os.path.join(storage, "snapshots", commit))


def _split_revision(name: str) -> tuple[str, str | None]:
    repo, _, revision = name.partition("@")
    return repo, revision or None


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _from_hub(name: str, key: str | None, patterns: tuple[str, ...], repo_type: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, IncompleteSnapshotError, \
        LocalEntryNotFoundError

    repo, revision = _split_revision(name)
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=list(patterns), repo_type=repo_type)
    except IncompleteSnapshotError as e:
        raise LocationError(f"{_subject(name, key)}: the Hugging Face cache holds only part of it ({e}); "
                            "download it again with network access") from None
    except LocalEntryNotFoundError:
        raise LocationError(describe_problem(name, key, repo_type=repo_type) or
                            f"{_subject(name, key)}: not in the Hugging Face cache ({_hub_cache()}) and the Hub "
                            "cannot be reached: download it where there is network, or unset HF_HUB_OFFLINE") \
            from None
    except (HfHubHTTPError, HFValidationError) as e:
        first = str(e).strip().splitlines()[0]
        raise LocationError(f"{_subject(name, key)}: the Hugging Face Hub refused it ({first}); check the id and "
                            "revision, and for a gated or private repo set HF_TOKEN") from None


def _cache_root() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sail_jax")
    return os.environ.get("SAIL_JAX_CACHE", default)


def _listing(folder, patterns: tuple[str, ...], recursive: bool, prefix: str = "") -> dict[str, list[int]]:
    """``relative/name -> [size, mtime]`` of the files in ``folder`` (an epath; its subfolders too when
    ``recursive``: a dataset's ``data/``, never a checkpoint's optimizer state) whose names match."""
    files = {}
    for path in folder.iterdir():
        stat = path.stat()
        if stat.is_directory:
            if recursive:
                files.update(_listing(path, patterns, recursive, f"{prefix}{path.name}/"))
        elif any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns):
            files[prefix + path.name] = [stat.length, stat.mtime]
    return files


def _copy_remote(name: str, key: str | None, patterns: tuple[str, ...], *, recursive: bool) -> str:
    """Copy the matching files of a remote folder into the machine's cache, unless the same files are there."""
    from etils import epath

    source = epath.Path(name)
    try:
        files = _listing(source, patterns, recursive)
    except (FileNotFoundError, NotADirectoryError):
        raise LocationError(f"{_subject(name, key)}: no such folder") from None
    except Exception as e:  # the filesystem layer raises its own types for credentials, scheme and network
        raise LocationError(f"{_subject(name, key)} cannot be listed ({type(e).__name__}: {e}); for gs:// the "
                            "machine needs gcsfs (pip install 'sail-jax[gcs]') and Google Cloud credentials") \
            from None
    if not files:
        raise LocationError(f"{_subject(name, key)} holds no {' / '.join(patterns)} files")
    scheme, _, rest = name.partition("://")
    dest = os.path.join(_cache_root(), scheme, rest.strip("/"))
    manifest = os.path.join(dest, _MANIFEST)
    if os.path.exists(manifest):
        with open(manifest, encoding="utf-8") as f:
            if json.load(f) == files:
                return dest
    staging = f"{dest}.partial-{uuid.uuid4().hex}"  # a whole folder replaces dest, or nothing does
    os.makedirs(staging)
    try:
        for file in sorted(files):  # streamed: a file system's own copy cannot cross to local disk
            os.makedirs(os.path.dirname(os.path.join(staging, file)), exist_ok=True)
            with (source / file).open("rb") as src, open(os.path.join(staging, file), "wb") as out:
                shutil.copyfileobj(src, out, 16 << 20)
        with open(os.path.join(staging, _MANIFEST), "w", encoding="utf-8") as f:
            json.dump(files, f)
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.replace(staging, dest)
    except OSError:
        if not os.path.exists(manifest):  # another process on this machine may have finished the same copy
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest
