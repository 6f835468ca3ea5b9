# Two flows from one source port (40123): through the NodePort
# NODE_IP:30090 until web-1a answers, then straight to POD_IP:8080. Prints
# both answers. SO_REUSEADDR: each connection may leave the port in
# TIME_WAIT.
import socket
import sys

node_ip, pod_ip = sys.argv[1], sys.argv[2]


def get(target):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", 40123))
    s.settimeout(5)
    try:
        s.connect(target)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return s.makefile().read().split()[-1]
    except OSError as error:
        return str(error)
    finally:
        s.close()


for _ in range(30):
    first = get((node_ip, 30090))
    if first == "web-1a":
        break
print(first)
print(get((pod_ip, 8080)))
