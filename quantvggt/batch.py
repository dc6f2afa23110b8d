"""What a batch of scenes writes where: output names, collisions and finished results, decided before any work.

Shared by the reconstruct flows (their discover step) and ``quantvggt submit`` (refuses before queueing).
"""

from __future__ import annotations

from typing import Literal

from quantvggt.scene import SceneResult, Status, collision_error, output_names, scene_name
from quantvggt.storage import Storage, open_storage

Collision = Literal["error", "suffix"]


def name_outputs(
    uris: list[str], out: str, on_collision: Collision = "error", force: bool = False
) -> tuple[list[tuple[str, str]], list[SceneResult]]:
    """(scene URI, output name) pairs to reconstruct, and the results decided without a worker.

    A scene counts as complete (``skipped``) only if its completion record names the same source; two inputs with one
    folder name, or a result of another source under the name, fail the scene (``on_collision="error"``) or send it
    to ``<name>-<hash of its parent>`` (``"suffix"``). ``force`` reconstructs complete scenes again.
    """
    names, decided = _names(uris, on_collision)
    store = open_storage(out)
    todo: list[tuple[str, str]] = []
    for uri, name in names.items():
        if not force and store.is_complete(name, source=uri):
            decided.append(_skipped(store, name, uri))
            continue
        record = None if force else store.completion_record(name)
        if record is not None:  # complete, but for another source with the same folder name
            if on_collision == "error":
                decided.append(
                    _result(store, name, uri, "failed", collision_error(store.uri(name), record.get("source")))
                )
                continue
            name = output_names([record["source"], uri], on_collision="suffix")[uri]
            if store.is_complete(name, source=uri):
                decided.append(_skipped(store, name, uri))
                continue
        todo.append((uri, name))
    return todo, decided


def _result(store: Storage, name: str, uri: str, status: Status, error: str = "") -> SceneResult:
    return SceneResult(
        name, status, error=error, output=store.uri(name), report=store.uri(f"{name}/report.json"), source=uri
    )


def _skipped(store: Storage, name: str, uri: str) -> SceneResult:
    """A 'skipped' result with the counts its completion record kept."""
    result = _result(store, name, uri, "skipped")
    record = store.completion_record(name) or {}
    result.images, result.points = int(record.get("images", 0)), int(record.get("points", 0))
    return result


def _names(uris: list[str], on_collision: Collision) -> tuple[dict[str, str], list[SceneResult]]:
    """Output names (:func:`output_names`); with "error", only the colliding scenes fail, each naming the others."""
    named: dict[str, str] = {}
    failed: list[SceneResult] = []
    nameable = []
    for uri in uris:
        try:
            scene_name(uri)
            nameable.append(uri)
        except ValueError as e:
            failed.append(SceneResult(uri, error=f"ValueError: {e}", source=uri))
    try:
        return output_names(nameable, on_collision=on_collision), failed
    except ValueError as e:  # on_collision="error": fail the colliding scenes, keep the rest
        suffixed = output_names(nameable, on_collision="suffix")
        for uri in nameable:
            if suffixed[uri] == scene_name(uri):
                named[uri] = suffixed[uri]
            else:
                failed.append(SceneResult(scene_name(uri), error=f"ValueError: {e}", source=uri))
        return named, failed
