"""Service: what makes edged a daemon a machine can run unattended.

`daemon` wires sources, stages and delivery from the config and supervises them, `notify`
speaks systemd's notify protocol and gates the watchdog on progress, `log` writes structured
lines for stdout and journald, `doctor` checks a machine against its config.
"""
