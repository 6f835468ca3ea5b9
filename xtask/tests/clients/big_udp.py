# Three UDP datagrams of 3000 bytes to HOST:PORT, more than a 1500-byte
# link carries: the kernel sends each in fragments.
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(3):
    s.sendto(b"x" * 3000, (host, port))
