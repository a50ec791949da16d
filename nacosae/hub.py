"""Hugging Face Hub access: downloads with errors that say what to fix."""

from __future__ import annotations


def hub_file(repo_id: str, filename: str, subfolder: str | None = None, revision: str | None = None, repo_type: str = "model") -> str:
    """`hf_hub_download` with the Hub's exceptions turned into messages a user can act on."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}" + (f"/{subfolder}" if subfolder else "")
    try:
        return hf_hub_download(repo_id, filename, subfolder=subfolder, revision=revision, repo_type=repo_type)
    except HFValidationError as e:
        raise FileNotFoundError(f"{repo_id!r} is neither a local folder nor a valid Hub repo id ({e})") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"no Hub {repo_type} repo {repo_id!r} (or it is private: set HF_TOKEN)") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {repo_id!r} has no revision {revision!r}") from e
    except LocalEntryNotFoundError as e:  # before EntryNotFoundError: it is a subclass of it
        raise FileNotFoundError(f"cannot reach the Hub for {where}/{filename} and it is not in the local cache (offline?)") from e
    except EntryNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {where} has no file {filename!r}: wrong subfolder?") from e
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"cannot reach the Hub for {where}/{filename} and it is not in the local cache (offline?)") from e
