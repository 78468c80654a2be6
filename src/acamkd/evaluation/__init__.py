"""Evaluation: COCO box mAP (faster-coco-eval) for detectors, mIoU for segmenters.

``coco_map(gt_json, results)`` scores a COCO results list; ``evaluate_detections`` does the
same from torchvision detector outputs. ``SegMetric`` accumulates a confusion matrix over
batches (and processes) and reports mIoU / pixel accuracy.
"""
from acamkd.evaluation.coco import STAT_KEYS, coco_map, evaluate_detections, predictions_to_coco_results
from acamkd.evaluation.segmentation import SegMetric

__all__ = ["STAT_KEYS", "coco_map", "evaluate_detections", "predictions_to_coco_results", "SegMetric"]
