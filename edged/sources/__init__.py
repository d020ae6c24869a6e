"""Sources: the hardware edged reads, turned into timestamped arrays in SI units.

`camera/` yields `Frame`s (uint8 HxWx3, capture time), `imu/` yields `ImuBatch`es (m/s², rad/s,
chip time). A source knows its hardware and nothing about models or MQTT.
"""
