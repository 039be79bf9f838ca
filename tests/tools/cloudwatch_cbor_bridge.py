#!/usr/bin/env python3
"""CloudWatch Smithy RPC v2 CBOR -> moto bridge, for the tests.

Why it exists: the current `aws-sdk-cloudwatch` Rust crate talks to CloudWatch only over the
Smithy RPC v2 CBOR protocol, while moto (5.2.1) serves CloudWatch only over the Query and JSON
protocols. This small HTTP server accepts the SDK's CBOR requests, replays each one against a
moto server with boto3 (JSON protocol) and answers in CBOR like the real service, so the
loader's metrics can be read back from moto with boto3 or the AWS CLI.

Wire format (Smithy RPC v2 CBOR spec, checked against smithy-rs' aws-smithy-cbor and botocore):
  request   POST {prefix?}/service/GraniteServiceVersion20100801/operation/<Operation>
            smithy-protocol: rpc-v2-cbor, Content-Type: application/cbor (no body: empty input),
            optional Content-Encoding: gzip (PutMetricData has @requestCompression);
            body = CBOR map (definite or indefinite length), timestamps = tag 1 + epoch seconds
            (the Rust SDK writes a float64), doubles = CBOR floats, blobs = byte strings.
  response  200, smithy-protocol: rpc-v2-cbor, Content-Type: application/cbor, CBOR map of the
            output structure (`{}` for PutMetricData). Doubles and timestamps are always written
            as floats: the Rust decoder reads them with minicbor's f64(), which rejects integers.
  error     400/404/500 (the model's httpStatusCode), same headers, body
            {"__type": "com.amazonaws.cloudwatch#<ErrorShape>", "message": "..."} and, since
            CloudWatch is @awsQueryCompatible, header `x-amzn-query-error: <QueryCode>;<Sender|Receiver>`.

Usage: cloudwatch_cbor_bridge.py --moto http://127.0.0.1:MOTOPORT [--port 0] [--region us-east-1]
       [--fail-rate R] [--delay-ms N]
Prints `PORT=<n>` on stdout once listening; logs one line per request on stderr. Any
CloudWatch operation is forwarded (PutMetricData, GetMetricData, GetMetricStatistics,
ListMetrics, ...). The moto region is taken from the request's SigV4 credential scope, else
--region. --delay-ms sleeps after decoding each request, before forwarding and answering it;
--fail-rate answers that (random) share of requests with 500 InternalServiceFault *without*
forwarding them to moto.
"""
from __future__ import annotations

import argparse
import gzip
import random
import re
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import botocore.config
import botocore.exceptions
import cbor2
from botocore import xform_name

SERVICE = "GraniteServiceVersion20100801"
SHAPE_NAMESPACE = "com.amazonaws.cloudwatch"
# The spec routes on the last four path segments and lets a service accept the absolute
# service shape id (with '#' written as '.') as the service name.
PATH_RE = re.compile(rf"^(?:/.*)?/service/(?:{re.escape(SHAPE_NAMESPACE)}\.)?{SERVICE}/operation/([A-Za-z0-9]+)$")
CREDENTIAL_REGION_RE = re.compile(r"Credential=[^/,]+/\d{8}/([a-z0-9-]+)/monitoring/aws4_request")
IGNORED_MEMBERS = {"PutMetricData": ("EntityMetricData", "StrictEntityValidation")}


class BridgeError(Exception):
    """An error answered to the client: status, error shape name, message, query code, fault."""

    def __init__(self, status, shape, message, query_code=None, fault="Sender"):
        super().__init__(message)
        self.status, self.shape, self.message = status, shape, message
        self.query_code, self.fault = query_code, fault


