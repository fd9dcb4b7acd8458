"""Shard formats for sample.py --out-dir, measured: write time, read time and size for N MNIST-like digits.

    python bench/shard_formats.py --data-dir /work/shared/data --n 100000 [--shard-size 10000]

Real MNIST training digits stand in for generated ones (same statistics: mostly black, 8-bit).
Prints one line per format (safetensors, parquet+zstd, npz compressed, WebDataset tar of PNGs). The
Parquet row needs pyarrow (pip install pyarrow; not a dependency of the package); without it it is skipped.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_safetensors(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    from safetensors.numpy import save_file
    save_file({"images": x, "labels": y}, str(path.with_suffix(".safetensors")))


def read_safetensors(path: Path) -> int:
    from safetensors.numpy import load_file
    return sum(load_file(str(p))["images"].shape[0] for p in sorted(path.parent.glob("*.safetensors")))


def write_parquet(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    flat = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 784)
    pq.write_table(pa.table({"image": flat, "label": y}), path.with_suffix(".parquet"), compression="zstd")


def read_parquet(path: Path) -> int:
    import pyarrow.parquet as pq
    return sum(pq.read_table(p).num_rows for p in sorted(path.parent.glob("*.parquet")))


def write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    np.savez_compressed(path.with_suffix(".npz"), images=x, labels=y)


def read_npz(path: Path) -> int:
    return sum(np.load(p)["images"].shape[0] for p in sorted(path.parent.glob("*.npz")))


def write_tar(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    with tarfile.open(path.with_suffix(".tar"), "w") as tar:
        for i, (im, lab) in enumerate(zip(x, y)):
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", str(int(lab)).encode())):
                info = tarfile.TarInfo(f"{i:08d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def read_tar(path: Path) -> int:
    n = 0
    for p in sorted(path.parent.glob("*.tar")):
        with tarfile.open(p) as tar:
            for m in tar:
                if m.name.endswith(".png"):
                    np.asarray(Image.open(tar.extractfile(m)))
                    n += 1
    return n


FORMATS = {"safetensors": (write_safetensors, read_safetensors), "parquet-zstd": (write_parquet, read_parquet),
           "npz-compressed": (write_npz, read_npz), "webdataset-tar-png": (write_tar, read_tar)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--formats", nargs="+", default=list(FORMATS))
    args = p.parse_args()
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from latentdiff.data import load_idx_folder  # noqa: E402
    xt, yt = load_idx_folder(args.data_dir)
    x, y = xt.numpy(), yt.numpy()
    reps = -(-args.n // len(x))
    x, y = np.concatenate([x] * reps)[: args.n], np.concatenate([y] * reps)[: args.n].astype(np.int64)
    for name in args.formats:
        write, read = FORMATS[name]
        if name.startswith("parquet"):
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                print(json.dumps({"format": name, "skipped": "pip install pyarrow"}), flush=True)
                continue
        root = Path(tempfile.mkdtemp(prefix=f"fmt-{name}-"))
        t0 = time.perf_counter()
        for k, start in enumerate(range(0, args.n, args.shard_size)):
            write(root / f"shard-{k:05d}", x[start:start + args.shard_size], y[start:start + args.shard_size])
        t_write = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in root.iterdir())
        t0 = time.perf_counter()
        n = read(root / "x")
        t_read = time.perf_counter() - t0
        assert n == args.n
        print(json.dumps({"format": name, "digits": args.n, "write_s": round(t_write, 2), "read_s": round(t_read, 2),
                          "mb": round(size / 1e6, 1), "bytes_per_digit": round(size / args.n, 1)}), flush=True)
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
