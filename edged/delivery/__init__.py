"""Delivery: results from the stages to the broker without losing one.

`codec` makes compact payloads, `outbox` stores them durably before they are sent, `link` is the
MQTT client that drains the outbox; `homeassistant` and `commands` are the side channels (state,
discovery, requests from the broker, which are untrusted).
"""
