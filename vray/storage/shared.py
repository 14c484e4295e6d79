"""Whether a run directory is shared by every node of a run (object storage, or a network filesystem)."""

from __future__ import annotations

import os
from pathlib import Path

from vray.errors import VrayError

NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "beegfs",
                       "wekafs", "fuse.")  # fuse.* covers s3fs / gcsfuse / juicefs mounts


def mount_type(path: str | Path) -> str | None:
    """The filesystem type of the mount holding `path` (Linux /proc/mounts), if known."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    target = str(Path(path).expanduser().resolve())
    best = max((m for m in mounts if target == m[0] or target.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best else None


def require_shared_storage(uri: str, nodes: int, mounts_of_this_machine: bool = True) -> None:
    """A run spread over several nodes writes one run directory from all of them: refuse a node-local path.

    An object store URI is shared; so is a path on a network filesystem, when the run's nodes mount what this
    machine mounts (`mounts_of_this_machine`; not for pods rendered here, which mount nothing of it)."""
    if nodes <= 1 or "://" in uri or os.environ.get("VRAY_SHARED_STORAGE") == "1":
        return
    if not mounts_of_this_machine:
        raise VrayError(
            f"the run's workers run in {nodes} pods but the run directory {uri} is a local path, which each pod "
            "would have for itself; set output (or VRAY_STORAGE) to s3://BUCKET/runs so every pod writes to the same "
            "run directory, or mount one shared volume (NFS, a ReadWriteMany PersistentVolumeClaim) at that path in "
            "every pod and render with VRAY_SHARED_STORAGE=1"
        )
    kind = mount_type(uri) or "unknown"
    if kind.startswith(NETWORK_FILESYSTEMS):
        return
    raise VrayError(
        f"the plan spans {nodes} nodes but the run directory {uri} is on a node-local disk ({kind}); set output (or "
        "VRAY_STORAGE) to s3://BUCKET/runs or to a folder every node mounts (NFS, Lustre, a FUSE bucket); if this "
        "path is shared storage vray does not recognise, set VRAY_SHARED_STORAGE=1"
    )
