"""Streaming conversion: convert checkpoints larger than RAM, shard by shard, driven by the same adapters.

``convert_streaming(src, out)`` reads ``model.safetensors`` or a sharded index tensor by tensor, centres the
writers with the float64 maths of :mod:`normswap.maths`, writes new shards with a new index and the same
``config.normswap`` metadata as the in-memory path, and verifies the result (whole model or a layer sample).
"""

from normswap.streaming.converter import (
    AUTO_STREAM_RAM_FRACTION,
    StreamingResult,
    convert_streaming,
    streaming_reason,
)
from normswap.streaming.output import DEFAULT_MAX_SHARD_SIZE, parse_size
from normswap.streaming.writer import StreamingStats

__all__ = [
    "AUTO_STREAM_RAM_FRACTION",
    "DEFAULT_MAX_SHARD_SIZE",
    "StreamingResult",
    "StreamingStats",
    "convert_streaming",
    "parse_size",
    "streaming_reason",
]
