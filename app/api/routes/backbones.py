from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import CurrentUser
from app.api.schemas import BackboneOut, errors
from domain.catalog import CATALOG

router = APIRouter(prefix="/api/v1/backbones", tags=["backbones"], responses=errors(401))


@router.get("", response_model=list[BackboneOut])
def list_backbones(user: CurrentUser) -> list[BackboneOut]:
    """Every backbone, its size, and whether its pretrained weights are available on this server."""
    return [BackboneOut(name=e.name, description=e.description, params=e.params, image_size=e.image_size,
                        pretrained_available=e.weights_available(), weights_file=e.weights_file,
                        weights_url=e.weights_url) for e in CATALOG.values()]
