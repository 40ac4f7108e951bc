"""Tool-call parsing of model output (Kimi K2's format) and history id normalisation."""

from .kimi_k2 import (
    InvalidToolCall,
    KimiK2Scanner,
    ParsedOutput,
    ToolCall,
    normalize_tool_call_ids,
    parse_tool_calls,
)
from .streaming import StreamingToolParser

__all__ = [
    "InvalidToolCall", "KimiK2Scanner", "ParsedOutput", "StreamingToolParser", "ToolCall",
    "normalize_tool_call_ids", "parse_tool_calls",
]
