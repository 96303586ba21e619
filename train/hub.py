"""Push an exported folder to the Hugging Face Hub (docs/EXPORT.md).

Only the files of the exported model go up (weights, configs, tokenizer, code, card): the list is
built here, never a whole directory, so optimizer state or checkpoints can not leak into an upload.
The token comes from HF_TOKEN or the login cache (`hf auth login`); a missing token or an
unreachable Hub is one clear HubError line.
"""
from __future__ import annotations

import os
from pathlib import Path

UPLOAD_SUFFIXES = (".json", ".safetensors", ".py", ".md", ".model", ".txt")
NEVER_UPLOAD = ("optim", "zero_pp_rank", "mp_rank", "rank_state", ".pt", ".bin")


class HubError(ValueError):
    """The Hub push could not happen; the message says why and what to do."""


def files_to_upload(folder: Path) -> list[str]:
    """Relative paths of the model files in an exported folder, sorted."""
    names = []
    for path in sorted(Path(folder).rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name.endswith(UPLOAD_SUFFIXES) and not any(bad in name for bad in NEVER_UPLOAD) \
                and not name.startswith("."):
            names.append(name)
    return names


def push_folder(folder: str | Path, repo_id: str, revision: str | None = None, private: bool = False,
                token: str | None = None, endpoint: str | None = None, api=None) -> str:
    """Create the repo (and branch) if needed and commit the folder's model files; returns the URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise HubError(f"--push-to-hub {repo_id!r}: expected ORG/NAME")
    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = api or HfApi(endpoint=endpoint, token=token)
    names = files_to_upload(folder)
    if "config.json" not in names:
        raise HubError(f"{folder}: not an exported model folder (no config.json)")
    where = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in names]
        commit = api.create_commit(repo_id, operations, commit_message=f"hope-export: {folder.name}",
                                   revision=revision, repo_type="model")
    except HfHubHTTPError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HubError(f"the Hub at {where} refused the push to {repo_id}: {first_line}") from None
    except (OSError, ConnectionError) as error:
        raise HubError(f"cannot reach the Hub at {where}: {type(error).__name__}: {error}") from None
    except Exception as error:  # httpx / requests transport errors are not OSErrors
        if "connect" in type(error).__name__.lower() or "timeout" in type(error).__name__.lower():
            raise HubError(f"cannot reach the Hub at {where}: {type(error).__name__}: {error}") from None
        raise
    return getattr(commit, "commit_url", None) or f"{where}/{repo_id}"
