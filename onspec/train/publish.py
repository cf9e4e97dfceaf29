"""Versioned drafter checkpoints on disk: atomic publication, manifests, checksums, export.

A version is a directory ``<root>/v0007/`` holding

* ``config.json`` + ``model.safetensors``: the drafter in its kind's layout (``speculation/checkpoints.py``
  ``save_drafter``: EAGLE-3, or a parallel drafter's P-EAGLE layout), loadable by SGLang / vLLM loaders as is;
* ``manifest.json``: version, parent, training step, samples seen, held-out simulated acceptance length,
  the sha256 of every weight file, when and from what it was made;
* ``optimizer.pt`` (optional): AdamW state, so a restarted trainer continues where it stopped.

Publication is atomic: everything is written into a temporary directory beside the target, each file and
the directory are fsynced, then one ``rename`` makes the version appear complete or not at all (a reader
never sees half a version). ``state.json`` in the root records which version is promoted and every gate
decision; it is replaced atomically the same way, so versions and decisions survive a restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

VERSION_RE = re.compile(r"^v(\d{4,})$")
WEIGHT_FILES = ("model.safetensors", "config.json")
OPTIMIZER_FILE = "optimizer.pt"


class VersionError(ValueError):
    """A version directory is missing, incomplete or corrupt (the message says which and why)."""


@dataclass
class Manifest:
    version: int
    parent: int | None
    kind: str                           # initial | imported | trained | warmup
    step: int = 0                       # optimizer steps since the lineage started
    samples: int = 0                    # training positions seen
    heldout_acceptance: float | None = None   # simulated acceptance length on held-out traces
    heldout_positions: int = 0
    loss: float | None = None
    sha256: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    base_model: str = ""
    note: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def version_name(version: int) -> str:
    return f"v{version:04d}"


def version_dir(root: Path, version: int) -> Path:
    return Path(root) / version_name(version)


def list_versions(root: Path) -> list[int]:
    """Complete versions in ``root`` (temporary directories are never listed), ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = VERSION_RE.match(p.name)
        if m and p.is_dir() and (p / "manifest.json").is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def next_version(root: Path) -> int:
    """One more than any version (complete or not) ever written here."""
    root = Path(root)
    seen = [int(m.group(1)) for p in (root.iterdir() if root.is_dir() else [])
            if (m := re.search(r"(?:^|-)v(\d{4,})(?:$|-)", p.name))]
    return max(seen, default=-1) + 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def publish_version(root: Path, drafter, manifest: Manifest, optimizer_state: dict | None = None) -> Path:
    """Write ``drafter`` as version ``manifest.version`` under ``root`` atomically; returns its directory."""
    from ..speculation.checkpoints import save_drafter

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = version_dir(root, manifest.version)
    if final.exists():
        raise VersionError(f"version {manifest.version} already exists in {root}")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version_name(manifest.version)}-", dir=root))
    try:
        save_drafter(tmp, drafter)
        manifest.sha256 = {name: sha256_file(tmp / name) for name in _payload_files(tmp)}
        if optimizer_state is not None:  # not in sha256: old versions drop it to save disk (see prune)
            import torch

            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        (tmp / "manifest.json").write_text(json.dumps(asdict(manifest), indent=2))
        for p in tmp.iterdir():
            _fsync(p)
        _fsync(tmp)
        os.rename(tmp, final)
        _fsync(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _payload_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.is_file() and p.name not in ("manifest.json", OPTIMIZER_FILE))


def read_manifest(d: Path) -> Manifest:
    d = Path(d)
    try:
        return Manifest.from_dict(json.loads((d / "manifest.json").read_text()))
    except FileNotFoundError:
        raise VersionError(f"{d}: no manifest.json (not a published version)") from None
    except (json.JSONDecodeError, TypeError, OSError) as exc:
        raise VersionError(f"{d}: unreadable manifest.json: {exc}") from None


def verify_checksums(d: Path, manifest: Manifest | None = None) -> Manifest:
    """Raise ``VersionError`` unless every file listed in the manifest exists with the recorded sha256."""
    d = Path(d)
    manifest = manifest or read_manifest(d)
    for name in WEIGHT_FILES:
        if name not in manifest.sha256:
            raise VersionError(f"{d}: the manifest has no checksum for {name}")
    for name, digest in manifest.sha256.items():
        path = d / name
        if not path.is_file():
            raise VersionError(f"{d}: {name} is missing")
        if sha256_file(path) != digest:
            raise VersionError(f"{d}: {name} does not match its sha256 in manifest.json (corrupt or modified)")
    return manifest


def prune_versions(root: Path, keep: int, protect: set[int], keep_optimizer: int = 2) -> list[int]:
    """Delete the oldest versions beyond ``keep`` except those in ``protect``, and the optimizer state of
    all but the newest ``keep_optimizer`` versions and the protected ones; returns the deleted versions."""
    versions = list_versions(root)
    candidates = [v for v in versions if v not in protect]
    doomed = candidates[:max(0, len(candidates) - keep)]
    for v in doomed:
        shutil.rmtree(version_dir(root, v), ignore_errors=True)
    for v in versions[:max(0, len(versions) - keep_optimizer)]:
        if v not in protect and v not in doomed:
            (version_dir(root, v) / OPTIMIZER_FILE).unlink(missing_ok=True)
    return doomed


# ---- promotion state ----------------------------------------------------------------------------------
@dataclass
class VersionState:
    """``state.json``: the promoted version, every promotion, and the decisions log (capped)."""

    current: int | None = None
    promoted: list[int] = field(default_factory=list)     # in promotion order; rollbacks pop the tail
    decisions: list[dict] = field(default_factory=list)   # {t, kind, version, ...figures}

    MAX_DECISIONS = 500

    @classmethod
    def load(cls, root: Path) -> "VersionState":
        path = Path(root) / "state.json"
        if not path.is_file():
            return cls()
        try:
            d = json.loads(path.read_text())
            return cls(current=d.get("current"), promoted=list(d.get("promoted", [])),
                       decisions=list(d.get("decisions", [])))
        except (json.JSONDecodeError, OSError, TypeError):
            return cls()  # an unreadable state file is not fatal: versions are still on disk

    def save(self, root: Path) -> None:
        self.decisions = self.decisions[-self.MAX_DECISIONS:]
        write_json_atomic(Path(root) / "state.json",
                          {"current": self.current, "promoted": self.promoted, "decisions": self.decisions})


def latest_promoted(root: Path) -> int | None:
    """The version serving when this root was last used (None: nothing was ever promoted)."""
    st = VersionState.load(root)
    versions = set(list_versions(root))
    if st.current is not None and st.current in versions:
        return st.current
    for v in reversed(st.promoted):
        if v in versions:
            return v
    return None


def export_version(root: Path, out: Path, version: int | None = None) -> tuple[int, Path]:
    """Copy a version (default: the latest promoted, else the initial one) to ``out`` after checking it."""
    root = Path(root)
    versions = list_versions(root)
    if not versions:
        raise VersionError(f"no drafter versions in {root}")
    if version is None:
        version = latest_promoted(root)
        if version is None:
            version = versions[0]
    if version not in versions:
        raise VersionError(f"version {version} not found in {root} (have {versions})")
    src = version_dir(root, version)
    verify_checksums(src)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise VersionError(f"--out {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "manifest.json"):
        shutil.copy2(src / name, out / name)
    return version, out
