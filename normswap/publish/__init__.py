"""Publishing converted checkpoints: model card, remote code that needs no normswap, and the Hub upload.

:func:`write_publish_files` runs inside ``normswap.save`` so that every output folder is ready to publish;
:mod:`normswap.publish.hub` uploads one (``normswap push``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from normswap.errors import NormswapError
from normswap.publish.card import render_model_card, source_license, write_model_card
from normswap.publish.remote_code import MODELING_FILE, load_output_config, requires_remote_code, write_remote_code

__all__ = [
    "MODELING_FILE",
    "load_output_config",
    "render_model_card",
    "requires_remote_code",
    "write_model_card",
    "write_publish_files",
]

logger = logging.getLogger(__name__)


def write_publish_files(
    model=None, out_dir: str | os.PathLike = ".", *, source_dir: str | os.PathLike | None = None,
    name: str | None = None,
) -> bool:
    """Add the modeling file, the ``auto_map`` patch and the model card to a freshly saved output folder.

    ``name`` is the folder's final name (``out_dir`` may be a temporary folder). The metadata is read from the saved
    ``config.json`` (``model`` is only a shortcut to skip folders of unconverted models). A folder that cannot get
    remote code (a model type transformers has no auto class for) is still a valid output: that is logged, not
    raised. Returns whether the folder was made publishable.
    """
    from normswap._version import __version__

    out = Path(out_dir)
    if model is not None and not isinstance(getattr(getattr(model, "config", None), "normswap", None), dict):
        logger.info("no normswap metadata on the model: no remote code or model card written")
        return False
    try:
        config = write_remote_code(out, __version__)
    except NormswapError as exc:
        logger.warning("%s: not adding remote code or a model card (%s)", name or out, exc)
        return False
    source_id = (config["normswap"].get("source") or {}).get("id")
    write_model_card(out, name=name, license=source_license(source_dir, source_id))
    return True
