"""Which images a workspace may use: one rule for the API's ``image`` field and for the
images a repository's devcontainer.json names (``image``, a Dockerfile's FROM)."""

from __future__ import annotations

from server.config import Settings
from server.errors import ValidationFailed


def check(settings: Settings, image: str) -> None:
    """Raise ValidationFailed unless the operator allows ``image``: the default image, the
    images of DEN_ALLOWED_IMAGES, or (when that is empty) any ``den/`` image."""
    allowed = image == settings.default_image or (
        image in settings.allowed_images if settings.allowed_images
        else image.startswith("den/"))
    if not allowed:
        raise ValidationFailed(f"image {image!r} is not allowed on this server "
                               "(DEN_ALLOWED_IMAGES)")
