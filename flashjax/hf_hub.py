"""Hugging Face Hub ids as `--model`, resolved through huggingface_hub to files in its local cache.

Two forms (`@REVISION`, a branch, tag or commit, is optional in both):

- `ORG/NAME[@REVISION]`: a transformers safetensors repository. Only what flashjax reads is fetched:
  config.json, the tokenizer files, generation_config.json, and model.safetensors or
  model.safetensors.index.json with the shards it lists (never *.bin, consolidated.safetensors, onnx/...).
- `ORG/NAME[@REVISION]:FILE.gguf`: one GGUF file of a repository (FILE may sit in a folder of it).

The Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME`/hub, else ~/.cache/huggingface/hub) is read first,
without any network call; what is missing there is downloaded into it (huggingface_hub's progress bars,
on stderr). With `HF_HUB_OFFLINE=1` the network is never touched. Every failure is a CheckpointError that
names the id, the cache directory and what to do.

`flashjax.weights.open_checkpoint` calls `resolve_hub_spec` for a spec that is neither a built-in name nor
an existing local path, so a local directory `org/name` wins over the hub id of the same name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re

from flashjax.weights.errors import CheckpointError

# What flashjax reads from a safetensors repository besides the weights (each small; absent ones are skipped).
META_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "chat_template.jinja")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # a Hub namespace or repository name (no leading '.', '-' or '/')
_HUB_SPEC = re.compile(rf"(?P<repo_id>{_PART}/{_PART})(?:@(?P<revision>[^:@\s]+))?(?::(?P<filename>[^:@\s]+))?")


@dataclasses.dataclass(frozen=True)
class HubSpec:
    spec: str  # as the user wrote it
    repo_id: str  # ORG/NAME
    revision: str | None  # None: the default branch
    filename: str | None  # a .gguf file of the repository; None: a safetensors repository


def parse_hub_spec(spec: str) -> HubSpec | None:
    """`ORG/NAME[@REVISION][:FILE.gguf]` as a HubSpec; None for anything else (a path, a bare name).
    A NAME ending in .gguf without `:FILE` is taken for a path (`models/x.gguf`), not a repository."""
    match = _HUB_SPEC.fullmatch(spec)
    if match is None:
        return None
    repo_id, revision, filename = match.group("repo_id", "revision", "filename")
    if filename is None and repo_id.lower().endswith(".gguf"):
        return None
    if filename is not None and not filename.lower().endswith(".gguf"):
        raise CheckpointError(f"{spec}: after ':' comes the name of a .gguf file of the repository "
                              f"(e.g. {repo_id}:model-Q4_K_M.gguf); a quantization tag alone is not supported")
    return HubSpec(spec, repo_id, revision, filename)


def hub_cache_dir() -> str:
    """The Hugging Face cache directory huggingface_hub reads and writes (its HF_HUB_CACHE)."""
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), as huggingface_hub read it at import or as set now."""
    from huggingface_hub import constants
    now = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or now.strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve_hub_spec(spec: str) -> str | None:
    """The local path of a Hub id's files: the snapshot directory of a safetensors repository, or the
    GGUF file. None when `spec` does not look like a Hub id; CheckpointError when it does but cannot be
    had from the cache or the Hub."""
    hub = parse_hub_spec(spec)
    if hub is None:
        return None
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise CheckpointError(f"{spec}: no such local path; reading it as a Hugging Face Hub id needs "
                              f"huggingface_hub (pip install huggingface_hub)") from None
    return _resolve_gguf(hub) if hub.filename else _resolve_repo(hub)


# -- a safetensors repository -------------------------------------------------------------------------


