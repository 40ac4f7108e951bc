"""Embedding / rerank models, quality and speed, ours vs sentence-transformers on the same files:

  quality  the seed's Peru rerank example (cosine query vs each document) and NDCG@1/@3 on the
           labelled set of tests/embeddings/labelled_set.py, per model
  speed    median seconds to embed a batch (`--batch` texts of ~`--words` words), ours
           (SentenceEncoder: one padded forward pass) vs SentenceTransformer.encode, and the
           ratio; repeats interleaved, one thread each unless --threads
  batching `--batch` single-text requests to the serving backend at once (asyncio.gather; the
           batcher groups them into shared forward passes) vs the same requests one after
           another: median wall time of each, forward passes used, ratio

    python benchmarks/embeddings_eval.py [--data-dir DIR] [--batch 32] [--words 40]
                                         [--repeats 5] [--threads 1]

all-mpnet-base-v2 is unpacked into DIR/models once (default: $K2SERVE_HOME or ~/.k2serve).
Benchmark-only dependency: sentence-transformers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--words", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from k2serve.embeddings import packages
    from k2serve.embeddings.sentence_encoder import SentenceEncoder
    from k2serve.platform.db import data_dir
    from tests.embeddings.conftest import PERU_DOCUMENTS, PERU_QUERY
    from tests.embeddings.labelled_set import QUERIES, ndcg_at_k

    torch.set_num_threads(args.threads)
    paths = {"all-MiniLM-L6-v2": packages.minilm_dir(),
             "all-mpnet-base-v2": packages.mpnet_dir(data_dir(args.data_dir))}
    words = ("embeddings place sentences with similar meaning close together so a search "
             "finds what a query means rather than the words it uses").split()
    texts = [" ".join(words[(i + j) % len(words)] for j in range(args.words))
             for i in range(args.batch)]
    for name, path in paths.items():
        ours, ref = SentenceEncoder(str(path)), SentenceTransformer(str(path), device="cpu")
        unit = ours.embed(ours.tokenize([PERU_QUERY, *PERU_DOCUMENTS]))
        peru = ", ".join(f"{label} {c:.3f}" for label, c in
                         zip(("panda", "llama", "camel", "guanaco"), unit[1:] @ unit[0]))
        ndcg = {1: [], 3: []}
        for query, docs in QUERIES:
            v = ours.embed(ours.tokenize([query, *(d for d, _ in docs)]))
            order = np.argsort(-(v[1:] @ v[0]), kind="stable")
            grades = [g for _, g in docs]
            for k in ndcg:
                ndcg[k].append(ndcg_at_k([grades[i] for i in order], grades, k))
        print(f"{name}: Peru cosines: {peru}; NDCG@1 {np.mean(ndcg[1]):.3f}, "
              f"NDCG@3 {np.mean(ndcg[3]):.3f} ({len(QUERIES)} queries)")

        timings = {"ours": [], "sentence-transformers": []}
        ids = ours.tokenize(texts)
        ours.embed(ids), ref.encode(texts, batch_size=len(texts))  # warm-up
        for _ in range(args.repeats):
            start = time.perf_counter()
            ours.embed(ours.tokenize(texts))
            timings["ours"].append(time.perf_counter() - start)
            start = time.perf_counter()
            ref.encode(texts, batch_size=len(texts))
            timings["sentence-transformers"].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in timings.items()}
        tokens = sum(len(s) for s in ids)
        print(f"  batch of {len(texts)} texts ({tokens} tokens), {args.threads} thread(s), "
              f"median of {args.repeats}: ours {med['ours'] * 1000:.0f} ms, "
              f"sentence-transformers {med['sentence-transformers'] * 1000:.0f} ms, "
              f"ratio {med['sentence-transformers'] / med['ours']:.2f}x")

        batching(name, path, texts, args.repeats)


def batching(name, path, texts, repeats) -> None:
    import asyncio

    from k2serve.embeddings.backend import EmbeddingBackend

    backend = EmbeddingBackend(name, lambda: path, max_tokens=512)

    async def run():
        encoder = await backend.encoder()
        sequences = encoder.tokenize(texts)
        times = {"concurrent": [], "one by one": []}
        passes = {}
        for _ in range(repeats):
            before = backend.batch_stats.forward_passes
            start = time.perf_counter()
            await asyncio.gather(*(backend.embed([s]) for s in sequences))
            times["concurrent"].append(time.perf_counter() - start)
            passes["concurrent"] = backend.batch_stats.forward_passes - before
            before = backend.batch_stats.forward_passes
            start = time.perf_counter()
            for s in sequences:
                await backend.embed([s])
            times["one by one"].append(time.perf_counter() - start)
            passes["one by one"] = backend.batch_stats.forward_passes - before
        return times, passes

    times, passes = asyncio.run(run())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"  {len(texts)} single-text requests, median of {repeats}: concurrent "
          f"{med['concurrent'] * 1000:.0f} ms in {passes['concurrent']} forward pass(es), one "
          f"by one {med['one by one'] * 1000:.0f} ms in {passes['one by one']}, ratio "
          f"{med['one by one'] / med['concurrent']:.2f}x")


if __name__ == "__main__":
    main()