class Bridge:
    def __init__(self, moto_url, region, fail_rate=0.0, delay_ms=0):
        self.moto_url, self.region = moto_url, region
        self.fail_rate, self.delay_ms = fail_rate, delay_ms
        self._clients, self._lock = {}, threading.Lock()
        self.model = self.client(region).meta.service_model
        # Query error code (what moto reports through botocore) -> modeled error shape.
        self.errors_by_code = {}
        for shape in self.model.error_shapes:
            meta = shape.metadata.get("error", {})
            self.errors_by_code[meta.get("code", shape.name)] = shape
            self.errors_by_code[shape.name] = shape

    def client(self, region):
        with self._lock:
            if region not in self._clients:
                self._clients[region] = boto3.client(
                    "cloudwatch", endpoint_url=self.moto_url, region_name=region,
                    aws_access_key_id="test", aws_secret_access_key="test",
                    config=botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=5,
                                                  read_timeout=30))
            return self._clients[region]

    def modeled_error(self, shape_name, message, status=None):
        shape = self.errors_by_code.get(shape_name)
        if shape is None:
            return BridgeError(status or 400, shape_name, message)
        meta = shape.metadata.get("error", {})
        return BridgeError(status or meta.get("httpStatusCode", 400), shape.name, message,
                           meta.get("code", shape.name),
                           "Sender" if meta.get("senderFault") else "Receiver")

    def error_body(self, err):
        body = {"__type": f"{SHAPE_NAMESPACE}#{err.shape}", "message": err.message}
        shape = self.errors_by_code.get(err.shape)
        if shape is not None and "Message" in shape.members:  # e.g. InternalServiceFault
            body["Message"] = err.message
        return body

    def handle(self, operation, headers, raw_body, log):
        """Returns the CBOR-ready output structure or raises BridgeError; fills `log`."""
        if headers.get("smithy-protocol") != "rpc-v2-cbor":
            raise self.modeled_error("ValidationException", "missing header smithy-protocol: rpc-v2-cbor")
        if headers.get("x-amz-target") or headers.get("x-amzn-target"):
            raise self.modeled_error("ValidationException", "rpc-v2-cbor requests must not carry X-Amz-Target")
        if operation not in self.model.operation_names:
            raise BridgeError(404, "UnknownOperationException", f"unknown operation {operation}")
        if raw_body and (headers.get("content-type") or "").split(";")[0].strip() != "application/cbor":
            raise BridgeError(415, "UnsupportedMediaTypeException", "Content-Type must be application/cbor")
        encodings = [e.strip() for e in (headers.get("content-encoding") or "").split(",") if e.strip()]
        try:
            for enc in reversed(encodings):
                if enc != "gzip":
                    raise BridgeError(415, "UnsupportedMediaTypeException", f"Content-Encoding {enc}")
                raw_body = gzip.decompress(raw_body)
            params = drop_nulls(cbor2.loads(raw_body)) if raw_body else {}  # tag 1 -> aware datetime
        except (OSError, EOFError, ValueError, cbor2.CBORDecodeError) as e:
            raise BridgeError(400, "SerializationException", f"cannot decode CBOR body: {e}")
        if not isinstance(params, dict):
            raise BridgeError(400, "SerializationException", "CBOR body is not a map")

        op_model = self.model.operation_model(operation)
        known = op_model.input_shape.members if op_model.input_shape else {}
        ignored = [k for k in params if k not in known or k in IGNORED_MEMBERS.get(operation, ())]
        params = {k: v for k, v in params.items() if k not in ignored}
        if "Namespace" in params:
            log["namespace"] = params["Namespace"]
        if operation == "PutMetricData":
            log["datapoints"] = len(params.get("MetricData") or [])
        if encodings:
            log["encoding"] = ",".join(encodings)
        if ignored:
            log["ignored"] = ",".join(ignored)

        if self.delay_ms:
            time.sleep(self.delay_ms / 1000)
        if self.fail_rate and random.random() < self.fail_rate:
            raise self.modeled_error("InternalServiceFault", "injected fault (--fail-rate)")

        m = CREDENTIAL_REGION_RE.search(headers.get("authorization") or "")
        client = self.client(m.group(1) if m else self.region)
        try:
            out = getattr(client, xform_name(operation))(**params)
        except botocore.exceptions.ParamValidationError as e:
            raise self.modeled_error("ValidationException", str(e), 400)
        except botocore.exceptions.ClientError as e:
            err = e.response.get("Error", {})
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise self.modeled_error(err.get("Code", "InternalServiceFault"), err.get("Message", str(e)), status)
        except botocore.exceptions.BotoCoreError as e:  # moto unreachable, timeouts, ...
            raise self.modeled_error("InternalServiceFault", f"moto: {e}", 500)
        out.pop("ResponseMetadata", None)
        return to_cbor(out, op_model.output_shape)


