"""Reading a running gitplane from a bench script: its /metrics text and its RSS.

Shared by bench/stall-attack.py and bench/rpc-idle-attack.py."""
import socket


def metrics(addr):
    """The /metrics page of the HTTP listener at addr (host, port), as text."""
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    return out.decode(errors="replace")


def rss_mb(pid):
    """VmRSS of one process, in MB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0
