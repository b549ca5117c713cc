"""schemathesis hooks for scripts/contract-test (loaded via SCHEMATHESIS_HOOKS).

The fixture (playback-fixture) writes CONTRACT_FIXTURE, a JSON file with the
seeded intakes and the tokens. Two runs use these hooks:

- CONTRACT_RUN=valid: the caller's valid token is sent (-H).
- CONTRACT_RUN=refused: each case carries a bad token, in turn: none at all,
  expired, signed with another secret, an anon key, one without an
  organization, garbage, Basic credentials, the valid one with a byte
  more. The check `refused_without_a_valid_token` then requires 401 (403
  for the token without an organization) on every operation that declares
  a security requirement, and no signed URL.

In both, every other generated intake id is replaced by a seeded one, so
answers other than 404 (200 with a signed URL, each state) are checked
against the document too, and bad tokens are tried on intakes that exist.
"""

import itertools
import json
import os

import schemathesis

FIXTURE = json.load(open(os.environ["CONTRACT_FIXTURE"]))
RUN = os.environ["CONTRACT_RUN"]
INTAKES = list(FIXTURE["intakes"].values())
BAD = FIXTURE["bad_tokens"]
# None: the Authorization header is removed.
BAD_HEADERS = [None] + [f"Bearer {t}" for t in BAD.values()] + [
    "Basic dXNlcjpwYXNz",
    f"Bearer {FIXTURE['token']}x",
]
EXPECTED = {f"Bearer {BAD['no_organization']}": 403}

_ids = itertools.cycle(INTAKES)
_turn = itertools.count()
_bad = itertools.cycle(BAD_HEADERS)


def _secured(operation):
    raw = operation.definition.raw
    security = raw.get("security", operation.schema.raw_schema.get("security", []))
    return any(requirement for requirement in security)


@schemathesis.hook
def map_path_parameters(context, path_parameters):
    if path_parameters and "id" in path_parameters:
        if next(_turn) % 2 == 0:
            path_parameters = dict(path_parameters, id=next(_ids))
    return path_parameters


@schemathesis.hook
def map_case(context, case):
    if RUN == "refused":
        headers = {
            k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"
        }
        header = next(_bad)
        if header is not None:
            headers["Authorization"] = header
        case.headers = headers
    return case


@schemathesis.check
def refused_without_a_valid_token(ctx, response, case):
    if RUN != "refused" or not _secured(case.operation):
        return None
    # Another method (the coverage phase tries TRACE and the like) is not
    # the operation: its 405 is the router's, and carries nothing.
    if response.request.method.upper() != case.operation.method.upper():
        return None
    sent = response.request.headers.get("Authorization")
    expected = EXPECTED.get(sent, 401)
    if response.status_code != expected:
        raise AssertionError(
            f"without a valid token ({'no Authorization header' if sent is None else 'a bad one'}) "
            f"expected {expected}, got {response.status_code}"
        )
    body = response.text or ""
    if '"url"' in body or "token=" in body:
        raise AssertionError("a refusal carries something like a signed URL")
    return None
