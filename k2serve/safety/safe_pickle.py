"""Reading the package's pickled Keras Tokenizer without running any of its code.

`pickle.load` may call any importable callable the file names. This reader resolves only
the four globals the file uses (checked with `pickletools`): two containers from
`collections`, `int` (a defaultdict's factory), and Keras's `Tokenizer` class, which it
replaces with `TokenizerState`, a plain class with no methods: the pickle's NEWOBJ makes an
empty instance and BUILD fills its `__dict__`. Any other global fails the load, so a
tampered file cannot make this reader import or call anything else. It runs once, at
conversion time; the server reads the JSON it produces.
"""

from __future__ import annotations

import collections
import io
import pickle


class TokenizerState:
    """The attributes of a pickled Keras Tokenizer (word_index, num_words, filters, ...)."""


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("builtins", "int"): int,
    ("keras.src.legacy.preprocessing.text", "Tokenizer"): TokenizerState,
    ("keras.preprocessing.text", "Tokenizer"): TokenizerState,
    ("keras_preprocessing.text", "Tokenizer"): TokenizerState,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} from the tokenizer pickle") from None


def load_tokenizer_state(data: bytes) -> TokenizerState:
    state = _RestrictedUnpickler(io.BytesIO(data)).load()
    if not isinstance(state, TokenizerState):
        raise pickle.UnpicklingError(f"expected a Keras Tokenizer, got {type(state).__name__}")
    return state
