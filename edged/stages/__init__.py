"""Stages: models run in-process on what the sources produce.

`vision/` turns frames into detections, `motion.py` turns IMU windows into motion signatures.
Each stage owns its interpreters and reused buffers and knows nothing about delivery.
"""
