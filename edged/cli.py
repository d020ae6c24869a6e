"""The `edged` command line: run the daemon, check a config, and run the models on files.

Errors a user can fix (bad config, missing file, bad model) print one line on stderr and exit
with status 2; nothing here prints a traceback for them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from edged import __version__

if TYPE_CHECKING:  # the CLI imports modules only when a command needs them
    from edged.config import Config

EXIT_USAGE = 2        # bad config or input: restarting cannot help (systemd: RestartPreventExitStatus=2)
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: a device or runtime is not there (yet): systemd retries


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="PATH",
                   help="TOML config file (default: /etc/edged/edged.toml if it exists, "
                        "else the embedded defaults: demo sources, broker on 127.0.0.1:1883)")


def _score(text: str) -> float:
    """--threshold: a score within 0..1, as vision.score_threshold takes it."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number within 0..1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number within 0..1, got {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edged",
        description="Edge-ML daemon: runs TFLite models on camera frames and IMU samples "
                    "in-process and publishes compact results over MQTT.")
    p.add_argument("--version", action="version", version=f"edged {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    r = sub.add_parser("run", help="run the daemon until SIGTERM/Ctrl-C",
                       description="Run the daemon: sources → models → outbox → MQTT.")
    _config_arg(r)

    c = sub.add_parser("check-config", help="validate a config file without starting",
                       description="Validate a config file, and that the models it names are in the manifest "
                                   "`edged run` reads; print one line per problem; exit 2 if any.")
    c.add_argument("path", help="TOML config file")

    cf = sub.add_parser("config", help="print a complete config file: the one in effect, or the defaults",
                        description="Print every config key as a TOML file that check-config accepts: "
                                    "the config in effect (the file, else /etc/edged/edged.toml if it "
                                    "exists, else the defaults), or with --defaults the embedded defaults "
                                    "as they resolve on this machine (device_id from the host name, "
                                    "state_dir, the shipped samples). A starting point for a config.")
    cf.add_argument("--defaults", action="store_true", help="the embedded defaults, ignoring any config file")
    _config_arg(cf)

    d = sub.add_parser("detect", help="find people and faces in image files, one JSON line each",
                       description="Run the vision models on image files and print one JSON line "
                                   'per image: {"image": PATH, "objects": [{label, score, box, stage, '
                                   'parent}]}. Without --model: what the daemon runs, the config\'s '
                                   "[[vision.stages]] or vision.model, else the default chain (people on "
                                   "the frame and its tiles, faces with the full-range model, faces inside "
                                   "each person's crop; see docs/models.md). With --model: that one model "
                                   "on the whole frame.")
    d.add_argument("images", nargs="+", metavar="IMAGE")
    d.add_argument("--model", help="run only this vision model from the manifest (default: the config's "
                                    "stages or vision.model, else the default chain)")
    d.add_argument("--threshold", type=_score, metavar="SCORE",
                   help="minimum score, 0..1; 0 (the default) means each model's own threshold from "
                        "the manifest, as vision.score_threshold = 0 does")
    _config_arg(d)

    sn = sub.add_parser("snapshot", help="save one camera frame as a JPEG with the detections drawn",
                        description="Take one frame from the configured camera (the full-size stream "
                                    "where the camera has one), run the configured vision models on it, "
                                    "draw each object's box, label and score, and write a JPEG: what "
                                    "the daemon sees, without MQTT. Prints the detections as one JSON line. "
                                    "Stop edged run first when it holds the camera.")
    sn.add_argument("--out", "-o", default="snapshot.jpg", metavar="JPEG",
                    help="where to write the JPEG (default: %(default)s)")
    sn.add_argument("--timeout", type=float, default=10.0, metavar="S",
                    help="give up when the camera has no frame within S seconds (default: %(default)s)")
    _config_arg(sn)

    m = sub.add_parser("motion", help="run the motion model on an IMU CSV, one JSON line per window",
                       description="Run the motion stage on a CSV with columns t,ax,ay,az,gx,gy,gz "
                                   "(seconds, m/s², rad/s, as a chip reports them) and print one "
                                   'JSON line per window: {"t", "label", "score", "signature", "sig_v"} '
                                   "(what 'edged signatures build' and 'enroll' read).")
    m.add_argument("csv", metavar="CSV")
    m.add_argument("--model", help="motion model name from the manifest (default: the config's motion.model)")
    m.add_argument("--mounting", choices=("fixed", "free"),
                   help="whether the sensor's tilt means something (default: the config's motion.mounting)")
    m.add_argument("--centroids", metavar="CENTROIDS_JSON",
                   help="label windows by nearest centroid from this file (default: the config's motion.centroids; "
                        "without one, the model's own classes)")
    _config_arg(m)

    s = sub.add_parser("subscribe", help="receive results from devices on one machine (edged ingest on a SQLite file)",
                       description="Run the ingest worker (the same checks, exactly-once key and "
                                   "acknowledgement after commit as 'edged ingest') on a SQLite file, with no "
                                   "database server: print one JSON line per result once it is stored, and on "
                                   "exit report per device what this run stored, its duplicates and the seqs "
                                   "the database does not hold. The file has the tables and views of "
                                   "'edged ingest --db sqlite:///FILE' (docs/cloud.md).")
    s.add_argument("--host", default="127.0.0.1", help="broker host name or address (default: %(default)s)")
    s.add_argument("--port", type=_port, default=1883, help="broker port, 1-65535 (default: %(default)s)")
    s.add_argument("--prefix", default="edged", help="topic prefix (default: edged)")
    s.add_argument("--db", default="edged-results.db", metavar="FILE",
                   help="SQLite file to store results in, made on first use (default: %(default)s)")
    s.add_argument("--client-id", help="a fixed client id: the broker keeps the session and queues results while "
                                       "away (default: a clean session under a new id each run)")
    s.add_argument("--username", help="broker user name")
    s.add_argument("--password", help="broker password")
    s.add_argument("--ca-file", metavar="PATH", help="CA certificate to verify the broker with (turns TLS on)")
    s.add_argument("--cert-file", metavar="PATH", help="client certificate for TLS (turns TLS on)")
    s.add_argument("--key-file", metavar="PATH", help="the client certificate's private key")
    s.add_argument("--count", type=int, default=0, metavar="N",
                   help="stop once N results are stored, exactly N (what arrived beyond them is not "
                        "acknowledged; with --client-id the broker delivers it next time); default: run until Ctrl-C")
    s.add_argument("--seconds", type=float, default=0, help="stop after S seconds")
    s.add_argument("--quiet", "-q", action="store_true", help="print only the summary")

    ig = sub.add_parser(
        "ingest", help="cloud: store every device's results in PostgreSQL exactly once (run several to scale out)",
        description="Receive every device's results through an MQTT 5 shared subscription and store "
                    "each one exactly once in PostgreSQL (tables results, devices, rejected; view gaps). "
                    "Run as many workers as you like with one --group: the broker splits the messages "
                    "between them. A message is acknowledged only after its row is committed. Settings "
                    "come from --config (TOML sections [ingest], [database], [mqtt]; default "
                    "/etc/edged/ingest.toml if it exists); a flag overrides the file. Run once with "
                    "--migrate to create or update the schema. Workers ask devices to send again "
                    "what the gaps view lists (results a broker acknowledged and then lost); --resend "
                    "asks now. See docs/cloud.md.")
    ig.add_argument("--config", "-c", metavar="PATH",
                    help="TOML config (default: /etc/edged/ingest.toml if it exists, else the defaults)")
    ig.add_argument("--migrate", action="store_true",
                    help="create or update the database schema (idempotent), make the current "
                         "partitions, drop those past the retention, and exit")
    ig.add_argument("--resend", action="store_true",
                    help="ask devices now to send again the results the gaps view lists (within "
                         "ingest.resend_window_s, less what they said they no longer hold; back-off "
                         "and attempt cap ignored), print what was asked, and exit; the running "
                         "workers store what comes and record the replies")
    ig.add_argument("--device", metavar="ID", help="with --resend: only this device")
    ig.add_argument("--db", metavar="URL", help="PostgreSQL URL (default: postgresql:///edged), or "
                                                "sqlite:///FILE for one machine without a database server")
    ig.add_argument("--host", help="broker host (default: 127.0.0.1)")
    ig.add_argument("--port", type=int, help="broker port (default: 1883)")
    ig.add_argument("--prefix", help="topic prefix the devices use (default: edged)")
    ig.add_argument("--username")
    ig.add_argument("--password")
    ig.add_argument("--ca-file", help="CA to verify the broker's certificate (turns TLS on)")
    ig.add_argument("--cert-file", help="client certificate for mutual TLS (with --key-file)")
    ig.add_argument("--key-file")
    ig.add_argument("--group", help="shared-subscription group: workers of one group split the load "
                                    "(default: edged-ingest)")
    ig.add_argument("--client-id", help="this worker's MQTT client id: stable across its restarts, unique "
                                        "in the group (default: edged-ingest-<hostname>)")
    ig.add_argument("--batch-size", type=int, help="most messages per transaction (default: 500)")
    ig.add_argument("--batch-delay", type=float, metavar="SECONDS",
                    help="longest wait to fill a batch (default: 0.1)")
    ig.add_argument("--max-inflight", type=int,
                    help="most unacknowledged messages the broker may send this worker (default: 2000)")
    ig.add_argument("--retention-days", type=int, help="drop results older than this; 0 keeps all (default: 30)")
    ig.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    fs = sub.add_parser("fleet-sim", help="cloud: simulate many devices publishing results, to load or fault-test a receiver",
                        description="Run N simulated devices in one process, each its own MQTT 5 connection, "
                                    "device id and seq, publishing status, motion, detections and stats as "
                                    "edged run does (payloads from its codec) and re-sending whatever the broker "
                                    "has not acknowledged after a restart or a dropped connection. Prints one "
                                    "summary line; exit 1 if not everything was acknowledged in the end.")
    fs.add_argument("--host", default="127.0.0.1")
    fs.add_argument("--port", type=int, default=1883)
    fs.add_argument("--prefix", default="edged", help="topic prefix (default: edged)")
    fs.add_argument("--devices", "-n", type=int, default=10, help="how many devices (default: 10)")
    fs.add_argument("--id-prefix", default="sim", help="device ids are <id-prefix>-0000, … (default: sim)")
    fs.add_argument("--seconds", type=float, default=10, help="how long to publish; 0 = until Ctrl-C (default: 10)")
    fs.add_argument("--motion-hz", type=float, default=1.0, help="motion windows per second per device (default: 1)")
    fs.add_argument("--detection-every", type=float, default=5.0, metavar="SECONDS",
                    help="one detection every this many seconds per device; 0 = none (default: 5)")
    fs.add_argument("--stats-every", type=float, default=60.0, metavar="SECONDS", help="stats interval (default: 60)")
    fs.add_argument("--codec", choices=("json", "cbor", "mixed"), default="mixed",
                    help="payload codec; mixed alternates by device (default: mixed)")
    fs.add_argument("--restart-every", type=float, default=0, metavar="SECONDS",
                    help="restart a random device this often (seq continues); 0 = never")
    fs.add_argument("--drop-every", type=float, default=0, metavar="SECONDS",
                    help="drop a random device's connection this often; 0 = never")
    fs.add_argument("--seed", type=int, default=0)

    sg = sub.add_parser("signatures", help="cloud side: build motion centroids, enroll a new motion, classify; "
                                           "postures from pose signatures",
                        description="Work with motion signatures as a cloud subscriber would (and, with "
                                    "'posture', with the vision pose stage's keypoint signatures). "
                                    "Input files are JSON lines with a 'signature' (int8 list), for build "
                                    "and enroll a 'label', and optionally 'sig_v' (the signature version): "
                                    "motion payloads as they arrive over MQTT, or 'edged motion' output.")
    sgs = sg.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = sgs.add_parser("build", help="centroids (and 'unknown' thresholds) from labelled signatures",
                       description="Make a centroid file from labelled signatures: a JSON-lines file, or "
                                   "with --db the motion windows a database of 'edged ingest' or 'edged "
                                   "subscribe' holds, each labelled as its device labelled it (windows "
                                   "labelled 'unknown' are left out).")
    b.add_argument("signatures", metavar="SIGNATURES_JSONL", nargs="?", help="the labelled signatures (or use --db)")
    b.add_argument("--out", "-o", required=True, metavar="CENTROIDS_JSON")
    b.add_argument("--label-key", default="label", help="field holding the true label (default: label)")
    b.add_argument("--quantile", type=_score, default=0.99, metavar="Q",
                   help="a motion's 'unknown' threshold is this quantile of its examples' distances "
                        "to its centroid ... (default: %(default)s)")
    b.add_argument("--margin", type=float, default=1.25, metavar="M",
                   help="... times this margin; raise it to flag fewer signatures 'unknown' (default: %(default)s)")
    _db_args(b, "build from", required_device=False, limit=100000)
    en = sgs.add_parser("enroll", help="add a motion to a centroid file from a handful of its signatures",
                        description="Add one motion to a centroid file from a few labelled signatures (five "
                                    "windows are enough): its centroid is their mean, its 'unknown' threshold "
                                    "the larger of their own spread and the file's median threshold. A device "
                                    "given the result as motion.centroids labels the new motion itself.")
    en.add_argument("signatures", metavar="SIGNATURES_JSONL", nargs="?",
                    help="the labelled signatures (or use --db)")
    _db_args(en, "enroll", required_device=True, limit=1000)
    en.add_argument("--centroids", "-c", required=True, metavar="CENTROIDS_JSON",
                    help="the file to add to (the shipped model's: models/motion.centroids.json)")
    en.add_argument("--out", "-o", metavar="CENTROIDS_JSON", help="where to write the result (default: --centroids)")
    en.add_argument("--label", help="the new motion's name (default: the one label every line carries)")
    en.add_argument("--label-key", default="label", help="field holding the label (default: label)")
    en.add_argument("--replace", action="store_true", help="rebuild a motion the file already has")
    cl = sgs.add_parser("classify", help="nearest centroid per signature, or 'unknown'",
                        description="Match signatures against a centroid file, one JSON line each: "
                                    "{label, nearest, distance}; with --db, each stored motion window, "
                                    "with its device_id, seq, ts and the label its device gave it "
                                    "(device_label).")
    cl.add_argument("signatures", metavar="SIGNATURES_JSONL", nargs="?", help="the signatures (or use --db)")
    cl.add_argument("--centroids", "-c", required=True, metavar="CENTROIDS_JSON",
                    help="from 'edged signatures build' (the shipped model's: models/motion.centroids.json)")
    _db_args(cl, "classify", required_device=False, limit=100000)

    po = sgs.add_parser("posture", help="standing / sitting / lying from pose signatures, no image needed",
                        description="The posture of each pose signature (the 'pose' stage's 17 keypoints on a "
                                    "person crop) by its geometry: the torso's angle from the vertical (lying "
                                    "from 55 degrees), then the thighs' (sitting from 50 degrees forward), "
                                    "'upright' when no knee is in view, 'unknown' without shoulders and hips. "
                                    "Input lines: pose objects, detections payloads or 'edged detect' lines; "
                                    "one JSON line out per pose. 'fallen' is not told from one signature: "
                                    "the device's track events carry it (posture), from how the track "
                                    "came to lie. docs/models.md has the rules and their confusion matrix.")
    po.add_argument("signatures", metavar="POSES_JSONL",
                    help="a JSON-lines file: pose objects, detections payloads or 'edged detect' lines")
    po.add_argument("--frame-aspect", type=float, default=0.75, metavar="H/W",
                    help="the frames' height / width, which with each pose's box gives its crop's shape "
                         "(default: %(default)s, the camera's default 640x480)")

    sm = sub.add_parser("samples", help="cloud side: list, label and export the samples devices sent",
                        description="The samples 'edged ingest' stored (raw IMU windows and frame crops the "
                                    "devices' models could not place, [sampling] on a device): list them, "
                                    "give one a label, or export them as files to look at. Labelled IMU "
                                    "windows train the motion model: scripts/train_motion.py --samples URL.")
    sms = sm.add_subparsers(dest="action", metavar="ACTION", required=True)
    sl = sms.add_parser("list", help="one JSON line per sample (without its data)")
    sl.add_argument("--unlabelled", action="store_true", help="only samples without a label")
    sl.add_argument("--kind", choices=("imu", "crop"), help="only this kind")
    sl.add_argument("--limit", type=int, default=1000, help="at most this many, oldest first (default: %(default)s)")
    sb = sms.add_parser("label", help="give a sample its label (or --clear it)")
    sb.add_argument("device", metavar="DEVICE_ID")
    sb.add_argument("id", type=int, metavar="SAMPLE_ID")
    sb.add_argument("label", nargs="?", metavar="LABEL", help="lowercase, e.g. stairs")
    sb.add_argument("--clear", action="store_true", help="remove the label instead")
    se = sms.add_parser("export", help="write each sample as a file: IMU windows as IMU CSV, crops as JPEG")
    se.add_argument("--out", "-o", required=True, metavar="DIR")
    se.add_argument("--all", action="store_true", help="labelled ones too (default: only unlabelled)")
    for action in (sl, sb, se):
        action.add_argument("--db", required=True, metavar="URL",
                       help="the database 'edged ingest' fills: postgresql://... or sqlite:///FILE")

    _release_parser(sub)

    mo = sub.add_parser("models", help="list or verify the shipped models",
                        description="List the models in the manifest, or verify their files' sha256.")
    mo.add_argument("action", choices=("list", "verify"))
    _config_arg(mo)

    dr = sub.add_parser("doctor", help="check this machine against the config: hardware, groups, broker",
                        description="Check what the config needs on this machine (Python and runtime, "
                                    "models, camera, I2C bus and IMU chip, Edge TPU, groups, broker, "
                                    "outbox space) and print one line per check with the fix for each "
                                    "failure. Exit status 1 when something the config needs is missing.")
    dr.add_argument("--json", action="store_true", help="print the checks as JSON")
    dr.add_argument("--unit", metavar="PATH",
                    help="the systemd unit whose state and runtime directories to check, as the "
                         "service gets them (default: /etc/systemd/system/edged.service when it "
                         "exists; 'none': this user's own directories)")
    _config_arg(dr)

    rl = sub.add_parser("reload", help="make the running daemon reload its config; wait for the outcome",
                        description="Send the daemon SIGHUP and wait until it has reloaded. Exit status 0 "
                                    "when the new config and models are in service, 1 when the daemon "
                                    "refused them (it keeps running the old ones) or gave no answer. The "
                                    "unit's ExecReload= runs this, so `systemctl reload edged` waits for "
                                    "the daemon and fails when the reload was refused. The daemon records "
                                    "each outcome in $RUNTIME_DIRECTORY/reload.json (the unit's "
                                    "RuntimeDirectory=); without that variable there is nothing to wait on.")
    rl.add_argument("--pid", type=int, metavar="PID",
                    help="the daemon's process ID (default: $MAINPID, which systemd sets for ExecReload=)")
    rl.add_argument("--timeout", type=float, default=100.0, metavar="SECONDS",
                    help="give up after this long (default: 100; the unit's TimeoutStartSec= "
                         "bounds a reload at 120)")
    return p


