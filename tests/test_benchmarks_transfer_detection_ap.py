"""The benchmark's AP function (benchmarks/transfer_detection.py) on cases checked by hand; numpy only."""

import importlib.util
import math
import os

import numpy as np

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "transfer_detection.py")
_spec = importlib.util.spec_from_file_location("transfer_detection", _PATH)
td = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(td)  # imports numpy only at module level


def test_box_iou():
    iou = td.box_iou([[0, 0, 10, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(iou, [[1.0, 50 / 150, 0.0]])


def test_average_precision_by_hand():
    # Image 0: two trees; image 1: one tree. Four detections, ranked by score:
    #   0.9 image 0 on tree A (IoU 1)          -> TP  P=1/1 R=1/3
    #   0.8 image 0 on tree A again            -> FP  (A already taken) P=1/2
    #   0.7 image 1 on its tree, IoU 50/150    -> FP at 0.5 (IoU 0.33)  P=1/3
    #   0.6 image 0 on tree B (IoU 1)          -> TP  P=2/4 R=2/3
    # Monotone precision: 1 up to recall 1/3, then 0.5 up to 2/3, then 0 (tree of image 1 missed).
    # AP50 = 1/3 * 1 + 1/3 * 0.5 = 0.5.
    gt = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([[0, 0, 10, 10]], float)]
    det = [
        (np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([0.9, 0.8, 0.6])),
        (np.array([[5, 0, 15, 10]], float), np.array([0.7])),
    ]
    assert math.isclose(td.average_precision(det, gt, 0.5), 0.5)
    # At IoU 0.3 the third detection is a TP: P = 1, 1/2, 2/3, 3/4 at recalls 1/3, 1/3, 2/3, 1;
    # monotone: 1 to 1/3, 3/4 from 1/3 to 1 -> AP = 1/3 + 2/3 * 3/4 = 5/6.
    assert math.isclose(td.average_precision(det, gt, 0.3), 5 / 6)
    # Perfect detections: AP 1 at every threshold, so the COCO-style mean is 1 too.
    perfect = [(g, np.linspace(1, 0.5, len(g))) for g in gt]
    assert math.isclose(td.coco_ap(perfect, gt), 1.0)
    # No detections: 0; no ground truth: nan.
    assert td.average_precision([(np.zeros((0, 4)), np.zeros(0))] * 2, gt) == 0.0
    assert math.isnan(td.average_precision(det, [np.zeros((0, 4)), np.zeros((0, 4))]))
