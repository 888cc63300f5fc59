"""The run's ``--output_dir`` on any fsspec URL, and accelerate checkpoints in it, whole or not at all.

accelerate (``save_state``), tensorboard and ``save_pretrained`` write to a local folder. With
a local ``--output_dir`` that folder is ``--output_dir`` itself. With a remote one (``s3://``)
they write to a local staging folder and what they wrote is uploaded: checkpoints, sample
grids, the pipeline and the logs all end up in ``--output_dir``, so a job that lost its
machine resumes on another one from the bucket alone.

A checkpoint ``checkpoint-<step>/`` counts only once it holds ``training_state.json``, which
is written last, after every process's files are in place. A job killed mid-save leaves a
folder that ``latest`` skips and that the next save removes, never a checkpoint that loads
half a state.

    out = OutputDir("s3://bucket/runs/ffhq", {"endpoint_url": "http://127.0.0.1:9000"})
    out.write("samples.png", png_bytes)        # one PUT: readers see the old file or the new one
    out.latest()                               # "checkpoint-1500", or None
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile

import fsspec
from fsspec.implementations.local import LocalFileSystem

STATE = "training_state.json"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")


class OutputDir:
    """``--output_dir`` (local or any fsspec URL) and the local folder its files are made in.

    >>> out = OutputDir("/tmp/run", {})
    >>> out.local == "/tmp/run"      # local: nothing to stage, nothing to upload
    True
    """

    def __init__(self, url: str, storage_options: dict, staging: str | None = None):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.remote = not isinstance(self.fs, LocalFileSystem)
        if self.remote:
            digest = hashlib.sha1(self.url.encode()).hexdigest()[:12]
            self.local = staging or os.path.join(tempfile.gettempdir(), f"ffhq_diffusion-{digest}")
        else:
            self.local = self.root
        self.fs.makedirs(self.root, exist_ok=True)
        os.makedirs(self.local, exist_ok=True)

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def local_path(self, name: str) -> str:
        return os.path.join(self.local, name)

    def write(self, name: str, data: bytes) -> None:
        """Replace ``name`` whole: a reader (or a kill) never meets half a file."""
        target = f"{self.root}/{name}"
        if self.remote:
            self.fs.pipe_file(target, data)   # one PUT, all or nothing
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        temporary = f"{target}.tmp-{os.getpid()}"
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)

    def publish(self, name: str) -> None:
        """Make the local file or folder ``name`` part of ``--output_dir`` (uploaded if remote)."""
        if not self.remote:
            return
        source = self.local_path(name)
        files = [source] if os.path.isfile(source) else [
            os.path.join(folder, file) for folder, _, names in os.walk(source) for file in names]
        for path in files:
            relative = os.path.relpath(path, self.local).replace(os.sep, "/")
            self.fs.put_file(path, f"{self.root}/{relative}")

    def remove(self, name: str) -> None:
        """Remove ``name`` from ``--output_dir`` and from the staging folder, if there."""
        if self.fs.exists(f"{self.root}/{name}"):
            self.fs.rm(f"{self.root}/{name}", recursive=True)
        if self.remote:
            shutil.rmtree(self.local_path(name), ignore_errors=True)

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoints(self) -> tuple[list[str], list[str]]:
        """(complete, incomplete) checkpoint folder names, each sorted by step."""
        if self.remote:
            self.fs.invalidate_cache()   # another process (a killed job) wrote here, below too
        names = [os.path.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)]
        names = sorted((n for n in names if CHECKPOINT.fullmatch(n)), key=step_of)
        # One listing for all of them, not a request per checkpoint.
        done = {p.rstrip("/").split("/")[-2] for p in self.fs.glob(f"{self.root}/checkpoint-*/{STATE}")}
        return [n for n in names if n in done], [n for n in names if n not in done]

    def latest(self) -> str | None:
        """The complete checkpoint of the highest step, or None."""
        complete, _ = self.checkpoints()
        return complete[-1] if complete else None

    def retire(self, keep: int | None) -> list[str]:
        """Remove incomplete checkpoints and all but the ``keep`` newest complete ones."""
        complete, incomplete = self.checkpoints()
        old = incomplete + (complete[:-keep] if keep else [])
        for name in old:
            self.remove(name)
        return old

    def locate(self, location: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
        """The file system and path of the complete checkpoint at ``location``: a
        ``checkpoint-<step>`` name in ``--output_dir``, a local folder or a URL."""
        url = self.url_of(location) if CHECKPOINT.fullmatch(location) else location
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        if not fs.exists(f"{root}/{STATE}"):
            raise SystemExit(f"--resume_from_checkpoint {location}: {url} is not a complete "
                             f"checkpoint (no {STATE}: it is missing, or its save was "
                             f"interrupted); pass 'latest' or another checkpoint-<step> folder")
        return fs, root.rstrip("/")

    def local_copy(self, fs: fsspec.AbstractFileSystem, root: str) -> str:
        """Where accelerate loads the checkpoint at ``root`` from: itself when local, else its
        copy in the staging folder (made by ``download``)."""
        if isinstance(fs, LocalFileSystem):
            return root
        return os.path.join(self.local, "resume", os.path.basename(root))

    def download(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        """Copy a remote checkpoint into the staging folder (nothing to do for a local one)."""
        local = self.local_copy(fs, root)
        if local == root:
            return
        shutil.rmtree(local, ignore_errors=True)
        for path in fs.find(root):
            target = os.path.join(local, os.path.relpath(path, root))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fs.get_file(path, target)


def save_checkpoint(accelerator, out: OutputDir, step: int, state: dict, keep: int | None) -> str:
    """Collective: every process saves its part of ``checkpoint-<step>`` (accelerate's
    ``save_state``: model, optimizer, RNG states, and the save hooks' EMA weights); then
    ``training_state.json`` completes it. Returns the checkpoint's URL.
    """
    name = f"checkpoint-{step}"
    if accelerator.is_main_process:
        out.remove(name)                   # what an interrupted save left under this name
    elif accelerator.is_local_main_process and out.remote:
        shutil.rmtree(out.local_path(name), ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(out.local_path(name))
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process:
        out.publish(name)                  # each machine uploads what its processes wrote
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.write(f"{name}/{STATE}", strict_json(state))   # last: from here on it counts
        out.retire(keep)
    if accelerator.is_local_main_process and out.remote:
        shutil.rmtree(out.local_path(name), ignore_errors=True)
    return out.url_of(name)


def update_checkpoint(accelerator, out: OutputDir, step: int, state: dict) -> str:
    """Replace the training state of ``checkpoint-<step>``, saved at this very step (nothing
    else changed since: no optimizer step was taken). One file, replaced whole."""
    name = f"checkpoint-{step}"
    if accelerator.is_main_process:
        out.write(f"{name}/{STATE}", strict_json(state))
    return out.url_of(name)


def load_checkpoint(accelerator, out: OutputDir, location: str, storage_options: dict) -> dict:
    """Collective: load a complete checkpoint into the prepared objects (``load_state``, and
    the load hooks' EMA weights); returns its training state."""
    fs, root = out.locate(location, storage_options)
    if accelerator.is_local_main_process:
        out.download(fs, root)
    accelerator.wait_for_everyone()
    accelerator.load_state(out.local_copy(fs, root))
    return read_strict_json(fs.cat_file(f"{root}/{STATE}"), f"{root}/{STATE}")


def step_of(name: str) -> int:
    """The optimizer step a ``checkpoint-<step>`` folder was saved at."""
    return int(CHECKPOINT.fullmatch(name)[1])


def strict_json(value: object) -> bytes:
    """JSON with no NaN or Infinity (a strict reader refuses them): non-finite numbers -> null."""
    def clean(v):
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(value), allow_nan=False, indent=1).encode()


def read_strict_json(data: bytes, name: str) -> dict:
    """Parse what ``strict_json`` wrote; NaN, Infinity or a repeated field is an error naming the file."""
    def refuse(what):
        raise ValueError(f"{name}: not strict JSON ({what}); the file is damaged or not ours")

    def unique(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            refuse("a repeated field")
        return dict(pairs)
    return json.loads(data, parse_constant=refuse, object_pairs_hook=unique)
