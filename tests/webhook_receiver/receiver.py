"""The tests' webhook receiver: records every delivery and verifies its signature with the
Standard Webhooks reference library (PyPI `standardwebhooks`), not with the platform's code.

    receiver.py --port PORT      (0: any; prints "listening 127.0.0.1:PORT" first)

`POST /hooks/<name>` is a delivery to the endpoint `<name>`, answered as its mode says: `ok` (200),
`fail` (500), `hang` (never answered; the client gives up) or `slow:<ms>` (200 after that delay).
Control, JSON: `PUT /_control/endpoints/<name>` {"secrets": [...], "mode": "..."},
`GET /_control/deliveries[?name=<name>]`, `DELETE /_control/deliveries`, `POST /_control/close`
(answers no delivery from then on and returns every one recorded: what a test keeps before it
kills the receiver). Loopback only.
"""

import argparse
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from standardwebhooks.webhooks import Webhook

lock = threading.Lock()
endpoints = {}  # name -> {"secrets": [...], "mode": "ok"}
deliveries = []
closed = False


def verification(secrets, body, headers):
    """(verified, why not) with any of the endpoint's secrets."""
    errors = []
    for secret in secrets:
        try:
            Webhook(secret).verify(body, headers)
            return True, None
        except Exception as error:  # the library's own verdict, whatever it is
            errors.append(f"{type(error).__name__}: {error}")
    return False, "; ".join(errors) or "no secret configured"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        # Headers and body are two writes: without this, Nagle's algorithm and the client's
        # delayed ACK hold every answer about 40 ms.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *arguments):
        pass

    def reply(self, status, document=None):
        body = b"" if document is None else json.dumps(document).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body(self):
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def do_POST(self):
        path = urlparse(self.path).path
        if path == "/_control/close":
            return self.do_POST_control()
        if not path.startswith("/hooks/"):
            return self.reply(404)
        name = path[len("/hooks/"):]
        body = self.body()
        with lock:
            endpoint = dict(endpoints.get(name, {"secrets": [], "mode": "ok"}))
        headers = {key.lower(): value for key, value in self.headers.items()}
        verified, verify_error = verification(endpoint["secrets"], body, headers)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = body.decode("utf-8", "replace")
        mode = endpoint["mode"]
        answered = None if mode == "hang" else (500 if mode == "fail" else 200)
        record = {
            "name": name,
            "webhook_id": headers.get("webhook-id", ""),
            "timestamp": headers.get("webhook-timestamp", ""),
            "signature": headers.get("webhook-signature", ""),
            "verified": verified,
            "verify_error": verify_error,
            "body": parsed,
            "mode": mode,
            "answered": answered,
            "received_at": time.time(),
        }
        if mode.startswith("slow:"):
            time.sleep(int(mode[len("slow:"):]) / 1000)
        # Recorded before the answer (the dispatcher sends its next delivery only after this one's
        # answer, so the records keep the order of the deliveries), unless closed: then dropped
        # unanswered, as a receiver that is down would.
        with lock:
            if not closed:
                deliveries.append(record)
        if closed or mode == "hang":
            # Held until the client gives up and closes the connection.
            if mode == "hang":
                self.rfile.read(1)
            self.close_connection = True
            return
        self.reply(answered, {"received": True})

    def do_POST_control(self):
        global closed
        with lock:
            closed = True
            recorded = list(deliveries)
        self.reply(200, {"deliveries": recorded})

    def do_PUT(self):
        path = urlparse(self.path).path
        if not path.startswith("/_control/endpoints/"):
            return self.reply(404)
        name = path[len("/_control/endpoints/"):]
        change = json.loads(self.body() or b"{}")
        with lock:
            endpoint = endpoints.setdefault(name, {"secrets": [], "mode": "ok"})
            endpoint.update({key: change[key] for key in ("secrets", "mode") if key in change})
        self.reply(200, endpoint)

    def do_GET(self):
        url = urlparse(self.path)
        if url.path != "/_control/deliveries":
            return self.reply(404)
        name = parse_qs(url.query).get("name", [None])[0]
        with lock:
            selected = [d for d in deliveries if name is None or d["name"] == name]
        self.reply(200, {"deliveries": selected})

    def do_DELETE(self):
        if urlparse(self.path).path != "/_control/deliveries":
            return self.reply(404)
        with lock:
            deliveries.clear()
        self.reply(200, {})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    port = parser.parse_args().port
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"listening 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
