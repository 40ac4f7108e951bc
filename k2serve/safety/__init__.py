"""The safety model: the toxicity classifier of the PyPI package `toxic-comment-classifier`.

Its Keras weights and pickled tokenizer are converted once into safetensors + JSON
(`convert.py`); the forward pass is ours in PyTorch (`model.py`), so neither TensorFlow nor
an unpickler runs when the server does. It backs POST /v1/moderations and the `safety_model`
field of chat and completions (`k2serve.api.safety_guard`).
"""
