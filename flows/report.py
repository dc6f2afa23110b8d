"""What a run shows its users: table rows, Markdown with full errors and previews, browsable links (no Prefect here)."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from urllib.parse import quote

from quantvggt.scene import SceneResult
from quantvggt.storage import Storage, is_remote, parse_s3_uri, uri_scheme

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
MAX_EMBEDDED_PREVIEWS = 12  # pictures inline in the summary; every scene's preview is linked from its row anyway


def plain(text: str) -> str:
    """Text without terminal colour codes (Ray and Rich colour their tracebacks)."""
    return _ANSI.sub("", text or "")


def one_line(text: str, limit: int | None = None) -> str:
    """One line of a possibly multi-line error, for terminals: a traceback's last line, else the first line."""
    lines = [line.strip() for line in plain(text).splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1] if any(line.startswith("Traceback (most recent call last)") for line in lines) else lines[0]
    if len(lines) > 1:
        line += f" (+{len(lines) - 1} lines)"
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


def browse_url(uri: str) -> str:
    """A link a browser can open: a file:// URL, the S3-compatible endpoint's object URL, or the AWS console."""
    if not uri:
        return ""
    if uri_scheme(uri) == "s3":
        bucket, key = parse_s3_uri(uri)
        endpoint = os.environ.get("QUANTVGGT_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:  # MinIO, moto: path-style object URLs
            return f"{endpoint.rstrip('/')}/{bucket}/{quote(key)}"
        return f"https://s3.console.aws.amazon.com/s3/buckets/{bucket}?prefix={quote(key)}"
    if is_remote(uri):
        return uri
    return Path(uri).resolve().as_uri()


def scene_rows(results: list[SceneResult]) -> list[dict[str, object]]:
    """One row per scene for a Prefect table artifact: status, counts, seconds, the error in full, where it is."""
    return [
        {
            "scene": r.scene,
            "status": r.status,
            "images": r.images,
            "points": r.points,
            "seconds": round(r.seconds, 1),
            "error": plain(r.error),
            "output": r.output if r.ok else "",  # a failed scene has no result to point at
            "preview": f"{r.output}/preview.png" if r.ok and r.output else "",
            "source": r.source,
            "attempt": r.attempt,
            "worker": r.worker,
        }
        for r in results
    ]


def _cell(text: str) -> str:
    # a Markdown table cell holds one line and no unescaped pipes; the error keeps every line, as <br>
    return plain(text).strip().replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def summary_markdown(
    title: str, results: list[SceneResult], manifest: str, previews: dict[str, bytes] | None = None
) -> str:
    """Counts, the manifest, one row per scene (full error, link to the output) and the scenes' pictures."""
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    lines = [
        f"# {title}",
        "",
        f"**{counts['failed']} failed**, {counts['done']} done, {counts['skipped']} already complete "
        f"of {len(results)} scenes. Manifest: [{manifest}]({browse_url(manifest)})",
        "",
        "| scene | status | images | points | seconds | output | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        link = f"[{_cell(r.output)}]({browse_url(r.output)})" if r.output and r.ok else ""
        lines.append(
            f"| {_cell(r.scene)} | {r.status} | {r.images} | {r.points} | {r.seconds:.1f} | {link} | {_cell(r.error)} |"
        )
    shown = list((previews or {}).items())[:MAX_EMBEDDED_PREVIEWS]
    if shown:
        lines += ["", "## Previews", ""]
        for scene, png in shown:
            data = base64.b64encode(png).decode()
            lines += [f"**{scene}**", "", f"![{scene}](data:image/png;base64,{data})", ""]
    return "\n".join(lines) + "\n"


def read_previews(store: Storage, results: list[SceneResult]) -> dict[str, bytes]:
    """The preview PNGs of the scenes reconstructed in this run (missing ones left out)."""
    out: dict[str, bytes] = {}
    for r in results:
        if r.status == "done" and len(out) < MAX_EMBEDDED_PREVIEWS:
            try:
                out[r.scene] = store.read_bytes(f"{r.scene}/preview.png")
            except (OSError, RuntimeError):  # no picture is not a failure of the scene
                continue
    return out
