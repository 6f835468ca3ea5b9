# Connects COUNT UDP sockets to HOST:53 and keeps them all open; prints how
# many show each peer, then asks dns-a through the first and the last and
# prints where each reply came from.
import resource
import socket
import struct
import sys

host, count = sys.argv[1], int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
query = struct.pack(">6H", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x06whoami\x03lab\x00" + struct.pack(">2H", 16, 1)
socks = []
for _ in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, 53))
    socks.append(s)
peers = {}
for s in socks:
    peer = "%s:%d" % s.getpeername()
    peers[peer] = peers.get(peer, 0) + 1
print(peers)
for s in (socks[0], socks[-1]):
    s.settimeout(3)
    s.send(query)
    reply, (peer, port) = s.recvfrom(512)
    print(peer, port, b"dns-a" in reply)
