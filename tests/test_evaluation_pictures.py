"""Retrieval grids: one row per query, borders marking neighbours of the query's class or not."""

from __future__ import annotations

import numpy as np

from moco_tf.evaluation import pictures


def test_retrieval_grid_marks_wrong_neighbours():
    queries = np.full((2, 8, 8, 3), 128, np.uint8)
    neighbours = np.zeros((2, 3, 8, 8, 3), np.uint8)
    labels = np.array([[0, 1, 0], [1, 1, 2]])
    grid = pictures.retrieval_grid(
        queries, [0, 1], neighbours, labels, predicted=[0, 1], class_names=["a", "b", "c"], cell=16
    )
    border, text_h, gap = 3, 14, 8
    w, h = 16 + 2 * border, 16 + 2 * border + text_h
    assert grid.shape == (2 * h, 4 * w + gap, 3) and grid.dtype == np.uint8
    corner = lambda r, c: tuple(grid[r * h, (c + 1) * w + gap]) if c >= 0 else tuple(grid[r * h, 0])  # noqa: E731
    assert [corner(0, c) for c in range(3)] == [pictures._RIGHT, pictures._WRONG, pictures._RIGHT]
    assert [corner(1, c) for c in range(3)] == [pictures._RIGHT, pictures._RIGHT, pictures._WRONG]
    assert corner(0, -1) == pictures._QUERY
    assert tuple(grid[border + 4, border + 4]) == (128, 128, 128)  # the query image itself
