"""Hostile input: the HTTP API fuzzed from its own OpenAPI schema, and codec property tests.

Bounded so it fits in CI: a fixed number of generated cases per operation, one real server.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import checks

from tests.service.conftest import CODEBOOK, Server
from vqsearch.service._wire import npy_bytes

# What the issue asks of the fuzz run: no server errors, and answers as documented. (Whether
# a loosely-typed body the schema allows is accepted is not asked: bodies are validated by code.)
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("fuzz")).start()
    httpx.put(
        f"{srv.url}/v1/banks/cb", json={"vectors": CODEBOOK.tolist()}, timeout=30
    ).raise_for_status()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def case_strategies(live):
    """One hypothesis strategy of generated requests per operation of the live schema."""
    loaded = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    ops = [result.ok() for result in loaded.get_all_operations()]
    return {f"{op.method.upper()} {op.path}": op.as_strategy() for op in ops}


def test_schema_covers_the_api(case_strategies):
    """The fuzzer sees every route (so the test below really covers the API)."""
    assert {
        "POST /v1/banks/{name}/search",
        "POST /v1/banks/{name}/nearest",
        "PUT /v1/banks/{name}",
        "POST /v1/banks/{name}/vectors",
        "PUT /v1/banks/{name}/index",
    } <= set(case_strategies)


@given(data=st.data())
@settings(
    max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
def test_api_never_fails_and_answers_match_the_schema(case_strategies, data):
    """Generated requests to every operation never get a 5xx, and each answer (status, content
    type, body) matches what the schema documents."""
    name = data.draw(st.sampled_from(sorted(case_strategies)))
    case = data.draw(case_strategies[name])
    if case.method == "DELETE" and case.path == "/v1/banks/{name}":
        case.path_parameters = {"name": "fuzz-target"}  # keep the bank the other cases use
    response = case.call(timeout=60)
    assert response.status_code < 500, (name, response.text[:500])
    case.validate_response(response, checks=CHECKS)


def _post(url: str, body: bytes, ctype: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/banks/cb/search", content=body, headers={"content-type": ctype}, timeout=30
    )


@given(
    body=st.binary(max_size=2048),
    ctype=st.sampled_from(
        ["application/x-npy", "application/x-npz", "application/json", "text/csv", ""]
    ),
)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_arbitrary_bodies_get_4xx_never_a_crash(live, body, ctype):
    """Random bytes under any content type: 400, 415 or 422, and the server lives on."""
    r = _post(live.url, body, ctype)
    assert r.status_code in (400, 415, 422), r.text
    assert httpx.get(f"{live.url}/healthz").status_code == 200


def _npy_header(shape, descr: str) -> bytes:
    head = {"descr": descr, "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, head)
    return buf.getvalue()


@given(
    shape=st.lists(st.integers(0, 5), max_size=4).map(tuple),
    descr=st.sampled_from(["<f4", "<f8", "<i8", "|O", "<U3", "|b1", "<c8", "|V8"]),
    payload=st.binary(max_size=256),
)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_npy_with_lying_headers_is_refused_cleanly(live, shape, descr, payload):
    """Well-formed .npy headers over wrong or short data, object dtypes included: 400 or 422
    (or 200 when the bytes happen to be a valid query), never an unpickle."""
    r = _post(live.url, _npy_header(shape, descr) + payload, "application/x-npy")
    assert r.status_code in (200, 400, 422), r.text
    if descr == "|O":
        assert r.status_code == 400 and "pickle" in r.json()["detail"].lower()


@given(
    doc=st.recursive(
        st.none()
        | st.booleans()
        | st.floats(allow_nan=False)
        | st.integers()
        | st.text(max_size=5),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=3),
        max_leaves=20,
    )
)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_json_document_gets_a_clear_answer(live, doc):
    """Any JSON value as a search body: 200 only for a valid query, else 422, never 5xx."""
    r = _post(live.url, json.dumps({"queries": doc}).encode(), "application/json")
    assert r.status_code in (200, 422), r.text


def test_npz_bomb_is_refused_before_inflating(live):
    """An .npz whose members inflate past the body limit is a 413, not an out-of-memory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("queries.npy", b"\0" * (300 << 20))
    r = _post(live.url, buf.getvalue(), "application/x-npz")
    assert r.status_code == 413


