"""The checkpoint registry: the contract between training and serving (DESIGN 3.3).

`registry.format` (file names, manifest, bytes <-> arrays), `registry.writer` (publish and commit, local disk and
object stores), `registry.reader` (LATEST, versions, verified loads), `registry.retention` (what gets removed),
`registry.item_index` (the approximate index over item vectors a large version carries).
Trainers publish through it and serving reads through it; it imports neither.
"""

from registry.format import (
    BRANDS,
    CATEGORIES,
    CLAIMS,
    CURVE,
    FORMAT,
    INDEX,
    ITEM_VECTORS,
    ITEMS,
    LATEST,
    MANIFEST,
    MODEL,
    POPULARITY,
    POPULARITY_SCHEMA,
    SEEN,
    STAGING_PREFIX,
    USER_VECTORS,
    USERS,
    VERSIONS,
    CheckpointError,
    ModelArtifacts,
    config_hash,
    version_label,
    version_name,
    version_number,
)
from registry.reader import (
    LoadedVersion,
    latest_version,
    list_versions,
    load_latest,
    load_newest_good,
    load_version,
    read_curve,
    read_manifest,
    version_folder,
)
from registry.retention import prune, remove_stale_staging
from registry.user_keys import UserKeys
from registry.writer import publish

__all__ = [
    "BRANDS", "CATEGORIES", "CLAIMS", "CURVE", "FORMAT", "INDEX", "ITEM_VECTORS", "ITEMS", "LATEST", "MANIFEST",
    "MODEL", "POPULARITY", "POPULARITY_SCHEMA", "SEEN", "STAGING_PREFIX", "USER_VECTORS", "USERS", "VERSIONS",
    "CheckpointError", "LoadedVersion", "ModelArtifacts", "config_hash", "latest_version", "list_versions",
    "load_latest", "load_newest_good", "load_version", "publish", "UserKeys", "prune", "read_curve", "read_manifest",
    "remove_stale_staging", "version_folder", "version_label", "version_name", "version_number",
]
