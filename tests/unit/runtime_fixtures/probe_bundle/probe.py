"""Probe the Runtime API as a raw client: next's headers, a wrong request id, an unknown path."""

import http.client
import json
import os
import time


def call(method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(os.environ["AWS_LAMBDA_RUNTIME_API"])
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


status, headers, body = call("GET", "/2018-06-01/runtime/invocation/next")
rid = headers["Lambda-Runtime-Aws-Request-Id"]
wrong = call("POST", f"/2018-06-01/runtime/invocation/not-{rid}/response", b"{}")
unknown = call("GET", "/2018-06-01/runtime/nope")
report = {
    "next": status,
    "event": json.loads(body),
    "arn": headers["Lambda-Runtime-Invoked-Function-Arn"],
    "deadline_left": int(headers["Lambda-Runtime-Deadline-Ms"]) - int(time.time() * 1000),
    "trace": headers["Lambda-Runtime-Trace-Id"],
    "wrong": [wrong[0], json.loads(wrong[2])],
    "unknown": unknown[0],
}
call("POST", f"/2018-06-01/runtime/invocation/{rid}/response", json.dumps(report).encode())
