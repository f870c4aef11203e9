"""Checking a streamed output against its source: every block, one module's weights in memory at a time.

The output folder is verified exactly as ``normswap verify OUT --against SRC`` would verify it
(:func:`normswap.verification.folder.verify_folder`): the source in float64 is the reference, the source and the
output run at the output's dtype, and every block's stream, writer outputs and norm inputs are checked, reading
each module's tensors from the safetensors files just before it runs. Memory stays at one module's weights in
float64 (the head in chunks of vocabulary rows), so no model is ever loaded and no block is skipped, whatever the
checkpoint size or the free RAM.
"""

from __future__ import annotations

from pathlib import Path

from normswap.streaming.plan import StreamPlan
from normswap.streaming.source import SourceCheckpoint
from normswap.verify import VerificationResult

#: "auto", "full" and "sample" (kept for old callers) all verify every block; "none" skips verification.
VERIFY_MODES = ("auto", "full", "sample", "none")


def verify_streamed(
    src_dir: Path, out_dir: Path, plan: StreamPlan, source: SourceCheckpoint, *, mode: str = "auto",
    tolerance: float | None = None,
) -> tuple[VerificationResult | None, str]:
    """Verify ``out_dir`` against ``src_dir``; returns the result (None when skipped) and what was verified."""
    from normswap.verification.folder import verify_folder

    if mode == "none":
        return None, "skipped (not requested)"
    result = verify_folder(out_dir, src_dir, tolerance=tolerance)
    scope = (f"block by block: all {result.blocks_checked} blocks, embeddings, final norm and head, the source in "
             f"float64 as reference and both models in {result.dtype}, one module's weights in memory at a time")
    result.scope = scope
    return result, scope
