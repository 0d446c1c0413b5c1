"""`tokenizers/` holds scripts only: it must never shadow the HuggingFace package."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tokenizers_folder_is_not_a_package():
    assert (ROOT / "tokenizers").is_dir()
    assert not (ROOT / "tokenizers" / "__init__.py").exists()


def test_huggingface_tokenizers_imports_from_repo_root():
    # run from the repository root, where a package named `tokenizers` would win the import
    code = ("import tokenizers, transformers; from tokenizers import Tokenizer; "
            "print(tokenizers.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert "site-packages" in out.stdout and str(ROOT / "tokenizers") not in out.stdout


def test_engine_imports_no_task_or_script():
    """The engine (sequence, masks, attention, model, kv_cache, sampling) imports no task or data."""
    for mod in ["masks", "sequence", "attention", "model", "diffusion", "kv_cache", "sampling"]:
        src = (ROOT / "unimodal" / f"{mod}.py").read_text()
        for banned in ("import tasks", "from tasks", "from .data", "import unimodal.data", "from .codecs"):
            assert banned not in src, f"unimodal/{mod}.py imports {banned}"
        importlib.import_module(f"unimodal.{mod}")
