"""Hugging Face Hub access: downloads with errors that say what to fix.

Two kinds of caller, two entry points:
- the operator (CLI flags, environment, space_config): `repo_folder` takes a local folder or any Hub repo id;
- a visitor of the app: `visitor_repo_folder` takes only a validated Hub id 'owner/name' (never a local path),
  downloads only the files an SAE or results repo needs (`SAE_REPO_FILES`, `RESULTS_REPO_FILES`), and refuses
  before downloading anything when those files exceed a size cap (`check_download_size`, from the Hub's file
  listing). Its errors (`RepoRefused`) name the repo the visitor gave and nothing of the server's files.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

SAE_REPO_FILES = ("README.md", "*/config.json", "*/model.safetensors")
"""What the app reads of an SAE repo (one subfolder per SAE, possibly nested: `*` matches `/`)."""
SAE_CONFIG_FILES = ("README.md", "*/config.json")
"""The part of an SAE repo read when a source is opened (weights come on first use, one SAE at a time)."""
RESULTS_REPO_FILES = ("README.md", "data/*.parquet")
"""What the app reads of a results dataset repo (docs/RESULTS_SCHEMA.md: `data/<table>/*.parquet`)."""


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
    repo are read by the same code. Errors say what to fix. For the operator's input only: a name a visitor typed
    goes through `visitor_repo_folder`, which never reads a local path."""
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


# ---------------------------------------------------------------------------------------------------------------
# repos named by a visitor of the app


class RepoRefused(ValueError):
    """A repo a visitor named that the app will not download: not a Hub id, unreachable, missing, or too big. The
    message names only what the visitor gave."""


def check_visitor_repo_id(text: str) -> str:
    """`text` stripped, when it is a Hub repo id 'owner/name' (`huggingface_hub.utils.validate_repo_id`, plus
    exactly one '/'); else RepoRefused. Local paths, '..', '~' and URLs are refused without looking at the disk."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = (text or "").strip()
    if not repo_id:
        raise RepoRefused("give a Hub repo id 'owner/name'")
    # the refused text is not echoed: whatever it names, the answer is the same and says nothing of the server
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")) or ".." in repo_id or "\\" in repo_id:
        raise RepoRefused("that is not a Hub repo id 'owner/name' (this app loads local folders only from its "
                          "operator's settings)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise RepoRefused("that is not a valid Hub repo id 'owner/name' (letters, digits, '-', '_', '.')") from e
    return repo_id


def download_size(info: Any, allow_patterns: Iterable[str]) -> tuple[int, int]:
    """(bytes, files) of the repo files matching `allow_patterns` (as `snapshot_download` matches them), from a repo
    listing with sizes: `HfApi().model_info(..., files_metadata=True)` or `dataset_info`, or anything with
    `.siblings` of objects with `.rfilename` and `.size`. RepoRefused when the listing has no sizes."""
    from huggingface_hub.utils import filter_repo_objects

    siblings = getattr(info, "siblings", None)
    if siblings is None:
        raise RepoRefused("the Hub did not list this repo's files")
    files = list(filter_repo_objects(siblings, allow_patterns=list(allow_patterns), key=lambda f: f.rfilename))
    if any(getattr(f, "size", None) is None for f in files):
        raise RepoRefused("the Hub did not give this repo's file sizes")
    return sum(int(f.size) for f in files), len(files)


def check_download_size(info: Any, allow_patterns: Iterable[str], max_bytes: int, repo_id: str, what: str) -> int:
    """The bytes a download of `allow_patterns` would fetch (see `download_size`); RepoRefused when no file matches
    (not a `what` repo) or when they exceed `max_bytes`, with the sizes in the message."""
    total, n = download_size(info, allow_patterns)
    if n == 0:
        raise RepoRefused(f"{repo_id!r} has none of the files of {what} ({', '.join(allow_patterns)})")
    if total > max_bytes:
        raise RepoRefused(f"{repo_id!r} holds {total / 1e6:,.0f} MB of {what} files, more than this app downloads "
                          f"for a visitor ({max_bytes / 1e6:,.0f} MB): run the app yourself with this repo "
                          "(python app.py --sae-repo ... --results-repo ...)")
    return total


@contextmanager
def _visitor_errors(repo_id: str, repo_type: str):
    """The Hub's exceptions as RepoRefused messages that name the repo and never a local path (no `str(e)`: a
    cache path could be in it)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kind = "dataset" if repo_type == "dataset" else "model"
    try:
        yield
    except (RepositoryNotFoundError, GatedRepoError) as e:  # gated is a subclass: first
        raise RepoRefused(f"no public Hub {kind} repo {repo_id!r}") from e
    except RevisionNotFoundError as e:
        raise RepoRefused(f"Hub repo {repo_id!r} has no such revision") from e
    except EntryNotFoundError as e:
        raise RepoRefused(f"Hub repo {repo_id!r} lacks a file the app needs") from e
    except RepoRefused:
        raise
    except (HfHubHTTPError, OSError, Exception) as e:  # network (any HTTP client's errors), offline mode, disk:
        # the operator gets the details in the log, the visitor a message with none of them (a cache path could be there)
        logging.getLogger(__name__).warning("visitor download of %s repo %r failed", kind, repo_id, exc_info=True)
        raise RepoRefused(f"cannot download {kind} repo {repo_id!r} from the Hub right now (offline or unreachable)") from e


def visitor_repo_folder(repo_id: str, repo_type: str, allow_patterns: Iterable[str], max_bytes: int,
                        what: str) -> Path:
    """A local snapshot of a visitor-named Hub repo: the id checked (`check_visitor_repo_id`), the size of the
    `allow_patterns` files checked against `max_bytes` from the Hub's listing before anything downloads, then only
    those files downloaded, at the listed commit (so what was measured is what arrives). RepoRefused otherwise.
    `what` names the kind of repo in messages ("an SAE repo")."""
    from huggingface_hub import HfApi, snapshot_download

    repo_id = check_visitor_repo_id(repo_id)
    patterns = list(allow_patterns)
    api = HfApi()
    with _visitor_errors(repo_id, repo_type):
        info = (api.dataset_info if repo_type == "dataset" else api.model_info)(repo_id, files_metadata=True)
        check_download_size(info, patterns, max_bytes, repo_id, what)
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=info.sha, allow_patterns=patterns))
