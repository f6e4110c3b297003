"""Fault injection, observed with plain `requests`: every kind, and the after/times/method knobs."""

from __future__ import annotations

import hashlib
import time

import pytest
import requests

from reconcile.emulator import Fault

PAYLOAD = bytes(range(256)) * 400  # 100 KiB


@pytest.fixture
def file_url(emulator) -> str:
    exp = emulator.archive.add_session("PROJ", "S1", "S1_MR1")
    emulator.archive.add_scan(exp.id, "1", type="t1", files={"1.dcm": PAYLOAD, "2.dcm": PAYLOAD[:5000]})
    return f"{emulator.url}/data/experiments/{exp.id}/scans/1/resources/DICOM/files/1.dcm"


@pytest.fixture
def http(emulator) -> requests.Session:
    client = requests.Session()
    client.auth = (emulator.user, emulator.password)
    return client


def test_status_fault_fires_the_given_number_of_times(emulator, http):
    emulator.app.faults.add(Fault(route=r"^/data/projects$", kind="status", status=503, times=2))
    url = f"{emulator.url}/data/projects?format=json"
    first, second, third = (http.get(url) for _ in range(3))
    assert (first.status_code, second.status_code, third.status_code) == (503, 503, 200)
    assert first.text.startswith("<html>") and "<h3>" in first.text


def test_after_skips_the_first_matching_requests(emulator, http):
    emulator.app.faults.add(Fault(route=r"/projects", kind="status", status=502, after=1, times=1))
    codes = [http.get(f"{emulator.url}/data/projects?format=json").status_code for _ in range(3)]
    assert codes == [200, 502, 200]


def test_method_restricts_a_fault(emulator, http):
    emulator.app.faults.add(Fault(route=r"/projects", kind="status", status=500, method="PUT"))
    assert http.get(f"{emulator.url}/data/projects?format=json").status_code == 200
    assert http.put(f"{emulator.url}/data/projects/NEWP").status_code == 500


def test_unmatched_routes_are_untouched_and_faults_can_be_cleared(emulator, http, file_url):
    fault = emulator.app.faults.add(Fault(route=r"/files/", kind="status", status=500))
    assert http.get(f"{emulator.url}/data/projects?format=json").status_code == 200
    assert http.get(file_url).status_code == 500
    assert fault.fired == 1  # only the matching request
    emulator.app.faults.clear()
    answer = http.get(file_url)
    assert answer.status_code == 200 and answer.content == PAYLOAD
    assert fault.fired == 1 and len(emulator.app.faults) == 0


def test_latency_delays_each_matching_request(emulator, http, monkeypatch):
    import reconcile.emulator.app as app_module

    slept: list[float] = []

    class RecordingClock:  # the emulator's `time`, with its sleeps recorded (and still taken)
        def __getattr__(self, name):
            return getattr(time, name)

        def sleep(self, seconds: float) -> None:
            slept.append(seconds)
            time.sleep(seconds)

    monkeypatch.setattr(app_module, "time", RecordingClock())
    emulator.app.faults.add(Fault(route=r"/projects", kind="latency", seconds=0.3, times=2))
    codes = [http.get(f"{emulator.url}/data/projects?format=json").status_code for _ in range(3)]
    assert codes == [200, 200, 200]  # delayed, not failed
    assert slept == [0.3, 0.3]  # once per firing, for the given time


def test_truncate_announces_the_full_length_but_sends_less(emulator, http, file_url):
    emulator.app.faults.add(Fault(route=r"/files/1\.dcm$", kind="truncate", fraction=0.25))
    response = http.get(file_url, stream=True)
    assert response.headers["Content-Length"] == str(len(PAYLOAD))
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        b"".join(response.iter_content(8192))


def test_truncate_cuts_a_streamed_zip_short(emulator, http, file_url):
    emulator.app.faults.add(Fault(route=r"/files$", kind="truncate"))
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        http.get(file_url.rsplit("/", 1)[0] + "?format=zip")


def test_truncate_of_a_json_listing_is_an_incomplete_read(emulator, http):
    emulator.app.faults.add(Fault(route=r"/projects$", kind="truncate"))
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        http.get(f"{emulator.url}/data/projects?format=json")


def test_reset_is_a_connection_error(emulator, http, file_url):
    emulator.app.faults.add(Fault(route=r"/files/", kind="reset", times=1))
    with pytest.raises(requests.ConnectionError):
        http.get(file_url)
    assert http.get(file_url).content == PAYLOAD


def test_auth_expire_rejects_every_credential_until_cleared(emulator, file_url):
    client = requests.Session()
    login = client.put(f"{emulator.url}/data/services/auth", data={"username": "admin", "password": "secret"})
    assert login.status_code == 200
    emulator.app.faults.add(Fault(route=r"/files/", kind="auth_expire", times=1))
    assert client.get(file_url).status_code == 401
    assert client.get(f"{emulator.url}/data/auth").status_code == 401
    assert requests.get(f"{emulator.url}/data/auth", auth=("admin", "secret")).status_code == 401
    assert client.put(f"{emulator.url}/data/services/auth", data={"username": "admin", "password": "secret"}).status_code == 401
    emulator.app.faults.clear()
    # The outage ended the old session: the client has to log in again.
    assert client.get(f"{emulator.url}/data/auth").status_code == 401
    assert client.put(f"{emulator.url}/data/services/auth", data={"username": "admin", "password": "secret"}).status_code == 200
    assert client.get(f"{emulator.url}/data/auth").status_code == 200


def test_corrupt_flips_bytes_but_keeps_the_length(emulator, http, file_url):
    emulator.app.faults.add(Fault(route=r"/files/1\.dcm$", kind="corrupt", times=1))
    corrupted = http.get(file_url).content
    assert len(corrupted) == len(PAYLOAD)
    assert hashlib.md5(corrupted).hexdigest() != hashlib.md5(PAYLOAD).hexdigest()
    assert http.get(file_url).content == PAYLOAD


def test_html_200_is_an_error_page_with_status_200(emulator, http):
    emulator.app.faults.add(Fault(route=r"/experiments", kind="html_200"))
    response = http.get(f"{emulator.url}/data/projects/PROJ/experiments?format=json")
    assert response.status_code == 200
    assert response.text.startswith("<html>") and "<h3>" in response.text


def test_invalid_json_cannot_be_parsed(emulator, http):
    emulator.app.faults.add(Fault(route=r"/experiments", kind="invalid_json"))
    response = http.get(f"{emulator.url}/data/projects/PROJ/experiments?format=json")
    assert response.status_code == 200
    with pytest.raises(requests.JSONDecodeError):
        response.json()


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault(route=".*", kind="explode")


def test_counters_record_what_happened(emulator, http):
    fault = emulator.app.faults.add(Fault(route=r"/projects", kind="status", status=503, after=1, times=1))
    for _ in range(3):
        http.get(f"{emulator.url}/data/projects?format=json")
    assert (fault.seen, fault.fired, fault.exhausted) == (3, 1, True)
