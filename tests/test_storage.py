"""Run storage: compressed, lossless chunks."""

from __future__ import annotations

import numpy as np
import pytest

from smartscope.rundir import (
    LABELS_NAME,
    Hierarchy,
    PositionArrays,
    position_path,
    read_position,
)


def _chunk_bytes(run_dir, labels: bool) -> int:
    chunks = position_path(run_dir, "p0", labels=labels) / "0" / "c"
    return sum(f.stat().st_size for f in chunks.rglob("*") if f.is_file())


@pytest.mark.parametrize("compression", ["blosc-zstd", "blosc-lz4", "zstd", "none"])
def test_chunks_are_compressed_losslessly(tmp_path, compression):
    rng = np.random.default_rng(0)
    image = (100 + rng.poisson(20.0, (256, 256))).astype(np.uint16)
    labels = np.zeros((256, 256), np.uint16)
    labels[40:80, 50:90] = 1
    labels[150:200, 100:140] = 2
    hierarchy = Hierarchy.create(tmp_path, None)
    for name, frame in ((None, image), (LABELS_NAME, labels)):
        arrays = PositionArrays(hierarchy, labels=name, compression=compression)
        arrays.write(frame, {"position": "p0"})
        arrays.close()

    # bit for bit
    assert (read_position(tmp_path, "p0")[0, 0, 0] == image).all()
    assert (read_position(tmp_path, "p0", labels=True)[0, 0, 0] == labels).all()
    raw = image.nbytes
    if compression == "none":
        assert _chunk_bytes(tmp_path, False) == raw
        assert _chunk_bytes(tmp_path, True) == raw
    else:
        assert _chunk_bytes(tmp_path, False) < raw / 2  # noise on an offset
        assert _chunk_bytes(tmp_path, True) < raw / 50  # mostly background


def test_unknown_compression_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown compression"):
        PositionArrays(tmp_path, compression="gzip")  # type: ignore[arg-type]
