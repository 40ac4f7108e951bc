"""Grammar-constrained decoding: token bitmasks from llguidance, per sequence.

- `grammars`: grammar text for response_format (JSON schema, JSON object, regex) and for tool
  calls (Kimi K2's native markers, or the JSON call format of models without one); user
  schemas are checked here and refused with a message naming the problem.
- `compiler`: one `GrammarCompiler` per tokenizer compiles and caches grammars (off the engine
  thread) and hands each sequence its own `GrammarMatcher`.
- `bitmask`: turns the matchers' packed bitmasks into a mask over the logits.
"""

from .compiler import CompiledGrammar, GrammarCompiler, GrammarMatcher, compiler_for
from .grammars import GrammarError

__all__ = ["CompiledGrammar", "GrammarCompiler", "GrammarError", "GrammarMatcher",
           "compiler_for"]
