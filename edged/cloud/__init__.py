"""Cloud: what runs off the device (the `cloud` extra), never installed on a Pi.

The receivers (`edged ingest` and its single-machine front end `edged subscribe`), the fleet
simulator, model releases and the signature tools. Nothing here imports a device-only module
(sources, tpu, fakes), so a cloud install can leave their dependencies out.
"""
