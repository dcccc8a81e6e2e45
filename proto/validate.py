"""Check every vector in proto/vectors against the CDDL in proto/ with an
independent validator: ``python proto/validate.py`` (CI runs it).

The validator is cddl-verifier (PyPI), a CDDL implementation that shares no
code with peerd: see proto/README.md for why this one. What is checked:

- messages.json: every valid message matches ``message`` in wire.cddl and is
  deterministically encoded (RFC 8949 section 4.2.1, as wire.cddl requires of
  encoders); a datagram with no skipped message matches ``datagram``, one
  with skipped messages does not (the skipped ones are not messages of this
  version); every invalid message is rejected: one whose reason is a schema
  matter (not_message, unknown_type, bad_arity, bad_field) by the schema
  alone, one of reason bad_cbor (tags, indefinite lengths, duplicate keys,
  trailing bytes, truncation, bignums) by the validator's CBOR layer and its
  deterministic-encoding check, since CDDL itself cannot state those rules
  (proto/README.md lists them; tests/wire keeps them for our decoder).
- seal.json: the payload of every sealed and plaintext envelope matches
  ``datagram`` (the envelope itself is raw bytes, not CBOR).
- api.json: every frame's body matches its ``rule`` in api.cddl, and each of
  its ``parts`` (args, result) matches the rule named for it.

Exit 0 if all hold, 1 otherwise; one line per failure, then a summary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cddl_verifier import Validator

HERE = Path(__file__).resolve().parent
VECTORS = HERE / "vectors"

SCHEMA_REASONS = {"not_message", "unknown_type", "bad_arity", "bad_field"}
"""Invalid-vector reasons that CDDL can state, so the validator must reject them."""


class Report:
    def __init__(self) -> None:
        self.checked = 0
        self.failures: list[str] = []

    def expect(self, what: str, valid: bool, result: Any) -> None:
        self.checked += 1
        if bool(result.valid) != valid:
            detail = (
                "; ".join(str(d) for d in result.diagnostics)[:300]
                if not result.valid
                else "accepted"
            )
            self.failures.append(
                f"{what}: expected {'valid' if valid else 'invalid'}, got {detail}"
            )


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return data


def check_wire(report: Report) -> None:
    wire = Validator(HERE / "wire.cddl")
    msgs = load("messages.json")
    for v in msgs["messages"]:
        report.expect(
            f"messages.json {v['name']}",
            True,
            wire.validate(bytes.fromhex(v["cbor_hex"]), "message", require_deterministic=True),
        )
    for v in msgs["datagrams"]:
        report.expect(
            f"messages.json datagram {v['name']}",
            not v["errors"],
            wire.validate(bytes.fromhex(v["cbor_hex"]), "datagram"),
        )
    for v in msgs["invalid"]:
        # Schema matters must fail the schema alone; CBOR-layer ones (bad_cbor)
        # fail the validator's decoder, the indefinite-length one only its
        # deterministic-encoding check.
        strict = v["reason"] not in SCHEMA_REASONS
        report.expect(
            f"messages.json invalid {v['name']} ({v['reason']})",
            False,
            wire.validate(bytes.fromhex(v["cbor_hex"]), "message", require_deterministic=strict),
        )
    seal = load("seal.json")
    for group in ("sealed", "plaintext"):
        for v in seal[group]:
            if not v["payload_hex"]:  # a transport's own envelope (wire.cddl section 1)
                continue
            report.expect(
                f"seal.json {group} {v['name']} payload",
                True,
                wire.validate(bytes.fromhex(v["payload_hex"]), "datagram"),
            )


def check_api(report: Report) -> None:
    import cbor2

    api = Validator(HERE / "api.cddl")
    for v in load("api.json")["frames"]:
        frame = bytes.fromhex(v["frame_hex"])
        length = int.from_bytes(frame[:4], "big")
        body = frame[4:]
        if length != len(body):
            report.checked += 1
            report.failures.append(
                f"api.json {v['name']}: header says {length} bytes, body has {len(body)}"
            )
            continue
        report.expect(f"api.json {v['name']} ({v['rule']})", True, api.validate(body, v["rule"]))
        decoded = cbor2.loads(body)
        for field, rule in v["parts"].items():
            report.expect(
                f"api.json {v['name']} {field} ({rule})",
                True,
                api.validate(cbor2.dumps(decoded[field]), rule),
            )


def main() -> int:
    report = Report()
    for check in (check_wire, check_api):
        try:
            check(report)
        except Exception as exc:  # a schema the validator cannot load is a failure too
            report.checked += 1
            report.failures.append(f"{check.__name__}: {type(exc).__name__}: {exc}")
    for line in report.failures:
        print(f"FAIL {line}")
    print(
        f"cddl: {report.checked} checks against wire.cddl and api.cddl, "
        f"{len(report.failures)} failed"
    )
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
