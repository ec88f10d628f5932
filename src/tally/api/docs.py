"""/docs (Swagger UI) and /redoc (ReDoc), with their assets served from this package.

FastAPI's pages load Swagger UI, ReDoc, a favicon and Google fonts from the internet: on a
host without it (a data centre behind a proxy, an air-gapped site) /docs is a blank page. The
assets are vendored under static/ (versions, licences and how to refresh them:
static/README.md) and served by one route that knows each file by name, so nothing else of
the package can be read through it. The pages' Content-Security-Policy lets the browser
load nothing from another host either.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from starlette.exceptions import HTTPException

STATIC = Path(__file__).parent / "static"
ASSETS = "/docs/assets"

# name under ASSETS -> media type; the names are the files' paths under static/.
_FILES = {
    "swagger-ui/swagger-ui-bundle.js": "text/javascript",
    "swagger-ui/swagger-ui.css": "text/css",
    "swagger-ui/favicon-32x32.png": "image/png",
    "redoc/redoc.standalone.js": "text/javascript",
}

# Inline scripts and styles are the pages' own (FastAPI's start-up script, ReDoc's styles);
# ReDoc runs its search in a worker made from a blob; Swagger UI draws icons from data: URLs.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",
        "worker-src 'self' blob:",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    )
)


def _asset(request: Request, name: str) -> str:
    # root_path: behind a proxy that mounts Tally under a prefix, as FastAPI's own pages do.
    return f"{request.scope.get('root_path', '')}{ASSETS}/{name}"


def _page(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page


router = APIRouter(include_in_schema=False)


def _openapi_url(request: Request) -> str:
    return f"{request.scope.get('root_path', '')}{request.app.openapi_url}"


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    return _page(
        get_swagger_ui_html(
            openapi_url=_openapi_url(request),
            title=f"{request.app.title} API",
            swagger_js_url=_asset(request, "swagger-ui/swagger-ui-bundle.js"),
            swagger_css_url=_asset(request, "swagger-ui/swagger-ui.css"),
            swagger_favicon_url=_asset(request, "swagger-ui/favicon-32x32.png"),
            # Swagger UI would otherwise send the document to validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None, "displayOperationId": True},
        )
    )


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    return _page(
        get_redoc_html(
            openapi_url=_openapi_url(request),
            title=f"{request.app.title} API",
            redoc_js_url=_asset(request, "redoc/redoc.standalone.js"),
            redoc_favicon_url=_asset(request, "swagger-ui/favicon-32x32.png"),
            with_google_fonts=False,
        )
    )


@router.get(ASSETS + "/{name:path}")
def asset(name: str) -> FileResponse:
    media_type = _FILES.get(name)
    if media_type is None:
        raise HTTPException(404, "No such documentation asset.")
    # The files never change within an installed version.
    return FileResponse(
        STATIC / name, media_type=media_type, headers={"Cache-Control": "public, max-age=86400"}
    )
