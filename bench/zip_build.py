"""ZIP package build speed: Softgoods' builder against Info-ZIP on the same files, in the same run.

    .venv/bin/python bench/zip_build.py [--mib 512] [--rounds 3]

Stored content (already-compressed media, random bytes named *.mp4) is compared with ``zip -0``;
compressible content (text, *.txt) with ``zip -6`` (zip's default level; ours is zlib's default, 6).
Both sides end with an fsync of the archive, because the builder must fsync before the rename that
publishes it. Target: stored builds at >= 0.9x the speed of ``zip -0``. Prints the best of N rounds.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.downloads.packages import write_zip  # noqa: E402

import random  # noqa: E402

_rng = random.Random(8)
_VOCAB = [bytes(_rng.choice(b"etaoinshrdlucmfwypvbgkqjxz") for _ in range(_rng.randint(2, 9))) for _ in range(5000)]
# Text-like bytes (deflates to about a third): random words, so the 32 KiB window finds no long repeats.
TEXT_BLOCK = b" ".join(_rng.choice(_VOCAB) for _ in range(800_000))[:4 << 20]


def make_files(folder: Path, kind: str, total: int, count: int = 4) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / (f"video{i}.mp4" if kind == "stored" else f"book{i}.txt")
        with open(path, "wb") as fh:
            left = total // count
            while left:
                block = os.urandom(min(left, 4 << 20)) if kind == "stored" else TEXT_BLOCK[:min(left, 4 << 20)]
                fh.write(block)
                left -= len(block)
        paths.append(path)
    return paths


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def time_ours(root: Path, files: list[Path], out: Path) -> float:
    members = [(p.relative_to(root).as_posix(), p) for p in files]
    start = time.perf_counter()
    write_zip(out, members)  # includes fsync of the file and of the folder
    return time.perf_counter() - start


def time_zip(root: Path, files: list[Path], out: Path, level: str) -> float:
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run(["zip", "-q", "-X", level, str(out), *[p.relative_to(root).as_posix() for p in files]],
                   cwd=root, check=True)
    fsync_file(out)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=512, help="MiB of content per kind (default 512)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not shutil.which("zip"):
        print("zip is not installed (apt-get install zip)", file=sys.stderr)
        return 2
    total = args.mib << 20
    with tempfile.TemporaryDirectory(prefix="zipbench-", dir=os.environ.get("BENCH_DIR")) as tmp:
        root = Path(tmp)
        results = {}
        for kind, level in (("stored", "-0"), ("deflated", "-6")):
            files = make_files(root / "src" / kind, kind, total)
            ours, theirs = [], []
            time_zip(root / "src", files, root / "warm.zip", level)  # warm the page cache for both sides
            for _ in range(args.rounds):  # alternate, so drift in machine load hits both sides alike
                ours.append(time_ours(root / "src", files, root / "out" / "ours.zip"))
                theirs.append(time_zip(root / "src", files, root / "theirs.zip", level))
            size_ours = (root / "out" / "ours.zip").stat().st_size
            size_theirs = (root / "theirs.zip").stat().st_size
            best_ours, best_theirs = min(ours), min(theirs)
            ratio = best_theirs / best_ours  # >1: we are faster
            results[kind] = ratio
            print(f"{kind:9s} {args.mib} MiB in 4 files: softgoods {total / best_ours / 2**20:7.1f} MiB/s "
                  f"({best_ours:.2f}s, {size_ours / 2**20:.1f} MiB)   zip {level} {total / best_theirs / 2**20:7.1f} MiB/s "
                  f"({best_theirs:.2f}s, {size_theirs / 2**20:.1f} MiB)   speed ratio {ratio:.2f}x")
        target = results["stored"] >= 0.9
        print(f"target: stored build >= 0.9x zip -0 speed: {'met' if target else 'NOT met'} ({results['stored']:.2f}x)")
        return 0 if target else 1


if __name__ == "__main__":
    raise SystemExit(main())