def _resolve_repo(hub: HubSpec) -> str:
    from huggingface_hub.utils import LocalEntryNotFoundError

    cache = hub_cache_dir()
    folder, missing, incomplete = None, [], None
    try:
        folder, missing = _cached_repo(hub, cache)
    except CheckpointError:
        raise
    except LocalEntryNotFoundError as e:  # nothing cached for this revision, or a snapshot known incomplete
        incomplete = e if os.path.isdir(getattr(e, "snapshot_path", "") or "") else None
    except ValueError as e:  # huggingface_hub's HFValidationError: not a valid repository id
        raise CheckpointError(f"{hub.spec}: no such local path, and not a valid Hugging Face Hub id ({e})") from None
    if folder is not None and not missing:
        return folder
    if hub_offline():
        if folder is not None:
            raise CheckpointError(f"{hub.spec}: the Hugging Face cache holds an incomplete copy ({folder} lacks "
                                  f"{', '.join(missing)}) and HF_HUB_OFFLINE is set, so nothing is downloaded. "
                                  f"Unset HF_HUB_OFFLINE to fetch the rest{_gguf_hint(hub, folder)}")
        if incomplete is not None:
            raise CheckpointError(f"{hub.spec}: the Hugging Face cache ({cache}) holds an incomplete copy "
                                  f"({incomplete}) and HF_HUB_OFFLINE is set. Unset HF_HUB_OFFLINE to fetch the rest")
        raise CheckpointError(f"{hub.spec}: no such local path, and the Hugging Face Hub id {_named(hub)} is not "
                              f"in the Hugging Face cache ({cache}); HF_HUB_OFFLINE is set, so it is not downloaded. "
                              f"Unset HF_HUB_OFFLINE to download it, or pass a local model directory")
    return _download_repo(hub, cache)


def _cached_repo(hub: HubSpec, cache: str) -> tuple[str, list[str]]:
    """(snapshot directory, files flashjax needs that it lacks), without any network call."""
    from huggingface_hub import snapshot_download

    folder = snapshot_download(hub.repo_id, revision=hub.revision, cache_dir=cache, local_files_only=True,
                               allow_patterns=[*META_FILES, INDEX_FILE])
    needed = ["config.json", *_weight_files(hub, folder)]
    return folder, [name for name in needed if not os.path.isfile(os.path.join(folder, *name.split("/")))]


def _download_repo(hub: HubSpec, cache: str) -> str:
    from huggingface_hub import snapshot_download

    with _hub_errors(hub, cache):
        # The small files first: the index says which shards to fetch (a repository may hold other
        # weights too, e.g. consolidated.safetensors or *.bin, that flashjax does not read).
        meta = snapshot_download(hub.repo_id, revision=hub.revision, cache_dir=cache,
                                 allow_patterns=[*META_FILES, INDEX_FILE])
    # snapshots/<commit hash>: the rest comes from the same commit.
    return _download_files(hub, cache, os.path.basename(meta), ["config.json", *_weight_files(hub, meta)])


def _download_files(hub: HubSpec, cache: str, revision: str | None, names: list[str]) -> str:
    """Downloads `names` of the repository into the cache (those there already are not fetched again);
    returns the snapshot directory holding them all."""
    from huggingface_hub import hf_hub_download, snapshot_download

    # snapshot_download: one call for them all (files in parallel, one progress bar), and an unreachable
    # Hub fails at once (hf_hub_download retries a refused connection for half a minute).
    with _hub_errors(hub, cache):
        folder = snapshot_download(hub.repo_id, revision=revision, cache_dir=cache, allow_patterns=names)
    for name in names:
        if not os.path.isfile(os.path.join(folder, *name.split("/"))):
            # Not fetched: ask for it alone, to tell "the repository has no such file" from "the Hub is down".
            with _hub_errors(hub, cache, name, folder):
                hf_hub_download(hub.repo_id, name, revision=os.path.basename(folder), cache_dir=cache)
    return folder


def _weight_files(hub: HubSpec, folder: str) -> list[str]:
    index_path = os.path.join(folder, INDEX_FILE)
    if not os.path.isfile(index_path):
        return [SINGLE_FILE]
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        return sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{hub.spec}: {index_path}: not a valid safetensors index ({e!r})") from None


# -- one GGUF file --------------------------------------------------------------------------------------


