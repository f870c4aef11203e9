"""Paths of the offline defaults shipped with the package (see README.md in this folder)."""

from pathlib import Path

ASSETS = Path(__file__).parent
DEFAULT_MODEL_NAME = "shakespeare-gpt2"
DEFAULT_MODEL = ASSETS / DEFAULT_MODEL_NAME
DEFAULT_TEXT = ASSETS / "macbeth.txt"
DEFAULT_TEXT_SOURCE = "William Shakespeare, Macbeth (opening; public domain), Open Knowledge Foundation packaging"


def resolve_model(src: str | None) -> str:
    """``None`` or ``embedded`` → the shipped model's folder; anything else is passed through."""
    if src in (None, "", "embedded", DEFAULT_MODEL_NAME):
        return str(DEFAULT_MODEL)
    return src
