"""HTTP over keel-vmm's unix API socket, for the Python benchmarks."""
import http.client, json, socket, sys


class UnixHttp(http.client.HTTPConnection):
    def __init__(self, path, timeout=60):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def api(sock, method, target, body=None):
    """One request; the reply's body, or exit naming the request if it is not 200."""
    conn = UnixHttp(sock)
    conn.request(method, target, body=json.dumps(body) if body is not None else None,
                 headers={"Content-Type": "application/json"})
    reply = conn.getresponse()
    text = reply.read().decode()
    conn.close()
    if reply.status != 200:
        sys.exit(f"{sys.argv[0]}: {method} {target} answered {reply.status}: {text}")
    return text
