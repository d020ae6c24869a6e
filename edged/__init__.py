"""edged: an edge-ML daemon that turns camera frames and IMU samples into compact MQTT results."""

__version__ = "0.1.0"
