"""Keypoints by clicking: each click on a pose's canvas adds ``[x, y, 1]`` to its keypoints.

Imported by the page only (it needs Gradio). This module keeps real annotations (no postponed
ones): Gradio hands the click's position to the parameter annotated ``gr.SelectData``, which
it recognises by the annotation's value.
"""

import json
from collections.abc import Callable
from typing import Any

import gradio as gr

from latentgen.serve.inputs import keypoint_picture

__all__ = ["keypoint_clicker"]


def keypoint_clicker(count: int, side: int) -> Callable[..., tuple[str, Any]]:
    """A ``select`` handler for a ``side`` x ``side`` canvas of a ``count``-keypoint pose.

    It takes the keypoint text and the click, and returns the new text and picture; the click
    after the last keypoint starts a new pose.
    """

    def on_click(text: str | None, evt: gr.SelectData) -> tuple[str, Any]:
        try:
            points = json.loads(text) if text and text.strip() else []
        except json.JSONDecodeError:
            points = []  # the text box held something else: start again from this click
        if not isinstance(points, list) or len(points) >= count:
            points = []
        x, y = evt.index
        points.append([round((x + 0.5) / side, 4), round((y + 0.5) / side, 4), 1])
        return json.dumps(points), keypoint_picture(points, side, count)

    return on_click
