"""The remote model store: serves stage / rest / full images of the models under a root folder.

``hydraserve store serve --root DIR`` -- every subfolder of DIR that holds a Hugging Face
safetensors checkpoint is a model. HTTP API:

  GET  /health
  GET  /models                                   names, sizes, layer counts
  GET  /models/{name}/layout?p=P                 layer ranges and image sizes of the p stages
  GET  /models/{name}/image?kind=stage|rest|full&p=P&rank=R    (HEAD for the size)
  GET  /models/{name}/files/{file}               the model's small side files (config,
                                                 tokenizer): what a stock engine needs beside
                                                 the weights

Images are sent from the checkpoint files with ``sendfile`` (never built in memory, never
copied through this process), honour ``Range: bytes=a-b`` (206), and share the store's egress
limit fairly across all connections.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

from aiohttp import web

from hydraserve.store.bandwidth import Link
from hydraserve.store.server import json_error
from hydraserve.store.checkpoint import CheckpointError, scan_checkpoint
from hydraserve.store.image import SIDE_FILES, ImageKind, ImageSpec, StageImage
from hydraserve.store.layout import StageLayout

log = logging.getLogger("hydraserve.store")

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """'bytes=a-b' | 'bytes=a-' | 'bytes=-n' -> [start, end); None for the whole body.
    Raises ValueError for an unsatisfiable or malformed range."""
    if not header:
        return None
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise ValueError(f"malformed range {header!r}")
    if not m.group(1):
        start, end = max(0, size - int(m.group(2))), size
    else:
        start = int(m.group(1))
        end = min(size, int(m.group(2)) + 1) if m.group(2) else size
    if start >= size or start >= end:
        raise ValueError(f"range {header!r} is outside 0..{size}")
    return start, end


class ModelStore:
    """The models under ``root`` and their (cached) layouts and image descriptions."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"store root {self.root} is not a directory")
        self._layouts: dict[str, StageLayout] = {}
        self._images: dict[str, StageImage] = {}

    def names(self) -> list[str]:
        return sorted(d.name for d in self.root.iterdir()
                      if d.is_dir() and MODEL_NAME.match(d.name) and (d / "config.json").exists())

    def layout(self, name: str) -> StageLayout:
        if not MODEL_NAME.match(name) or not (self.root / name / "config.json").is_file():
            raise KeyError(name)
        if name not in self._layouts:
            self._layouts[name] = StageLayout(scan_checkpoint(self.root / name))
        return self._layouts[name]

    def image(self, spec: ImageSpec) -> StageImage:
        if spec.key not in self._images:
            layout = self.layout(spec.model)
            if spec.p > layout.num_layers:
                raise ValueError(f"p = {spec.p} exceeds the model's {layout.num_layers} layers")
            self._images[spec.key] = StageImage.build(self.root / spec.model, spec, layout)
        return self._images[spec.key]



async def send_image(request: web.Request, resp: web.StreamResponse, img: StageImage,
                     start: int, end: int, egress: Link) -> None:
    """Send image bytes [start, end) after ``resp``'s headers: the image header from memory,
    every tensor range straight from its checkpoint file with ``sendfile`` (the bytes never
    enter this process), in grants of the egress link."""
    loop = asyncio.get_running_loop()
    files: dict[Path, object] = {}
    try:
        for part in img.spans(start, end):
            if isinstance(part, bytes):
                await egress.acquire(len(part))
                await resp.write(part)
                continue
            path, offset, length = part
            f = files.get(path)
            if f is None:
                f = files[path] = open(path, "rb")  # noqa: SIM115 - closed below
            grant = egress.grant()
            for at in range(offset, offset + length, grant):
                n = min(grant, offset + length - at)
                await egress.acquire(n)
                transport = request.transport
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("the client went away")
                if await loop.sendfile(transport, f, at, n) != n:
                    raise OSError(f"{path} is shorter than its header says")
    finally:
        for f in files.values():
            f.close()


def make_app(store: ModelStore, egress_gbps: float | None = None) -> web.Application:
    egress = Link(egress_gbps)
    app = web.Application()

    def lookup(request: web.Request) -> ImageSpec:
        q = request.query
        try:
            spec = ImageSpec(request.match_info["name"], ImageKind(q.get("kind", "stage")),
                             int(q.get("p", 1)), int(q.get("rank", 0)))
        except ValueError as e:
            raise web.HTTPBadRequest(text=json.dumps({"error": str(e)}),
                                     content_type="application/json") from None
        return spec

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "egress_gbps": egress.gbps})

    async def models(_: web.Request) -> web.Response:
        out = []
        for name in store.names():
            try:
                layout = store.layout(name)
            except CheckpointError as e:
                log.warning("model %s is unreadable: %s", name, e)
                continue
            out.append({"name": name, "bytes": sum(t.nbytes for t in layout.tensors.values()),
                        "layers": layout.num_layers, "tied": layout.tied})
        return web.json_response({"models": out})

    async def layout(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            p = int(request.query.get("p", 1))
            lay = store.layout(name)
            stages = lay.stages(p)
        except KeyError:
            return json_error(404, f"unknown model {name!r}")
        except ValueError as e:
            return json_error(400, str(e))
        return web.json_response({"model": name, "p": p, "stages": [
            {"rank": s.rank, "layers": [s.layer_start, s.layer_end],
             "bytes": store.image(ImageSpec(name, ImageKind.STAGE, p, s.rank)).size}
            for s in stages]})

    async def image(request: web.Request) -> web.StreamResponse:
        spec = lookup(request)
        try:
            img = store.image(spec)
        except KeyError:
            return json_error(404, f"unknown model {spec.model!r}")
        except (ValueError, CheckpointError) as e:
            return json_error(400, str(e))
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        try:
            rng = parse_range(request.headers.get("Range"), img.size)
        except ValueError as e:
            return web.Response(status=416, text=str(e),
                                headers={"Content-Range": f"bytes */{img.size}"})
        start, end = rng or (0, img.size)
        if rng:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{img.size}"
        headers["Content-Length"] = str(end - start)
        resp = web.StreamResponse(status=206 if rng else 200, headers=headers)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        await send_image(request, resp, img, start, end, egress)
        await resp.write_eof()
        return resp

    async def side_file(request: web.Request) -> web.Response:
        name, fname = request.match_info["name"], request.match_info["file"]
        if fname not in SIDE_FILES:
            return json_error(404, f"{fname!r} is not a side file; one of {', '.join(SIDE_FILES)}")
        try:
            store.layout(name)
        except KeyError:
            return json_error(404, f"unknown model {name!r}")
        path = store.root / name / fname
        # a model is a folder (or a link to one) under the root; a side file must be in it:
        # never a link out of the model's folder
        if not path.is_file() or not path.resolve().is_relative_to((store.root / name).resolve()):
            return json_error(404, f"model {name!r} has no {fname}")
        return web.Response(body=path.read_bytes(), content_type="application/octet-stream")

    app.router.add_get("/health", health)
    app.router.add_get("/models", models)
    app.router.add_get("/models/{name}/files/{file}", side_file)
    app.router.add_get("/models/{name}/layout", layout)
    app.router.add_get("/models/{name}/image", image)  # HEAD is routed with GET
    return app
