"""Verification against the original in float64, module by module and block by block (issue 12).

- :mod:`.casting`: run a model at any dtype, or from weights on disk, holding one module's weights at a time.
- :mod:`.runs`: one forward on the probes, recording outputs, block streams, writer outputs and norm inputs.
- :mod:`.figures`: errors against the truth, per block, and the bound an exact conversion is held to.
- :mod:`.engine`: the verdict, and the in-memory verifier ``convert_`` uses.
- :mod:`.folder`: the same certificate for a converted folder against its original folder (``normswap verify``,
  streaming), reading one module at a time from the safetensors files.
"""

from normswap.verification.engine import TruthVerifier, judge

__all__ = ["TruthVerifier", "judge"]
