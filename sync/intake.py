"""Pure: one HIS row -> what the outbox holds for it (pending, skipped or invalid).

Every rule of the document is ``records``'s; this module decides what of a row the
outbox keeps: the payload to send and its hash, or the raw row of a record that could
not be built (kept exactly, so a requeue validates it again on what the HIS returned);
the key the row is stored under; what the DBA sees beside it; and, where the HIS's
``key_crowd`` column alone decides the key population, a visit parked ``skipped`` at
once (dispatch decides again, the same way, before anything is sent).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

from sync import keycrowd, records
from sync.columns import Unreadable, normalize_row
from sync.errors import InvalidRecord
from sync.keycrowd import LabelResult, Verdict
from sync.outbox.model import DEFAULT_INSTITUTION, Incoming, Status
from sync.records import RESIDENT_ID
from sync.settings import KeyCrowd

# The outbox keys rows by lsh in a column of 255 characters; the platform allows 50.
_MAX_KEY = 255
# sync_outbox.institution holds 40 characters.
_MAX_INSTITUTION = 40
# The keyCrowd a pending payload of a resident ID card holds in lookup mode (see incoming()).
_PAYLOAD_KEY_CROWD = "1"
_NOT_ASKED = LabelResult.not_asked()


def institution_of(row: Mapping[str, Any], institutions: Sequence[str]) -> tuple[str, str | None]:
    """(the outbox's institution of a canonical row, why it is none of ``institutions``).

    One institution: every row is its own, whatever the column says. Several: the row's
    ``institution`` column names it; a value that is none of them is kept (cut to the
    column's size) with the reason and the fix."""
    if len(institutions) == 1:
        return institutions[0], None
    value = row.get("institution")
    text = "" if value is None or isinstance(value, Unreadable) else str(value).strip()
    if text in institutions:
        return text, None
    said = f"{text!r}" if text else "empty" if value is None or text == "" else repr(value)
    reason = (
        f"机构编码 {said} 不在配置的 institutions 中 / institution {said} is none of the settings' institutions[].code ({', '.join(institutions)}): "
        "add that institution (its code, app key and account) to institutions:, or make his.query's "
        "institution column return one of these codes; then `crowd-sync retry --status invalid`"
    )
    return (text or "(none)")[:_MAX_INSTITUTION], reason


def incoming(
    raw: Mapping[str, Any], *, key_crowd: KeyCrowd, today: date, institutions: Sequence[str] = (DEFAULT_INSTITUTION,)
) -> Incoming:
    """One HIS row -> what the outbox should hold for it (pending, skipped or invalid), under
    its institution (``institutions``: the codes of the settings)."""
    row = normalize_row(raw)
    institution, stranger = institution_of(row, institutions)
    if stranger is not None:
        lsh_text = "" if row.get("lsh") is None else str(row.get("lsh")).strip()
        text = raw_json(row)
        return _parked(
            _outbox_key(lsh_text, text), text, row, reason=stranger, changed_at=_changed_at(row), institution=institution
        )
    return _incoming(row, key_crowd=key_crowd, today=today, institution=institution)


def _changed_at(row: Mapping[str, Any]) -> datetime | None:
    changed_at = row.get("changed_at")
    return changed_at if isinstance(changed_at, datetime) else None


def _incoming(row: dict[str, Any], *, key_crowd: KeyCrowd, today: date, institution: str) -> Incoming:
    lsh_raw = row.get("lsh")
    lsh = "" if lsh_raw is None else str(lsh_raw).strip()
    # The raw row's JSON is needed only to park an invalid row or name one without lsh:
    # not built for the valid majority of a back-fill.
    raw_text = raw_json(row) if not lsh else ""
    key = _outbox_key(lsh, raw_text)
    changed_at = row.get("changed_at")
    if not isinstance(changed_at, datetime):
        changed_at = None
    # With `key_crowd.source: column` (a back-fill's usual case) build() reads and checks
    # the column and the card itself; the card type and the column are read here only to
    # decide before a label lookup.
    lookup = key_crowd.source != "column"
    card_type = _decoded(records.decode_card_type, row.get("card_type")) if lookup else None
    column = records.decode_key_crowd(row.get("key_crowd")) if lookup and card_type != RESIDENT_ID else None

    # build() needs a keyCrowd to check the rest of the row. What the stored payload holds
    # is never sent as it is: every upload takes keyCrowd from keycrowd.decide() at
    # dispatch. (For resident ID cards in lookup mode it stays "1" as in earlier versions,
    # so that their payload hashes, and the visits already sent, stay as they are.)
    decided: str | None
    if not lookup:
        decided = None  # build() reads and checks the column itself
    elif card_type == RESIDENT_ID:
        decided = _PAYLOAD_KEY_CROWD
    else:
        decided = column or "0"
    try:
        payload = records.build(row, key_crowd=decided, today=today)
    except InvalidRecord as exc:
        return _parked(key, raw_text or raw_json(row), row, reason=str(exc), changed_at=changed_at,
                       institution=institution)
    text = records.payload_json(payload)
    status = Status.PENDING
    reason: str | None = None
    # What the outbox knows of the key population: the HIS's column (None: nothing yet).
    known = payload["keyCrowd"] if not lookup else column
    if not keycrowd.needs_lookup(source=key_crowd.source, card_type=payload["cardType"]):
        # Decided by the column alone: park what must not go at once.
        d = keycrowd.decide(
            source=key_crowd.source, upload_only_key_crowd=key_crowd.upload_only_key_crowd,
            card_type=payload["cardType"], column=known, labels=_NOT_ASKED,
        )
        if d.verdict is Verdict.SKIP:
            status, reason = Status.SKIPPED, d.how
    return Incoming(
        institution=institution,
        lsh=key,
        payload_json=text,
        payload_hash=records.text_hash(text),
        status=status,
        key_crowd=known,
        reason=reason,
        source_changed_at=changed_at,
        # As sent: build() checked and normalised them (an ID number's x upper-cased).
        card_type=payload["cardType"],
        card_no=payload["cardNo"],
        visit_type=payload["type"],
        settlement_date=date.fromisoformat(payload["settlementDate"]),
    )


def rebuild(lsh: str, stored: str, *, key_crowd: KeyCrowd, today: date) -> Incoming | None:
    """A claimed row's payload, as it is to be sent now: None for a built payload (the usual
    case: sent as stored). A requeued record that local validation had parked holds its raw
    HIS row: validated again here by today's rules, from exactly the values the HIS
    returned (its key population is decided again at dispatch). An ``invalid`` answer
    says why it cannot be sent."""
    if stored.startswith('{"cardType"'):
        return None  # a built payload: records.payload_json starts so
    try:
        data = json.loads(stored)
    except ValueError:
        data = None
    if not isinstance(data, dict) or "cardType" in data:
        return None
    restored = parse_raw_json(stored)
    if restored is None:
        reason = (
            "parked by an earlier version of crowd-sync, which did not keep the HIS values exactly "
            "(bytes as hex, numbers through floats): not rebuilt from that copy. Read it again from the HIS: "
            "`crowd-sync reconcile --since <its settlement date>`, or change the HIS row"
        )
        return _parked(lsh, stored, {}, reason=reason, changed_at=None)
    row, lost = restored
    if lost:
        kinds = ", ".join(f"{column} ({kind})" for column, kind in sorted(lost.items()))
        reason = (
            f"the HIS returned values the outbox cannot keep exactly: {kinds}; cast these columns in his.query "
            "(text: CAST(x AS CHAR), amounts: CAST(x AS DECIMAL(10,2)), dates: CAST(x AS DATE)); "
            "the row is validated again when it is read next (reconcile, or a change in the HIS)"
        )
        return _parked(lsh, stored, {}, reason=reason, changed_at=None)
    return incoming(row, key_crowd=key_crowd, today=today)


def _parked(
    key: str, raw_text: str, row: Mapping[str, Any], *, reason: str, changed_at: datetime | None,
    institution: str = DEFAULT_INSTITUTION,
) -> Incoming:
    """An invalid row: its raw HIS values kept, with what the DBA can read of them beside."""
    card_type = _decoded(records.decode_card_type, row.get("card_type"))
    card_no = records.optional_text(row.get("card_no"))
    if card_no and card_type == RESIDENT_ID:
        card_no = card_no.upper()
    settled = row.get("settlement_date")
    return Incoming(
        institution=institution,
        lsh=key,
        payload_json=raw_text,
        payload_hash=records.text_hash(raw_text),
        status=Status.INVALID,
        key_crowd=records.decode_key_crowd(row.get("key_crowd")),
        reason=reason,
        source_changed_at=changed_at,
        card_type=card_type,
        card_no=card_no,
        visit_type=_decoded(records.decode_visit_type, row.get("visit_type")),
        settlement_date=settled.date() if isinstance(settled, datetime) else settled if isinstance(settled, date) else None,
    )


def _decoded(decode: Callable[[Any], str | None], value: Any) -> str | None:
    """A dictionary column as the payload would carry it; the value as written when the
    dictionary does not know it (for the DBA: the row's reason names the broken rule)."""
    try:
        return decode(value)
    except ValueError:
        return records.optional_text(value)


def _outbox_key(lsh: str, raw_text: str) -> str:
    if not lsh:
        return f"(missing lsh) {records.text_hash(raw_text)[:16]}"
    if len(lsh) > _MAX_KEY:
        return lsh[:200] + "…" + records.text_hash(lsh)[:16]
    return lsh


# -- the raw row, kept exactly ------------------------------------------------------------

# The key of the type map in a raw row's JSON; no HIS column can be called that.
RAW_TYPES_KEY = "$types"


def _typed(value: Any) -> tuple[Any, str | None]:
    """A value as JSON can hold it, and its type when JSON alone would not give it back."""
    if value is None or isinstance(value, bool | int | str):
        return value, None
    if isinstance(value, float):
        # repr() gives back the very same float; JSON has no NaN or infinity, text does.
        return (value if math.isfinite(value) else repr(value)), "float"
    if isinstance(value, Decimal):
        return str(value), "decimal"
    if isinstance(value, datetime):
        return value.isoformat(), "datetime"
    if isinstance(value, date):
        return value.isoformat(), "date"
    if isinstance(value, time):
        return value.isoformat(), "time"
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex(), "bytes"
    if isinstance(value, Unreadable):
        # Nothing to give back: the driver could not read the value, so the row stays invalid.
        return repr(value), "unreadable"
    return str(value), f"unsupported {type(value).__name__}"


def raw_json(row: Mapping[str, Any]) -> str:
    """The raw row as JSON, for parking a record that could not be built (DBA-readable).

    Exact: values JSON cannot hold as they were (Decimal, dates, times, bytes, floats) are
    written as text and named in the ``$types`` map, so ``parse_raw_json`` gives back the
    very values the HIS returned and a requeued row is validated on what the HIS holds.
    """
    values: dict[str, Any] = {}
    types: dict[str, str] = {}
    for key, value in row.items():
        values[str(key)], kind = _typed(value)
        if kind is not None:
            types[str(key)] = kind
    values[RAW_TYPES_KEY] = types
    return json.dumps(values, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


_DECODE: dict[str, Callable[[Any], Any]] = {
    "float": float,
    "decimal": Decimal,
    "datetime": datetime.fromisoformat,
    "date": date.fromisoformat,
    "time": time.fromisoformat,
    "bytes": bytes.fromhex,
}


def parse_raw_json(text: str) -> tuple[dict[str, Any], dict[str, str]] | None:
    """``raw_json``'s row back: (row, {column: type} of values it could not keep exactly).

    None when ``text`` is not a raw row in this form (a built payload, or a raw row parked
    by an earlier version, which kept neither types nor bytes exactly).
    """
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get(RAW_TYPES_KEY), dict):
        return None
    types: dict[str, Any] = data.pop(RAW_TYPES_KEY)
    lost: dict[str, str] = {}
    for key, kind in types.items():
        decode = _DECODE.get(str(kind))
        if key not in data:
            continue
        if decode is None:
            lost[key] = str(kind)
            continue
        try:
            data[key] = decode(data[key])
        except (TypeError, ValueError, ArithmeticError):
            lost[key] = str(kind)
    return data, lost
