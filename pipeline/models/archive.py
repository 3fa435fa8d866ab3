"""A `.keras` file checked before Keras opens it: a zip archive whose members inflate to
a bounded size. Keras reads config.json whole into memory, so a few megabytes of zip can
otherwise cost gigabytes before any error."""

from __future__ import annotations

import zipfile
from pathlib import Path

from pipeline.errors import PipelineError

MAX_CONFIG_BYTES = 64 * 2**20  # config.json / metadata.json: a few MB even for the largest zoo models
# Keras stores members uncompressed; weights barely compress. The slack admits zero-filled
# weights of a small untrained model, never a bomb's thousandfold.
MAX_RATIO = 8
SLACK_BYTES = 256 * 2**20
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def check_keras_archive(path: Path) -> None:
    """Raise PipelineError (one line) unless `path` is a zip whose declared member sizes are
    within bounds. zipfile never inflates a member past its declared size, so checking the
    central directory bounds what loading can allocate."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        is_zip = zipfile.is_zipfile(path)
    except OSError as err:
        raise PipelineError(f"cannot read model file {path}: {err.strerror or err}") from err
    if not is_zip:
        if head.startswith(HDF5_SIGNATURE):
            raise PipelineError(f"{path} is an HDF5 (legacy .h5) model saved under a .keras name: "
                                f"rename it to {path.with_suffix('.h5').name} and pass that")
        raise PipelineError(f"{path} is not a Keras archive (a .keras file is a zip holding config.json and "
                            f"model.weights.h5): save the model again with model.save('name.keras')")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise PipelineError(f"{path} is a damaged zip archive ({err}): save the model again") from err
    size = path.stat().st_size
    for member in members:
        if member.filename.endswith(".json") and member.file_size > MAX_CONFIG_BYTES:
            raise PipelineError(f"{path}: its {member.filename} inflates to {member.file_size / 2**20:.0f} MiB "
                                f"(above {MAX_CONFIG_BYTES // 2**20} MiB, no real model's is): not loaded; "
                                f"save the model again")
    total = sum(m.file_size for m in members)
    if total > MAX_RATIO * size + SLACK_BYTES:
        raise PipelineError(f"{path}: its members inflate to {total / 2**20:.0f} MiB from a "
                            f"{size / 2**20:.1f} MiB file (more than {MAX_RATIO}x + {SLACK_BYTES // 2**20} MiB): "
                            f"not loaded; save the model again with model.save('name.keras')")
