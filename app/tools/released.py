"""Released VAR weights from the Hugging Face Hub, verified before anything is laid out.

huggingface_hub downloads (resumable, into its cache, with its progress bars). Every file is then checked
against what the hub reports for it at the commit being downloaded: its size and the SHA-256 of its
content (the hub keeps both for files in Git LFS, and the released weights are LFS files). A model's files
may also pin a digest, which the hub's must equal. Only when every file of a model is verified does its
folder appear in the model store, whole, with a SHA256SUMS that the service checks at every load; a file that
fails is also removed from the hub cache, so that the next run downloads it afresh.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

from app.model.checksums import SUMS_FILE, sha256, sums_text

REPO_ID = "FoundationVision/var"
DEFAULT_ENDPOINT = "https://huggingface.co"
VQVAE_FILE = "vae_ch160v4096z32.pth"  # the VQVAE every released transformer was trained with
_SHA256 = re.compile(r"[0-9a-f]{64}")


class WeightsError(RuntimeError):
    """A download that failed or a file that does not match what the hub reports: said to the user as is."""


@dataclass(frozen=True)
class ReleasedFile:
    name: str
    sha256: str | None = None  # a pinned digest the hub's must equal; None: the hub's LFS SHA-256 alone


@dataclass(frozen=True)
class ReleasedModel:
    folder: str  # its folder in the model store
    files: tuple[ReleasedFile, ...]


def _released(depth: int) -> ReleasedModel:
    # the released names select the preset at load (app/model/checkpoint.py): no config.json is needed
    return ReleasedModel(f"var_d{depth}", (ReleasedFile(f"var_d{depth}.pth"), ReleasedFile(VQVAE_FILE)))


RELEASED: dict[str, ReleasedModel] = {f"d{depth}": _released(depth) for depth in (16, 20, 24, 30, 36)}


@dataclass(frozen=True)
class Hub:
    """Where the files come from. `endpoint` and `cache_dir` are passed to every call explicitly, since
    huggingface_hub reads HF_ENDPOINT and HF_HUB_CACHE once, when it is first imported."""

    endpoint: str = DEFAULT_ENDPOINT
    repo_id: str = REPO_ID
    revision: str = "main"
    cache_dir: Path | None = None  # None: huggingface_hub's default cache

    def url(self, name: str, revision: str) -> str:
        return hf_hub_url(self.repo_id, name, revision=revision, endpoint=self.endpoint)


@dataclass(frozen=True)
class RemoteFile:
    name: str
    commit: str
    sha256: str
    size: int


@contextlib.contextmanager
def _reporting(action: str) -> Iterator[None]:
    """Any failure of the network library as a WeightsError naming what was being done: its exception types
    differ between huggingface_hub versions, and none of them is a bug of this program."""
    try:
        yield
    except WeightsError:
        raise
    except Exception as e:
        gist = (str(e).splitlines() or [""])[0].rstrip(".")  # the rest is advice for the library's own callers
        raise WeightsError(f"{action} failed: {type(e).__name__}: {gist}; nothing was laid out") from e


def remote_file(hub: Hub, file: ReleasedFile, revision: str) -> RemoteFile:
    """What the hub reports for `file` at `revision`: the commit, the LFS SHA-256 (the ETag of an LFS file)
    and the size. A file the hub gives no SHA-256 for, or a different one than pinned, is refused."""
    url = hub.url(file.name, revision)
    with _reporting(f"asking {url} for its size and SHA-256"):
        meta = get_hf_file_metadata(url)
    digest = (meta.etag or "").lower()
    if not meta.commit_hash or not _SHA256.fullmatch(digest) or meta.size is None:
        raise WeightsError(f"{url}: the hub reports no commit, LFS SHA-256 and size for it, so it cannot be verified")
    if file.sha256 is not None and file.sha256 != digest:
        raise WeightsError(f"{file.name}: the hub reports SHA-256 {digest}, pinned is {file.sha256}")
    return RemoteFile(file.name, meta.commit_hash, digest, meta.size)


def remote_files(hub: Hub, model: ReleasedModel) -> list[RemoteFile]:
    """Every file of `model` at one commit: the first file resolves `hub.revision`, the others use its commit,
    so a push to the repository between two requests cannot mix files of two commits."""
    first = remote_file(hub, model.files[0], hub.revision)
    return [first, *(remote_file(hub, f, first.commit) for f in model.files[1:])]


def download_verified(hub: Hub, remote: RemoteFile) -> Path:
    """The file in the hub cache, downloaded unless already there, of the size and SHA-256 the hub reports."""
    with _reporting(f"downloading {hub.url(remote.name, remote.commit)}"):
        path = Path(
            hf_hub_download(
                hub.repo_id, remote.name, revision=remote.commit, cache_dir=hub.cache_dir, endpoint=hub.endpoint
            )
        )
    size, problem = path.stat().st_size, ""
    if size != remote.size:
        problem = f"{size} bytes, the hub reports {remote.size}"
    elif (digest := sha256(path)) != remote.sha256:
        problem = f"SHA-256 {digest}, the hub reports {remote.sha256}"
    if problem:
        _evict(path)
        raise WeightsError(f"{remote.name}: downloaded file is corrupt ({problem}); removed from the cache, run again")
    return path


def _evict(path: Path) -> None:
    """Remove a bad download from the hub cache: the snapshot's link and the blob it points to."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def _place(source: Path, target: Path) -> None:
    """A hard link to the cached blob where the file system allows (no second copy of GBs), else a copy. The
    model store gets a real file, never a symbolic link into the cache, so a container mounting it works."""
    try:
        os.link(source.resolve(), target)
    except OSError:
        shutil.copyfile(source, target)


def differences(folder: Path, files: list[RemoteFile]) -> list[str]:
    """How `folder`'s copies of `files` differ from them: missing, or of another size or SHA-256."""
    problems = []
    for f in files:
        path = folder / f.name
        if not path.is_file():
            problems.append(f"{f.name}: missing")
        elif path.stat().st_size != f.size or sha256(path) != f.sha256:
            problems.append(f"{f.name}: differs from the hub's")
    return problems


def fetch_released(
    model: ReleasedModel, store: Path, hub: Hub, announce: Callable[[list[RemoteFile]], None] = lambda files: None
) -> tuple[Path, bool]:
    """Download, verify and lay out `model` as `store/model.folder`; `announce` hears what the hub reports
    before any download. Returns the folder and whether it was laid out now (False: it already held exactly
    these files). An existing folder that differs is never touched: the error says so."""
    target = store / model.folder
    files = remote_files(hub, model)
    announce(files)
    if target.exists():
        if problems := differences(target, files):
            raise WeightsError(
                f"{target} exists and does not hold these files ({'; '.join(problems)}): move it away and run again"
            )
        return target, False
    paths = [download_verified(hub, f) for f in files]
    store.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model.folder}.", dir=store))  # hidden, and on the same file system
    try:
        for f, path in zip(files, paths, strict=True):
            _place(path, staging / f.name)
        (staging / SUMS_FILE).write_text(sums_text({f.name: f.sha256 for f in files}))
        staging.chmod(0o755)  # mkdtemp's 0700 would keep a service of another user out
        staging.rename(target)  # the folder appears whole or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target, True
