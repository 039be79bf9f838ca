"""Tests of tests/tools/cloudwatch_cbor_bridge.py against a real moto server.

Run: $HOME/.cache/s3-sql-loader/venv/bin/python -m pytest tests/tools -q

The requests are built byte by byte the way the Rust `aws-sdk-cloudwatch` crate writes them
(smithy-rs' aws-smithy-cbor: structures as indefinite-length maps, lists as indefinite-length
arrays in the schema-based serializer or definite-length ones in the older generated code,
doubles as float64, timestamps as tag 1 + float64 epoch seconds), then read back from moto
directly over boto3's JSON protocol. botocore's own rpc-v2-cbor client is used as an
independent cross-check where the installed botocore has it.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as dt
import gzip
import http.client
import json
import math
import select
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions
import cbor2
import pytest

HERE = Path(__file__).resolve().parent
BRIDGE = HERE / "cloudwatch_cbor_bridge.py"
VENV_BIN = Path(sys.executable).parent
REGION = "us-east-1"
PATH = "/service/GraniteServiceVersion20100801/operation/"


# ----------------------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def moto_url():
    exe = VENV_BIN / "moto_server"
    port = free_port()
    proc = subprocess.Popen([str(exe if exe.exists() else "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            assert proc.poll() is None, "moto_server exited"
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url + "/moto-api/", timeout=1)
                break
            assert time.time() < deadline, "moto_server did not start"
            time.sleep(0.2)
        yield url
    finally:
        stop(proc)


class BridgeProc:
    def __init__(self, url: str, log: Path):
        self.url, self.log = url, log

    def log_text(self) -> str:
        return self.log.read_text()


@pytest.fixture(scope="module")
def start_bridge(moto_url, tmp_path_factory):
    started = []

    def start(*extra: str) -> BridgeProc:
        log = tmp_path_factory.mktemp("bridge") / "stderr.log"
        err = open(log, "w")
        proc = subprocess.Popen([sys.executable, str(BRIDGE), "--port", "0", "--moto", moto_url, *extra],
                                stdout=subprocess.PIPE, stderr=err, text=True)
        started.append((proc, err))
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline().strip() if ready else ""
        assert line.startswith("PORT="), f"bridge did not report its port: {line!r} {log.read_text()}"
        return BridgeProc(f"http://127.0.0.1:{int(line[5:])}", log)

    yield start
    for proc, err in started:
        stop(proc)
        err.close()


@pytest.fixture(scope="module")
def bridge(start_bridge):
    return start_bridge()


def moto_client(moto_url):
    """Reads back from moto directly (JSON protocol), as the loader's tests will."""
    return boto3.client("cloudwatch", endpoint_url=moto_url, region_name=REGION,
                        aws_access_key_id="test", aws_secret_access_key="test")


# ----------------------------------------------------------------------------- CBOR as the Rust SDK writes it

class Ts(float):
    """A timestamp: tag 1 + float64 epoch seconds (aws_smithy_cbor::Encoder::timestamp)."""


def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for info, fmt, limit in ((24, ">B", 1 << 8), (25, ">H", 1 << 16), (26, ">I", 1 << 32)):
        if n < limit:
            return bytes([major << 5 | info]) + struct.pack(fmt, n)
    return bytes([major << 5 | 27]) + struct.pack(">Q", n)


def sdk_cbor(value, indefinite_lists: bool = True) -> bytes:
    """Structures -> indefinite maps (begin_map ... end), lists -> indefinite (schema-based
    serializer) or definite (older generated serializers) arrays, doubles -> float64."""
    if isinstance(value, dict):
        return b"\xbf" + b"".join(sdk_cbor(k) + sdk_cbor(v, indefinite_lists)
                                  for k, v in value.items()) + b"\xff"
    if isinstance(value, list):
        items = b"".join(sdk_cbor(v, indefinite_lists) for v in value)
        return (b"\x9f" + items + b"\xff") if indefinite_lists else _head(4, len(value)) + items
    if isinstance(value, Ts):
        return b"\xc1" + struct.pack(">Bd", 0xFB, value)
    if isinstance(value, float):
        return struct.pack(">Bd", 0xFB, value)
    if isinstance(value, (bool, int, str)):
        return cbor2.dumps(value)
    raise TypeError(value)


