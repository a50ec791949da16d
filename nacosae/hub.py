"""Hugging Face Hub access: downloads with errors that say what to fix."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _hub_errors(repo_id: str, repo_type: str, revision: str | None, what: str):
    """Turn the Hub's exceptions into FileNotFoundErrors that say what to fix (one mapping for every download)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except HFValidationError as e:
        raise FileNotFoundError(f"{repo_id!r} is neither a local folder nor a valid Hub repo id ({e})") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"no Hub {repo_type} repo {repo_id!r} (or it is private: set HF_TOKEN)") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {repo_id!r} has no revision {revision!r}") from e
    except LocalEntryNotFoundError as e:  # before EntryNotFoundError: it is a subclass of it
        raise FileNotFoundError(f"cannot reach the Hub for {what} and it is not in the local cache (offline?): "
                                "pass a local folder instead") from e
    except EntryNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {what} does not exist: wrong subfolder or file name?") from e


def hub_file(repo_id: str, filename: str, subfolder: str | None = None, revision: str | None = None, repo_type: str = "model") -> str:
    """`hf_hub_download` with the Hub's exceptions turned into messages a user can act on."""
    from huggingface_hub import hf_hub_download

    what = f"{repo_id}/" + (f"{subfolder}/" if subfolder else "") + filename
    with _hub_errors(repo_id, repo_type, revision, what):
        return hf_hub_download(repo_id, filename, subfolder=subfolder, revision=revision, repo_type=repo_type)


def repo_folder(path_or_repo_id: str, repo_type: str = "model", revision: str | None = None,
                allow_patterns: list[str] | None = None) -> Path:
    """A local folder with the repo's files: `path_or_repo_id` itself when it is a folder, else a Hub snapshot
    (`snapshot_download`, cached). Code that reads artifacts takes this folder, so a `--local-dir` copy and the Hub
    repo are read by the same code. Errors say what to fix."""
    from huggingface_hub import snapshot_download

    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise FileNotFoundError(f"{path_or_repo_id!r} is a file, not a folder or a Hub repo id")
    if str(path_or_repo_id).startswith((".", "/", "~")) or str(path_or_repo_id).count("/") > 1:
        raise FileNotFoundError(f"no folder {path_or_repo_id!r} (and it does not look like a Hub repo id 'owner/name')")
    with _hub_errors(str(path_or_repo_id), repo_type, revision, f"{repo_type} repo {path_or_repo_id!r}"):
        return Path(snapshot_download(str(path_or_repo_id), repo_type=repo_type, revision=revision,
                                      allow_patterns=allow_patterns))


def hub_file_or_none(repo_id: str, filename: str, repo_type: str = "model", revision: str | None = None) -> str | None:
    """`hub_file`, or None when the repo or the file does not exist yet (e.g. the card of a repo never published).
    An unreachable Hub still raises: publishing offline would silently drop a hand-edited card."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision)
    except LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError: the network, not a missing file
        raise FileNotFoundError(f"cannot reach the Hub to read {repo_id}/{filename} (offline?)") from e
    except (RepositoryNotFoundError, EntryNotFoundError):
        return None
