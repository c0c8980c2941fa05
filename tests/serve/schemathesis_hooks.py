"""schemathesis hooks for tests/serve/test_openapi_fuzz.py (loaded with SCHEMATHESIS_HOOKS).

`positive_data_acceptance_within_limits` is schemathesis' own positive_data_acceptance
with one refinement: a schema-valid request may get a 400 whose error code names a rule
that involves several fields, which JSON Schema cannot state (the prompt plus max_tokens
beyond the context, more prompts x n than the server holds, fields that only go together).
Every other rejection of valid data still fails. The run excludes the original check.
"""

import json

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

CROSS_FIELD_CODES = {"context_length_exceeded", "too_many_completions", "invalid_combination"}


def _error_code(response) -> str | None:
    try:
        return json.loads(response.content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


@schemathesis.check
def positive_data_acceptance_within_limits(ctx, response, case):
    try:
        return positive_data_acceptance(ctx, response, case)
    except Exception:
        if response.status_code == 400 and _error_code(response) in CROSS_FIELD_CODES:
            return None
        raise
