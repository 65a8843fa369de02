"""A merchant's endpoint for paywatch's URL hook tests (tests/url_hooks.rs): it verifies each
delivery with the reference Standard Webhooks library (PyPI `standardwebhooks`), answers with
the next scripted status, and prints one JSON line per request on stdout.

Usage: receiver.py --secret whsec_... [--secret whsec_...] [--answers 500,200] [--location URL]

The first line printed is `listening PORT` (127.0.0.1, a free port). Each request's line holds
its headers, its body, and for each --secret the library's verdict (null: verified, else the
error), and whether the library rejects the same delivery with its body tampered with, with its
timestamp header changed, and received 6 minutes later (outside the 5-minute tolerance).
Statuses past the script's end are 200. Runs until stdin closes.
"""

import argparse
import json
import sys
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import standardwebhooks.webhooks as library
from standardwebhooks import Webhook

args = argparse.ArgumentParser()
args.add_argument("--secret", action="append", required=True)
args.add_argument("--answers", default="")
args.add_argument("--location", default="http://127.0.0.1:9/elsewhere")
options = args.parse_args()
answers = [int(a) for a in options.answers.split(",") if a]
lock = threading.Lock()


class Later(datetime):
    """The library's clock, 6 minutes on: a replay outside the tolerance."""

    @classmethod
    def now(cls, tz=None):
        return datetime.now(tz) + timedelta(minutes=6)


def verdict(secret, body, headers):
    try:
        Webhook(secret).verify(body, headers)
        return None
    except Exception as error:  # the library's verdict, whatever its type
        return f"{type(error).__name__}: {error}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        secret = options.secret[0]
        with lock:
            verified = [verdict(s, body, headers) for s in options.secret]
            tampered_body = verdict(secret, body.replace(b'"amount":"', b'"amount":"9'), headers)
            moved = dict(headers, **{"webhook-timestamp": str(int(headers.get("webhook-timestamp", "0")) - 1)})
            tampered_timestamp = verdict(secret, body, moved)
            library.datetime = Later
            try:
                stale = verdict(secret, body, headers)
            finally:
                library.datetime = datetime
            status = answers.pop(0) if answers else 200
        record = {
            "path": self.path,
            "headers": headers,
            "body": body.decode("utf-8", "replace"),
            "verified": verified,
            "tampered_body": tampered_body,
            "tampered_timestamp": tampered_timestamp,
            "stale": stale,
            "status": status,
        }
        self.send_response(status)
        if 300 <= status < 400:
            self.send_header("location", options.location)
        reply = b"refused by the test receiver" if status >= 300 else b"ok"
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)
        with lock:
            print(json.dumps(record), flush=True)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(f"listening {server.server_address[1]}", flush=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
sys.stdin.read()
