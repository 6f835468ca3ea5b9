# Asks the DNS Service at HOST:53 for whoami.lab TXT twice: from an
# unconnected socket (sendto/recvfrom), then from a connected one
# (connect/send/recv and getpeername). Prints who answered each.
import socket
import struct
import sys

host = sys.argv[1]
query = struct.pack(">6H", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x06whoami\x03lab\x00" + struct.pack(">2H", 16, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(query, (host, 53))
reply, (peer, port) = s.recvfrom(512)
print(peer, port, reply[:2].hex(), b"dns-a" in reply)
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.settimeout(3)
c.connect((host, 53))
c.send(query)
reply, (peer, port) = c.recvfrom(512)
print(peer, port, *c.getpeername(), b"dns-a" in reply)