def _release_parser(sub) -> None:
    from edged.rollout import ARTEFACT_KINDS

    rl = sub.add_parser("release", help="cloud side: signed model releases for the fleet (a TUF repository)",
                        description="Build and change the repository devices update their models from "
                                    "(The Update Framework; docs/updates.md). Needs the cloud extra: "
                                    "pip install 'edged[cloud]'. Serve REPO/public with any web server.")
    rls = rl.add_subparsers(dest="action", metavar="ACTION", required=True)
    i = rls.add_parser("init", help="new keys and root metadata: a repository devices can pin",
                       description="Create REPO with four ed25519 keys (root, targets, snapshot, timestamp), "
                                   "root metadata, and REPO/root.json to pin on devices.")
    i.add_argument("repo", metavar="REPO")
    i.add_argument("--root-key", metavar="PATH",
                   help="where to write the root key (default: REPO/offline/root.pem; move it offline)")
    a = rls.add_parser("add", help="release a model with its manifest entry and golden self-test vectors",
                       description="Add MODEL (a .tflite listed in the manifest of its directory) as release "
                                   "NAME/VERSION: the model, its _edgetpu variant, the files its entry names, "
                                   "the entry itself and golden self-test vectors measured on real inputs.")
    a.add_argument("repo", metavar="REPO")
    a.add_argument("model", metavar="MODEL")
    a.add_argument("--name", help="release name, as devices' vision.model / motion.model (default: the manifest's)")
    a.add_argument("--version", type=int, required=True, help="release version, a positive integer, new for NAME")
    a.add_argument("--edgetpu", metavar="FILE", help="the Edge TPU variant (default: the entry's edgetpu_file)")
    a.add_argument("--golden", metavar="NPZ", help="self-test vectors measured elsewhere (default: measure now)")
    a.add_argument("--inputs", nargs="+", metavar="FILE",
                   help="images (vision) or an IMU CSV (motion) to measure vectors on (default: the shipped samples)")
    a.add_argument("--tolerance", type=float, help="allowed self-test difference, as a share of each output's range "
                                                   "(default: 0.05)")
    a.add_argument("--min-edged", metavar="VERSION", help="oldest edged that may install it (default: this one)")
    ar = rls.add_parser("artefact", help="release a model's centroids or label map on its own, without a new model",
                        description="Add FILE as artefact release NAME/KIND/VERSION: motion centroids (from "
                                    "edged signatures build / enroll; NAME defaults to the model the file names) "
                                    "or a label map (one label per line, as many as the model's classes). "
                                    "Devices running model NAME install it once rolled out (--kind on rollout), "
                                    "if it fits the model they run.")
    ar.add_argument("repo", metavar="REPO")
    ar.add_argument("file", metavar="FILE")
    ar.add_argument("--kind", required=True, choices=ARTEFACT_KINDS)
    ar.add_argument("--name", help="the model it is for (default, for centroids: the file's model)")
    ar.add_argument("--version", type=int, required=True, help="a positive integer, new for NAME and KIND")
    ar.add_argument("--min-edged", metavar="VERSION", help="oldest edged that may install it (default: this one)")
    kinds = ("model",) + ARTEFACT_KINDS
    ro = rls.add_parser("rollout", help="offer a release to PERCENT of a channel's devices",
                        description="Set the share of devices (by a stable hash of their id) that run "
                                    "NAME/VERSION (of the model, or with --kind of its artefact) on a channel; "
                                    "raising it only adds devices.")
    ro.add_argument("repo", metavar="REPO")
    ro.add_argument("--name", required=True)
    ro.add_argument("--version", type=int, required=True)
    ro.add_argument("--percent", type=float, required=True)
    ro.add_argument("--channel", default="stable", help="(default: %(default)s)")
    ro.add_argument("--kind", default="model", choices=kinds, help="what is rolled out (default: %(default)s)")
    rv = rls.add_parser("revoke", help="withdraw a release: devices running it leave it",
                        description="Withdraw NAME/VERSION from a channel (default: every channel); devices "
                                    "go back to the highest version still offered, else the shipped model "
                                    "(for an artefact: the highest still offered, else none).")
    rv.add_argument("repo", metavar="REPO")
    rv.add_argument("--name", required=True)
    rv.add_argument("--version", type=int, required=True)
    rv.add_argument("--channel")
    rv.add_argument("--kind", default="model", choices=kinds, help="what is withdrawn (default: %(default)s)")
    st = rls.add_parser("status", help="releases, channels, expiry, and with --broker what devices run",
                        description="Print the repository's releases, channels and metadata expiry; with "
                                    "--broker, also every device's retained models report.")
    st.add_argument("repo", metavar="REPO")
    st.add_argument("--json", action="store_true")
    st.add_argument("--broker", metavar="HOST", help="MQTT broker to read the devices' models reports from")
    st.add_argument("--db", metavar="URL", help="the PostgreSQL database edged ingest fills: what each device "
                                                "last reported running in its stats")
    st.add_argument("--port", type=int, default=1883)
    st.add_argument("--prefix", default="edged", help="topic prefix (default: %(default)s)")
    st.add_argument("--seconds", type=float, default=2.0, help="how long to collect reports (default: %(default)s)")
    rt = rls.add_parser("rotate", help="new keys: a new root version signed by the old and the new root key",
                        description="Replace the online keys (targets, snapshot, timestamp) and, unless "
                                    "--keep-root, the root key: root metadata version N+1 names the new keys "
                                    "and is signed by the current root key and the new one; every role is "
                                    "re-signed. Devices follow from the root they pinned; REPO/root.json is "
                                    "the pin for devices provisioned afterwards.")
    rt.add_argument("repo", metavar="REPO")
    rt.add_argument("--root-key", metavar="PATH", help="the current root key (default: REPO/offline/root.pem)")
    rt.add_argument("--new-root-key", metavar="PATH",
                    help="where to write the new root key (default: root-N.pem beside the current one)")
    rt.add_argument("--keep-root", action="store_true", help="rotate only the online keys; root keeps its key")
    rf = rls.add_parser("refresh", help="sign a new timestamp (run hourly from cron)",
                        description="Sign a new timestamp (and snapshot when past half its life): devices "
                                    "stop trusting a repository whose timestamp is older than a day.")
    rf.add_argument("repo", metavar="REPO")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C anywhere, even while the heavy modules are imported
        return 130


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from edged.sources.camera import CameraError
    from edged.config import ConfigError
    from edged.sources.imu import ImuError
    from edged.sources.imu.imucsv import ImuCsvError
    from edged.models import ModelError
    from edged.delivery.outbox import OutboxError
    from edged.delivery.samples import SampleQueueError
    from edged.cloud.signatures import SignatureError
    from edged.runtime import RuntimeUnavailable

    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"edged: {line}", file=sys.stderr)
        return EXIT_USAGE
    except (ModelError, ImuCsvError, SignatureError) as exc:  # a file the user gave or installed is wrong
        print(f"edged: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeUnavailable, CameraError, ImuError, OutboxError, SampleQueueError) as exc:  # may be fine on the next start
        print(f"edged: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def _config_path(args) -> Path | None:
    from edged import config

    if args.config is None and config.DEFAULT_PATH.is_file():
        return config.DEFAULT_PATH
    return Path(args.config) if args.config else None


def _load_config(args) -> Config:
    from edged import config

    return config.load(_config_path(args))


def _stopped_while_starting(signum, frame) -> None:
    raise SystemExit(0)


def cmd_run(args) -> int:
    import signal

    # A stop (SIGTERM) before the daemon has installed its own handlers (it does as soon as the
    # config is read) ends the start-up with status 0, as a stop at any later point does.
    signal.signal(signal.SIGTERM, _stopped_while_starting)
    from edged import config
    from edged.service import log
    from edged.service.daemon import Daemon

    path = _config_path(args)
    cfg = config.load(path)
    log.setup(cfg.log_level, device_id=cfg.device_id)
    daemon = Daemon(cfg, path)
    daemon.open()
    return daemon.run()


def cmd_check_config(args) -> int:
    from edged import config
    from edged.models import ModelError, default_models_dir, load_manifest, select

    cfg = config.load(args.path)
    # `edged run` opens every model the config names from the manifest, and refuses to start on
    # one it lacks or of the wrong kind: a problem here too (a name's sha256 is `edged doctor`'s).
    uses = cfg.model_uses()
    if uses:
        manifest = load_manifest(Path(cfg.models_dir) if cfg.models_dir else default_models_dir())
        lines, problems = config.key_lines(args.path), []
        for name, task, key in uses:
            try:
                select(manifest, name, task, key)
            except ModelError as exc:
                at = f"{args.path}:{lines[key]}" if key in lines else str(args.path)
                problems.append(f"{at}: {exc}")
        if problems:
            raise config.ConfigError(list(dict.fromkeys(problems)))
    print(f"{args.path}: ok (device_id={cfg.device_id}, broker={cfg.mqtt.host}:{cfg.mqtt.port})")
    return 0


def cmd_config(args) -> int:
    from edged import config

    cfg = config.Config() if args.defaults else _load_config(args)
    where = "the embedded defaults on this machine" if args.defaults else cfg.source_path
    print(f"# edged {__version__}: every key, from {where}. Check a copy with: edged check-config FILE")
    print(config.to_toml(cfg), end="")
    return 0


def _stage_model(args, task: str):
    """The model `--model` names, else the one the config (or its defaults) runs for `task`."""
    from edged.models import default_models_dir, load_manifest, open_model, select

    cfg = _load_config(args)
    models_dir = Path(cfg.models_dir) if cfg.models_dir else default_models_dir()
    name = args.model or (cfg.vision.model if task == "vision" else cfg.motion.model)
    entry = select(load_manifest(models_dir), name, task, "--model" if args.model else f"{task}.model")
    return entry, open_model(entry)


def _object_json(o) -> dict:
    out = {"label": o.label, "score": round(o.score, 3), "box": [round(x, 4) for x in o.box]}
    if o.stage:
        out["stage"] = o.stage
    if o.parent >= 0:
        out["parent"] = o.parent
    return out


def _vision_chain(cfg, threshold: float = 0.0, open_entry=None):
    """The vision graph the config runs (its `[[vision.stages]]`, or the default chain), or None
    when it runs `vision.model` alone. `threshold` (0: each model's own) replaces every stage's."""
    from dataclasses import replace

    from edged.models import default_models_dir, load_manifest
    from edged.stages.vision.graph import open_graph

    specs = cfg.vision.chain()
    if not specs:
        return None
    if threshold:
        specs = [replace(s, score_threshold=threshold) for s in specs]
    models_dir = Path(cfg.models_dir) if cfg.models_dir else default_models_dir()
    return open_graph(specs, load_manifest(models_dir), threads=cfg.vision.threads or None, open_entry=open_entry)


def cmd_detect(args) -> int:
    from edged.sources.camera import CameraError, decode_image
    from edged.stages.vision import VisionStage

    stage = None if args.model else _vision_chain(_load_config(args), args.threshold or 0.0)
    if stage is None:
        entry, model = _stage_model(args, "vision")
        stage = VisionStage(model, entry, score_threshold=args.threshold or None)
    max_pixels = _load_config(args).camera.max_pixels
    failed = 0
    for path in args.images:
        try:
            image = decode_image(Path(path), max_pixels=max_pixels)
        except CameraError as exc:
            print(f"edged: {exc}", file=sys.stderr)
            failed += 1
            continue
        objects = stage.detect(image)
        print(json.dumps({"image": path, "objects": [_object_json(o) for o in objects]}), flush=True)
    return EXIT_USAGE if failed else 0


def cmd_snapshot(args) -> int:
    import time

    from edged.hardware import for_config
    from edged.models import default_models_dir, load_manifest, select
    from edged.delivery.commands import draw_objects
    from edged.sources.camera import CameraError, open_camera
    from edged.stages.vision import VisionStage
    from edged.tpu import open_for_backend

    cfg = _load_config(args)
    if not cfg.camera.enabled:
        print("edged: camera.enabled = false: no camera to take a snapshot from", file=sys.stderr)
        return EXIT_USAGE
    acc = cfg.accelerator
    stage = _vision_chain(cfg, open_entry=lambda entry: open_for_backend(
        entry, acc.device, acc.fallback, retry_s=acc.retry_s, threads=cfg.vision.threads or None))
    if stage is None:
        manifest = load_manifest(Path(cfg.models_dir) if cfg.models_dir else default_models_dir())
        entry = select(manifest, cfg.vision.model, "vision", "vision.model")
        model = open_for_backend(entry, acc.device, acc.fallback, retry_s=acc.retry_s,
                                 threads=cfg.vision.threads or None)
        stage = VisionStage(model, entry, score_threshold=cfg.vision.score_threshold or None)
        pre = stage.preprocess
        cam = open_camera(cfg.camera, model_size=(pre.width, pre.height), letterbox=pre.letterbox,
                          snapshots=True, hardware=for_config(cfg))
    else:  # a chain's tiles and crops need the full frame
        cam = open_camera(cfg.camera, snapshots=True, hardware=for_config(cfg))
    try:
        end = time.monotonic() + args.timeout
        frame = None
        while frame is None and time.monotonic() < end:
            frame = cam.read()
        if frame is None:
            raise CameraError(f"{cam.name}: no frame within {args.timeout:g} s")
        full = cam.snapshot() if hasattr(cam, "snapshot") else None
        image = full if full is not None else frame.image.copy()
    finally:
        cam.close()
    objects = stage.detect(image)
    Path(args.out).write_bytes(draw_objects(image, objects))
    print(json.dumps({"image": args.out, "camera": cam.name, "size": [image.shape[1], image.shape[0]],
                      "objects": [{"label": o.label, "score": round(o.score, 3),
                                   "box": [round(x, 4) for x in o.box]} for o in objects]}), flush=True)
    return 0


def cmd_motion(args) -> int:
    from edged.sources.imu.imucsv import read_imu_csv
    from edged.stages.motion import MotionStage, load_stage_centroids, recording_problem

    cfg = _load_config(args)
    entry, model = _stage_model(args, "motion")
    centroids = args.centroids if args.centroids is not None else cfg.motion.centroids
    stage = MotionStage(model, entry, mounting=args.mounting or cfg.motion.mounting,
                        centroids=load_stage_centroids(centroids, entry))
    batch = read_imu_csv(Path(args.csv))
    problem = recording_problem(batch.t, stage.spec)
    if problem:
        print(f"edged: {args.csv}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        signatures = stage.push(batch)
    except ValueError as exc:  # e.g. a stretch of the recording slower than the model's rate
        print(f"edged: {args.csv}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for sig in signatures:
        print(json.dumps({"t": round(sig.ts, 3), "label": sig.label, "score": round(sig.score, 3),
                          "signature": list(sig.signature), "sig_v": sig.signature_v}), flush=True)
    if not signatures:
        print(f"edged: {args.csv}: no complete window (breaks in the timestamps longer than "
              f"{stage.spec.max_gap_s:.2f} s split it into pieces shorter than one window)", file=sys.stderr)
        return EXIT_USAGE
    return 0


def cmd_models(args) -> int:
    from edged.models import ModelError, default_models_dir, load_manifest, verify

    cfg = _load_config(args) if args.config else None
    models_dir = Path(cfg.models_dir) if cfg and cfg.models_dir else default_models_dir()
    manifest = load_manifest(models_dir)
    bad = 0
    for e in manifest.values():
        if args.action == "list":
            print(f"{e.name:10} {e.task:7} {e.path.name:40} {e.size:>9}  {e.license:12} labels={','.join(e.labels[:6])}")
            continue
        try:
            verify(e)
            print(f"{e.name}: ok ({e.path.name}, sha256 {e.sha256[:12]}…)")
        except ModelError as exc:
            print(f"{e.name}: FAILED: {exc}")
            bad += 1
    return 1 if bad else 0


def _db_args(p, what: str, *, required_device: bool, limit: int) -> None:
    """--db and the flags that choose which stored motion windows a signatures command reads."""
    p.add_argument("--db", metavar="URL",
                   help=f"{what} the motion windows stored by 'edged ingest' or 'edged subscribe' instead: a "
                        "PostgreSQL URL or sqlite:///FILE" + (" (needs --device and --label)" if required_device else ""))
    p.add_argument("--device", help="with --db: the device whose windows to read"
                   + ("" if required_device else " (default: every device)"))
    p.add_argument("--since", type=_when, default=0.0, metavar="TIME",
                   help="with --db: first window end, UNIX seconds or ISO 8601 (default: any)")
    p.add_argument("--until", type=_when, default=1e12, metavar="TIME",
                   help="with --db: last window end, UNIX seconds or ISO 8601 (default: any)")
    p.add_argument("--limit", type=int, default=limit,
                   help="with --db: at most this many windows, oldest first (default: %(default)s)")


def _when(text: str) -> float:
    """A time on the command line: UNIX seconds, or ISO 8601 (UTC unless it says otherwise)."""
    import argparse
    from datetime import datetime, timezone

    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected UNIX seconds or an ISO 8601 time, got {text!r}") from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def cmd_signatures(args) -> int:
    from edged.cloud import signatures

    if args.action == "posture":
        from edged.cloud import posture

        if not 0.05 <= args.frame_aspect <= 20:
            print(f"edged: --frame-aspect: expected 0.05 to 20, got {args.frame_aspect:g}", file=sys.stderr)
            return EXIT_USAGE
        try:
            for n, record, found in posture.classify_file(args.signatures, args.frame_aspect):
                where = {k: record[k] for k in ("image", "device_id", "seq", "ts") if k in record}
                for p in found:
                    print(json.dumps({**where, "line": n, **p}), flush=True)
        except posture.PostureError as exc:
            print(f"edged: signatures posture: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as exc:
            print(f"edged: signatures posture: {args.signatures}: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE
        return 0
    if (args.db is None) == (args.signatures is None):
        print(f"edged: signatures {args.action}: give a SIGNATURES_JSONL file or --db (one of them)", file=sys.stderr)
        return EXIT_USAGE
    db = {"since": args.since, "until": args.until, "limit": args.limit} if args.db else {}
    if args.action == "build":
        if args.margin <= 0:
            print(f"edged: --margin: expected a number above 0, got {args.margin:g}", file=sys.stderr)
            return EXIT_USAGE
        if args.db:
            cents = signatures.build_from_db(args.db, args.out, device_id=args.device, quantile=args.quantile,
                                             margin=args.margin, **db)
        else:
            cents = signatures.build(args.signatures, args.out, label_key=args.label_key,
                                     quantile=args.quantile, margin=args.margin)
        print(f"{args.out}: {len(cents.labels)} centroids ({', '.join(cents.labels)})", file=sys.stderr)
        return 0
    if args.action == "enroll":
        out = args.out or args.centroids
        if args.db is not None:
            if not args.device or not args.label:
                print("edged: signatures enroll --db: --device and --label are needed", file=sys.stderr)
                return EXIT_USAGE
            cents = signatures.enroll_from_db(args.centroids, args.db, args.device, out, label=args.label,
                                              replace=args.replace, **db)
        else:
            cents = signatures.enroll(args.centroids, args.signatures, out, label=args.label,
                                      label_key=args.label_key, replace=args.replace)
        print(f"{out}: {cents.labels[-1]} enrolled from {cents.counts[-1]} signatures "
              f"(threshold {cents.thresholds[-1]:.1f}); {len(cents.labels)} motions", file=sys.stderr)
        return 0
    if args.db:
        w, matches = signatures.classify_from_db(args.centroids, args.db, device_id=args.device, **db)
        for i, m in enumerate(matches):
            print(json.dumps({"device_id": w.devices[i], "seq": w.seqs[i], "ts": w.ts[i], "device_label": w.labels[i],
                              "label": m.label, "nearest": m.nearest, "distance": round(m.distance, 2)}), flush=True)
        return 0
    for m in signatures.classify_path(args.centroids, args.signatures):
        print(json.dumps({"label": m.label, "nearest": m.nearest, "distance": round(m.distance, 2)}), flush=True)
    return 0


def cmd_samples(args) -> int:
    import json

    from edged.cloud import samples

    try:
        if args.action == "list":
            for row in samples.listing(args.db, unlabelled=args.unlabelled, kind=args.kind, limit=args.limit):
                print(json.dumps(row), flush=True)
        elif args.action == "label":
            if bool(args.label) == args.clear:
                print("edged: samples label: give a LABEL or --clear (one of them)", file=sys.stderr)
                return EXIT_USAGE
            samples.set_label(args.db, args.device, args.id, None if args.clear else args.label)
        else:
            paths = samples.export(args.db, args.out, unlabelled=not args.all)
            print(f"edged: {len(paths)} samples written to {args.out}", file=sys.stderr)
    except samples.SamplesError as exc:
        print(f"edged: samples {args.action}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def cmd_subscribe(args) -> int:
    from edged.cloud.subscriber import run_cli

    return run_cli(args)


def cmd_fleet_sim(args) -> int:
    from edged.cloud.fleet import run_cli

    return run_cli(args)


def cmd_ingest(args) -> int:
    from edged.cloud.ingest import run_cli

    return run_cli(args)


def cmd_doctor(args) -> int:
    from edged import config
    from edged.service import doctor, unitfile

    unit = None if args.unit == "none" else unitfile.installed(args.unit)
    if args.unit not in (None, "none") and unit is None:
        print(f"edged: --unit {args.unit}: cannot read it", file=sys.stderr)
        return EXIT_USAGE
    if unit is not None:
        unitfile.apply(unit)  # $STATE_DIRECTORY etc., as systemd sets them for the service
    path = _config_path(args)
    cfg, problems = None, None
    try:
        cfg = config.load(path)
    except config.ConfigError as exc:
        problems = exc.problems
    name = str(path) if path else "<defaults>"
    checks = doctor.run(cfg, config_path=name, problems=problems, unit=unit)
    print(doctor.to_json(checks, name) if args.json else doctor.render(checks, name))
    return doctor.exit_status(checks)


def cmd_reload(args) -> int:
    import os

    from edged.service.reload import ReloadError, request_reload, runtime_dir

    pid = args.pid or int(os.environ.get("MAINPID") or 0)
    if pid <= 0:
        print("edged: reload: no daemon to reload: give --pid (systemd passes $MAINPID)", file=sys.stderr)
        return EXIT_USAGE
    directory = runtime_dir()
    if directory is None:
        print("edged: reload: RUNTIME_DIRECTORY is not set, so there is no reload outcome to wait "
              "for; this is the unit's ExecReload= (use: sudo systemctl reload edged)", file=sys.stderr)
        return EXIT_USAGE
    try:
        request_reload(pid, directory, timeout=args.timeout)
    except ReloadError as exc:
        print(f"edged: reload: {exc}", file=sys.stderr)
        return 1
    print("edged: reloaded: the new configuration is in service")
    return 0


def cmd_release(args) -> int:
    try:
        from edged.cloud import releases
    except ImportError as exc:
        print(f"edged: release needs the cloud extra ({exc.name} is missing): pip install 'edged[cloud]'",
              file=sys.stderr)
        return EXIT_USAGE
    from edged.selftest import DEFAULT_TOLERANCE, Golden, SelfTestError

    try:
        golden = None
        if args.action == "add":
            if args.golden:
                golden = Golden.load(Path(args.golden))
                if args.tolerance is not None:
                    golden.tolerance = args.tolerance
            else:  # measured here: the vectors come from the device's own preprocessing
                from edged.stages.golden import measure_release

                golden = measure_release(Path(args.model), [Path(p) for p in args.inputs or []] or None,
                                         DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance)
        return releases.run_cli(args, golden)
    except (releases.ReleaseError, SelfTestError) as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return EXIT_USAGE


COMMANDS = {
    "release": cmd_release,
    "subscribe": cmd_subscribe,
    "ingest": cmd_ingest,
    "fleet-sim": cmd_fleet_sim,
    "signatures": cmd_signatures,
    "samples": cmd_samples,
    "run": cmd_run,
    "check-config": cmd_check_config,
    "config": cmd_config,
    "detect": cmd_detect,
    "snapshot": cmd_snapshot,
    "motion": cmd_motion,
    "models": cmd_models,
    "doctor": cmd_doctor,
    "reload": cmd_reload,
}