def drop_nulls(value):
    """CBOR null (and undefined, which the spec reads as null) means an absent member."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None and v is not cbor2.undefined}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def to_cbor(value, shape):
    """Shapes a botocore output value for CBOR: timestamps -> tag 1 float, doubles -> float."""
    if shape is None:  # operation without output: still a CBOR map
        return {}
    kind = shape.type_name
    if kind == "structure":
        return {k: to_cbor(v, shape.members[k]) for k, v in value.items() if k in shape.members}
    if kind == "list":
        return [to_cbor(v, shape.member) for v in value]
    if kind == "map":
        return {k: to_cbor(v, shape.value) for k, v in value.items()}
    if kind == "timestamp":
        return cbor2.CBORTag(1, float(value.timestamp()))
    if kind in ("double", "float"):
        return float(value)
    if kind in ("integer", "long", "short", "byte"):
        return int(value)
    return value


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
    bridge: Bridge = None

    def do_POST(self):
        started = time.monotonic()
        body = self.read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        m = PATH_RE.match(self.path.split("?", 1)[0])
        operation = m.group(1) if m else "?"
        log, extra = {}, {}
        try:
            if not m:
                raise BridgeError(404, "UnknownOperationException", f"no RPC v2 route for {self.path}")
            status, payload = 200, self.bridge.handle(operation, headers, body, log)
        except BridgeError as e:
            status, payload = e.status, self.bridge.error_body(e)
            if e.query_code:
                extra["x-amzn-query-error"] = f"{e.query_code};{e.fault}"
            log["error"] = e.shape
        except Exception as e:  # never leave the client without an answer
            status, payload = 500, {"__type": f"{SHAPE_NAMESPACE}#InternalServiceFault",
                                    "message": f"bridge bug: {e!r}", "Message": f"bridge bug: {e!r}"}
            log["error"] = repr(e)
        data = cbor2.dumps(payload)
        self.send_response(status)
        self.send_header("smithy-protocol", "rpc-v2-cbor")
        self.send_header("Content-Type", "application/cbor")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-requestid", str(uuid.uuid4()))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        fields = " ".join(f"{k}={v}" for k, v in log.items())
        print(f"cbor-bridge: {operation} {fields} -> {status} ({(time.monotonic() - started) * 1000:.0f} ms)",
              file=sys.stderr, flush=True)

    def read_body(self):
        if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)

    def log_message(self, format, *args):  # one line per request is printed by do_POST
        pass


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    p.add_argument("--moto", required=True, help="moto server URL, e.g. http://127.0.0.1:5000")
    p.add_argument("--region", default="us-east-1", help="region when the request has no SigV4 scope")
    p.add_argument("--fail-rate", type=float, default=0.0, help="share of requests answered 500")
    p.add_argument("--delay-ms", type=int, default=0, help="sleep before handling each request")
    args = p.parse_args(argv)
    if not 0.0 <= args.fail_rate <= 1.0:
        p.error("--fail-rate must be between 0 and 1")
    Handler.bridge = Bridge(args.moto.rstrip("/"), args.region, args.fail_rate, args.delay_ms)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"PORT={server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
