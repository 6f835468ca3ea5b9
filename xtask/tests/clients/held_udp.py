# Connected UDP sockets held open across a change of the DNS Service VIP:53,
# whose backends are dns-a and dns-b (port 5353). The sockets, by MODE:
#   service-and-pod  one through the Service that landed on dns-a, and one
#                    straight to POD_IP; a socket that fails is replaced.
#   service-then-pod two through the Service that landed on dns-a; the
#                    second then connects straight to POD_IP and its peer
#                    is printed.
#   pod              one straight to POD_IP; its SO_COOKIE is printed.
# Then, for each line on stdin, every socket asks once more; the line
# printed holds who answered or the errno each got. An IPv6 VIP makes
# AF_INET6 sockets.
import errno
import socket
import struct
import sys

mode, vip, pod_ip = sys.argv[1], sys.argv[2], sys.argv[3]
SO_COOKIE = 57
query = struct.pack(">6H", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x06whoami\x03lab\x00" + struct.pack(">2H", 16, 1)
service, pod = (vip, 53), (pod_ip, 5353)


FAMILY = socket.AF_INET6 if ":" in vip else socket.AF_INET


def connected(target):
    s = socket.socket(FAMILY, socket.SOCK_DGRAM)
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


if mode == "service-and-pod":
    socks, again = [on_dns_a(), connected(pod)], [service, pod]
elif mode == "service-then-pod":
    socks, again = [on_dns_a(), on_dns_a()], [None, None]
    socks[1].connect(pod)
    print("%s:%d" % socks[1].getpeername()[:2], flush=True)
elif mode == "pod":
    socks, again = [connected(pod)], [None]
    print(" ".join("%02x" % b for b in socks[0].getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)), flush=True)
else:
    sys.exit("unknown mode " + mode)

for _ in sys.stdin:
    words = []
    for i, target in enumerate(again):
        try:
            words.append(ask(socks[i]))
        except OSError as error:
            words.append(errno.errorcode[error.errno])
            if target is not None:
                socks[i] = connected(target)
                words.append(ask(socks[i]))
    print(" ".join(words), flush=True)