def rpc(url: str, operation: str, body: bytes, headers: dict | None = None, path: str | None = None):
    """One request with the headers the Rust SDK sends; returns (status, headers, decoded body)."""
    hdrs = {
        "smithy-protocol": "rpc-v2-cbor",
        "Content-Type": "application/cbor",
        "Accept": "application/cbor",
        "x-amzn-query-mode": "true",
        "Content-Length": str(len(body)),
        "X-Amz-Date": "20260101T000000Z",
        "Authorization": "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/monitoring/aws4_request, "
                         "SignedHeaders=content-type;host;x-amz-date, Signature=00",
        "amz-sdk-invocation-id": str(uuid.uuid4()),
        "amz-sdk-request": "attempt=1; max=3",
        "User-Agent": "aws-sdk-rust/1.3 ua/2.1 api/cloudwatch/1.100 os/linux lang/rust/1.90",
    }
    for k, v in (headers or {}).items():
        hdrs = {hk: hv for hk, hv in hdrs.items() if hk.lower() != k.lower()}
        if v is not None:
            hdrs[k] = v
    host = url.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=30)
    try:
        conn.request("POST", path or PATH + operation, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, (cbor2.loads(data) if data else None)
    finally:
        conn.close()


def recent_ts(seconds_ago: int = 120) -> float:
    """A recent timestamp with a sub-second part, on a millisecond boundary."""
    return math.floor(time.time()) - seconds_ago + 0.25


def window(ts: float) -> dict:
    t = dt.datetime.fromtimestamp(ts, dt.timezone.utc)
    return {"StartTime": t - dt.timedelta(minutes=10), "EndTime": t + dt.timedelta(minutes=10)}


def stats(cw, ns, name, dims, ts, period=60):
    return cw.get_metric_statistics(Namespace=ns, MetricName=name, Dimensions=dims, Period=period,
                                    Statistics=["SampleCount", "Sum", "Minimum", "Maximum"],
                                    **window(ts))["Datapoints"]


def metric_set(metrics):
    return {(m["MetricName"], frozenset((d["Name"], d["Value"]) for d in m["Dimensions"])) for m in metrics}


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("lists", ["indefinite", "definite"])
def test_put_metric_data_as_the_rust_sdk_sends_it(bridge, moto_url, lists):
    ns = f"S3SqlLoader/BridgeTest/{lists}"
    ts = recent_ts()
    rows_dims = [{"Name": "Table", "Value": "orders"}, {"Name": "Env", "Value": "test"}]
    secs_dims = [{"Name": "Table", "Value": "orders"}]
    body = sdk_cbor({
        "Namespace": ns,
        "MetricData": [
            {"MetricName": "RowsLoaded", "Dimensions": rows_dims, "Timestamp": Ts(ts),
             "Value": 1234.0, "Unit": "Count", "StorageResolution": 60},
            {"MetricName": "LoadSeconds", "Dimensions": secs_dims, "Timestamp": Ts(ts),
             "StatisticValues": {"SampleCount": 4.0, "Sum": 10.0, "Minimum": 1.0, "Maximum": 4.0},
             "Unit": "Seconds"},
        ],
    }, indefinite_lists=(lists == "indefinite"))
    assert body[:1] == b"\xbf" and b"\xc1\xfb" in body  # indefinite map, tag 1 + float64

    status, headers, out = rpc(bridge.url, "PutMetricData", body)
    assert status == 200, out
    assert headers["smithy-protocol"] == "rpc-v2-cbor"
    assert headers["content-type"] == "application/cbor"
    assert out == {}

    cw = moto_client(moto_url)
    assert metric_set(cw.list_metrics(Namespace=ns)["Metrics"]) == {
        ("RowsLoaded", frozenset({("Table", "orders"), ("Env", "test")})),
        ("LoadSeconds", frozenset({("Table", "orders")})),
    }
    [rows] = stats(cw, ns, "RowsLoaded", rows_dims, ts)
    assert (rows["SampleCount"], rows["Sum"], rows["Minimum"], rows["Maximum"]) == (1.0, 1234.0, 1234.0, 1234.0)
    assert rows["Unit"] == "Count"
    assert abs(rows["Timestamp"].timestamp() - ts) < 1e-3  # the tag-1 float, sub-second part kept
    [secs] = stats(cw, ns, "LoadSeconds", secs_dims, ts)
    assert (secs["SampleCount"], secs["Sum"], secs["Minimum"], secs["Maximum"]) == (4.0, 10.0, 1.0, 4.0)
    assert secs["Unit"] == "Seconds"
    assert f"PutMetricData namespace={ns} datapoints=2 -> 200" in bridge.log_text()


def test_gzip_body_and_values_counts(bridge, moto_url):
    """PutMetricData has @requestCompression: the SDK gzips bodies of 10 KiB and more."""
    ns = "S3SqlLoader/BridgeTest/gzip"
    ts = recent_ts()
    body = gzip.compress(sdk_cbor({"Namespace": ns, "MetricData": [
        {"MetricName": "BatchRows", "Timestamp": Ts(ts), "Values": [1.0, 2.0, 3.0],
         "Counts": [1.0, 1.0, 2.0], "Unit": "Count"}]}))
    status, _, out = rpc(bridge.url, "PutMetricData", body, {"Content-Encoding": "gzip"})
    assert (status, out) == (200, {})
    [dp] = stats(moto_client(moto_url), ns, "BatchRows", [], ts)
    assert (dp["SampleCount"], dp["Sum"], dp["Minimum"], dp["Maximum"]) == (4.0, 9.0, 1.0, 3.0)


def test_errors_are_rpc_v2_cbor_errors(bridge):
    ts = recent_ts()
    # Rejected by moto (Value and StatisticValues are exclusive): a modeled client error.
    bad = sdk_cbor({"Namespace": "S3SqlLoader/BridgeTest/errors", "MetricData": [
        {"MetricName": "X", "Timestamp": Ts(ts), "Value": 1.0,
         "StatisticValues": {"SampleCount": 1.0, "Sum": 1.0, "Minimum": 1.0, "Maximum": 1.0}}]})
    status, headers, out = rpc(bridge.url, "PutMetricData", bad)
    assert status == 400
    assert headers["smithy-protocol"] == "rpc-v2-cbor" and headers["content-type"] == "application/cbor"
    assert out["__type"] == "com.amazonaws.cloudwatch#InvalidParameterCombinationException"
    assert "mutually exclusive" in out["message"]
    assert headers["x-amzn-query-error"] == "InvalidParameterCombination;Sender"

    status, _, out = rpc(bridge.url, "NoSuchOperation", sdk_cbor({}))
    assert status == 404 and out["__type"].endswith("#UnknownOperationException")

    status, _, out = rpc(bridge.url, "PutMetricData", bad, {"smithy-protocol": None})
    assert status == 400 and out["__type"].endswith("#ValidationException")

    status, _, out = rpc(bridge.url, "PutMetricData", b"\xbf\x61", {})
    assert status == 400 and out["__type"].endswith("#SerializationException")

    status, _, out = rpc(bridge.url, "PutMetricData", sdk_cbor({"MetricData": []}))
    assert status == 400 and out["__type"].endswith("#ValidationException")  # Namespace is required


def test_fault_injection(start_bridge, moto_url):
    faulty = start_bridge("--fail-rate", "1", "--delay-ms", "300")
    ns = "S3SqlLoader/BridgeTest/faults"
    body = sdk_cbor({"Namespace": ns, "MetricData": [
        {"MetricName": "X", "Timestamp": Ts(recent_ts()), "Value": 1.0}]})
    started = time.monotonic()
    status, headers, out = rpc(faulty.url, "PutMetricData", body)
    assert time.monotonic() - started >= 0.3
    assert status == 500
    assert out["__type"] == "com.amazonaws.cloudwatch#InternalServiceFault"
    assert headers["x-amzn-query-error"] == "InternalServiceError;Receiver"
    # A failed request is not forwarded: nothing reached moto.
    assert moto_client(moto_url).list_metrics(Namespace=ns)["Metrics"] == []
    assert f"PutMetricData namespace={ns} datapoints=1 error=InternalServiceFault -> 500" in faulty.log_text()


# ----------------------------------------------------------------------------- botocore's rpc-v2-cbor client

def botocore_cbor_client(endpoint: str, tmp_path: Path):
    """A boto3 CloudWatch client forced onto botocore's own rpc-v2-cbor implementation (an
    independent client), or a skip when the installed botocore has none for CloudWatch."""
    import botocore.parsers
    import botocore.serialize
    import botocore.session

    proto = "smithy-rpc-v2-cbor"
    if proto not in botocore.serialize.SERIALIZERS or proto not in botocore.parsers.PROTOCOL_PARSERS:
        pytest.skip(f"botocore {botocore.__version__} has no {proto} serializer/parser")
    model = copy.deepcopy(botocore.session.get_session().get_component("data_loader")
                          .load_service_model("cloudwatch", "service-2"))
    if proto not in model["metadata"].get("protocols", []):
        pytest.skip(f"botocore {botocore.__version__}'s CloudWatch model does not list {proto}")
    # botocore prefers "json" over "smithy-rpc-v2-cbor": ship a model that offers only CBOR.
    model["metadata"]["protocols"] = [proto]
    model["metadata"]["protocol"] = proto
    models = tmp_path / "models"
    (models / "cloudwatch" / model["metadata"]["apiVersion"]).mkdir(parents=True)
    (models / "cloudwatch" / model["metadata"]["apiVersion"] / "service-2.json").write_text(json.dumps(model))
    session = botocore.session.get_session()
    session.set_config_variable("data_path", str(models))
    client = session.create_client(
        "cloudwatch", endpoint_url=endpoint, region_name=REGION,
        aws_access_key_id="test", aws_secret_access_key="test",
        config=botocore.config.Config(retries={"max_attempts": 1},
                                      request_min_compression_size_bytes=1))  # gzip every body
    assert client.meta.service_model.resolved_protocol == proto
    return client


def test_botocore_rpc_v2_cbor_client_through_the_bridge(bridge, moto_url, tmp_path):
    cw = botocore_cbor_client(bridge.url, tmp_path)
    ns = "S3SqlLoader/BridgeTest/botocore"
    ts = recent_ts()
    when = dt.datetime.fromtimestamp(ts, dt.timezone.utc)
    dims = [{"Name": "Table", "Value": "orders"}]
    cw.put_metric_data(Namespace=ns, MetricData=[
        {"MetricName": "RowsLoaded", "Dimensions": dims, "Timestamp": when, "Value": 7.0, "Unit": "Count"},
        {"MetricName": "BatchRows", "Dimensions": dims, "Timestamp": when,
         "Values": [10.0, 20.0], "Counts": [2.0, 1.0], "Unit": "Count", "StorageResolution": 1},
    ])
    log = bridge.log_text()
    assert f"PutMetricData namespace={ns} datapoints=2 encoding=gzip -> 200" in log

    # Read back both ways: through the bridge (botocore parses our CBOR) and from moto directly.
    for client in (cw, moto_client(moto_url)):
        assert metric_set(client.list_metrics(Namespace=ns)["Metrics"]) >= {
            ("RowsLoaded", frozenset({("Table", "orders")})), ("BatchRows", frozenset({("Table", "orders")}))}
        [dp] = stats(client, ns, "BatchRows", dims, ts)
        assert (dp["SampleCount"], dp["Sum"], dp["Minimum"], dp["Maximum"]) == (3.0, 40.0, 10.0, 20.0)
        assert isinstance(dp["Timestamp"], dt.datetime) and abs(dp["Timestamp"].timestamp() - ts) < 1.0

    got = cw.get_metric_data(MetricDataQueries=[{"Id": "rows", "MetricStat": {
        "Metric": {"Namespace": ns, "MetricName": "RowsLoaded", "Dimensions": dims},
        "Period": 60, "Stat": "Sum"}}], **window(ts))["MetricDataResults"]
    assert [(r["Id"], r["Values"], r["StatusCode"]) for r in got] == [("rows", [7.0], "Complete")]
    assert all(isinstance(t, dt.datetime) for t in got[0]["Timestamps"])

    with pytest.raises(botocore.exceptions.ClientError) as err:
        cw.put_metric_data(Namespace=ns, MetricData=[{
            "MetricName": "X", "Value": 1.0,
            "StatisticValues": {"SampleCount": 1.0, "Sum": 1.0, "Minimum": 1.0, "Maximum": 1.0}}])
    error = err.value.response["Error"]
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    # awsQueryCompatible: botocore takes the query code from x-amzn-query-error.
    assert (error["Code"], error.get("Type")) == ("InvalidParameterCombination", "Sender")
    assert "mutually exclusive" in error["Message"]
