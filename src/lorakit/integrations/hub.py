"""Adapters on the Hugging Face Hub: upload exactly the adapter files and a model card; download only those.

    model.push_to_hub("owner/my-adapter")                           # PeftModel.push_to_hub
    model = PeftModel.from_pretrained(base, "owner/my-adapter")     # downloads adapter_config.json + weights
    model = PeftModel.from_pretrained(base, "owner/my-adapter", subfolder="second", revision="v1", token=...)

`push_to_hub` writes the adapters with `save_pretrained` into a temporary directory (adapter_config.json,
adapter_model.safetensors, each further adapter in a folder of its name, README.md: the model card of
model_card.py) and uploads that directory in one commit. Nothing of the base model is uploaded.

huggingface_hub is used through its public API (`HfApi().create_repo`, `create_branch`, `upload_folder`,
`snapshot_download`), looked up when called, so that tests can stand in for the Hub.
"""

from __future__ import annotations

import os
import tempfile

from lorakit.adapter_files import WEIGHTS_NAME
from lorakit.config import CONFIG_NAME
from lorakit.integrations.model_card import facts_from_model, write_model_card
from lorakit.label_names import LABELS_NAME

# The files of an adapter folder that a download fetches (labels.json: a classifier's class names, lorakit's).
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, LABELS_NAME)
# snapshot_download's keyword arguments a caller may pass through from_pretrained / load_adapter.
DOWNLOAD_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download")


def download_adapter(repo_id: str, subfolder: str | None = None, **hub_kwargs) -> str:
    """Download the adapter files of `repo_id` (of `subfolder` in it) and return their local directory."""
    unknown = sorted(set(hub_kwargs) - set(DOWNLOAD_KWARGS))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown} for downloading adapter {repo_id!r}; the Hub "
                        f"download takes {', '.join(DOWNLOAD_KWARGS)} and subfolder")
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        import huggingface_hub

        root = huggingface_hub.snapshot_download(repo_id, allow_patterns=[prefix + name for name in ADAPTER_FILES],
                                                 **hub_kwargs)
    except Exception as err:  # offline, unknown repo, bad id, no access: all mean the same to the user
        raise FileNotFoundError(
            f"Adapter {repo_id!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Pass the directory that "
            f"holds {CONFIG_NAME} and {WEIGHTS_NAME}."
        ) from None
    directory = os.path.join(root, prefix) if prefix else root
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        where = f"in its folder {subfolder!r}" if subfolder else "at its top level"
        raise FileNotFoundError(f"the Hub repository {repo_id!r} has no {CONFIG_NAME} {where}, so it holds no "
                                "adapter there" + ("" if subfolder else " (an adapter in a folder: pass subfolder=)"))
    return os.path.normpath(directory)


def push_adapter(model, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                 private: bool | None = None, token: str | bool | None = None, revision: str | None = None,
                 create_pr: bool = False, tags: list[str] | None = None, selected_adapters: list[str] | None = None,
                 safe_serialization: bool = True, max_shard_size=None):
    """Upload `model`'s adapters (all of them, or `selected_adapters`) and their model card to `repo_id`, creating
    the repository (and the `revision` branch) when missing. Returns huggingface_hub's CommitInfo.

    The keyword arguments are transformers' `push_to_hub`'s; max_shard_size is accepted and unused (an adapter
    is one file). lorakit writes safetensors only: safe_serialization=False is refused."""
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"repo_id must be a Hub repository name such as 'owner/my-adapter', got {repo_id!r}")
    if not safe_serialization:
        raise ValueError("lorakit writes safetensors only (safe_serialization=False is not supported)")
    if tags is not None and (isinstance(tags, str) or not all(isinstance(t, str) for t in tags)):
        raise ValueError(f"tags must be a list of strings, got {tags!r}")
    import huggingface_hub

    api = huggingface_hub.HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    names = list(selected_adapters or model.peft_config)
    with tempfile.TemporaryDirectory(prefix="lorakit-push-") as folder:
        model.save_pretrained(folder, selected_adapters=names)
        # the card save_pretrained wrote, again with the repository's name in its loading snippet and the tags
        write_model_card(folder, facts_from_model(model, names, repo_id=repo_id, tags=tags or ()))
        return api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                 commit_message=commit_message or "Upload adapter with lorakit",
                                 commit_description=commit_description, revision=revision, create_pr=create_pr)
