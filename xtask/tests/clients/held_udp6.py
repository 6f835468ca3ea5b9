# Two connected AF_INET6 UDP sockets held open across a change of the DNS
# Service [VIP]:53, whose backends are dns-a and dns-b (port 5353): one
# through the Service that landed on dns-a, and one straight to
# [POD_IP]:5353. For each line on stdin, each socket asks once more; the
# line printed holds who answered or the errno each got, and a socket that
# failed is replaced by a new one to the same address, which asks again.
import errno
import socket
import struct
import sys

vip, pod_ip = sys.argv[1], sys.argv[2]
query = struct.pack(">6H", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x06whoami\x03lab\x00" + struct.pack(">2H", 16, 1)
service, pod = (vip, 53), (pod_ip, 5353)


def connected(target):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect(target)
    return s


def ask(s):
    s.send(query)
    answer = s.recv(512)
    return "dns-a" if b"dns-a" in answer else "dns-b" if b"dns-b" in answer else "?"


def on_dns_a():
    for _ in range(100):
        s = connected(service)
        if ask(s) == "dns-a":
            return s
        s.close()
    sys.exit("the Service never chose dns-a")


targets = [service, pod]
socks = [on_dns_a(), connected(pod)]
for _ in sys.stdin:
    words = []
    for i, target in enumerate(targets):
        try:
            words.append(ask(socks[i]))
        except OSError as error:
            words.append(errno.errorcode[error.errno])
            socks[i] = connected(target)
            words.append(ask(socks[i]))
    print(" ".join(words), flush=True)
