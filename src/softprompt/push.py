"""softprompt-push: publish a run's prompt/ (the adapter and its model card) to a Hugging Face hub repository.

What goes up is prompt/ as the run saved it, with the card written again so that its loading snippets name the
repository. Only a completed run is pushed: its card then holds the final metrics. This is the one command that
reaches the hub on purpose, so it says in one line when the hub cannot be reached.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from softprompt import model_card
from softprompt import run_dir as records
from softprompt.errors import UserError, exit_on_user_error, read_record


def check_run(run_dir: Path) -> dict:
    """The metrics.json record of a completed run with a saved prompt/, or a UserError saying what is missing."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run directory: no such folder")
    prompt = run_dir / records.PROMPT_DIR
    if not prompt.is_dir():
        raise UserError(f"{run_dir} holds no trained prompt (no prompt/ folder): give a run softprompt-train completed")
    metrics = run_dir / records.METRICS
    if not metrics.is_file():
        raise UserError(f"{run_dir} is not a run directory: it has no {records.METRICS}")
    record = read_record(metrics, "train the run again, or give another run")
    status = record.get("status")
    if status != "completed":
        raise UserError(
            f"{run_dir} has not completed (status: {status}): push a completed run, its card holds the final metrics"
        )
    return record


def check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"REPO_ID {repo_id!r} is not allowed: a hub repository id, NAMESPACE/NAME") from None


def prepare(run_dir: Path, record: dict, repo_id: str, folder: Path) -> str:
    """A copy of the run's prompt/ in `folder`, its card loading the adapter from `repo_id`; the commit message."""
    # the config reader loads torch: only once the command's arguments are checked
    from softprompt.prompt_bank import run_config

    cfg = run_config(run_dir)
    shutil.copytree(run_dir / records.PROMPT_DIR, folder)
    model_card.write_card(folder, run_dir, cfg, record, adapter=repo_id)
    return f"softprompt: {cfg.method.name} for {cfg.task.name} on {cfg.model.name}"


def check_online() -> None:
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) forbids the hub: said before anything is prepared."""
    if constants.is_offline_mode():
        raise UserError(
            "the hub cannot be reached: offline mode is on (HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1); "
            "unset it on a machine with network access"
        )


def network_errors() -> tuple[type[BaseException], ...]:
    """What a hub call raises when the network fails: the transport errors of the HTTP client huggingface_hub uses
    (httpx up to 1.x, httpx2 from 2.x), and ConnectionError."""
    errors: list[type[BaseException]] = [ConnectionError]
    for client in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(client).TransportError)
        except ImportError:
            continue
    return tuple(errors)


def upload(folder: Path, repo_id: str, private: bool, revision: str | None, message: str) -> str:
    """Create the repository (kept if it exists) and the branch `revision`, upload `folder`; the commit's URL.

    A hub out of reach and a refusal (not logged in, no permission) are one line each."""
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=message)
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise UserError(
                f"the hub refused {repo_id}: not logged in (run `hf auth login`, or set HF_TOKEN)"
            ) from None
        raise UserError(f"the hub refused {repo_id}: {_first_line(error)}") from None
    except network_errors() as error:
        raise UserError(f"the hub cannot be reached at {constants.ENDPOINT}: {_first_line(error)}") from None
    return commit.commit_url


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="softprompt-push", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, metavar="RUN", help="a completed run directory (holding prompt/)")
    parser.add_argument("repo_id", metavar="REPO_ID", help="the hub repository, NAMESPACE/NAME (created if missing)")
    parser.add_argument(
        "--private", action="store_true", help="create the repository private (an existing one keeps its visibility)"
    )
    parser.add_argument("--revision", help="the branch to push to (created if missing; default: main)")
    args = parser.parse_args(argv)
    record = check_run(args.run)
    check_repo_id(args.repo_id)
    check_online()
    with tempfile.TemporaryDirectory(prefix="softprompt-push-") as work:
        folder = Path(work) / records.PROMPT_DIR
        message = prepare(args.run, record, args.repo_id, folder)
        url = upload(folder, args.repo_id, args.private, args.revision, message)
    print(f"pushed {args.run / records.PROMPT_DIR} to {args.repo_id}: {url}")


if __name__ == "__main__":
    main()
