"""Image references in requests -> decoded PIL images, with the server's limits applied.

Accepted, in order of preference:
- ``data:image/<type>;base64,<bytes>``: always allowed (the body-size limit bounds it);
- a local path (or ``file://`` URL): only under ``--allowed-image-dir`` after resolving
  symlinks and ``..``, so a request cannot read arbitrary files of the server;
- ``http(s)://``: only with ``--allow-remote-images``, with a byte cap and one deadline for the
  whole fetch (a per-socket timeout alone lets a slow server trickle bytes forever).

Every image is checked against ``max_image_pixels`` from its header, before any pixel is
decoded (the decompression-bomb guard).  Errors are :class:`APIError` (400 bad input, 403 a
source this server refuses, 413 over a limit).  The decode runs in the request's thread, not
in the model worker, so a slow upload or fetch never holds the model.  Resizing / normalising
is left to the runtime, which does it exactly as the model's Hugging Face processor does.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from .errors import APIError

__all__ = ["ImagePolicy", "load_image"]

_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ImagePolicy:
    allowed_dir: str | None          # realpath of --allowed-image-dir, or None
    allow_remote: bool
    max_pixels: int
    max_remote_bytes: int
    remote_timeout_s: float


def _decode(data: bytes, where: str, policy: ImagePolicy, param: str):
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own guard, far above ours
        raise APIError(413, f"{where}: {e}", param, "image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise APIError(400, f"{where}: the bytes are not an image Pillow can decode (PNG, JPEG, WebP, GIF, BMP, "
                            "TIFF)", param, "invalid_image") from None
    w, h = im.size
    if w * h > policy.max_pixels:
        raise APIError(413, f"{where}: the image is {w}x{h} = {w * h / 1e6:.1f} Mpx, over this server's limit of "
                            f"{policy.max_pixels / 1e6:.1f} Mpx (--max-image-pixels); downscale it first",
                       param, "image_too_large")
    if w < 1 or h < 1:
        raise APIError(400, f"{where}: the image is empty ({w}x{h})", param, "invalid_image")
    try:
        im.load()
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt pixel data
        raise APIError(400, f"{where}: the image data is corrupt or truncated ({e})", param, "invalid_image") from None
    return im


def _data_uri(url: str, policy: ImagePolicy, param: str):
    head, sep, payload = url[5:].partition(",")
    if not sep:
        raise APIError(400, f"{param}: a data URI needs a comma before the data (data:image/png;base64,...)",
                       param, "invalid_image_url")
    parts = head.split(";")
    mime = parts[0].strip().lower()
    if not mime.startswith("image/"):
        raise APIError(400, f"{param}: expected an image data URI (data:image/png;base64,...), got media type "
                            f"{mime or 'none'!r}", param, "invalid_image_url")
    if "base64" not in [p.strip().lower() for p in parts[1:]]:
        raise APIError(400, f"{param}: the image data URI must be base64-encoded (data:{mime};base64,...)",
                       param, "invalid_image_url")
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: the data URI payload is not valid base64", param, "invalid_image_url") from None
    return _decode(data, param, policy, param)


def _local(path: str, policy: ImagePolicy, param: str):
    if policy.allowed_dir is None:
        raise APIError(403, f"{param}: local image paths are disabled on this server; send the image as a data "
                            "URI, or start the server with --allowed-image-dir FOLDER", param, "path_not_allowed")
    real = os.path.realpath(os.path.join(policy.allowed_dir, path))  # a relative path is taken under the folder
    root = policy.allowed_dir
    if os.path.commonpath([real, root]) != root:
        raise APIError(403, f"{param}: {path!r} is outside the allowed image folder {root} (--allowed-image-dir)",
                       param, "path_not_allowed")
    if not os.path.isfile(real):
        raise APIError(400, f"{param}: no such image file {path!r} under {root}", param, "image_not_found")
    size = os.path.getsize(real)
    if size > policy.max_remote_bytes:
        raise APIError(413, f"{param}: the file is {size} bytes, over the limit of {policy.max_remote_bytes}",
                       param, "image_too_large")
    with open(real, "rb") as fh:
        return _decode(fh.read(), param, policy, param)


def _remote(url: str, policy: ImagePolicy, param: str):
    if not policy.allow_remote:
        raise APIError(403, f"{param}: remote image URLs are disabled on this server; send the image as a data URI "
                            "(data:image/png;base64,...), or start the server with --allow-remote-images",
                       param, "remote_images_disabled")
    deadline = time.monotonic() + policy.remote_timeout_s
    cap = policy.max_remote_bytes
    req = urllib.request.Request(url, headers={"User-Agent": "edgevlm-server", "Accept": "image/*"})
    try:
        with urllib.request.urlopen(req, timeout=max(policy.remote_timeout_s, 0.1)) as resp:
            ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype and not ctype.startswith("image/") and ctype != "application/octet-stream":
                raise APIError(400, f"{param}: {url} answered with Content-Type {ctype!r}, not an image",
                               param, "invalid_image")
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > cap:
                raise APIError(413, f"{param}: the remote image is {length} bytes, over the limit of {cap}",
                               param, "image_too_large")
            buf = bytearray()
            while chunk := resp.read(_CHUNK):
                buf += chunk
                if len(buf) > cap:
                    raise APIError(413, f"{param}: the remote image is over the limit of {cap} bytes",
                                   param, "image_too_large")
                if time.monotonic() > deadline:
                    raise APIError(400, f"{param}: fetching {url} took over {policy.remote_timeout_s:g} s",
                                   param, "image_fetch_timeout")
    except APIError:
        raise
    except urllib.error.HTTPError as e:
        raise APIError(400, f"{param}: fetching {url} failed with HTTP {e.code}", param, "image_fetch_failed") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise APIError(400, f"{param}: fetching {url} failed ({reason})", param, "image_fetch_failed") from None
    return _decode(bytes(buf), param, policy, param)


def load_image(url: str, policy: ImagePolicy, param: str = "image_url"):
    """One image reference -> a loaded PIL image (mode as stored; the runtime converts to RGB).
    ``param`` names the request field in error messages, e.g. ``messages[0].content[1]``."""
    if not isinstance(url, str) or not url.strip():
        raise APIError(400, f"{param}: the image URL is empty", param, "invalid_image_url")
    url = url.strip()
    scheme = urllib.parse.urlsplit(url).scheme.lower() if ":" in url[:12] else ""
    if scheme == "data":
        return _data_uri(url, policy, param)
    if scheme in ("http", "https"):
        return _remote(url, policy, param)
    if scheme == "file":
        return _local(urllib.parse.unquote(urllib.parse.urlsplit(url).path), policy, param)
    if scheme == "" or len(scheme) == 1:  # a plain path (a one-letter "scheme" is a Windows drive)
        return _local(url, policy, param)
    raise APIError(400, f"{param}: unsupported image URL scheme {scheme!r}; use a data URI, a path under "
                        "--allowed-image-dir, or http(s) with --allow-remote-images", param, "invalid_image_url")
