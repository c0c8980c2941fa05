"""The served tiny model the server tests share: `tok`, `model` and `server` (module-scoped, so each
test module gets its own server; a module may define its own `model` or `server` instead)."""

import pytest

from hybridlm.training.tokenizer import default_tokenizer

from helpers import SERVED_CONTEXT, SERVED_NAME, serving, text_model


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def model():
    return text_model(SERVED_CONTEXT)


@pytest.fixture(scope="module")
def server(model, tok):
    with serving(model, tok, model_name=SERVED_NAME, max_request_bytes=64 * 1024) as srv:  # test_server.BAD's limit
        yield srv
