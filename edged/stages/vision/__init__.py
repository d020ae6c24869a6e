"""The vision stage: one detector model turned into `DetectedObject`s for any RGB frame.

`VisionStage` owns the frame → model-input path (letterbox or stretch, nearest or bilinear
resampling through precomputed index maps, normalisation and quantisation through a 256-entry
lookup table, all into buffers reused from frame to frame) and the model-output → objects path.
How outputs become boxes is a small decoder plugin chosen by the manifest's `decoder` key:

- `blazeface`: MediaPipe-style SSD anchors, raw box regression, sigmoid scores, weighted NMS.
- `ssd`: TF Object Detection API box encoding (centre/size with scale factors), sigmoid class
  logits with a background column, per-class NMS; anchors from a `.npy` table beside the model.
- `tflite_detection_postprocess`: models whose graph already ends in the
  TFLite_Detection_PostProcess op (Coral's Edge TPU SSD models): boxes, classes, scores, count.

Decoders return boxes normalised to the model input as [x0, y0, x1, y1]; the stage maps them back
to the original frame (undoing the letterbox) and clips to [0, 1].

Modules: `preprocess` (frame → input tensor), `boxes` (anchors, IoU, NMS), `decoder` (the plugin
interface), one module per decoder family (`blazeface`, `ssd`, `postprocess`), `entry` (manifest
values checked), `stage` (`VisionStage`, the decoder registry).
"""

from __future__ import annotations

from edged.stages.vision.blazeface import BlazeFaceDecoder
from edged.stages.vision.boxes import nms, nms_few, ssd_anchors
from edged.stages.vision.decoder import Decoded, Decoder
from edged.stages.vision.postprocess import PostprocessDecoder
from edged.stages.vision.preprocess import Preprocessor, resize_frame
from edged.stages.vision.ssd import SsdDecoder
from edged.stages.vision.stage import DECODERS, VisionStage

__all__ = [
    "VisionStage", "Preprocessor", "Decoder", "Decoded", "DECODERS", "ssd_anchors", "nms", "nms_few", "resize_frame",
    "BlazeFaceDecoder", "SsdDecoder", "PostprocessDecoder",
]