@given(
    shape=st.lists(st.integers(0, 4), max_size=4).map(tuple),
    dtype=st.sampled_from(["<f4", ">f8", "<f2", "<i8", "<i4", "|i1", "<u2", "|b1"]),
    fortran=st.booleans(),
)
@settings(max_examples=100, deadline=None)
def test_npy_answers_are_what_np_save_writes(shape, dtype, fortran):
    """The server's own .npy writer: np.save's bytes for C-ordered arrays, and any array
    (Fortran-ordered, 0-d, empty) loads back equal."""
    a = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape).astype(dtype)
    a = np.asfortranarray(a) if fortran else a
    got = npy_bytes(a)
    back = np.load(io.BytesIO(got), allow_pickle=False)
    assert back.dtype == a.dtype and back.shape == a.shape and np.array_equal(back, a)
    if a.flags.c_contiguous:
        buf = io.BytesIO()
        np.save(buf, a)
        assert got == buf.getvalue()


def _npz(members: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **members)
    return buf.getvalue()


_SCALARS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(np.float64),
    st.integers(-(2**63), 2**64 - 1).map(
        lambda i: np.array(i, np.uint64 if i >= 2**63 else np.int64)
    ),
    st.booleans().map(np.bool_),
    st.text(max_size=6).map(np.str_),
)
_FIELDS = [
    "queries",
    "codes",
    "vectors",
    "ids",
    "k",
    "mode",
    "nprobe",
    "k_factor",
    "metric",
    "return_quantized",
    "channel_axis",
    "target_recall",
    "codes_dtype",
    "bogus",
]
HOSTILE = st.one_of(
    # .npy in either byte order, any small shape and numeric dtype
    st.tuples(
        st.lists(st.integers(0, 20), min_size=1, max_size=3).map(tuple),
        st.sampled_from([">f4", "<f8", ">i8", ">u8", "<u4", ">f2"]),
    ).map(lambda t: ("application/x-npy", npy_bytes(np.ones(t[0], t[1])))),
    # .npz: members that are fields or not, arrays or 0-d values of any kind
    st.dictionaries(
        st.sampled_from(_FIELDS),
        st.one_of(_SCALARS, st.just(np.ones((2, 16), ">f4")), st.just(np.arange(3, dtype=">u8"))),
        max_size=4,
    ).map(lambda m: ("application/x-npz", _npz(m))),
    # JSON with integers beyond 64 bits, or nested deep
    st.integers(2**62, 2**70).map(
        lambda i: ("application/json", json.dumps({"queries": [[i] * 16], "ids": [i]}).encode())
    ),
    st.integers(10, 200_000).map(
        lambda n: ("application/json", b'{"queries": ' + b"[" * n + b"]" * n + b"}")
    ),
    # .npy headers that do not parse, or claim far more than they hold
    st.sampled_from([b"(2 16)", b"(2, 16", b"(10000000000, 16)", b"(-1, 16)", b"()"]).map(
        lambda shape: (
            "application/x-npy",
            npy_bytes(np.zeros((2, 16), np.float32)).replace(b"(2, 16)", shape),
        )
    ),
)


@given(
    body=HOSTILE,
    route=st.sampled_from(
        [
            ("POST", "search"),
            ("POST", "nearest"),
            ("POST", "decode"),
            ("POST", "vectors"),
            ("DELETE", "vectors"),
        ]
    ),
)
@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
def test_hostile_shapes_get_a_named_4xx(live, body, route):
    """The shapes an adversarial probe found (big-endian arrays, odd .npz members and values,
    JSON integers past 64 bits, deep nesting, broken or lying .npy headers) on every query and
    write route: never a 5xx, and the error body in its one shape."""
    ctype, content = body
    method, what = route
    r = httpx.request(
        method,
        f"{live.url}/v1/banks/cb/{what}",
        content=content,
        headers={"content-type": ctype},
        timeout=60,
    )
    assert r.status_code < 500, (route, r.text[:300])
    if r.status_code >= 400:
        err = r.json()
        assert isinstance(err["detail"], str) and err["errors"], err
    assert httpx.get(f"{live.url}/healthz").status_code == 200
