# One unconnected UDP socket asks the DNS Services 10.96.1.1 to
# 10.96.1.COUNT before it reads any reply; prints, sorted, where each reply
# came from and which pod sent it.
import socket
import struct
import sys

count = int(sys.argv[1])
query = struct.pack(">6H", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x06whoami\x03lab\x00" + struct.pack(">2H", 16, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
for i in range(1, count + 1):
    s.sendto(query, ("10.96.1.%d" % i, 53))
seen = []
for _ in range(count):
    reply, (peer, port) = s.recvfrom(512)
    seen.append("%s:%d %s" % (peer, port, reply[-5:].decode()))
print("\n".join(sorted(seen)))