def _resolve_gguf(hub: HubSpec) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return hf_hub_download(hub.repo_id, hub.filename, revision=hub.revision, cache_dir=cache,
                               local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    except ValueError as e:  # an invalid repository id or file name
        raise CheckpointError(f"{hub.spec}: no such local path, and not a valid Hugging Face Hub id ({e})") from None
    if hub_offline():
        raise CheckpointError(f"{hub.spec}: no such local path, and {hub.filename} of the Hugging Face Hub "
                              f"repository {_named(hub)} is not in the Hugging Face cache ({cache}); HF_HUB_OFFLINE "
                              f"is set, so it is not downloaded. Unset HF_HUB_OFFLINE to download it, or pass a "
                              f"local .gguf file")
    folder = _download_files(hub, cache, hub.revision, [hub.filename])
    return os.path.join(folder, *hub.filename.split("/"))


# -- errors ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _hub_errors(hub: HubSpec, cache: str, filename: str | None = None, folder: str | None = None):
    """huggingface_hub's errors while downloading, as CheckpointErrors saying what to do."""
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"the Hugging Face cache ({cache})"
    try:
        yield
    except CheckpointError:  # already says what went wrong (a ValueError too: not caught below)
        raise
    except GatedRepoError:
        raise CheckpointError(f"{hub.spec}: {hub.repo_id} is a gated repository: accept its terms on "
                              f"https://huggingface.co/{hub.repo_id} and log in (`hf auth login`, or set HF_TOKEN); "
                              f"nothing usable in {where}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{hub.spec}: no such local path, and no repository {hub.repo_id} on the Hugging Face "
                              f"Hub (if it is private, log in with `hf auth login` or set HF_TOKEN); nothing in "
                              f"{where} either. Check the id") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{hub.spec}: the Hugging Face Hub repository {hub.repo_id} has no revision "
                              f"{hub.revision!r} (a branch, tag or commit); nothing in {where} either") from None
    except LocalEntryNotFoundError as e:  # before EntryNotFoundError, its base: the Hub could not be reached
        cause = e.__cause__ or e.__context__
        reason = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        raise CheckpointError(f"{hub.spec}: {filename + ' of ' if filename else ''}{_named(hub)} is not in {where}, "
                              f"and the Hugging Face Hub could not be reached{reason}. Check the network (proxy, "
                              f"HF_ENDPOINT) and retry, or pass a local path") from None
    except EntryNotFoundError:
        if filename is not None and filename.lower().endswith(".gguf"):
            hint = _remote_gguf_hint(hub)
        else:
            hint = (". flashjax reads a transformers safetensors repository (config.json, and model.safetensors "
                    "or model.safetensors.index.json with its shards)" + _gguf_hint(hub, folder))
        raise CheckpointError(f"{hub.spec}: the Hugging Face Hub repository {_named(hub)} has no file "
                              f"{filename}{hint}") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{hub.spec}: the Hugging Face Hub answered with an error ({e}); nothing usable in "
                              f"{where}. Retry later, or pass a local path") from None
    except ValueError as e:  # HFValidationError: an invalid repository id or file name
        raise CheckpointError(f"{hub.spec}: no such local path, and not a valid Hugging Face Hub id ({e})") from None
    except OSError as e:  # a full disk, a read-only cache, ...
        raise CheckpointError(f"{hub.spec}: could not download into {where}: {e}") from None


def _named(hub: HubSpec) -> str:
    return hub.repo_id if hub.revision is None else f"{hub.repo_id} (revision {hub.revision})"


def _gguf_hint(hub: HubSpec, folder: str | None) -> str:
    """A pointer to the form for GGUF files, when the cached snapshot `folder` holds some."""
    if folder is None or not os.path.isdir(folder):
        return ""
    ggufs = sorted(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
                   for root, _, names in os.walk(folder) for name in names if name.lower().endswith(".gguf"))
    return _ggufs_named(hub, ggufs)


def _remote_gguf_hint(hub: HubSpec) -> str:
    """The repository's .gguf files, asked of the Hub (only after a failed download, so it is online)."""
    try:
        from huggingface_hub import HfApi
        files = HfApi().list_repo_files(hub.repo_id, revision=hub.revision)
    except Exception:  # noqa: BLE001 - only a hint: the error being reported is the one that matters
        return ""
    return _ggufs_named(hub, sorted(f for f in files if f.lower().endswith(".gguf")))


def _ggufs_named(hub: HubSpec, ggufs: list[str]) -> str:
    if not ggufs:
        return ""
    shown = ", ".join(ggufs[:8]) + (f", ... ({len(ggufs)} in all)" if len(ggufs) > 8 else "")
    rev = f"@{hub.revision}" if hub.revision else ""
    return f"; it holds GGUF files ({shown}): name one as {hub.repo_id}{rev}:{ggufs[0]}"
